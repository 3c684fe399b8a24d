"""Gradient Map Estimation: the gradient of a guard classifier's loss w.r.t. its input, without the true label.

At inference the true label is unknown, so the loss is built from the guard's own belief:

* ``argmax``: cross-entropy against the predicted label;
* ``topk``:  sum_j p_j * CE(logits, j) over the ``k`` most probable labels, p renormalised over them (our default:
  on an adversarial image the true class is usually still among the top few, so its gradient gets a say);
* ``oracle``: cross-entropy against the true label; for ablations only (the restorer and service refuse it).

Per-sample ``scale``: ``std`` (divide by the map's RMS: magnitudes comparable across images, differentiable),
``maxabs`` (into [-1, 1]), ``sign`` (the direction FGSM/PGD step along; zero derivative), or ``none``.

    >>> g = estimate_gradient_map(x, guard, mode="topk", k=3)          # (N, C, H, W), same as x
    >>> g = estimate_gradient_map(x, guard, create_graph=True)         # differentiable in x: adaptive attacks
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trn.errors import ConfigError, InputError
from trn.validation import check_images, check_labels

__all__ = ["MODES", "SCALES", "GradientMapEstimator", "estimate_gradient_map"]

MODES = ("argmax", "topk", "oracle")
SCALES = ("std", "maxabs", "sign", "none")
Mode = Literal["argmax", "topk", "oracle"]
Scale = Literal["std", "maxabs", "sign", "none"]


def _label_weights(logits: torch.Tensor, mode: str, k: int, y: torch.Tensor | None) -> torch.Tensor:
    """(B, num_classes) non-negative weights over labels, each row summing to 1. Constant (detached)."""
    logits = logits.detach()
    n_cls = logits.shape[1]
    if mode == "oracle":
        if y is None:
            raise InputError("the 'oracle' gradient map needs the true labels y")
        check_labels(y, len(logits), n_cls, name="y")
        return F.one_hot(y.to(logits.device), n_cls).to(logits.dtype)
    if mode == "argmax":
        return F.one_hot(logits.argmax(1), n_cls).to(logits.dtype)
    kk = min(k, n_cls)
    probs = logits.softmax(1)
    top_p, top_i = probs.topk(kk, dim=1)
    w = torch.zeros_like(probs).scatter_(1, top_i, top_p)
    return w / w.sum(1, keepdim=True).clamp_min(1e-12)


def _check_settings(mode: str, k: int, scale: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown gradient-map mode {mode!r}; choose from {list(MODES)}")
    if scale not in SCALES:
        raise ConfigError(f"unknown gradient-map scale {scale!r}; choose from {list(SCALES)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"top-k needs an integer k >= 1, got {k!r}")


def _scale(g: torch.Tensor, scale: str) -> torch.Tensor:
    if scale == "none":
        return g
    if scale == "sign":
        return g.sign()
    flat = g.flatten(1)
    if scale == "std":
        d = flat.pow(2).mean(1).add(1e-24).sqrt()
    else:  # maxabs
        d = flat.abs().amax(1).clamp_min(1e-12)
    return g / d.view(-1, *([1] * (g.ndim - 1)))


def estimate_gradient_map(
    x: torch.Tensor,
    classifier: nn.Module,
    mode: Mode = "topk",
    k: int = 3,
    scale: Scale = "std",
    y: torch.Tensor | None = None,
    create_graph: bool = False,
) -> torch.Tensor:
    """Estimated input-gradient map of ``classifier``'s loss at ``x``.

    Args:
        x: (B, C, H, W) images in [0, 1].
        classifier: [0, 1] images -> logits. Put in eval mode for the call; its previous mode is restored.
        mode: how labels are chosen: ``argmax``, ``topk`` or ``oracle`` (needs ``y``).
        k: number of labels for ``topk``.
        scale: per-sample normalisation (see module docstring).
        y: true labels, only for ``oracle``.
        create_graph: keep the graph so the map is differentiable w.r.t. ``x`` (adaptive attacks, training through
            it). The label weights are treated as constants either way.

    Returns:
        (B, C, H, W) map. Detached unless ``create_graph``. No parameter gradient accumulates in ``classifier``,
        and the training mode of each of its submodules is restored (a frozen BatchNorm stays frozen).

    Raises:
        ConfigError: unknown ``mode`` / ``scale``, or ``k`` not a positive integer.
        InputError / ShapeError: ``x`` not a finite float (B, C, H, W) batch in [0, 1]; bad or missing ``y``
            for ``oracle``.

    Shape:
        x: (B, C, H, W) -> (B, C, H, W)
    """
    _check_settings(mode, k, scale)
    check_images(x, allow_empty=True, name="x")
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    modes = [(m, m.training) for m in classifier.modules()]
    classifier.eval()
    try:
        with torch.enable_grad():
            xg = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
            logits = classifier(xg)
            w = _label_weights(logits, mode, k, y)
            # sum_j w_j CE(z, j) = logsumexp(z) - sum_j w_j z_j  (rows of w sum to 1): one backward pass for any k.
            loss = (torch.logsumexp(logits, 1) - (w * logits).sum(1)).sum()
            (g,) = torch.autograd.grad(loss, xg, create_graph=create_graph)
    finally:
        for m, training in modes:
            m.train(training)
    g = _scale(g, scale)
    return g if create_graph else g.detach()


class GradientMapEstimator(nn.Module):
    """Module form of :func:`estimate_gradient_map`; holds the settings, not the classifier.

    Example:
        >>> est = GradientMapEstimator(mode="topk", k=3)
        >>> g = est(x, guard)
    """

    def __init__(self, mode: Mode = "topk", k: int = 3, scale: Scale = "std") -> None:
        super().__init__()
        _check_settings(mode, k, scale)
        self.mode, self.k, self.scale = mode, k, scale

    def forward(self, x: torch.Tensor, classifier: nn.Module, y: torch.Tensor | None = None,
                create_graph: bool = False) -> torch.Tensor:
        return estimate_gradient_map(x, classifier, self.mode, self.k, self.scale, y, create_graph)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, k={self.k}, scale={self.scale!r}"

    def settings(self) -> dict:
        return {"mode": self.mode, "k": self.k, "scale": self.scale}
