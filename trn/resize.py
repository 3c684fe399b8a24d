"""Fit one image to a model's input size under an explicit policy: the one resize path for every input format.

``trn sanitize`` decodes image files (folders, Parquet) at their own size and takes ``.npz`` rows as they are; both
then go through :func:`fit_image`, so an off-size PNG and an off-size npz row are refused, or resized, the same way.

    >>> fit_image(np.zeros((1, 30, 30), np.float32), (1, 28, 28), "resize").shape
    (1, 28, 28)
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from trn.errors import InputError, ShapeError

__all__ = ["ResizePolicy", "fit_image"]

ResizePolicy = Literal["reject", "resize"]


def fit_image(img: np.ndarray, shape: tuple[int, int, int], policy: ResizePolicy = "reject") -> np.ndarray:
    """Check one float image against ``shape`` and resize it (bilinear, antialiased when shrinking) if allowed.

    Args:
        img: float (C, H, W) image with values in [0, 1].
        shape: the model's (C, H, W).
        policy: ``reject`` raises on another size; ``resize`` resizes to (H, W). A channel mismatch is always an
            error (convert grey/RGB when decoding, where the file says what it holds).

    Returns:
        float32 (C, H, W) array of ``shape``, values in [0, 1].

    Raises:
        ShapeError: not (C, H, W), another channel count, or another size under ``reject``.
        InputError: NaN / infinite values or values outside [0, 1].

    Shape:
        (C, H', W') -> (C, H, W)
    """
    a = np.asarray(img)
    c, h, w = (int(v) for v in shape)
    if a.ndim != 3:
        raise ShapeError(f"expected a (C, H, W) image, got shape {a.shape}")
    if a.shape[0] != c:
        raise ShapeError(f"image has {a.shape[0]} channel(s) but the model needs {c}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise InputError("pixel values must be finite and lie in [0, 1]")
    if a.shape[1:] != (h, w):
        if policy != "resize":
            raise ShapeError(f"image is {a.shape[1]}x{a.shape[2]} but the model needs {h}x{w} "
                             "(resize policy is 'reject'; set it to 'resize' to accept other sizes)")
        t = F.interpolate(torch.from_numpy(np.ascontiguousarray(a))[None], size=(h, w), mode="bilinear",
                          align_corners=False, antialias=a.shape[1] > h or a.shape[2] > w)
        a = t[0].clamp_(0, 1).numpy()
    return a
