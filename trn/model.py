"""The Two-stream Restoration Network (TRN). Layer choices are ours (the paper's are unpublished): see docs/design.md.

    image x ──► image encoder ──┐  level 0 (H)      level 1 (H/2)     level 2 (H/4)
                                ├─► fusion ──► ... ─► fusion ──► ... ─► fusion
    gradient map g ─► grad enc ─┘      │  (streams exchange residuals at every level)
                                       ▼
                          U-Net decoder over the fused features ──► delta ──► clamp(x + delta, 0, 1)

Forward is split the way it reads: :meth:`TRN.encode_image`, :meth:`TRN.encode_gradient`, :meth:`TRN.fuse`,
:meth:`TRN.decode`. ``two_stream=False`` removes the gradient stream (the one-stream ablation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trn.errors import ConfigError, ShapeError
from trn.registry import Registry

__all__ = ["TRN", "TRN_VARIANTS", "FusionBlock", "TRNConfig", "create_trn", "list_trn_variants"]


@dataclass(frozen=True)
class TRNConfig:
    in_channels: int = 1     # 1 grey, 3 colour
    width: int = 16          # channels at full resolution; doubled at each level (16/32/64)
    levels: int = 3          # resolutions (2 downsamplings: sizes must be divisible by 4)
    two_stream: bool = True  # False = image stream only (ablation)
    grad_channels: int = 0   # channels of the gradient map; 0 = in_channels (2 * in_channels for a 'dual' map)


def _conv(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    """Conv + ReLU, no normalisation: the net is shallow, its head starts at zero, and norms cost CPU time."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2), nn.ReLU(inplace=True))


class FusionBlock(nn.Module):
    """Mix the two streams at one level and let each read the other.

    ``h = conv(cat(f_img, f_grad))`` is the fused feature (sent to the decoder); each stream then receives a 1x1
    projection of ``h`` as a residual, so later levels of the image stream see where the gradient points and vice
    versa. With one stream, ``h = conv(f_img)`` and only the image stream is updated.
    """

    def __init__(self, c: int, two_stream: bool = True) -> None:
        super().__init__()
        self.two_stream = two_stream
        self.mix = _conv(2 * c if two_stream else c, c)
        self.to_img = nn.Conv2d(c, c, 1)
        self.to_grad = nn.Conv2d(c, c, 1) if two_stream else None

    def forward(self, f_img: torch.Tensor, f_grad: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        h = self.mix(torch.cat([f_img, f_grad], 1) if self.two_stream else f_img)
        f_img = f_img + self.to_img(h)
        if self.two_stream:
            f_grad = f_grad + self.to_grad(h)
        return h, f_img, f_grad


class TRN(nn.Module):
    """Two-stream Restoration Network: ``restored = clamp(x + decode(fuse(encode(x), encode(g))), 0, 1)``.

    Args:
        cfg: :class:`TRNConfig`.

    Shape:
        x: (B, C, H, W) in [0, 1]; g: (B, C, H, W) gradient map; H and W divisible by 2 ** (levels - 1).
        out: (B, C, H, W) in [0, 1].
    """

    def __init__(self, cfg: TRNConfig = TRNConfig()) -> None:
        super().__init__()
        if cfg.in_channels not in (1, 3) or cfg.width < 4 or cfg.levels < 1 or cfg.grad_channels < 0:
            raise ConfigError(f"bad TRN config {cfg}")
        self.cfg = cfg
        widths = [cfg.width * 2**i for i in range(cfg.levels)]
        self.widths = widths

        def stream(cin: int) -> nn.ModuleList:
            return nn.ModuleList(_conv(cin if i == 0 else widths[i - 1], w, 1 if i == 0 else 2) for i, w in enumerate(widths))

        self.img_stream = stream(cfg.in_channels)
        self.grad_stream = stream(self.map_channels) if cfg.two_stream else None
        self.fusion = nn.ModuleList(FusionBlock(w, cfg.two_stream) for w in widths)
        self.up = nn.ModuleList(_conv(widths[i + 1] + widths[i], widths[i]) for i in range(cfg.levels - 1))
        self.head = nn.Conv2d(widths[0], cfg.in_channels, 3, 1, 1)
        nn.init.zeros_(self.head.weight)  # start as the identity: clean images pass unharmed from step 0
        nn.init.zeros_(self.head.bias)

    @property
    def map_channels(self) -> int:
        """Channels of the gradient map the second stream reads."""
        return self.cfg.grad_channels or self.cfg.in_channels

    @property
    def divisor(self) -> int:
        return 2 ** (self.cfg.levels - 1)

    def _check(self, x: torch.Tensor, g: torch.Tensor | None) -> None:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ShapeError(f"TRN expects (B, {self.cfg.in_channels}, H, W) images, got {tuple(x.shape)}")
        if x.shape[-1] % self.divisor or x.shape[-2] % self.divisor:
            raise ShapeError(f"TRN needs H and W divisible by {self.divisor}, got {x.shape[-2]}x{x.shape[-1]}")
        want = (x.shape[0], self.map_channels, *x.shape[2:])
        if self.cfg.two_stream and (g is None or tuple(g.shape) != want):
            raise ShapeError(f"gradient map must have shape {want} for images {tuple(x.shape)}, got "
                             f"{None if g is None else tuple(g.shape)}")

    def encode_image(self, x: torch.Tensor, level: int, f: torch.Tensor | None = None) -> torch.Tensor:
        """Image stream at ``level`` (input: the image at level 0, else the previous level's features)."""
        return self.img_stream[level](x if level == 0 else f)

    def encode_gradient(self, g: torch.Tensor, level: int, f: torch.Tensor | None = None) -> torch.Tensor:
        """Gradient stream at ``level``."""
        return self.grad_stream[level](g if level == 0 else f)

    def fuse(self, x: torch.Tensor, g: torch.Tensor | None) -> list[torch.Tensor]:
        """Run both streams level by level with a fusion block at each; return the fused features per level."""
        fused, f_img, f_grad = [], None, None
        for level in range(self.cfg.levels):
            f_img = self.encode_image(x, level, f_img)
            f_grad = self.encode_gradient(g, level, f_grad) if self.cfg.two_stream else None
            h, f_img, f_grad = self.fusion[level](f_img, f_grad)
            fused.append(h)
        return fused

    def decode(self, fused: list[torch.Tensor]) -> torch.Tensor:
        """U-Net decoder: upsample, concatenate the fused skip, conv; finally predict the correction delta."""
        h = fused[-1]
        for level in range(self.cfg.levels - 2, -1, -1):
            h = F.interpolate(h, size=fused[level].shape[-2:], mode="bilinear", align_corners=False)
            h = self.up[level](torch.cat([h, fused[level]], 1))
        return self.head(h)

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x, g)
        delta = self.decode(self.fuse(x, g))
        return (x + delta).clamp(0.0, 1.0)


TRN_VARIANTS: Registry[TRN] = Registry("TRN variant")


@TRN_VARIANTS.register("trn_small_28")
def trn_small_28(**overrides) -> TRN:
    """Grey 28x28 images (Fashion-MNIST): width 16, 3 levels (16/32/64 channels), ~0.19M parameters."""
    return TRN(TRNConfig(**{"in_channels": 1, "width": 16, "levels": 3, **overrides}))


@TRN_VARIANTS.register("trn_base_28")
def trn_base_28(**overrides) -> TRN:
    """Grey 28x28 images, wider: width 32, 3 levels (32/64/128 channels), ~0.75M parameters (the agnostic ablation)."""
    return TRN(TRNConfig(**{"in_channels": 1, "width": 32, "levels": 3, **overrides}))


@TRN_VARIANTS.register("trn_base_32")
def trn_base_32(**overrides) -> TRN:
    """Colour 32x32 images (CIFAR-10, SVHN): width 32, 3 levels (32/64/128 channels), ~0.76M parameters."""
    return TRN(TRNConfig(**{"in_channels": 3, "width": 32, "levels": 3, **overrides}))


@TRN_VARIANTS.register("trn_tiny", public=False)
def trn_tiny(**overrides) -> TRN:
    """Test-only: width 4, 2 levels (fast, untrained-quality); left out of :func:`list_trn_variants`."""
    return TRN(TRNConfig(**{"in_channels": 1, "width": 4, "levels": 2, **overrides}))


def list_trn_variants(include_private: bool = False) -> list[str]:
    """Names :func:`create_trn` accepts (test-only variants such as ``trn_tiny`` only with ``include_private``)."""
    return TRN_VARIANTS.list(include_private)


def create_trn(name: str = "trn_small_28", **overrides) -> TRN:
    """Build a named TRN variant; ``overrides`` replace :class:`TRNConfig` fields (e.g. ``two_stream=False``).

    Raises:
        ConfigError: unknown variant, or an override that is not a :class:`TRNConfig` field.

    Example:
        >>> net = create_trn("trn_small_28", two_stream=False)
    """
    return TRN_VARIANTS.create(name, **overrides)
