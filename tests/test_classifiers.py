"""Classifiers: shapes, registry errors, wrapping/normalisation, save/load, the shipped Fashion-MNIST guard, and
training (validation split from the training set, best-epoch selection, early stopping, TRADES)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BAND_CLASSES, band_images
from torch import nn

import trn.train_classifier as tc
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
from trn.config import load_config
from trn.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, ImageDataset, load_fashion_mnist
from trn.errors import CheckpointError, ConfigError
from trn.train_classifier import (
    ClassifierTrainConfig,
    split_validation,
    trades_adversary,
    trades_loss,
    train_classifier,
)
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
    names = list_classifiers()
    assert {"resnet18", "small_cnn"} <= set(names) and names == sorted(names)
    assert isinstance(create_classifier("small_cnn", width=8), SmallCNN)
    with pytest.raises(ConfigError, match=r"unknown classifier 'vgg16'; available: \['resnet18', "):
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


# --------------------------------------------------------------------------------------------- training
@pytest.fixture
def bands_npz(tmp_path: Path) -> str:
    x, y = band_images(120, seed=5)
    path = tmp_path / "bands.npz"
    np.savez(path, images=x.numpy(), labels=y.numpy())
    return str(path)


def _cfg(data: str, out: Path, **kw) -> ClassifierTrainConfig:
    base = {"dataset": "npz", "data_dir": data, "epochs": 2, "batch_size": 16, "lr": 0.05, "augment": False,
            "device": "cpu", "out": str(out), "val_size": 0.25}
    return ClassifierTrainConfig(**{**base, **kw})


def test_split_validation_is_seeded_disjoint_and_complete() -> None:
    x, y = band_images(40, seed=0)
    ds = ImageDataset(x, y, ("a", "b", "c"), "bands")
    rest, val = split_validation(ds, 0.25, seed=3)
    assert (len(rest), len(val)) == (30, 10)
    rows = {tuple(r.flatten().tolist()) for r in torch.cat([rest.images, val.images])}
    assert len(rows) == 40  # disjoint, and together the whole set
    again_rest, again_val = split_validation(ds, 0.25, seed=3)
    assert torch.equal(val.images, again_val.images) and torch.equal(rest.labels, again_rest.labels)
    assert not torch.equal(split_validation(ds, 0.25, seed=4)[1].images, val.images)
    assert len(split_validation(ds, 7, seed=0)[1]) == 7 and len(split_validation(ds, 0, seed=0)[1]) == 0
    with pytest.raises(ConfigError, match="holds out 40 of 40 training images"):
        split_validation(ds, 40, seed=0)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="not with trades"):
        ClassifierTrainConfig(regularizer="gfa", adv_train="trades")
    with pytest.raises(ConfigError, match="select_by=robust needs adv_train"):
        ClassifierTrainConfig(select_by="robust")
    with pytest.raises(ConfigError, match="patience needs a validation score"):
        ClassifierTrainConfig(patience=2, val_size=0)
    with pytest.raises(ConfigError, match="val_size must be"):
        ClassifierTrainConfig(val_size=1.5)
    with pytest.raises(ConfigError, match="patience must be a positive integer"):
        ClassifierTrainConfig(patience=0)
    with pytest.raises(ConfigError, match="adv_train: must be one of"):
        load_config(ClassifierTrainConfig, None, ["adv_train=mart"])
    assert ClassifierTrainConfig().selection == "clean" and ClassifierTrainConfig(adv_train="trades").selection == "robust"
    assert ClassifierTrainConfig(val_size=0).selection == "last"
    cfg = load_config(ClassifierTrainConfig, None, ["adv_train=trades", "trades_beta=3", "patience=2", "val_size=5000"])
    assert cfg.trades_beta == 3.0 and cfg.patience == 2 and cfg.val_size == 5000


def test_validation_uses_training_images_and_test_is_read_once(bands_npz: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    splits: list[str] = []
    real = tc.load_dataset

    def spy(name, root=None, split="test"):
        splits.append(split)
        return real(name, root, split)

    monkeypatch.setattr(tc, "load_dataset", spy)
    meta = train_classifier(_cfg(bands_npz, tmp_path / "clf", epochs=3))
    assert splits == ["train", "test"]  # the test split only once, after training, for the recorded accuracy
    assert meta["train_images"] == 90 and meta["val_images"] == 30 and meta["selection"] == "clean"
    assert [h["epoch"] for h in meta["val_history"]] == [1, 2, 3] and all("robust" not in h for h in meta["val_history"])
    assert meta["best_val_accuracy"] == max(h["clean"] for h in meta["val_history"])
    assert meta["val_history"][meta["best_epoch"] - 1]["clean"] == meta["best_val_accuracy"]
    assert meta["best_val_accuracy"] > 0.6  # it learnt (chance: 1/3)
    model, saved = load_classifier(tmp_path / "clf")
    assert saved["best_epoch"] == meta["best_epoch"] and saved["config"]["val_size"] == 0.25
    test = real("npz", bands_npz)
    assert accuracy(model, test.images, test.labels) == pytest.approx(meta["test_accuracy"])


def test_best_epoch_weights_are_saved_and_patience_stops(bands_npz: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripted validation scores 0.5, 0.8, 0.7, 0.6, ...: with patience 2 training stops after epoch 4 and the
    checkpoint holds epoch 2's weights, not the last ones."""
    scores, seen = iter([0.5, 0.8, 0.7, 0.6, 0.99, 0.99]), []

    def scripted(model, ds, robust_eps=None, *args, **kwargs):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"clean": next(scores)}

    monkeypatch.setattr(tc, "evaluate_classifier", scripted)
    meta = train_classifier(_cfg(bands_npz, tmp_path / "clf", epochs=6, patience=2))
    assert meta["stopped_early"] and meta["epochs_run"] == 4 and len(seen) == 4
    assert meta["best_epoch"] == 2 and meta["best_val_accuracy"] == 0.8
    model, _ = load_classifier(tmp_path / "clf")
    for k, v in model.state_dict().items():
        assert torch.equal(v, seen[1][k]), k  # epoch 2's weights ...
    assert any(not torch.equal(seen[1][k], seen[3][k]) for k in seen[1])  # ... which differ from the last epoch's
    monkeypatch.setattr(tc, "evaluate_classifier", lambda *a, **k: {"clean": 0.5})
    meta = train_classifier(_cfg(bands_npz, tmp_path / "last", epochs=3, select_by="last"))
    assert meta["best_epoch"] == 3 and not meta["stopped_early"] and "best_val_accuracy" not in meta


def test_trades_adversary_and_loss(make_tiny_classifier) -> None:
    model = make_tiny_classifier(num_classes=BAND_CLASSES).train()
    x, y = band_images(16, seed=1)
    x_adv = trades_adversary(model, x, eps=0.1, steps=5, alpha=0.03)
    assert model.training and all(p.grad is None for p in model.parameters())  # mode restored, no param grads
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()
    with torch.no_grad():
        p = torch.softmax(model(x), 1)

        def kl(z: torch.Tensor) -> float:
            return float(torch.nn.functional.kl_div(torch.log_softmax(model(z), 1), p, reduction="sum"))

        near = (x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
        assert kl(x_adv) > 10 * kl(near)  # the inner maximisation moved far up the KL
    ce = torch.nn.functional.cross_entropy(model(x), y)
    assert torch.allclose(trades_loss(model, x, x_adv, y, beta=0.0), ce)
    assert trades_loss(model, x, x_adv, y, beta=6.0) > ce


def test_trades_and_pgd_training_validate_robust_accuracy(bands_npz: str, tmp_path: Path) -> None:
    for mode in ("trades", "pgd"):
        meta = train_classifier(_cfg(bands_npz, tmp_path / mode, epochs=2, adv_train=mode, adv_eps=0.1, adv_steps=2,
                                     val_robust_steps=3, val_robust_limit=20))
        assert meta["selection"] == "robust" and meta["config"]["adv_train"] == mode
        for h in meta["val_history"]:
            assert 0 <= h["robust"] <= h["clean"] + 1 / 20 and set(h) == {"epoch", "clean", "robust"}
        assert meta["best_val_accuracy"] == max(h["robust"] for h in meta["val_history"])


def test_training_resumes_after_an_interruption(bands_npz: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed during epoch 3 of 3, a rerun continues from the state saved after epoch 2 and ends with exactly the
    weights of an uninterrupted run (same optimizer, schedule, augmentation and attack RNG)."""
    kw = {"epochs": 3, "augment": True, "adv_train": "pgd", "adv_steps": 2, "val_robust_steps": 2, "val_robust_limit": 10}
    full = train_classifier(_cfg(bands_npz, tmp_path / "full", **kw))
    assert not list(tmp_path.glob("full_train_state*"))  # removed once the checkpoint is saved
    real_eval, calls = tc.evaluate_classifier, []

    def dies_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(tc, "evaluate_classifier", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(_cfg(bands_npz, tmp_path / "cut", **kw))
    assert (tmp_path / "cut_train_state.safetensors").is_file() and not (tmp_path / "cut.safetensors").exists()
    monkeypatch.setattr(tc, "evaluate_classifier", real_eval)
    with pytest.raises(ConfigError, match="different config \\(lr\\)"):
        train_classifier(_cfg(bands_npz, tmp_path / "cut", **{**kw, "lr": 0.1}))
    resumed = train_classifier(_cfg(bands_npz, tmp_path / "cut", **kw))
    assert resumed["val_history"] == full["val_history"] and resumed["best_epoch"] == full["best_epoch"]
    a, _ = load_classifier(tmp_path / "full")
    b, _ = load_classifier(tmp_path / "cut")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
