"""Route each image to a second restorer when the first one has to change it a lot.

A restorer trained to keep clean images clean (the agnostic net: 33 dB on clean validation images) changes a clean
image little and a noisy one a lot, because removing the noise is its job. The per-image RMS change
``||R(x) - x|| / sqrt(C*H*W)`` therefore tells the two apart, and the images that needed a large change can be given
to a restorer built for hostile inputs (the adversarially trained one), which costs clean accuracy when it sees every
image but not when it sees only these. Measured on the agnostic net's 500 validation images (carved from the
training split, never trained on): its change has a 99th percentile of 0.065 on clean images and a median of 0.088 on
images with Square's opening +-0.1 stripes (``benchmarks/fallback_threshold.py``; docs/design.md, "The query
shield's fallback restorer").

    >>> stage = FallbackRestorer(agnostic, robust, threshold=0.06)
    >>> y = stage(x)             # (N, C, H, W): agnostic(x)[i], or robust(x)[i] where agnostic changed x[i] by > 0.06

Each image is routed on its own change, so its answer does not depend on the rest of the batch. The routing decision
is not differentiated (it is piecewise constant); gradients flow through whichever restorer produced each image.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trn.defenses.base import reads_gradient_map, takes_create_graph
from trn.errors import ConfigError
from trn.validation import check_images

__all__ = ["FallbackRestorer", "restoration_change"]


def restoration_change(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image RMS difference between an input and its restoration.

    Shape:
        x, y: (N, C, H, W); output: (N,).

    Example:
        >>> restoration_change(torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5))
        tensor([0.5000, 0.5000])
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"restoration_change: expected two (N, C, H, W) tensors of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    return (y - x).flatten(1).pow(2).mean(1).sqrt()


class FallbackRestorer(nn.Module):
    """``primary(x)``, except where it changed an image by more than ``threshold`` (RMS): ``fallback(x)`` there.

    Args:
        primary: the restorer every image goes through (its output is kept for the images it barely changes).
        fallback: the restorer for the images the primary changed a lot; run on those images only.
        threshold: RMS change above which an image is routed to ``fallback`` (in [0, 1] pixel units).

    ``image_shape``, ``class_names`` and ``guard`` are the primary's, so the stage stands in for it wherever a
    restorer is described. ``reads_gradient_map`` says whether either restorer reads a gradient map (then holding the
    map constant is a distinct adaptive attack on the stage).
    """

    def __init__(self, primary: nn.Module, fallback: nn.Module, threshold: float) -> None:
        super().__init__()
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                or threshold <= 0:
            raise ConfigError(f"fallback_above must be a positive number (an RMS change in [0, 1] pixel units, "
                              f"e.g. 0.06), got {threshold!r}")
        for name, r in (("primary", primary), ("fallback", fallback)):
            if not callable(r):
                raise ConfigError(f"the {name} restorer must be callable, got {type(r).__name__}")
        shapes = [tuple(getattr(r, "image_shape", ()) or ()) for r in (primary, fallback)]
        if all(shapes) and shapes[0] != shapes[1]:
            raise ConfigError(f"the fallback restorer restores {shapes[1]} images but the primary restores "
                              f"{shapes[0]}")
        classes = [len(getattr(r, "class_names", ()) or ()) for r in (primary, fallback)]
        if all(classes) and classes[0] != classes[1]:
            raise ConfigError(f"the fallback restorer's guard has {classes[1]} classes but the primary's has "
                              f"{classes[0]}")
        self.primary, self.fallback, self.threshold = primary, fallback, float(threshold)
        self._graph = (takes_create_graph(primary), takes_create_graph(fallback))

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.primary.image_shape)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.primary.class_names)

    @property
    def guard(self) -> nn.Module:
        return self.primary.guard

    @property
    def reads_gradient_map(self) -> bool:
        return reads_gradient_map(self.primary) or reads_gradient_map(self.fallback)

    def routed(self, x: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        """(N,) bool: which images go to the fallback, given the primary's ``restored`` output."""
        return restoration_change(x.detach(), restored.detach()) > self.threshold

    def forward(self, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        check_images(x, allow_empty=True, name="x")
        y = self.primary(x, create_graph=create_graph) if self._graph[0] else self.primary(x)
        idx = self.routed(x, y).nonzero().flatten()   # (M,) rows for the fallback
        if idx.numel() == 0:
            return y
        z = self.fallback(x[idx], create_graph=create_graph) if self._graph[1] else self.fallback(x[idx])
        return y.index_put((idx,), z)                 # (N, C, H, W), out of place: both branches keep their graph

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"
