"""Decoding untrusted image bytes and encoding PNGs: round trips, channel and size policies, bad bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from trn.errors import InputError, ShapeError
from trn.imageio import decode_image, encode_png


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def grey() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (1, 6, 9)).astype(np.float32) / 255  # on the 8-bit grid


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (3, 6, 9)).astype(np.float32) / 255


def test_png_round_trip_is_exact_on_the_8_bit_grid(grey: np.ndarray, rgb: np.ndarray) -> None:
    for img in (grey, rgb):
        out = decode_image(encode_png(img))
        assert out.dtype == np.float32 and out.shape == img.shape
        np.testing.assert_array_equal(out, img)
    np.testing.assert_array_equal(decode_image(encode_png(torch.from_numpy(grey))), grey)  # tensors too


def test_encode_rounds_and_clips() -> None:
    img = np.array([[[0.0, 0.31, 1.0, -0.5, 1.5]]], np.float32)
    out = decode_image(encode_png(img))
    np.testing.assert_array_equal(out, np.array([[[0, 79, 255, 0, 255]]], np.float32) / 255)


def test_channel_conversion_and_policy(grey: np.ndarray, rgb: np.ndarray) -> None:
    g3 = decode_image(encode_png(grey), channels=3)
    assert g3.shape == (3, 6, 9) and all(np.array_equal(g3[i], grey[0]) for i in range(3))  # replicated
    r1 = decode_image(encode_png(rgb), channels=1)
    assert r1.shape == (1, 6, 9)
    with pytest.raises(ShapeError, match=r"image has 3 channel\(s\) but the model needs 1"):
        decode_image(encode_png(rgb), channels=1, channel_policy="reject")
    with pytest.raises(ShapeError, match=r"image has 1 channel\(s\) but the model needs 3"):
        decode_image(encode_png(grey), channels=3, channel_policy="reject")
    with pytest.raises(ShapeError, match="only 1- or 3-channel"):
        decode_image(encode_png(grey), channels=2)


def test_alpha_palette_and_jpeg(rgb: np.ndarray) -> None:
    rgba = np.concatenate([(rgb * 255).astype(np.uint8).transpose(1, 2, 0), np.full((6, 9, 1), 7, np.uint8)], -1)
    out = decode_image(_png(rgba, "RGBA"))
    assert out.shape == (3, 6, 9)  # alpha dropped
    np.testing.assert_array_equal(out, rgb)
    pal = Image.fromarray((rgb * 255).astype(np.uint8).transpose(1, 2, 0), "RGB").convert("P")
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert decode_image(buf.getvalue()).shape == (3, 6, 9)
    buf = io.BytesIO()
    Image.fromarray((rgb * 255).astype(np.uint8).transpose(1, 2, 0), "RGB").save(buf, format="JPEG")
    jpg = decode_image(buf.getvalue())
    assert jpg.shape == (3, 6, 9) and 0 <= jpg.min() and jpg.max() <= 1


def test_sixteen_bit_grey_uses_the_full_range() -> None:
    full = (np.arange(6 * 9).reshape(6, 9) * 1200).astype(np.uint16)
    out = decode_image(_png(full))
    assert out.shape == (1, 6, 9)
    np.testing.assert_allclose(out[0], np.rint(full / 65535 * 255) / 255, atol=1e-6)
    dark = np.full((4, 4), 255, np.uint16)  # 255 / 65535 is nearly black, not white
    assert decode_image(_png(dark)).max() <= 1 / 255


def test_size_policy(grey: np.ndarray) -> None:
    data = encode_png(grey)
    assert decode_image(data, size=(6, 9)).shape == (1, 6, 9)
    with pytest.raises(ShapeError, match="image is 6x9 but the model needs 28x28.*'resize'"):
        decode_image(data, size=(28, 28))
    out = decode_image(data, size=(28, 28), resize="resize")
    assert out.shape == (1, 28, 28) and 0 <= out.min() and out.max() <= 1


def test_pixel_limit_is_checked_before_decoding(grey: np.ndarray) -> None:
    with pytest.raises(InputError, match=r"image is 9x6 = 54 pixels, over the limit of 50"):
        decode_image(encode_png(grey), max_pixels=50)
    assert decode_image(encode_png(grey), max_pixels=54).shape == (1, 6, 9)


@pytest.mark.parametrize("data", [b"", bytearray(), "not bytes", None])
def test_empty_or_not_bytes(data: object) -> None:
    with pytest.raises(InputError, match="empty request body"):
        decode_image(data)  # type: ignore[arg-type]


def test_garbage_and_truncated(grey: np.ndarray) -> None:
    with pytest.raises(InputError, match="not a decodable image"):
        decode_image(b"definitely not an image")
    png = encode_png(np.random.default_rng(0).random((3, 64, 64)).astype(np.float32))
    with pytest.raises(InputError, match="corrupt or truncated image"):
        decode_image(png[: len(png) // 2])
    assert decode_image(memoryview(encode_png(grey))).shape == (1, 6, 9)  # memoryview is fine


@pytest.mark.parametrize("shape", [(6, 9), (2, 6, 9), (4, 6, 9), (1, 1, 6, 9)])
def test_encode_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ShapeError, match=r"expects a \(C, H, W\) image with 1 or 3 channels"):
        encode_png(np.zeros(shape, np.float32))


def test_encode_bad_values() -> None:
    bad = np.zeros((1, 4, 4), np.float32)
    bad[0, 1, 1] = np.nan
    with pytest.raises(InputError, match="NaN or infinite"):
        encode_png(bad)
    with pytest.raises(InputError, match="NaN or infinite"):
        encode_png(torch.full((3, 2, 2), float("inf")))
    with pytest.raises(InputError, match="float image.*got dtype uint8.*divide"):
        encode_png(np.zeros((1, 4, 4), np.uint8))
