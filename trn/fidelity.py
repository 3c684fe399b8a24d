"""Fidelity of restored images to the clean originals: PSNR and SSIM from :mod:`kornia.metrics`.

A restorer that rewrites an image into what its guard likes can keep the guard's accuracy while moving away from the
clean image (issue 10). These numbers sit next to accuracy wherever a restorer is evaluated:

    >>> fid = fidelity(restored, clean)                  # {"psnr": dB, "ssim": 0-1}, means over images
    >>> psnr_per_image(x_adv, clean)                     # (N,) dB

PSNR is computed per image and then averaged; identical images (infinite PSNR) count as :data:`PSNR_CAP` dB.
"""

from __future__ import annotations

import torch

from trn.errors import ShapeError
from trn.validation import check_images

__all__ = ["PSNR_CAP", "SSIM_WINDOW", "fidelity", "psnr_per_image", "ssim_per_image"]

PSNR_CAP = 100.0   # dB reported for a pixel-exact copy (kornia returns inf)
SSIM_WINDOW = 7    # Gaussian window (sigma 1.5) of kornia's SSIM; 7 suits 28x28 images better than the usual 11


def _check_pair(x: torch.Tensor, ref: torch.Tensor) -> None:
    check_images(x, allow_empty=True, name="images")
    check_images(ref, allow_empty=True, name="reference")
    if x.shape != ref.shape:
        raise ShapeError(f"images {tuple(x.shape)} and reference {tuple(ref.shape)} must have the same shape")


@torch.no_grad()
def psnr_per_image(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB, max value 1) of ``x`` against ``ref``.

    Shape:
        x, ref: (N, C, H, W) in [0, 1] -> (N,)
    """
    _check_pair(x, ref)
    from kornia.metrics import psnr as _kornia_psnr  # kornia costs ~1 s to import: only when used

    out = [_kornia_psnr(x[i : i + 1].float(), ref[i : i + 1].float(), 1.0).reshape(()) for i in range(len(x))]
    return torch.stack(out).clamp(max=PSNR_CAP).cpu() if out else torch.zeros(0)


@torch.no_grad()
def ssim_per_image(x: torch.Tensor, ref: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Per-image mean SSIM of ``x`` against ``ref`` (kornia, Gaussian window :data:`SSIM_WINDOW`).

    Shape:
        x, ref: (N, C, H, W) in [0, 1] -> (N,)
    """
    _check_pair(x, ref)
    from kornia.metrics import ssim as _kornia_ssim

    out = [_kornia_ssim(x[i : i + batch_size].float(), ref[i : i + batch_size].float(), SSIM_WINDOW, max_val=1.0)
           .flatten(1).mean(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def fidelity(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of ``x`` against ``ref``, plus the mean largest absolute pixel change.

    Returns:
        ``{"psnr": float, "ssim": float, "max_abs": float}`` (NaN for an empty batch).

    Example:
        >>> fidelity(restorer.restore(x_adv), x_clean)["psnr"]
    """
    if len(x) == 0:
        _check_pair(x, ref)
        return {"psnr": float("nan"), "ssim": float("nan"), "max_abs": float("nan")}
    return {"psnr": psnr_per_image(x, ref).mean().item(), "ssim": ssim_per_image(x, ref).mean().item(),
            "max_abs": (x.float() - ref.float()).abs().flatten(1).amax(1).mean().item()}
