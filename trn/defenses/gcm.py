"""Gradient Concealment Module (GCM; "Gradient Concealment: Free Lunch for Defending Adversarial Attacks",
arXiv 2205.10617): a parameter-free layer put first in a classifier, ``GCM(x) = x + eps * sin(w * x)``.

With the published defaults (``w = 1e20``, ``eps = 1e-8``) the forward output moves by about one float32 rounding
step, while the input gradient is multiplied by ``1 + w * eps * cos(w * x)``: about +-1e12 with a pseudo-random sign
per pixel. That is gradient shattering (Athalye et al. 2018): the defence hides gradients rather than removing
adversarial directions, so BPDA (``bpda=True``: identity backward) and score-based attacks (Square) go around it.
It is here as a baseline that a fair evaluation must break, not as a recommendation.

    >>> model = GCMClassifier(classifier)                 # same predictions, useless gradients
    >>> bpda_model = GCMClassifier(classifier, bpda=True) # what an adaptive attacker uses
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trn.defenses.base import InputTransform, has_feature_split
from trn.errors import ConfigError
from trn.validation import check_images

__all__ = ["GCM", "GCMClassifier", "gcm"]


def _check_params(w: float, eps: float) -> None:
    for name, v in (("w", w), ("eps", eps)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"GCM: {name} must be a finite number, got {v!r}")
    if eps < 0:
        raise ConfigError(f"GCM: eps must be >= 0, got {eps}")


def gcm(x: torch.Tensor, w: float = 1e20, eps: float = 1e-8) -> torch.Tensor:
    """Gradient concealment: ``x + eps * sin(w * x)``.

    Args:
        x: images in [0, 1].
        w: frequency (published default 1e20).
        eps: amplitude (published default 1e-8).

    Returns:
        Same shape and dtype as ``x``, clamped to [0, 1] (a pixel within ``eps`` of 0 or 1 could otherwise leave the
        pixel range and trip the input checks of whatever comes next). Half-precision inputs are computed in
        float32 (``w * x`` would overflow).

    Shape:
        (N, C, H, W) -> (N, C, H, W)

    Example:
        >>> x = torch.rand(2, 1, 28, 28)
        >>> float((gcm(x) - x).abs().max()) <= 1e-8
        True
    """
    _check_params(w, eps)
    check_images(x, allow_empty=True, name="x")
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return (xf + eps * torch.sin(w * xf)).clamp(0.0, 1.0).to(x.dtype)


class GCM(InputTransform):
    """Module form of :func:`gcm`. ``differentiable`` is False: its exact gradient is shattered, use BPDA.

    Args:
        w: frequency.
        eps: amplitude.
        bpda: identity in the backward pass (the forward output is unchanged).
    """

    differentiable = False

    def __init__(self, w: float = 1e20, eps: float = 1e-8, bpda: bool = False) -> None:
        super().__init__(bpda)
        _check_params(w, eps)
        self.w, self.eps = float(w), float(eps)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return gcm(x, self.w, self.eps)

    def extra_repr(self) -> str:
        return f"w={self.w:g}, eps={self.eps:g}, bpda={self.bpda}"


class GCMClassifier(nn.Module):
    """``classifier(GCM(x))`` for any classifier module ([0, 1] in, logits out).

    ``forward_features`` / ``forward_head`` pass through (with GCM applied before the features) when the inner
    classifier has them, so UniG can be stacked on top.

    Args:
        classifier: the model to protect.
        w: GCM frequency.
        eps: GCM amplitude.
        bpda: identity backward through the GCM layer (for adaptive evaluation).
    """

    def __init__(self, classifier: nn.Module, w: float = 1e20, eps: float = 1e-8, bpda: bool = False) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Module):
            raise ConfigError(f"GCMClassifier needs an nn.Module classifier, got {type(classifier).__name__}")
        self.gcm = GCM(w, eps, bpda)
        self.classifier = classifier
        if hasattr(classifier, "num_classes"):
            self.num_classes = classifier.num_classes

    @property
    def has_feature_split(self) -> bool:
        return has_feature_split(self.classifier)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_feature_split:
            raise ConfigError(f"the wrapped {type(self.classifier).__name__} has no forward_features/forward_head")
        return self.classifier.forward_features(self.gcm(x))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        if not self.has_feature_split:
            raise ConfigError(f"the wrapped {type(self.classifier).__name__} has no forward_features/forward_head")
        return self.classifier.forward_head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.gcm(x))
