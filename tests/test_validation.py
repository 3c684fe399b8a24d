"""check_images / check_labels: every rejected input raises the right typed error with a useful message."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trn.errors import InputError, ShapeError
from trn.validation import check_images, check_labels


def _x(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("batch", [1, 2])
def test_valid_batches_pass_unchanged(batch: int) -> None:
    x = _x(batch, 3, 4, 5)
    assert check_images(x, channels=3, size=(4, 5)) is x
    assert check_images(x.double()) is not None  # any floating dtype
    assert check_images(torch.zeros(batch, 1, 2, 2)) is not None and check_images(torch.ones(batch, 1, 2, 2)) is not None


def test_empty_batch() -> None:
    with pytest.raises(InputError, match=r"empty batch \(N = 0\)") as exc:
        check_images(torch.zeros(0, 1, 4, 4))
    assert not isinstance(exc.value, ShapeError)
    assert check_images(torch.zeros(0, 1, 4, 4), allow_empty=True).shape == (0, 1, 4, 4)


@pytest.mark.parametrize("shape", [(4, 4), (1, 4, 4), (1, 1, 1, 4, 4), ()])
def test_wrong_ndim(shape: tuple[int, ...]) -> None:
    with pytest.raises(ShapeError, match=r"images must be a 4-D \(N, C, H, W\) batch, got shape"):
        check_images(torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_non_float_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(InputError, match=f"floating-point tensor.*got dtype {dtype}") as exc:
        check_images(torch.zeros(1, 1, 2, 2, dtype=dtype))
    assert not isinstance(exc.value, ShapeError)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite(bad: float) -> None:
    x = _x(2, 1, 3, 3)
    x[1, 0, 2, 2] = bad
    with pytest.raises(InputError, match="NaN or infinite"):
        check_images(x)


@pytest.mark.parametrize(("value", "shown"), [(1.5, "1.5"), (-0.25, "-0.25"), (255.0, "255")])
def test_out_of_range(value: float, shown: str) -> None:
    x = _x(2, 1, 3, 3)
    x[0, 0, 0, 0] = value
    with pytest.raises(InputError, match=r"must lie in \[0, 1\] \(pixel space\)") as exc:
        check_images(x)
    assert shown in str(exc.value)


def test_wrong_channels_and_size() -> None:
    with pytest.raises(ShapeError, match=r"must have 1 channel\(s\), got 3 \(shape \(2, 3, 4, 4\)\)"):
        check_images(_x(2, 3, 4, 4), channels=1)
    with pytest.raises(ShapeError, match="must be 28x28 pixels, got 4x5"):
        check_images(_x(2, 1, 4, 5), size=(28, 28))


def test_not_a_tensor_and_custom_name() -> None:
    with pytest.raises(InputError, match="x_adv must be a torch.Tensor, got ndarray"):
        check_images(np.zeros((1, 1, 2, 2), np.float32), name="x_adv")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="^batch contains NaN"):
        check_images(torch.full((1, 1, 2, 2), float("nan")), name="batch")


def test_error_hierarchy() -> None:
    assert issubclass(ShapeError, InputError) and issubclass(InputError, ValueError)


def test_check_labels() -> None:
    y = torch.tensor([0, 2, 1])
    assert check_labels(y, 3, num_classes=3) is y
    assert check_labels(torch.zeros(0, dtype=torch.long), 0, num_classes=3).numel() == 0
    with pytest.raises(InputError, match="labels must be a torch.Tensor, got list"):
        check_labels([0, 1], 2)  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match=r"labels must have shape \(3,\), got \(2,\)"):
        check_labels(torch.tensor([0, 1]), 3)
    with pytest.raises(ShapeError, match=r"got \(3, 1\)"):
        check_labels(torch.tensor([[0], [1], [2]]), 3)
    with pytest.raises(InputError, match="integer tensor, got dtype torch.float32"):
        check_labels(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(InputError, match="integer tensor, got dtype torch.bool"):
        check_labels(torch.tensor([True, False]), 2)
    with pytest.raises(InputError, match=r"labels must lie in \[0, 2\], got \[0, 3\]"):
        check_labels(torch.tensor([0, 3]), 2, num_classes=3)
    with pytest.raises(InputError, match=r"got \[-1, 1\]"):
        check_labels(torch.tensor([-1, 1]), 2, num_classes=3)
