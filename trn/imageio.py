"""Safe image decoding/encoding for untrusted bytes: size limits before decoding, explicit channel/resize policy."""

from __future__ import annotations

import io
import warnings
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from trn.errors import InputError, ShapeError

__all__ = ["DEFAULT_MAX_PIXELS", "decode_image", "encode_png"]

DEFAULT_MAX_PIXELS = 4096 * 4096  # refuse anything larger before decoding (decompression bombs)


def decode_image(
    data: bytes,
    *,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    resize: Literal["reject", "resize"] = "reject",
    channel_policy: Literal["reject", "convert"] = "convert",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode PNG/JPEG/... bytes into a float32 (C, H, W) array in [0, 1].

    Args:
        data: the encoded file.
        channels: required channel count (1 grey, 3 RGB); None keeps the file's own (grey stays 1, else 3).
        size: required (H, W); None accepts any size.
        resize: what to do when ``size`` is given and the image differs: ``reject`` (InputError) or ``resize``
            (bilinear), never silent.
        channel_policy: ``convert`` grey<->RGB (documented luminance/replication), or ``reject`` a mismatch.
        max_pixels: largest W*H accepted; checked from the header before any pixel is decoded.

    Raises:
        InputError: not an image, truncated/corrupt, too large, or a size/channel mismatch under ``reject``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise InputError("empty request body: expected the bytes of an image file (PNG, JPEG, ...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(data)))
            w, h = img.size
            if w * h > max_pixels:
                raise InputError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
            img.load()
    except InputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"not a decodable image: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"corrupt or truncated image: {e}") from e

    wide = img.mode in ("I", "F") or img.mode.startswith("I;16")  # 16/32-bit integer or float grey
    native = 1 if wide or img.mode in ("1", "L", "LA") else 3
    want = channels or native
    if want not in (1, 3):
        raise ShapeError(f"only 1- or 3-channel images are supported, asked for {want}")
    if want != native and channel_policy == "reject":
        raise ShapeError(f"image has {native} channel(s) but the model needs {want}")
    if wide:
        arr = np.asarray(img, dtype=np.float32)
        if img.mode.startswith("I;16"):  # 16-bit file: 65535 is white, however dark this image is
            arr = arr / 65535.0
        else:  # 32-bit int / float carry no range: 8-bit values unless they exceed 255
            arr = arr / (65535.0 if img.mode == "I" and arr.max() > 255 else 255.0)
        img = Image.fromarray(np.rint(np.clip(arr * 255, 0, 255)).astype(np.uint8), "L")
    img = img.convert("L" if want == 1 else "RGB")

    if size is not None and (img.height, img.width) != tuple(size):
        if resize == "reject":
            raise ShapeError(
                f"image is {img.height}x{img.width} but the model needs {size[0]}x{size[1]} "
                "(resize policy is 'reject'; set it to 'resize' to accept other sizes)"
            )
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8).astype(np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)


def encode_png(img: np.ndarray | torch.Tensor) -> bytes:
    """Encode a float (C, H, W) image in [0, 1] (1 or 3 channels) as 8-bit PNG bytes (rounded; values outside
    [0, 1] are clipped).

    Raises:
        ShapeError: not (C, H, W) with 1 or 3 channels.
        InputError: not a floating-point image, or NaN / infinite values.
    """
    a = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if a.ndim != 3 or a.shape[0] not in (1, 3):
        raise ShapeError(f"encode_png expects a (C, H, W) image with 1 or 3 channels, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):  # a uint8 0-255 image would silently clip to black and white
        raise InputError(f"encode_png expects a float image with values in [0, 1], got dtype {a.dtype} "
                         "(divide 0-255 values by 255 first)")
    if not np.isfinite(a).all():
        raise InputError("encode_png: the image contains NaN or infinite values")
    u8 = (np.clip(a, 0, 1) * 255.0).round().astype(np.uint8)
    pil = Image.fromarray(u8[0], "L") if u8.shape[0] == 1 else Image.fromarray(u8.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()
