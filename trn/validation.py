"""Input checks shared by every public entry point: fail early with a message, never silently fix."""

from __future__ import annotations

import torch

from trn.errors import InputError, ShapeError

__all__ = ["check_images", "check_labels"]


def check_images(
    x: torch.Tensor,
    *,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    allow_empty: bool = False,
    name: str = "images",
) -> torch.Tensor:
    """Check that ``x`` is a float NCHW batch of finite pixels in [0, 1]; return it unchanged.

    Args:
        x: candidate image batch.
        channels: required channel count, if any.
        size: required (H, W), if any.
        allow_empty: accept a batch of zero images.
        name: what to call ``x`` in error messages.

    Raises:
        InputError: not a tensor, not floating point, NaN/inf, values outside [0, 1], empty batch.
        ShapeError: not 4-D, or wrong channel count / spatial size.
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ShapeError(f"{name} must be a 4-D (N, C, H, W) batch, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor with values in [0, 1], got dtype {x.dtype}")
    if x.shape[0] == 0 and not allow_empty:
        raise InputError(f"{name} is an empty batch (N = 0)")
    if channels is not None and x.shape[1] != channels:
        raise ShapeError(f"{name} must have {channels} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        raise ShapeError(f"{name} must be {size[0]}x{size[1]} pixels, got {x.shape[-2]}x{x.shape[-1]}")
    if x.numel():
        with torch.no_grad():
            if not torch.isfinite(x).all():
                raise InputError(f"{name} contains NaN or infinite values")
            lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(f"{name} must lie in [0, 1] (pixel space), got values in [{lo:.4g}, {hi:.4g}]")
    return x


def check_labels(y: torch.Tensor, n: int, num_classes: int | None = None, name: str = "labels") -> torch.Tensor:
    """Check that ``y`` is an int64-compatible vector of ``n`` class indices in range."""
    if not isinstance(y, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.ndim != 1 or y.shape[0] != n:
        raise ShapeError(f"{name} must have shape ({n},), got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputError(f"{name} must be an integer tensor, got dtype {y.dtype}")
    if n and num_classes is not None and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(f"{name} must lie in [0, {num_classes - 1}], got [{int(y.min())}, {int(y.max())}]")
    return y
