"""Classifiers: shapes, registry errors, wrapping/normalisation, save/load, and the shipped Fashion-MNIST guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from trn.checkpoint import save_checkpoint
from trn.classifiers import (
    Normalize,
    ResNet18,
    SmallCNN,
    create_classifier,
    list_classifiers,
    load_classifier,
    save_classifier,
    wrap_classifier,
)
from trn.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist
from trn.errors import CheckpointError, ConfigError
from trn.utils import accuracy

GUARD = Path(__file__).resolve().parents[1] / "checkpoints" / "fmnist_guard"


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [0, 1, 2])
def test_small_cnn_shapes(batch: int) -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = _x(batch, 1, 28, 28)
    with torch.no_grad():
        f = model.forward_features(x)
        out = model(x)
    assert f.shape == (batch, 128) and out.shape == (batch, 10)
    assert torch.allclose(out, model.forward_head(f))


def test_small_cnn_other_inputs_and_training_mode() -> None:
    torch.manual_seed(0)
    model = SmallCNN(in_channels=3, num_classes=4, image_size=32, width=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert model(_x(2, 3, 32, 32)).shape == (2, 4)  # training mode (batch statistics) with batch 2
    with pytest.raises(ConfigError, match="divisible by 4, got 30"):
        SmallCNN(image_size=30)


@pytest.mark.parametrize("batch", [0, 1, 2])
def test_resnet18_shapes(batch: int) -> None:
    torch.manual_seed(0)
    model = ResNet18().eval()
    x = _x(batch, 3, 32, 32)
    with torch.no_grad():
        f = model.forward_features(x)
        out = model(x)
    assert f.shape == (batch, 512) and out.shape == (batch, 10)
    assert torch.allclose(out, model.forward_head(f))


def test_resnet18_grey_input() -> None:
    torch.manual_seed(0)
    model = ResNet18(in_channels=1, num_classes=3, mean=(0.5,), std=(0.5,)).eval()
    with torch.no_grad():
        assert model(_x(1, 1, 32, 32)).shape == (1, 3)


def test_input_gradients_flow() -> None:
    torch.manual_seed(0)
    model = SmallCNN(width=8).eval()
    x = _x(2, 1, 28, 28).requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_registry() -> None:
    assert list_classifiers() == ["resnet18", "small_cnn"]
    assert isinstance(create_classifier("small_cnn", width=8), SmallCNN)
    with pytest.raises(ConfigError, match=r"unknown classifier 'vgg16'; available: \['resnet18', 'small_cnn'\]"):
        create_classifier("vgg16")
    with pytest.raises(ConfigError, match="bad arguments for classifier 'small_cnn'"):
        create_classifier("small_cnn", depth=3)


def test_normalize() -> None:
    norm = Normalize((0.5, 0.25), (0.5, 0.25))
    x = _x(2, 2, 3, 3)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 0.25], 1)
    assert torch.allclose(norm(x), expected)
    assert "mean" not in norm.state_dict()  # constants, not weights


class _Recorder(nn.Module):
    """Records what it was called with; returns a fixed linear read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: torch.Tensor | None = None
        self.lin = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.detach().clone()
        return self.lin(x.flatten(1))


def test_wrap_classifier_normalises_inside() -> None:
    torch.manual_seed(0)
    inner = _Recorder()
    wrapped = wrap_classifier(inner, mean=(0.1, 0.2), std=(0.3, 0.4))
    x = _x(2, 2, 4, 4)
    out = wrapped(x)
    assert out.shape == (2, 3)
    mean = torch.tensor([0.1, 0.2]).view(1, 2, 1, 1)
    std = torch.tensor([0.3, 0.4]).view(1, 2, 1, 1)
    assert torch.allclose(inner.seen, (x - mean) / std)
    # without mean/std the model sees raw [0, 1] pixels
    plain = wrap_classifier(inner)
    plain(x)
    assert torch.equal(inner.seen, x)
    with pytest.raises(ConfigError, match="no features/head split"):
        plain.forward_features(x)
    with pytest.raises(ConfigError, match="no features/head split"):
        plain.forward_head(torch.zeros(2, 32))


def test_wrap_classifier_with_split() -> None:
    torch.manual_seed(0)
    features = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 5))
    head = nn.Linear(5, 3)
    wrapped = wrap_classifier(nn.Sequential(features, head), mean=(0.5, 0.5), std=(0.5, 0.5), features=features,
                              head=head)
    x = _x(2, 2, 4, 4)
    f = wrapped.forward_features(x)
    assert f.shape == (2, 5)
    assert torch.allclose(wrapped(x), head(features((x - 0.5) / 0.5)))
    assert torch.allclose(wrapped.forward_head(f), wrapped(x))


@pytest.mark.parametrize(("arch", "kwargs", "shape"), [
    ("small_cnn", {"width": 8}, (1, 28, 28)),
    ("resnet18", {"in_channels": 3, "num_classes": 10}, (3, 32, 32)),
])
def test_save_load_round_trip(tmp_path: Path, arch: str, kwargs: dict, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = create_classifier(arch, **kwargs)
    model.train()
    model(_x(4, *shape))  # move BatchNorm running statistics away from their defaults
    model.eval()
    save_classifier(tmp_path / "clf", model, arch, kwargs, {"test_accuracy": 0.5})
    loaded, meta = load_classifier(tmp_path / "clf.safetensors")
    assert not loaded.training
    assert meta["kind"] == "classifier" and meta["arch"] == arch and meta["test_accuracy"] == 0.5
    x = _x(2, *shape, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_classifier_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_classifier(tmp_path / "missing")
    save_checkpoint(tmp_path / "other", {"w": torch.zeros(1)}, {"kind": "trn"})
    with pytest.raises(CheckpointError, match="not a classifier checkpoint"):
        load_classifier(tmp_path / "other")
    model = SmallCNN(width=8)
    save_classifier(tmp_path / "wrong", model, "small_cnn", {"width": 16})  # weights do not fit the recorded arch
    with pytest.raises(CheckpointError, match="weights do not match architecture 'small_cnn'"):
        load_classifier(tmp_path / "wrong")


# --------------------------------------------------------------------------------------------- shipped guard
def test_shipped_guard_metadata() -> None:
    meta_path = GUARD.with_suffix(".json")
    assert meta_path.is_file(), f"shipped guard missing: {meta_path} (trn train-classifier --config " \
                                "configs/classifier_fmnist.yaml)"
    meta = json.loads(meta_path.read_text())
    assert meta["kind"] == "classifier" and meta["arch"] == "small_cnn"
    assert meta["image_shape"] == [1, 28, 28]
    assert tuple(meta["class_names"]) == FASHION_MNIST_CLASSES
    assert meta["test_images"] == 10000
    assert meta["test_accuracy"] >= 0.91


def test_shipped_guard_accuracy_remeasured() -> None:
    model, meta = load_classifier(GUARD)
    test = load_fashion_mnist(FASHION_MNIST_DIR, "test")
    x, y = test.images[:2000], test.labels[:2000]
    acc = accuracy(model, x, y, batch_size=500)
    assert acc >= 0.89, f"guard accuracy on the first 2000 test images is {acc:.4f} (recorded {meta['test_accuracy']})"
