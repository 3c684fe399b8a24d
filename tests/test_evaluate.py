"""End-to-end evaluation on tiny models: report.md / report.json / PNGs with gray-box, adaptive and BPDA results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trn.classifiers import create_classifier, save_classifier
from trn.config import load_config
from trn.data import ImageDataset, save_npz
from trn.errors import ConfigError
from trn.evaluate import EvalConfig, bpda, make_attack, run_evaluation
from trn.gradients import GradientMapEstimator
from trn.model import create_trn
from trn.restorer import Restorer

N, S, K = 12, 8, 3
ROOT = Path(__file__).resolve().parents[1]


def _restorer(guard_path: Path, two_stream: bool, seed: int) -> Restorer:
    r = Restorer.from_guard_checkpoint(guard_path, create_trn("trn_tiny", two_stream=two_stream),
                                       GradientMapEstimator())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a non-identity restorer, so the TRN rows differ from "no defence"
        r.net.head.weight.copy_(torch.randn(r.net.head.weight.shape, generator=g) * 0.2)
    return r


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> EvalConfig:
    tmp = tmp_path_factory.mktemp("eval")
    kw = {"in_channels": 1, "num_classes": K, "image_size": S, "width": 4}
    torch.manual_seed(0)
    guard = create_classifier("small_cnn", **kw).eval()
    x = torch.randint(0, 256, (N, 1, S, S), generator=torch.Generator().manual_seed(1)).float() / 255
    with torch.no_grad():
        y = guard(x).argmax(1)
    data = save_npz(tmp / "data.npz", ImageDataset(x, y, ("a", "b", "c"), "tiny"))
    save_classifier(tmp / "guard", guard, "small_cnn", kw, {"image_shape": [1, S, S], "class_names": ["a", "b", "c"]})
    _restorer(tmp / "guard", True, 0).save(tmp / "trn")
    _restorer(tmp / "guard", False, 1).save(tmp / "trn_one")
    return EvalConfig(dataset="npz", data_dir=str(data), guard=str(tmp / "guard"), restorer=str(tmp / "trn"),
                      ablations={"TRN one-stream (ablation)": str(tmp / "trn_one")}, estimator_ablation=["argmax"],
                      n_main=None, n_subset=8, eps_main=0.1, eps_sweep=[0.05, 0.1],
                      attacks=["fgsm", "pgd", "deepfool"], adaptive_steps=2, adaptive_eps=[0.1], batch_size=5,
                      device="cpu", out_dir=str(tmp / "report"))


@pytest.fixture(scope="module")
def report(cfg: EvalConfig):
    return run_evaluation(cfg)


def test_outputs_are_written(cfg: EvalConfig, report) -> None:
    out = Path(cfg.out_dir)
    for name in ("report.md", "report.json", "samples.png", "accuracy_vs_eps.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in ("samples.png", "accuracy_vs_eps.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.md").read_text() == report.markdown
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report.results))


def test_both_threat_models_are_reported(cfg: EvalConfig, report) -> None:
    res = report.results
    assert res["n_main"] == N and res["n_subset"] == 8
    rows = {"no defence", "TRN", "TRN (estimation: argmax)", "TRN one-stream (ablation)",
            "TRN + oracle gradient (ablation)"}
    # gray-box: every attack (and clean) x every defence row, accuracies in [0, 1]
    assert set(res["gray_box"]) == {"clean", "fgsm", "pgd", "deepfool"}
    for per_row in res["gray_box"].values():
        assert set(per_row) == rows and all(0.0 <= v <= 1.0 for v in per_row.values())
    assert res["gray_box"]["clean"]["no defence"] == 1.0  # labels are the guard's own predictions
    assert res["gray_box"]["pgd"]["no defence"] < 1.0
    assert set(res["sweep"]) == {"0.05", "0.1"} and set(res["sweep"]["0.1"]) == {"fgsm", "pgd", "deepfool"}
    # adaptive white-box: each variant and the per-image worst case, for TRN and the one-stream ablation
    assert set(res["adaptive"]) == {"0.1"}
    ada = res["adaptive"]["0.1"]
    assert ada["no defence"] == res["sweep"]["0.1"]["pgd"]["no defence"]
    assert set(ada["TRN"]) == {"e2e", "gconst", "smooth", "bpda", "worst"}
    assert set(ada["TRN one-stream (ablation)"]) == {"e2e", "bpda", "worst"}  # no map to hold constant
    for v in (ada["TRN"], ada["TRN one-stream (ablation)"]):
        assert all(0.0 <= a <= 1.0 for a in v.values())
        assert v["worst"] <= min(a for k, a in v.items() if k != "worst")  # the worst case is per image
    md = report.markdown
    assert "### Gray-box (attacker targets the guard), Linf eps = 0.1, 12 test images" in md
    assert "### Adaptive white-box, Linf eps = 0.1, PGD-2, 8 test images" in md
    assert "| defence | gray-box PGD-40 | end-to-end | map held constant | smooth map | BPDA | **worst case** |" in md
    assert "### Gray-box eps sweep" in md and "| TRN one-stream (ablation) |" in md
    assert "CW-L2 and DeepFool use an L2 budget of 1.5" in md


def test_gray_box_cache_is_reused(cfg: EvalConfig, report) -> None:
    cached = sorted((Path(cfg.out_dir) / "cache").glob("*.safetensors"))
    assert len(cached) == 3 + 2 * 3  # main table (n=12) + sweep (n=8): 3 attacks each
    mtimes = {p: p.stat().st_mtime_ns for p in cached}
    again = run_evaluation(EvalConfig(**{**cfg.__dict__, "adaptive_eps": [], "out_dir": cfg.out_dir}))
    assert again.results["gray_box"] == report.results["gray_box"]
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # read, not recomputed


def test_make_attack_settings_and_errors(cfg: EvalConfig) -> None:
    assert make_attack("pgd", 0.1, cfg).params()["steps"] == 40
    assert make_attack("cw", 0.1, cfg).eps == pytest.approx(1.5)  # L2 budget = l2_per_linf * eps
    with pytest.raises(ConfigError, match="unknown evaluation attack 'square'"):
        make_attack("square", 0.1, cfg)


def test_bpda_is_identity_backward() -> None:
    x = torch.rand(2, 1, 4, 4, requires_grad=True)
    y = bpda(lambda t: t.flip(-1) ** 2)(x)
    torch.testing.assert_close(y, x.detach().flip(-1) ** 2)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_shipped_eval_config_loads() -> None:
    c = load_config(EvalConfig, ROOT / "configs" / "eval_fmnist.yaml")
    assert c.guard == "checkpoints/fmnist_guard" and c.restorer == "checkpoints/trn_fmnist" and c.eps_main == 0.1
    for path in (c.restorer, *c.ablations.values()):  # every row's checkpoint is shipped
        assert (ROOT / (path + ".safetensors")).is_file(), path


def test_gray_box_cache_is_keyed_on_the_images(cfg: EvalConfig, tmp_path: Path) -> None:
    """Issue 14's bug: the same out_dir with other images must not return the first images' adversarials."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(7)
    dark = torch.rand(N, 1, S, S, generator=g) * 0.3          # two datasets of the same size, far apart
    bright = 1 - torch.rand(N, 1, S, S, generator=g) * 0.3
    labels = torch.randint(0, K, (N,), generator=g)
    out = tmp_path / "shared_out"
    small = {**cfg.__dict__, "ablations": {}, "estimator_ablation": [], "oracle": False, "attacks": ["pgd"],
             "n_subset": N, "eps_sweep": [0.1], "adaptive_eps": [], "out_dir": str(out)}
    for name, x in (("dark", dark), ("bright", bright)):
        path = save_npz(tmp_path / f"{name}.npz", ImageDataset(x, labels, ("a", "b", "c"), name))
        run_evaluation(EvalConfig(**{**small, "data_dir": str(path)}))
    cached = [load_file(str(p))["x_adv"] for p in sorted((out / "cache").glob("*.safetensors"))]
    tol = 0.1 + 1 / 255  # the npz round trip stores 8-bit images
    near_bright = [a for a in cached if a.shape == bright.shape and (a - bright).abs().max() <= tol]
    assert near_bright, "the second dataset reused adversarials crafted on the first one"
    assert len(cached) == 2 and all(a.shape == bright.shape for a in cached)  # PGD on each dataset
