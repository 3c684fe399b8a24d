"""Classical input-transformation defences (via kornia): JPEG, bit-depth reduction, median and Gaussian smoothing.

Each is a typed function plus a thin :class:`~trn.defenses.base.InputTransform` module. Inputs and outputs are
(N, C, H, W) images in [0, 1] of the same shape; N = 0 is allowed. Every module says whether autograd's gradient
through it is exact and informative (``differentiable``) and offers the BPDA version (``bpda=True`` or
:meth:`~trn.defenses.base.InputTransform.bpda_forward`: forward unchanged, identity backward). These defences are
known to fall to BPDA/EOT (Athalye et al. 2018); they are baselines.

    >>> x_def = JPEG(quality=75)(x)
    >>> x_def = BitDepthReduction(bits=4, bpda=True)(x)  # differentiable for attacks, same forward
"""

from __future__ import annotations

import math

import torch

from trn.defenses.base import InputTransform
from trn.defenses.base import straight_through as _straight_through
from trn.errors import ConfigError, ShapeError
from trn.validation import check_images

__all__ = [
    "JPEG",
    "BitDepthReduction",
    "GaussianBlur",
    "MedianSmoothing",
    "bit_depth_reduction",
    "gaussian_blur",
    "jpeg",
    "median_smoothing",
]


def _check_kernel(k: object, name: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ConfigError(f"{name}: kernel_size must be an odd positive integer, got {k!r}")
    return k


def _check_number(v: object, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > hi or (
            v <= lo if lo_open else v < lo):
        raise ConfigError(f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    return float(v)


# --------------------------------------------------------------------------------------------- JPEG
def jpeg(x: torch.Tensor, quality: float = 75.0) -> torch.Tensor:
    """Differentiable JPEG compression and decompression (kornia's ``jpeg_codec_differentiable``, Reich et al. 2024).

    Grey images are coded as RGB with R = G = B and averaged back. The codec's rounding is a differentiable
    approximation, so the output is close to, not bit-identical with, a libjpeg round trip.

    Args:
        x: (N, 1 or 3, H, W) images in [0, 1].
        quality: JPEG quality in [1, 100] (lower = stronger compression).

    Returns:
        (N, C, H, W) in [0, 1].

    Raises:
        ShapeError: channel count other than 1 or 3.
        ConfigError: quality out of range.

    Example:
        >>> jpeg(torch.rand(2, 1, 28, 28), quality=50).shape
        torch.Size([2, 1, 28, 28])
    """
    q = _check_number(quality, "JPEG quality", 1.0, 100.0)
    check_images(x, allow_empty=True, name="x")
    c = x.shape[1]
    if c not in (1, 3):
        raise ShapeError(f"JPEG needs 1 (grey) or 3 (RGB) channels, got {c} (shape {tuple(x.shape)})")
    if x.shape[0] == 0:
        return x.clone()
    rgb = x.expand(-1, 3, -1, -1) if c == 1 else x
    from kornia.enhance import jpeg_codec_differentiable  # kornia costs ~1 s to import: only when used

    out = jpeg_codec_differentiable(rgb, torch.tensor([q], device=x.device, dtype=x.dtype))
    if c == 1:
        out = out.mean(1, keepdim=True)
    return out.clamp(0.0, 1.0)


class JPEG(InputTransform):
    """Module form of :func:`jpeg`. ``differentiable``: True (kornia's differentiable codec)."""

    differentiable = True

    def __init__(self, quality: float = 75.0, bpda: bool = False) -> None:
        super().__init__(bpda)
        self.quality = _check_number(quality, "JPEG quality", 1.0, 100.0)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return jpeg(x, self.quality)

    def extra_repr(self) -> str:
        return f"quality={self.quality:g}, bpda={self.bpda}"


# --------------------------------------------------------------------------------------------- bit depth
def bit_depth_reduction(x: torch.Tensor, bits: int = 4, straight_through: bool = False) -> torch.Tensor:
    """Quantise each pixel to ``2**bits`` levels (feature squeezing, Xu et al. 2018).

    Args:
        x: (N, C, H, W) images in [0, 1].
        bits: bits per pixel value, 1..16.
        straight_through: identity gradient (BPDA) instead of rounding's zero gradient.

    Returns:
        (N, C, H, W) in [0, 1], values in ``{k / (2**bits - 1)}``.

    Example:
        >>> bit_depth_reduction(torch.tensor([[[[0.1, 0.6]]]]), bits=1)
        tensor([[[[0., 1.]]]])
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ConfigError(f"bit-depth reduction: bits must be an integer in [1, 16], got {bits!r}")
    check_images(x, allow_empty=True, name="x")
    levels = 2**bits - 1
    y = torch.round(x * levels) / levels
    return _straight_through(x, y) if straight_through else y


class BitDepthReduction(InputTransform):
    """Module form of :func:`bit_depth_reduction`. ``differentiable``: False (zero gradient a.e.); ``bpda=True``
    (or ``straight_through=True``, the same thing) gives the identity gradient."""

    differentiable = False

    def __init__(self, bits: int = 4, bpda: bool = False, straight_through: bool = False) -> None:
        super().__init__(bpda or straight_through)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ConfigError(f"bit-depth reduction: bits must be an integer in [1, 16], got {bits!r}")
        self.bits = bits

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return bit_depth_reduction(x, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, bpda={self.bpda}"


# --------------------------------------------------------------------------------------------- median
def median_smoothing(x: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """Median filter over ``kernel_size`` x ``kernel_size`` windows per channel (kornia ``median_blur``).

    The gradient is exact almost everywhere: it flows to the pixel that is the median of each window.

    Args:
        x: (N, C, H, W) images in [0, 1].
        kernel_size: odd window size.

    Example:
        >>> median_smoothing(torch.rand(1, 1, 8, 8), 3).shape
        torch.Size([1, 1, 8, 8])
    """
    k = _check_kernel(kernel_size, "median smoothing")
    check_images(x, allow_empty=True, name="x")
    if x.shape[0] == 0:
        return x.clone()
    from kornia.filters import median_blur

    return median_blur(x, k)


class MedianSmoothing(InputTransform):
    """Module form of :func:`median_smoothing`. ``differentiable``: True (a selection; exact almost everywhere)."""

    differentiable = True

    def __init__(self, kernel_size: int = 3, bpda: bool = False) -> None:
        super().__init__(bpda)
        self.kernel_size = _check_kernel(kernel_size, "median smoothing")

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return median_smoothing(x, self.kernel_size)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, bpda={self.bpda}"


# --------------------------------------------------------------------------------------------- Gaussian blur
def gaussian_blur(x: torch.Tensor, kernel_size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian blur (kornia ``gaussian_blur2d``, reflect padding). Linear, so the gradient is exact.

    Args:
        x: (N, C, H, W) images in [0, 1].
        kernel_size: odd window size.
        sigma: standard deviation in pixels, > 0.

    Example:
        >>> gaussian_blur(torch.rand(2, 3, 8, 8), 3, 0.8).shape
        torch.Size([2, 3, 8, 8])
    """
    k = _check_kernel(kernel_size, "Gaussian blur")
    s = _check_number(sigma, "Gaussian blur sigma", 0.0, 1e3, lo_open=True)
    check_images(x, allow_empty=True, name="x")
    if x.shape[0] == 0:
        return x.clone()
    from kornia.filters import gaussian_blur2d

    return gaussian_blur2d(x, (k, k), (s, s)).clamp(0.0, 1.0)


class GaussianBlur(InputTransform):
    """Module form of :func:`gaussian_blur`. ``differentiable``: True."""

    differentiable = True

    def __init__(self, kernel_size: int = 3, sigma: float = 1.0, bpda: bool = False) -> None:
        super().__init__(bpda)
        self.kernel_size = _check_kernel(kernel_size, "Gaussian blur")
        self.sigma = _check_number(sigma, "Gaussian blur sigma", 0.0, 1e3, lo_open=True)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(x, self.kernel_size, self.sigma)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, sigma={self.sigma:g}, bpda={self.bpda}"
