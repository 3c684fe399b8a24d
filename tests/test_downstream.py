"""Loading a user's classifier (trn checkpoint, TorchScript, torch.export), the zoo families and fidelity metrics."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from torch import nn

from trn.attacks import create_attack
from trn.classifiers import create_classifier, load_classifier, save_classifier
from trn.downstream import ExternalClassifier, detect_format, load_downstream, validate_classifier
from trn.errors import CheckpointError, ShapeError
from trn.fidelity import PSNR_CAP, fidelity, psnr_per_image, ssim_per_image
from trn.gradients import estimate_gradient_map
from trn.zoo import ZOO_FAMILIES, create_zoo_model


class TinyNet(nn.Module):
    """A user's model: BatchNorm (eval/train matters), [0, 1] in, logits out."""

    def __init__(self, in_channels: int = 1, out: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 14 * 14, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture
def net() -> TinyNet:
    torch.manual_seed(0)
    m = TinyNet()
    with torch.no_grad():  # non-trivial running stats, so train-mode and eval-mode outputs differ
        m.body[1].running_mean.uniform_(-0.5, 0.5)
        m.body[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def _x(n: int = 3, c: int = 1) -> torch.Tensor:
    return torch.rand(n, c, 28, 28, generator=torch.Generator().manual_seed(1))


def _torchscript(tmp_path, model: nn.Module, name: str = "m.pt"):
    path = tmp_path / name
    torch.jit.script(model).save(str(path))
    return path


def _export(tmp_path, model: nn.Module, name: str = "m.pt2", dynamic: bool = True):
    path = tmp_path / name
    shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic else None
    prog = torch.export.export(model, (_x(2),), dynamic_shapes=shapes)
    torch.export.save(prog, str(path))
    return path


# ------------------------------------------------------------------ each format loads and matches the original
def test_load_trn_checkpoint(tmp_path):
    m = create_classifier("zoo_mlp", hidden=16).eval()
    save_classifier(tmp_path / "clf", m, "zoo_mlp", {"hidden": 16}, {"image_shape": [1, 28, 28]})
    for given in (tmp_path / "clf", tmp_path / "clf.safetensors", tmp_path / "clf.json"):
        assert detect_format(given) == "checkpoint"
        clf = load_downstream(given)
        assert clf.num_classes == 10 and not clf.training
        assert torch.allclose(clf(_x()), m(_x()), atol=1e-6)
        assert not any(p.requires_grad for p in clf.parameters())


def test_load_checkpoint_wrong_image_shape(tmp_path):
    m = create_classifier("zoo_mlp", hidden=16)
    save_classifier(tmp_path / "clf", m, "zoo_mlp", {"hidden": 16}, {"image_shape": [1, 28, 28]})
    with pytest.raises(ShapeError, match=r"trained on \(1, 28, 28\) images"):
        load_downstream(tmp_path / "clf", image_shape=(3, 28, 28))


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_load_external_formats(tmp_path, net, fmt):
    path = _torchscript(tmp_path, net) if fmt == "torchscript" else _export(tmp_path, net)
    assert detect_format(path) == fmt
    clf = load_downstream(path, num_classes=10)
    assert isinstance(clf, ExternalClassifier) and clf.format == fmt and clf.num_classes == 10
    for n in (1, 2, 5):  # any batch size
        assert torch.allclose(clf(_x(n)), net(_x(n)), atol=1e-5)
    # attacks and the gradient map toggle every submodule's mode: must work (export programs refuse eval())
    x, y = _x(4), net(_x(4)).argmax(1)
    x_adv = create_attack("pgd", eps=0.1, steps=3, seed=0)(clf, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(x_adv, x)
    g = estimate_gradient_map(x, clf)
    assert g.shape == x.shape and g.abs().sum() > 0
    assert torch.allclose(clf(x), net(x), atol=1e-5)  # still in eval mode (BatchNorm running stats) afterwards
    clf.to("cpu")  # moving works for the hidden module


# ------------------------------------------------------------------ bad files give clear errors
def test_wrong_output_shape(tmp_path):
    class Flat(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :7].reshape(-1, 7, 1)  # (N, 7, 1), not (N, K)

    with pytest.raises(ShapeError, match=r"returns shape \(2, 7, 1\).*expected \(2, num_classes\) logits"):
        load_downstream(_torchscript(tmp_path, Flat()))


def test_wrong_num_classes(tmp_path, net):
    with pytest.raises(ShapeError, match="predicts 10 classes but the data has 5"):
        load_downstream(_torchscript(tmp_path, net), num_classes=5)


def test_wrong_input_channels(tmp_path):
    torch.manual_seed(0)
    rgb = TinyNet(in_channels=3).eval()
    path = _torchscript(tmp_path, rgb)
    with pytest.raises(ShapeError, match=r"does not accept a \(2, 1, 28, 28\) batch"):
        load_downstream(path, image_shape=(1, 28, 28))
    assert load_downstream(path, image_shape=(3, 28, 28)).num_classes == 10


def test_static_batch_export_hint(tmp_path, net):
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(net, (_x(1),)), str(path))
    with pytest.raises(ShapeError, match="export it with a dynamic batch dimension"):
        load_downstream(path)


def test_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="is not a classifier file"):
        load_downstream(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="not found"):
        load_downstream(tmp_path / "missing.pt")
    import zipfile

    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("a/readme.txt", "x")
    with pytest.raises(CheckpointError, match="neither TorchScript nor a torch.export program"):
        load_downstream(tmp_path / "other.zip")


def test_restorer_checkpoint_is_not_a_classifier(tmp_path):
    from trn.restorer import Restorer

    Restorer.build().save(tmp_path / "r")
    with pytest.raises(CheckpointError, match="not a classifier checkpoint"):
        load_downstream(tmp_path / "r")


def test_unsafe_formats_refused_without_unpickling(tmp_path, net, monkeypatch):
    torch.save(net, tmp_path / "full.pt")            # a pickled module
    torch.save(net.state_dict(), tmp_path / "sd.pt")  # a pickled state dict
    torch.save(net, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}))

    def boom(*a, **k):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    for name in ("full.pt", "sd.pt"):
        with pytest.raises(CheckpointError, match="written by torch.save .a pickle.*refused"):
            load_downstream(tmp_path / name)
    for name in ("legacy.pt", "plain.pkl"):
        with pytest.raises(CheckpointError, match="is a pickle file.*refused"):
            load_downstream(tmp_path / name)


def test_safe_formats_load_without_python_unpickling(tmp_path, net, monkeypatch):
    ts, ep = _torchscript(tmp_path, net), _export(tmp_path, net)

    def boom(*a, **k):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    for p in (ts, ep):
        assert torch.allclose(load_downstream(p)(_x()), net(_x()), atol=1e-5)


def test_probabilities_warn(tmp_path, net):
    soft = nn.Sequential(net, nn.Softmax(1)).eval()
    with pytest.warns(UserWarning, match="probabilities, not logits"):
        load_downstream(_torchscript(tmp_path, soft))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_classifier(net, (1, 28, 28))  # logits: no warning


# ------------------------------------------------------------------ zoo
@pytest.mark.parametrize("name", sorted(ZOO_FAMILIES))
@pytest.mark.parametrize("n", [0, 1, 2])
def test_zoo_families(name, n):
    torch.manual_seed(0)
    m = create_zoo_model(name).eval()
    x = torch.rand(n, 1, 28, 28, requires_grad=True)
    out = m(x)
    assert out.shape == (n, 10)
    assert torch.allclose(m.forward_head(m.forward_features(x)), out)
    if n:
        out.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_zoo_registered_and_roundtrip(tmp_path):
    m = create_classifier("zoo_vit", depth=1).eval()
    save_classifier(tmp_path / "vit", m, "zoo_vit", {"depth": 1})
    m2, _ = load_classifier(tmp_path / "vit")
    assert torch.allclose(m(_x()), m2(_x()), atol=1e-6)


def test_zoo_bad_arguments():
    from trn.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown zoo classifier 'zoo_nope'"):
        create_zoo_model("zoo_nope")
    for name in ("zoo_vit", "zoo_mixer"):
        with pytest.raises(ConfigError, match="not divisible by the patch size"):
            create_zoo_model(name, image_size=30, patch=4)
    with pytest.raises(ConfigError, match="bad arguments"):
        create_zoo_model("zoo_mlp", bogus=1)


# ------------------------------------------------------------------ fidelity
def test_psnr_matches_definition_and_caps():
    x = _x(4)
    noisy = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    want = 10 * torch.log10(1.0 / (noisy - x).pow(2).flatten(1).mean(1))
    assert torch.allclose(psnr_per_image(noisy, x), want, atol=1e-3)
    assert torch.equal(psnr_per_image(x, x), torch.full((4,), PSNR_CAP))


def test_ssim_and_fidelity():
    x = _x(3)
    assert torch.allclose(ssim_per_image(x, x), torch.ones(3), atol=1e-4)
    worse = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    better = (x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    fw, fb = fidelity(worse, x), fidelity(better, x)
    assert fb["psnr"] > fw["psnr"] + 10 and fb["ssim"] > fw["ssim"] and fb["max_abs"] < fw["max_abs"]
    empty = fidelity(x[:0], x[:0])
    assert empty["psnr"] != empty["psnr"]  # NaN


def test_fidelity_bad_input():
    with pytest.raises(ShapeError, match="must have the same shape"):
        fidelity(_x(2), _x(3))
    with pytest.raises(Exception, match=r"\[0, 1\]"):
        psnr_per_image(_x(2) * 3, _x(2))


class _Marker:
    """Unpickling this creates a file: proof that code from the archive ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _rewrite(src, dst, edit) -> None:
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info)))


def test_export_archive_pickles_never_run(tmp_path, net):
    ep = _export(tmp_path, net)
    marker = tmp_path / "ran.txt"
    evil = tmp_path / "evil.pt2"
    _rewrite(ep, evil, lambda n, b: pickle.dumps(_Marker(str(marker))) if "sample_inputs" in n else b)
    clf = load_downstream(evil)  # the example inputs (a pickle) are blanked before torch.export.load sees them
    assert torch.allclose(clf(_x()), net(_x()), atol=1e-5) and not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - torch's own loader does run it: the check above is not vacuous
        torch.export.load(str(evil))
    assert marker.exists()


def test_export_archive_with_pickled_weight_refused(tmp_path, net):
    import json

    ep = _export(tmp_path, net)
    bad = tmp_path / "bad.pt2"

    def flag(name, b):
        if not name.endswith("weights_config.json"):
            return b
        cfg = json.loads(b)
        next(iter(cfg["config"].values()))["use_pickle"] = True
        return json.dumps(cfg).encode()

    _rewrite(ep, bad, flag)
    with pytest.raises(CheckpointError, match="stored as a pickled object; refused"):
        load_downstream(bad)
