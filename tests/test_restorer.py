"""The public Restorer: save/load round trip, the oracle refusal, numpy/PIL helpers, bad input, and the shipped
Fashion-MNIST checkpoint restoring the guard's accuracy under gray-box PGD."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trn.attacks import PGD
from trn.checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from trn.classifiers import create_classifier, load_classifier, save_classifier
from trn.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from trn.errors import CheckpointError, ConfigError, InputError, ShapeError
from trn.gradients import GradientMapEstimator
from trn.model import create_trn
from trn.restorer import CHECKPOINT_DIR, PRETRAINED, Restorer
from trn.utils import accuracy

ROOT = Path(__file__).resolve().parents[1]
GUARD = ROOT / "checkpoints" / "fmnist_guard"
TRN_CKPT = ROOT / "checkpoints" / "trn_fmnist"
S = 16  # image size of the tiny restorers


def _trained_looking(r: Restorer, seed: int = 0) -> Restorer:
    """Non-zero head weights (a fresh TRN is the identity), so round trips compare something non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        r.net.head.weight.copy_(torch.randn(r.net.head.weight.shape, generator=g) * 0.3)
        r.net.head.bias.copy_(torch.randn(r.net.head.bias.shape, generator=g) * 0.05)
    return r


@pytest.fixture
def restorer() -> Restorer:
    return _trained_looking(Restorer.build((1, S, S), num_classes=4, arch="trn_tiny", seed=0, mode="topk", k=2))


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(5, 1, S, S, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------- build / save / load
def test_build_defaults_and_identity_at_init(x: torch.Tensor) -> None:
    r = Restorer.build((1, S, S), num_classes=4)
    assert not r.training and not r.guard.training
    assert all(not p.requires_grad for p in r.guard.parameters())
    assert r.class_names == ("0", "1", "2", "3") and r.image_shape == (1, S, S)
    assert r.estimator.settings() == {"mode": "topk", "k": 3, "scale": "std"}
    assert torch.equal(r(x), x)  # zero-initialised head: untrained restorer changes nothing


@pytest.mark.parametrize("two_stream", [True, False])
def test_save_load_round_trip(tmp_path: Path, x: torch.Tensor, two_stream: bool) -> None:
    r = _trained_looking(Restorer.build((1, S, S), num_classes=4, two_stream=two_stream, mode="argmax", k=2,
                                        scale="maxabs"))
    with torch.no_grad():
        expected = r(x)
    assert not torch.equal(expected, x)
    path = r.save(tmp_path / "r", note="hello")
    assert path == tmp_path / "r.safetensors" and (tmp_path / "r.json").is_file()
    back = Restorer.load(tmp_path / "r")
    assert not back.training
    with torch.no_grad():
        assert torch.equal(back(x), expected)
    assert back.estimator.settings() == {"mode": "argmax", "k": 2, "scale": "maxabs"}
    assert back.net.cfg == r.net.cfg and back.image_shape == (1, S, S) and back.class_names == r.class_names
    meta = json.loads((tmp_path / "r.json").read_text())
    assert meta["kind"] == "restorer" and meta["note"] == "hello" and meta["guard"]["arch"] == "small_cnn"
    assert meta["trn"]["two_stream"] is two_stream
    back.save(tmp_path / "again")  # a loaded restorer can be saved again
    with torch.no_grad():
        assert torch.equal(Restorer.load(tmp_path / "again")(x), expected)


def test_from_guard_checkpoint_records_the_guard(tmp_path: Path, x: torch.Tensor) -> None:
    kw = {"in_channels": 1, "num_classes": 3, "image_size": S, "width": 4}
    torch.manual_seed(0)
    save_classifier(tmp_path / "g", create_classifier("small_cnn", **kw), "small_cnn", kw,
                    {"image_shape": [1, S, S], "class_names": ["a", "b", "c"], "test_accuracy": 0.5})
    r = Restorer.from_guard_checkpoint(tmp_path / "g", create_trn("trn_tiny"), GradientMapEstimator())
    assert r.class_names == ("a", "b", "c") and r.image_shape == (1, S, S)
    r.save(tmp_path / "r")
    meta = json.loads((tmp_path / "r.json").read_text())
    assert meta["guard"]["path"] == str(tmp_path / "g") and meta["guard"]["test_accuracy"] == 0.5
    guard, _ = load_classifier(tmp_path / "g")
    back = Restorer.load(tmp_path / "r")
    for k, v in guard.state_dict().items():
        assert torch.equal(back.guard.state_dict()[k], v)


def test_oracle_is_refused() -> None:
    with pytest.raises(ConfigError, match="'oracle' gradient map needs true labels"):
        Restorer(create_trn("trn_tiny"), create_classifier("small_cnn", image_size=S),
                 GradientMapEstimator("oracle"))
    with pytest.raises(ConfigError, match="ablations only"):
        Restorer.build((1, S, S), mode="oracle")


def test_load_errors(tmp_path: Path, restorer: Restorer) -> None:
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        Restorer.load(tmp_path / "missing")
    save_classifier(tmp_path / "clf", restorer.guard, "small_cnn", {"image_size": S, "num_classes": 4})
    with pytest.raises(CheckpointError, match="not a restorer checkpoint"):
        Restorer.load(tmp_path / "clf")
    restorer.save(tmp_path / "r")
    state, meta = load_checkpoint(tmp_path / "r")
    meta["trn"]["width"] = 8  # weights no longer fit the recorded architecture
    save_checkpoint(tmp_path / "bad", state, meta)
    with pytest.raises(CheckpointError, match="does not match the code"):
        Restorer.load(tmp_path / "bad")
    del meta["guard"]
    save_checkpoint(tmp_path / "noguard", state, meta)
    with pytest.raises(CheckpointError, match="does not match the code"):
        Restorer.load(tmp_path / "noguard")
    with pytest.raises(ConfigError, match="no pretrained restorer 'imagenet'"):
        Restorer.pretrained("imagenet")


def test_pretrained_without_weights_says_where_it_looked(tmp_path: Path, restorer: Restorer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import trn.weights as w

    monkeypatch.setattr(w, "_PACKAGE_WEIGHTS", tmp_path / "pkg")  # an install whose weights are missing
    monkeypatch.setattr(w, "_SOURCE_WEIGHTS", tmp_path / "src")
    monkeypatch.setenv(w.ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(CheckpointError, match=r"checkpoint file not found for 'trn_fmnist_agnostic'.*TRN_WEIGHTS_DIR=.*"
                                              r"shipped: none"):
        Restorer.pretrained("fashion-mnist")
    restorer.save(tmp_path / "env" / "trn_fmnist_agnostic")  # the environment override supplies them
    assert torch.equal(Restorer.pretrained("fashion-mnist").net.head.weight, restorer.net.head.weight)


def test_save_needs_the_guard_architecture(tmp_path: Path) -> None:
    r = Restorer(create_trn("trn_tiny"), create_classifier("small_cnn", image_size=S))  # guard of unknown origin
    with pytest.raises(CheckpointError, match="guard's architecture is unknown"):
        r.save(tmp_path / "r")


# --------------------------------------------------------------------------------------------- restore paths
def test_restore_in_chunks_matches_forward(restorer: Restorer, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = restorer(x)
    got = restorer.restore(x, batch_size=2)
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad
    assert restorer.restore(x[:0]).shape == (0, 1, S, S)
    assert float(got.min()) >= 0 and float(got.max()) <= 1


def test_create_graph_makes_the_pipeline_differentiable(restorer: Restorer, x: torch.Tensor) -> None:
    xg = x.clone().requires_grad_(True)
    (g_full,) = torch.autograd.grad(restorer.guard(restorer(xg, create_graph=True)).logsumexp(1).sum(), xg)
    assert g_full.abs().sum() > 0
    assert all(p.grad is None for p in restorer.parameters())


@pytest.mark.parametrize(
    "shape",
    [(S, S), (S, S, 1), (3, S, S), (3, S, S, 1), (1, S, S)],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_restore_numpy_keeps_layout_and_dtype(restorer: Restorer, shape: tuple[int, ...], dtype: type) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, shape).astype(np.uint8) if dtype == np.uint8 else rng.random(shape).astype(dtype)
    out = restorer.restore_numpy(a)
    assert out.shape == a.shape and out.dtype == a.dtype
    f = a.astype(np.float32) / 255 if dtype == np.uint8 else a.astype(np.float32)
    x = torch.from_numpy(f.reshape(-1, S, S, 1).transpose(0, 3, 1, 2).copy())
    expected = restorer.restore(x).numpy().transpose(0, 2, 3, 1).reshape(a.shape)
    if dtype == np.uint8:
        assert np.abs(out.astype(int) - np.round(expected * 255).astype(int)).max() <= 1
    else:
        np.testing.assert_allclose(out, expected, atol=1e-6)


def test_restore_numpy_rgb() -> None:
    r = _trained_looking(Restorer.build((3, S, S), num_classes=3))
    a = np.random.default_rng(0).integers(0, 256, (2, S, S, 3)).astype(np.uint8)
    out = r.restore_numpy(a)
    assert out.shape == (2, S, S, 3) and out.dtype == np.uint8
    assert r.restore_numpy(a[0]).shape == (S, S, 3)


def test_restore_pil(restorer: Restorer) -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (S, S)).astype(np.uint8), "L")
    out = restorer.restore_pil(img)
    assert isinstance(out, Image.Image) and out.mode == "L" and out.size == (S, S)
    rgb = img.convert("RGB")  # converted to the network's single channel
    assert restorer.restore_pil(rgb).mode == "L"
    np.testing.assert_array_equal(np.asarray(out), restorer.restore_numpy(np.asarray(img)))


# --------------------------------------------------------------------------------------------- bad input
def test_bad_tensors(restorer: Restorer, x: torch.Tensor) -> None:
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    for fn in (restorer, restorer.restore):
        with pytest.raises(InputError, match="NaN"):
            fn(nan)
        with pytest.raises(InputError, match=r"\[0, 1\]"):
            fn(x * 255)
        with pytest.raises(InputError, match="floating-point"):
            fn((x * 255).to(torch.uint8))
        with pytest.raises(ShapeError, match="4-D"):
            fn(x[0])
        with pytest.raises(ShapeError, match="1 channel"):
            fn(x.repeat(1, 3, 1, 1))
        with pytest.raises(InputError, match="torch.Tensor"):
            fn(x.numpy())
    with pytest.raises(ShapeError, match="divisible by 2"):
        restorer(torch.rand(1, 1, S + 1, S + 1))


def test_bad_arrays(restorer: Restorer) -> None:
    with pytest.raises(InputError, match="uint8 or float, got dtype int32"):
        restorer.restore_numpy(np.zeros((S, S), np.int32))
    with pytest.raises(InputError, match="expected"):
        restorer.restore_numpy(np.zeros((2, S, S, 3), np.uint8))  # RGB into a grey restorer
    with pytest.raises(InputError, match="expected"):
        restorer.restore_numpy(np.zeros((1, 2, S, S, 1), np.uint8))
    bad = np.full((S, S), 0.5, np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        restorer.restore_numpy(bad)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        restorer.restore_numpy(np.full((S, S), 2.0, np.float32))
    with pytest.raises(InputError, match="empty batch|expected"):
        restorer.restore_numpy(np.zeros((0,), np.uint8))


# --------------------------------------------------------------------------------------------- shipped checkpoint
def test_shipped_restorer_metadata() -> None:
    assert PRETRAINED["fashion-mnist"] == "trn_fmnist_agnostic" and PRETRAINED["fashion-mnist-guard"] == "trn_fmnist" and CHECKPOINT_DIR == ROOT / "checkpoints"
    tensors, meta_path = checkpoint_paths(TRN_CKPT)
    assert tensors.is_file(), f"shipped restorer missing: {tensors} (trn train --config configs/trn_fmnist.yaml)"
    meta = json.loads(meta_path.read_text())
    assert meta["kind"] == "restorer" and meta["estimator"]["mode"] != "oracle"
    assert meta["guard"]["path"].endswith("fmnist_guard") and meta["image_shape"] == [1, 28, 28]
    assert tuple(meta["class_names"]) == FASHION_MNIST_CLASSES


@pytest.mark.slow
def test_shipped_restorer_restores_guard_accuracy_under_pgd() -> None:
    """Gray-box PGD-40, Linf eps 0.1, against the shipped guard on 250 seeded Fashion-MNIST test images: the guard
    is left near 0%; the same images after restoration are classified far better, and clean images stay fine."""
    r = Restorer.pretrained("fashion-mnist-guard")
    guard, _ = load_classifier(GUARD)
    for k, v in guard.state_dict().items():  # the restorer was trained against (and ships) this very guard
        assert torch.equal(r.guard.state_dict()[k], v), f"restorer's guard differs from {GUARD} at {k}"
    test = load_fashion_mnist(split="test").subset(250, seed=1)
    x, y = test.images, test.labels
    x_adv = PGD(eps=0.1, steps=40, seed=0)(guard, x, y)
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6
    clean, adv = accuracy(guard, x, y), accuracy(guard, x_adv, y)
    restored_adv, restored_clean = accuracy(guard, r.restore(x_adv), y), accuracy(guard, r.restore(x), y)
    summary = f"clean {clean:.3f}, PGD {adv:.3f}, restored PGD {restored_adv:.3f}, restored clean {restored_clean:.3f}"
    assert adv < 0.1, summary
    assert restored_adv >= 0.6 and restored_adv >= adv + 0.5, summary
    assert restored_clean >= clean - 0.06, summary


def test_dual_estimator_restorer_round_trip(tmp_path: Path, x: torch.Tensor) -> None:
    r = _trained_looking(Restorer.build((1, S, S), num_classes=4, arch="trn_tiny", seed=0, mode="dual"))
    assert r.net.map_channels == 2 and r.gradient_map(x).shape == (len(x), 2, S, S)
    r.save(tmp_path / "dual")
    back = Restorer.load(tmp_path / "dual")
    assert back.estimator.mode == "dual" and back.net.map_channels == 2
    with torch.no_grad():
        torch.testing.assert_close(back(x), r(x))


def test_estimator_must_match_the_gradient_stream() -> None:
    guard = create_classifier("small_cnn", in_channels=1, num_classes=4, image_size=S)
    with pytest.raises(ConfigError, match="'dual' estimator gives 2-channel maps but the network's gradient stream reads 1"):
        Restorer(create_trn("trn_tiny"), guard, GradientMapEstimator("dual"))
