"""DeepDefense gradient-feature alignment (GFA; Lin, Yeap, Kiringa, Zhang, "Layer-Wise Gradient-Feature Alignment
for Building Robust Neural Networks") as a training regulariser.

No public code exists; this is our reading (papers.md): ``loss = task + lambda * sum_l (1 - cos(dL/dh_l, h_l))`` over
chosen layers ``h_l``, averaged over the batch, with ``L`` the cross-entropy of the true labels.

Layers:
    * ``"first"`` (FIRST): only the input, ``h_0``. Our images are in [0, 1]; the paper's inputs are in [-1, 1], so
      ``h_0 = 2x - 1`` (cosine is scale-invariant, so the gradient w.r.t. ``x`` can be used as is).
    * ``"deep"`` (DEEP): ``h_0`` plus the output of each conv block, captured with forward hooks: the two pooling
      layers of :class:`~trn.classifiers.SmallCNN`, ``layer1``-``layer4`` of :class:`~trn.classifiers.ResNet18`,
      every ``nn.Conv2d`` of any other model.
    * a list of module names (``model.named_modules()``) for ``h_0`` plus those outputs.

The term is computed with ``create_graph=True`` so it trains (double backward). Reviewers suspected that GFA's
reported gains come from gradient obfuscation: evaluate GFA-trained models with adaptive and score-based attacks.

    >>> penalty = gfa_penalty(model, x, y, layers="deep")
    >>> (F.cross_entropy(model(x), y) + 0.5 * penalty).backward()
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trn.errors import ConfigError
from trn.validation import check_images, check_labels

__all__ = ["GFA_LAYER_CHOICES", "gfa_layer_names", "gfa_penalty"]

GFA_LAYER_CHOICES = ("first", "deep")


def gfa_layer_names(model: nn.Module, layers: str | Sequence[str] = "first") -> list[str]:
    """Names of the modules whose outputs the penalty aligns, besides the input (empty for ``"first"``).

    Raises:
        ConfigError: unknown choice, or a module name the model does not have.
    """
    modules = dict(model.named_modules())
    if isinstance(layers, str):
        if layers == "first":
            return []
        if layers != "deep":
            raise ConfigError(f"GFA layers must be one of {list(GFA_LAYER_CHOICES)} or a list of module names, "
                              f"got {layers!r}")
        from trn.classifiers import ResNet18, SmallCNN

        if isinstance(model, SmallCNN):
            return [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
        if isinstance(model, ResNet18):
            return [f"body.layer{i}" for i in range(1, 5)]
        names = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        if not names:
            raise ConfigError(f"GFA 'deep': {type(model).__name__} has no nn.Conv2d layers; name the layers instead")
        return names
    names = list(layers)
    unknown = [n for n in names if n not in modules or n == ""]
    if unknown:
        raise ConfigError(f"GFA: {type(model).__name__} has no module(s) {unknown}; "
                          f"some valid names: {[n for n in modules if n][:12]}")
    return names


def gfa_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers: str | Sequence[str] = "first",
                create_graph: bool = True, return_logits: bool = False, eps: float = 1e-8,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gradient-feature alignment penalty ``sum_l mean_batch (1 - cos(dL/dh_l, h_l))``, in [0, 2 * n_layers].

    Args:
        model: classifier, [0, 1] images in, logits out (its current train/eval mode is used as is).
        x: (B, C, H, W) images in [0, 1]. If ``x`` already requires grad it is used as it is (so the penalty can
            itself be differentiated w.r.t. ``x``); otherwise a detached copy is made to require grad.
        y: (B,) true labels.
        layers: ``"first"``, ``"deep"`` or module names (see module docstring).
        create_graph: keep the graph of the gradients so the penalty can be trained (True for training).
        return_logits: also return the logits of the same forward pass (saves a second forward in training).
        eps: added to the norms in the cosine.

    Returns:
        The penalty (a scalar), or ``(penalty, logits)``.

    Shape:
        x: (B, C, H, W), y: (B,) -> () [and logits (B, K)]
    """
    check_images(x, name="x")
    check_labels(y, len(x))
    names = gfa_layer_names(model, layers)
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_module: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            captured[name] = out
        return fn

    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.enable_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if not isinstance(captured.get(n), torch.Tensor)]
    if missing:
        raise ConfigError(f"GFA: module(s) {missing} did not produce a tensor in the forward pass")
    with torch.enable_grad():
        loss = F.cross_entropy(logits, y, reduction="sum")  # per-sample gradients, not scaled by 1/B
        feats = [x] + [captured[n] for n in names]
        grads = torch.autograd.grad(loss, feats, create_graph=create_graph)
        total = logits.new_zeros(())
        for i, (h, g) in enumerate(zip(feats, grads)):
            h = 2 * h - 1 if i == 0 else h  # the input in [-1, 1], as in the paper
            cos = F.cosine_similarity(g.flatten(1), h.flatten(1), dim=1, eps=eps)  # (B,)
            total = total + (1 - cos).mean()
    return (total, logits) if return_logits else total
