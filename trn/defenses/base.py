"""Pieces shared by the defences: straight-through (BPDA) wrapping and the input-transform base class.

BPDA (Athalye et al. 2018, "Obfuscated Gradients") attacks a non-differentiable or gradient-shattering transform
``t`` by using ``t(x)`` in the forward pass and the identity in the backward pass. Every input-side defence here can
do that, either always (``bpda=True``) or on demand (:meth:`InputTransform.bpda_forward`), so evaluators can attack
each defence both ways.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from trn.errors import ConfigError

__all__ = ["BPDAPolicy", "InputTransform", "bpda_policy", "has_feature_split", "is_randomized", "reads_gradient_map",
           "straight_through", "takes_create_graph"]

BPDAPolicy = Literal["as_built", "nondifferentiable", "all"]


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


def is_randomized(module: nn.Module) -> bool:
    """Whether any part of ``module`` says its output is random (a ``randomized = True`` attribute, e.g. UniG)."""
    return any(getattr(m, "randomized", False) is True for m in module.modules())


@contextmanager
def bpda_policy(module: nn.Module, policy: BPDAPolicy = "nondifferentiable") -> Iterator[nn.Module]:
    """Temporarily switch the BPDA (identity-backward) flag of every stage inside ``module``.

    A stage is any submodule with a boolean ``bpda`` attribute (input transforms, GCM, the TRN stage). The forward
    output never changes; only what an attacker's gradient sees does.

    Args:
        module: a defended model (e.g. a :class:`~trn.defenses.stack.DefenseStack`).
        policy: ``"as_built"``: leave the flags (the naive attack); ``"nondifferentiable"``: BPDA where the exact
            gradient is useless (``differentiable = False``: bit depth, GCM), autograd elsewhere (the end-to-end
            adaptive attack); ``"all"``: BPDA for every stage (a purifier treated as the identity).

    Example:
        >>> with bpda_policy(stack, "nondifferentiable"):
        ...     x_adv = PGD(eps=0.1, steps=40)(stack, x, y)
    """
    if policy not in ("as_built", "nondifferentiable", "all"):
        raise ConfigError(f"BPDA policy must be 'as_built', 'nondifferentiable' or 'all', got {policy!r}")
    stages = [m for m in module.modules() if isinstance(getattr(m, "bpda", None), bool)]
    saved = [m.bpda for m in stages]
    try:
        for m in stages:
            if policy == "all" or (policy == "nondifferentiable" and not getattr(m, "differentiable", True)):
                m.bpda = True
        yield module
    finally:
        for m, flag in zip(stages, saved):
            m.bpda = flag


def takes_create_graph(restorer: Any) -> bool:
    """Whether a restorer (module or callable) accepts ``create_graph=`` (a TRN :class:`~trn.restorer.Restorer`
    does: its gradient map can then be differentiated)."""
    fwd = restorer.forward if isinstance(restorer, nn.Module) else restorer
    try:
        return "create_graph" in inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return False


def reads_gradient_map(restorer: Any) -> bool:
    """Whether a restorer reads a gradient map: a two-stream TRN, or a pair (``reads_gradient_map`` attribute, e.g.
    :class:`~trn.defenses.fallback.FallbackRestorer`) of which either does."""
    reads = getattr(restorer, "reads_gradient_map", None)
    if reads is not None:
        return bool(reads)
    return bool(getattr(getattr(getattr(restorer, "net", None), "cfg", None), "two_stream", False))
