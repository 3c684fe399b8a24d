"""Gradient Map Estimation: the gradient of a guard classifier's loss w.r.t. its input, without the true label.

At inference the true label is unknown, so the loss is built from the guard's own belief:

* ``argmax``: cross-entropy against the predicted label. Just across a decision boundary its gradient points back
  across it, but on clean images it looks like an attack direction too;
* ``topk``:  sum_j p_j * CE(logits, j) over the ``k`` most probable labels, p renormalised over them (this module's
  default: the TRN trained on it keeps clean images best). Its logit gradient is ``softmax - p``, which vanishes where the
  top k hold almost all the mass, i.e. at a decision boundary (see docs/design.md for what that costs);
* ``hybrid``: ``argmax`` where the guard is unsure (top-1 probability below ``confidence``, i.e. near a decision
  boundary, where the ``topk`` map vanishes), ``topk`` elsewhere; chosen per sample, one backward pass (what the
  shipped TRN reads);
* ``oracle``: cross-entropy against the true label; for ablations only (the restorer and service refuse it).

* ``dual``: the ``topk`` and the ``argmax`` maps stacked along channels, (B, 2C, H, W): what each sees, for a net
  that can use both (two backward passes).

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

__all__ = ["MODES", "SCALES", "GradientMapEstimator", "estimate_gradient_map", "map_channels"]

MODES = ("argmax", "topk", "hybrid", "oracle", "dual")
SCALES = ("std", "maxabs", "sign", "none")
Mode = Literal["argmax", "topk", "hybrid", "oracle", "dual"]
_PARTS = {"argmax": ("argmax",), "topk": ("topk",), "hybrid": ("hybrid",), "oracle": ("oracle",),
          "dual": ("topk", "argmax")}


def map_channels(mode: str, channels: int) -> int:
    """Channels of the map ``mode`` gives for ``channels``-channel images (``dual`` stacks two maps)."""
    if mode not in _PARTS:
        raise ConfigError(f"unknown gradient-map mode {mode!r}; choose from {list(MODES)}")
    return len(_PARTS[mode]) * channels
Scale = Literal["std", "maxabs", "sign", "none"]


def _label_weights(logits: torch.Tensor, mode: str, k: int, y: torch.Tensor | None,
                   confidence: float = 0.6) -> torch.Tensor:
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
    w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
    if mode == "hybrid":  # unsure -> the predicted label alone, whose map still points across the boundary
        unsure = (top_p[:, :1] < confidence).to(w.dtype)
        w = unsure * F.one_hot(top_i[:, 0], n_cls).to(w.dtype) + (1 - unsure) * w
    return w


def _check_settings(mode: str, k: int, scale: str, confidence: float = 0.6) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown gradient-map mode {mode!r}; choose from {list(MODES)}")
    if scale not in SCALES:
        raise ConfigError(f"unknown gradient-map scale {scale!r}; choose from {list(SCALES)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"top-k needs an integer k >= 1, got {k!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 < confidence <= 1:
        raise ConfigError(f"the hybrid map's confidence threshold must lie in (0, 1], got {confidence!r}")


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
    confidence: float = 0.6,
) -> torch.Tensor:
    """Estimated input-gradient map of ``classifier``'s loss at ``x``.

    Args:
        x: (B, C, H, W) images in [0, 1].
        classifier: [0, 1] images -> logits. Put in eval mode for the call; its previous mode is restored.
        mode: how labels are chosen: ``argmax``, ``topk``, ``hybrid`` (per sample, see module docstring), ``dual``
            (topk and argmax, stacked) or ``oracle`` (needs ``y``).
        k: number of labels for ``topk``.
        scale: per-sample normalisation (see module docstring).
        y: true labels, only for ``oracle``.
        create_graph: keep the graph so the map is differentiable w.r.t. ``x`` (adaptive attacks, training through
            it). The label weights are treated as constants either way.
        confidence: ``hybrid`` uses the argmax map where the guard's top-1 probability is below this.

    Returns:
        (B, C, H, W) map ((B, 2C, H, W) for ``dual``, each half scaled on its own). Detached unless ``create_graph``. No parameter gradient accumulates in ``classifier``,
        and the training mode of each of its submodules is restored (a frozen BatchNorm stays frozen).

    Raises:
        ConfigError: unknown ``mode`` / ``scale``, or ``k`` not a positive integer.
        InputError / ShapeError: ``x`` not a finite float (B, C, H, W) batch in [0, 1]; bad or missing ``y``
            for ``oracle``.

    Shape:
        x: (B, C, H, W) -> (B, C, H, W), or (B, 2C, H, W) for ``dual``
    """
    _check_settings(mode, k, scale, confidence)
    check_images(x, allow_empty=True, name="x")
    if x.shape[0] == 0:
        return x.new_zeros(0, map_channels(mode, x.shape[1]), *x.shape[2:])
    parts = _PARTS[mode]
    modes = [(m, m.training) for m in classifier.modules()]
    classifier.eval()
    try:
        with torch.enable_grad():
            xg = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
            logits = classifier(xg)
            lse = torch.logsumexp(logits, 1)
            maps = []
            for i, part in enumerate(parts):
                w = _label_weights(logits, part, k, y, confidence)
                # sum_j w_j CE(z, j) = logsumexp(z) - sum_j w_j z_j  (rows of w sum to 1): one backward pass per map.
                loss = (lse - (w * logits).sum(1)).sum()
                keep = create_graph or i < len(parts) - 1
                (g,) = torch.autograd.grad(loss, xg, create_graph=create_graph, retain_graph=keep)
                maps.append(_scale(g, scale))
    finally:
        for m, training in modes:
            m.train(training)
    g = maps[0] if len(maps) == 1 else torch.cat(maps, 1)
    return g if create_graph else g.detach()


class GradientMapEstimator(nn.Module):
    """Module form of :func:`estimate_gradient_map`; holds the settings, not the classifier.

    Example:
        >>> est = GradientMapEstimator(mode="topk", k=3)
        >>> g = est(x, guard)
    """

    def __init__(self, mode: Mode = "topk", k: int = 3, scale: Scale = "std", confidence: float = 0.6) -> None:
        super().__init__()
        _check_settings(mode, k, scale, confidence)
        self.mode, self.k, self.scale, self.confidence = mode, k, scale, float(confidence)

    def forward(self, x: torch.Tensor, classifier: nn.Module, y: torch.Tensor | None = None,
                create_graph: bool = False) -> torch.Tensor:
        return estimate_gradient_map(x, classifier, self.mode, self.k, self.scale, y, create_graph, self.confidence)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, k={self.k}, scale={self.scale!r}, confidence={self.confidence:g}"

    def settings(self) -> dict:
        extra = {"confidence": self.confidence} if self.mode == "hybrid" else {}
        return {"mode": self.mode, "k": self.k, "scale": self.scale, **extra}
