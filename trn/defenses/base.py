"""Pieces shared by the defences: straight-through (BPDA) wrapping and the input-transform base class.

BPDA (Athalye et al. 2018, "Obfuscated Gradients") attacks a non-differentiable or gradient-shattering transform
``t`` by using ``t(x)`` in the forward pass and the identity in the backward pass. Every input-side defence here can
do that, either always (``bpda=True``) or on demand (:meth:`InputTransform.bpda_forward`), so evaluators can attack
each defence both ways.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["straight_through", "InputTransform", "has_feature_split"]


def straight_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` in the forward pass, identity to ``x`` in the backward pass (BPDA with g(x) = x).

    Args:
        x: the transform's input.
        y: the transform's output, same shape as ``x``.

    Returns:
        A tensor equal to ``y`` whose gradient w.r.t. ``x`` is the identity.

    Example:
        >>> x = torch.rand(2, 1, 4, 4, requires_grad=True)
        >>> straight_through(x, x.round()).sum().backward()
        >>> bool((x.grad == 1).all())
        True
    """
    return x + (y - x).detach()


class InputTransform(nn.Module):
    """Base of the input-side defences: ``forward(x) = transform(x)``, or its BPDA version when ``bpda=True``.

    Subclasses implement :meth:`transform` and set the class attribute ``differentiable``: ``True`` when autograd's
    gradient through the transform is exact and informative (blur, differentiable JPEG), ``False`` when it is zero
    almost everywhere or shattered (bit-depth reduction, GCM), i.e. when an evaluator should attack it with BPDA.

    Args:
        bpda: use the identity in the backward pass of :meth:`forward` (the forward output is unchanged).
    """

    differentiable: bool = True

    def __init__(self, bpda: bool = False) -> None:
        super().__init__()
        self.bpda = bool(bpda)

    def transform(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def bpda_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The transform's output with an identity backward pass, whatever ``self.bpda`` says."""
        return straight_through(x, self.transform(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bpda_forward(x) if self.bpda else self.transform(x)

    def extra_repr(self) -> str:
        return f"bpda={self.bpda}"


def has_feature_split(model: nn.Module) -> bool:
    """Whether ``model`` really offers ``forward_features`` / ``forward_head`` (the split UniG needs).

    A model may say so itself with a boolean ``has_feature_split`` attribute (wrappers do); a
    :class:`~trn.classifiers.WrappedClassifier` has the split only when built with ``features=`` and ``head=``.
    """
    flag = getattr(model, "has_feature_split", None)
    if isinstance(flag, bool):
        return flag
    from trn.classifiers import WrappedClassifier

    if isinstance(model, WrappedClassifier):
        return model.features_module is not None and model.head_module is not None
    return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))
