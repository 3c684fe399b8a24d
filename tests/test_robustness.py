"""The robustness harness (trn.robustness) and APGD: EOT, white-box variants, worst case, sanity checks, cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import band_images, fit_on_bands
from safetensors.torch import load_file, save_file
from torch import nn

from trn.attacks import APGD, PGD, create_attack, eot_input_gradient, per_sample_loss
from trn.classifiers import create_classifier, save_classifier
from trn.data import ImageDataset, save_npz
from trn.defenses.stack import build_defense_stack
from trn.errors import ConfigError
from trn.gradients import GradientMapEstimator
from trn.model import create_trn
from trn.restorer import Restorer
from trn.robustness import (
    AdaptiveEvalConfig,
    DefenseRow,
    attack_view,
    check_large_eps,
    check_more_steps,
    check_transfer,
    check_whitebox_vs_blackbox,
    content_digest,
    defended_model,
    gray_box_images,
    looks_random,
    model_modes,
    run_adaptive_evaluation,
    smooth_surrogate,
    whitebox_correct,
    worst_case,
)

C, H, W, K = 1, 8, 8, 3


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, 4, 3, padding=1)
        self.fc = nn.Linear(4 * H * W, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return band_images(48, seed=1)


@pytest.fixture(scope="module")
def model() -> TinyNet:
    """TinyNet trained to ~100% on the synthetic task (under a second)."""
    torch.manual_seed(0)
    return fit_on_bands(TinyNet())


def acc(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (m(x).argmax(1) == y).float().mean().item()


# ----------------------------------------------------------------------------------------------- EOT
class RandomSign(nn.Module):
    """Two-class linear model whose logits flip sign with probability 0.2 per call: E[s] = 0.6."""

    randomized = True

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(C * H * W, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.where(torch.rand(len(x), 1) < 0.2, -1.0, 1.0)
        return s * self.lin(x.flatten(1))


def test_eot_gradient_is_the_expectation_over_randomness() -> None:
    torch.manual_seed(0)
    m = RandomSign().requires_grad_(False)
    x, y = torch.rand(4, C, H, W), torch.tensor([0, 1, 0, 1])
    w = m.lin.weight  # the margin loss z_other - z_y = s * (w_other - w_y) . x is linear in s
    exact = 0.6 * torch.stack([w[1 - t] - w[t] for t in y.tolist()]).view(4, C, H, W)
    g1, _, _ = eot_input_gradient(m, x, y, "cw", eot_iter=1)
    for i in range(4):  # one pass: the gradient of one draw, +-1 times (w_other - w_y), never the expectation
        ratio = (g1[i] / (exact[i] / 0.6)).flatten()
        assert torch.allclose(ratio, ratio[0].expand_as(ratio)) and abs(abs(ratio[0].item()) - 1) < 1e-5
    g, _, _ = eot_input_gradient(m, x, y, "cw", eot_iter=800)
    ratio = (g / (exact / 0.6)).flatten(1)  # per image, the mean sign over 800 draws: ~0.6 (std 0.03)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-4)
    assert ((ratio[:, 0] - 0.6).abs() < 0.1).all(), ratio[:, 0]


def test_whitebox_turns_on_eot_for_random_models(data) -> None:
    calls = []

    class Counting(RandomSign):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return super().forward(x)

    torch.manual_seed(0)
    m = Counting().requires_grad_(False)
    x, y = data[0][:4], data[1][:4] % 2
    assert looks_random(m, x) and not looks_random(TinyNet().eval(), x)
    calls.clear()
    whitebox_correct(m, x, y, "e2e", PGD(eps=0.1, steps=3), eot_samples=5, randomized=True)
    assert len(calls) >= 3 * 5  # every step averaged 5 passes
    calls.clear()
    whitebox_correct(m, x, y, "naive", PGD(eps=0.1, steps=3), eot_samples=5, randomized=True)
    assert len(calls) < 3 * 5  # the naive attack takes one pass per step


# ----------------------------------------------------------------------------------------------- APGD
def test_apgd_is_at_least_as_strong_as_pgd_and_stays_in_budget(model: TinyNet, data) -> None:
    x, y = data
    eps = 0.3  # where PGD-20 leaves ~30 % of this model's accuracy
    a_pgd = acc(model, PGD(eps=eps, steps=20, seed=0)(model, x, y), y)
    for loss in ("ce", "dlr"):
        x_adv = APGD(eps=eps, steps=20, loss=loss, restarts=2, seed=0)(model, x, y)
        assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        assert acc(model, x_adv, y) <= a_pgd + 1 / len(y), loss
    assert acc(model, x, y) > 0.9 and a_pgd < acc(model, x, y)  # the attack has work to do
    x_l2 = APGD(eps=1.0, steps=10, norm="l2", seed=0)(model, x, y)
    assert (x_l2 - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-5


def test_apgd_registry_losses_and_errors(model: TinyNet, data) -> None:
    assert create_attack("apgd-dlr", eps=0.1).loss == "dlr" and create_attack("apgd_ce", eps=0.1).loss == "ce"
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    # DLR: -(z_y - max_other) / (z_1 - z_3): -(3 - 1) / 3 and -(0 - 2) / 2
    torch.testing.assert_close(per_sample_loss(logits, y, "dlr"), torch.tensor([-2 / 3, 1.0]))
    torch.testing.assert_close(per_sample_loss(logits * 10 + 5, y, "dlr"), torch.tensor([-2 / 3, 1.0]))  # scale-free
    with pytest.raises(ConfigError, match="at least 3 classes"):
        per_sample_loss(torch.zeros(2, 2), torch.tensor([0, 1]), "dlr")
    with pytest.raises(ConfigError, match="restarts must be a positive integer"):
        APGD(restarts=0)
    with pytest.raises(ConfigError, match="untargeted"):
        APGD(targeted=True)
    with pytest.raises(ConfigError, match="eot_iter must be a positive integer"):
        PGD(eot_iter=0)


# ----------------------------------------------------------------------------------------------- views and modes
def test_model_modes_restore_everything_even_on_error(model: TinyNet) -> None:
    r = Restorer.build((C, H, W), num_classes=K, arch="trn_tiny", seed=0)
    stack = build_defense_stack([{"name": "bit_depth", "bits": 3}, "trn", "gcm"], model, restorer=r)
    stack.train()
    bit, stage = stack.preprocessor.stages
    with pytest.raises(RuntimeError, match="boom"), attack_view(stack, "gconst"):
        assert not stack.training and stage.hold_map and bit.bpda and not stage.bpda
        raise RuntimeError("boom")
    assert stack.training and all(m.training for m in stack.modules() if m is not r.guard)
    assert not stage.hold_map and not bit.bpda and not stack.classifier.gcm.bpda
    with attack_view(stack, "bpda"):
        assert stage.bpda and bit.bpda
    assert not stage.bpda
    with model_modes(lambda t: t):  # plain callables pass through
        pass
    with pytest.raises(ConfigError, match="unknown white-box variant"), attack_view(stack, "nope"):
        pass


def test_smooth_view_keeps_the_exact_forward_and_differentiates_the_surrogate_map(changing_restorer) -> None:
    r = changing_restorer
    stack = defended_model(r.guard, r)
    stage = stack.preprocessor.stages[0]
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3])
    surrogate = smooth_surrogate(r.guard)
    assert not any(isinstance(m, nn.ReLU) for m in surrogate.modules())
    assert any(isinstance(m, nn.ReLU) for m in r.guard.modules())  # the guard itself is untouched

    def grad(view: str) -> tuple[torch.Tensor, torch.Tensor]:
        xx = x.clone().requires_grad_(True)
        with attack_view(stack, view) as m:
            logits = m(xx)
            (g,) = torch.autograd.grad(F.cross_entropy(logits, y), xx)
        return logits.detach(), g

    (z_smooth, g_smooth), (z_const, g_const) = grad("smooth"), grad("gconst")
    assert stage.map_surrogate is None  # restored on exit
    torch.testing.assert_close(z_smooth, z_const)  # the forward pass is the exact pipeline
    # the same gradient by hand: exact map forward, the surrogate's map backward
    xx = x.clone().requires_grad_(True)
    g_map = r.gradient_map(xx)
    g_sur = r.estimator(xx, surrogate, create_graph=True)
    logits = r.guard(r.net(xx, g_map + (g_sur - g_sur.detach())))
    (want,) = torch.autograd.grad(F.cross_entropy(logits, y), xx)
    torch.testing.assert_close(g_smooth, want)
    assert (g_smooth - g_const).abs().max() > 1e-6  # the map's movement reaches the attacker


# ----------------------------------------------------------------------------------------------- worst case
def test_worst_case_is_per_image() -> None:
    a = torch.tensor([True, True, False, True])
    b = torch.tensor([True, False, True, True])
    assert worst_case({"a": a, "b": b}).tolist() == [True, False, False, True]
    assert worst_case([a]).tolist() == a.tolist()
    # per image, not per attack: each attack alone keeps 75 %, the worst case only 50 %
    assert worst_case([a, b]).float().mean() < min(a.float().mean(), b.float().mean())
    with pytest.raises(ConfigError, match="different numbers of images"):
        worst_case([a, b[:3]])
    with pytest.raises(ConfigError, match="at least one"):
        worst_case({})


# ----------------------------------------------------------------------------------------------- sanity checks
def test_sanity_checks_pass_on_a_plain_model_and_flag_masking(model: TinyNet, data, caplog) -> None:
    x, y = data
    plain = defended_model(model)
    kw = {"batch_size": 48}
    assert check_large_eps(plain, x, y, eps=0.5, steps=10, **kw).passed
    more = check_more_steps(plain, x, y, eps=0.3, steps=(2, 20), **kw)
    assert more.passed and more.values["pgd20"] <= more.values["pgd2"] + 0.01
    masked = build_defense_stack(["gcm"], model)  # shattered gradients: the naive attack cannot get anywhere
    with caplog.at_level(logging.WARNING, logger="trn.robustness"):
        flagged = check_large_eps(masked, x, y, eps=0.5, steps=10, variants=("naive",), **kw)
    assert not flagged.passed and flagged.values["accuracy"] > 0.5
    assert "SANITY CHECK FAILED (large eps)" in caplog.text
    assert check_large_eps(masked, x, y, eps=0.5, steps=10, variants=("e2e",), **kw).passed  # BPDA through GCM
    t, f = torch.ones(10, dtype=torch.bool), torch.zeros(10, dtype=torch.bool)
    half = torch.arange(10) < 5
    assert check_whitebox_vs_blackbox(half, t).passed                 # white-box stronger: fine
    bad = check_whitebox_vs_blackbox(t, half)                          # black-box found what white-box missed
    assert not bad.passed and bad.values["only_blackbox_broke"] == 0.5
    assert check_transfer(t, half).passed and not check_transfer(f, half).passed


# ----------------------------------------------------------------------------------------------- gray-box cache
def test_gray_box_cache_is_keyed_on_content_and_checked_against_the_budget(model: TinyNet, data, tmp_path: Path,
                                                                           caplog) -> None:
    x, y = data
    atk = PGD(eps=0.1, steps=3, seed=0)
    kw = {"cache_dir": tmp_path, "guard_id": "g", "dataset_id": "d", "batch_size": 48}
    a = gray_box_images(model, x, y, atk, **kw)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and (a - x).abs().max() <= 0.1 + 1e-6
    torch.testing.assert_close(gray_box_images(model, x, y, atk, **kw), a)  # read back
    x2 = (1 - x).contiguous()  # other images, same count and settings
    b = gray_box_images(model, x2, y, atk, **kw)
    assert (b - x2).abs().max() <= 0.1 + 1e-6 and len(list(tmp_path.glob("*.safetensors"))) == 2
    gray_box_images(model, x, (y + 1) % K, atk, **kw)  # other labels: another entry too
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    # a cache entry that lies outside the budget around its images is rejected and recomputed
    meta = {"content": content_digest(x, y), "dataset": "d", "guard": "g"}
    save_file({"x_adv": (x + 0.5).clamp(0, 1).contiguous()}, str(files[0]), metadata=meta)
    with caplog.at_level(logging.WARNING, logger="trn.robustness"):
        c = gray_box_images(model, x, y, atk, **kw)
    assert "beyond the budget" in caplog.text and (c - x).abs().max() <= 0.1 + 1e-6
    assert (load_file(str(files[0]))["x_adv"] - x).abs().max() <= 0.1 + 1e-6  # rewritten


# ----------------------------------------------------------------------------------------------- adaptive evaluation
@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory, model: TinyNet) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("adaptive")
    kw = {"in_channels": C, "num_classes": K, "image_size": H, "width": 4}
    torch.manual_seed(0)
    guard = fit_on_bands(create_classifier("small_cnn", **kw), steps=40)
    meta = {"image_shape": [C, H, W], "class_names": ["a", "b", "c"]}
    save_classifier(tmp / "guard", guard, "small_cnn", kw, meta)
    save_classifier(tmp / "other", create_classifier("small_cnn", **kw).eval(), "small_cnn", kw, meta)
    r = Restorer.from_guard_checkpoint(tmp / "guard", create_trn("trn_tiny"), GradientMapEstimator())
    with torch.no_grad():  # a restorer that changes images
        r.net.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    r.save(tmp / "trn")
    xt, yt = band_images(12, seed=5)
    data_path = save_npz(tmp / "data.npz", ImageDataset(xt, yt, ("a", "b", "c"), "tiny"))
    return {"guard": str(tmp / "guard"), "other": str(tmp / "other"), "trn": str(tmp / "trn"),
            "data": str(data_path), "out": str(tmp / "out")}


@pytest.mark.slow
def test_adaptive_evaluation_end_to_end(tiny_checkpoints: dict[str, str]) -> None:
    p = tiny_checkpoints
    rows = [{"name": "restorer", "defenses": [{"name": "trn", "checkpoint": p["trn"]}]},
            {"name": "own classifier", "classifier": p["other"]},
            {"name": "later", "defenses": [{"name": "trn", "checkpoint": p["trn"] + "_missing"}]}]
    cfg = {"dataset": "npz", "data_dir": p["data"], "guard": p["guard"], "rows": rows, "n": 8, "n_square": 4,
           "n_sanity": 4, "apgd_steps": 4, "apgd_restarts": 2, "apgd_variants": ["smooth", "e2e"],
           "pgd_steps": 3, "pgd_variants": ["gconst", "bpda"], "square_queries": 10,
           "sanity_steps": [1, 3], "sanity_large_eps_steps": 3, "transfer_steps": 3, "batch_size": 8, "device": "cpu", "out_dir": p["out"]}
    with pytest.warns(UserWarning, match="skipping row 'later'"):
        report = run_adaptive_evaluation(cfg)
    res = report.results
    assert list(res["rows"]) == ["restorer", "own classifier"] and "later" in res["skipped"]
    trn = res["rows"]["restorer"]
    assert trn["variants"] == ["e2e", "gconst", "smooth", "bpda"]
    assert res["rows"]["own classifier"]["variants"] == ["e2e"]
    assert "APGD-CE (e2e)" in res["rows"]["own classifier"]["attacks"] and not trn["randomized"]
    assert set(trn["attacks"]) == {"APGD-CE (smooth)", "APGD-CE (e2e)", "APGD-DLR (smooth)", "APGD-DLR (e2e)",
                                   "PGD-3 (gconst)", "PGD-3 (bpda)"}
    for r in res["rows"].values():
        worst_seen = [a["worst_so_far"] for a in r["attacks"].values()]
        assert worst_seen == sorted(worst_seen, reverse=True)  # the worst case only goes down
        assert r["gradient_worst"] == worst_seen[-1] <= r["clean"]
        assert r["worst"] <= r["gradient_worst"] and r["worst_on_square_images"] <= r["square"]["accuracy"]
        names = [c["name"] for c in r["sanity"]]
        assert {"large eps", "white-box >= black-box", "transfer weaker than white-box"} <= set(names)
        assert all(isinstance(c["passed"], bool) for c in r["sanity"])
    flags = [f"{n}: {c['message']}" for n, r in res["rows"].items() for c in r["sanity"] if not c["passed"]]
    assert res["flags"] == flags
    out = Path(p["out"])
    assert (out / "report.md").read_text() == report.markdown
    assert json.loads((out / "report.json").read_text())["rows"]["restorer"]["worst"] == trn["worst"]
    assert "| restorer |" in report.markdown and "Gradient-masking sanity checks" in report.markdown
    assert (out / "adaptive.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adaptive_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown white-box variant"):
        AdaptiveEvalConfig(pgd_variants=["sideways"])
    with pytest.raises(ConfigError, match="must be <= n"):
        AdaptiveEvalConfig(n=10, n_square=20)
    with pytest.raises(ConfigError, match="row 'x'.*unknown defence"):
        AdaptiveEvalConfig(rows=[DefenseRow("x", ["nonsense"])])
    with pytest.raises(ConfigError, match="apgd_restarts must be a positive integer"):
        AdaptiveEvalConfig(apgd_restarts=0)


def test_shipped_adaptive_config_loads() -> None:
    from trn.config import load_config

    root = Path(__file__).resolve().parents[1]
    c = load_config(AdaptiveEvalConfig, root / "configs" / "eval_robust_fmnist.yaml")
    assert c.n >= 1000 and c.square_queries == 5000 and c.eps == 0.1 and c.apgd_losses == ["ce", "dlr"]
    assert {"e2e", "gconst", "bpda"} <= set(c.pgd_variants) and c.apgd_restarts >= 2
    assert any(r.classifier for r in c.rows) and any(r.defenses for r in c.rows)
