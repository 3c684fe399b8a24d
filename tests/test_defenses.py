"""Related defences (GCM, UniG, GFA, classical transforms), their composition, the Square attack, the robust
training options and the defence evaluation -- on a tiny model trained in a second on synthetic 8x8 images."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import band_images, fit_on_bands
from torch import nn

from trn.attacks import PGD, Square, create_attack
from trn.classifiers import create_classifier, save_classifier
from trn.cli import build_parser
from trn.config import from_dict, load_config
from trn.defenses import (
    GCM,
    JPEG,
    BitDepthReduction,
    GaussianBlur,
    GCMClassifier,
    MedianSmoothing,
    UniGClassifier,
    bit_depth_reduction,
    bpda_policy,
    build_defense_stack,
    build_preprocessor,
    gaussian_blur,
    gcm,
    gfa_penalty,
    jpeg,
    median_smoothing,
    parse_defense_spec,
)
from trn.defenses.stack import RestorerStage
from trn.errors import ConfigError, ShapeError
from trn.evaluate_defenses import DefenseEvalConfig, run_defense_evaluation, whitebox_correct
from trn.train_classifier import ClassifierTrainConfig, train_classifier

K, C, H, W = 3, 1, 8, 8  # classes, channels, height, width of the synthetic problem


class TinyNet(nn.Module):
    """conv -> pool -> 16 features -> linear head, with the forward_features / forward_head split UniG needs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, 4, 3, padding=1)
        self.fc = nn.Linear(4 * (H // 2) * (W // 2), 16)
        self.head = nn.Linear(16, K)
        self.num_classes = K

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(F.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1)))  # (B, 16)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return band_images(64, seed=1)


@pytest.fixture(scope="module")
def model() -> TinyNet:
    """TinyNet trained to ~100% on the synthetic task (about a second)."""
    torch.manual_seed(0)
    return fit_on_bands(TinyNet())


def acc(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (m(x).argmax(1) == y).float().mean().item()


def test_model_fixture_learned(model: TinyNet, data) -> None:
    assert acc(model, *data) > 0.95


# ----------------------------------------------------------------------------------------------- GCM
def input_grad(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(m(x), y, reduction="sum"), x)
    return g


def test_gcm_keeps_outputs_but_scrambles_input_gradient(model: TinyNet, data) -> None:
    x, y = data
    defended = GCMClassifier(model)
    with torch.no_grad():
        assert (gcm(x) - x).abs().max() <= 1e-7  # at most float rounding of eps = 1e-8
        torch.testing.assert_close(defended(x), model(x), atol=1e-5, rtol=0)
    g_plain, g_gcm = input_grad(model, x, y), input_grad(defended, x, y)
    assert torch.isfinite(g_gcm).all()
    assert g_gcm.norm() / g_plain.norm() > 1e6  # multiplied by ~ w * eps * cos(w x) = +-1e12
    cos = F.cosine_similarity(g_gcm.flatten(1), g_plain.flatten(1), dim=1)
    assert cos.abs().mean() < 0.3  # pseudo-random sign per pixel: direction lost
    g_bpda = input_grad(GCMClassifier(model, bpda=True), x, y)
    torch.testing.assert_close(g_bpda, g_plain, atol=1e-4, rtol=1e-3)  # BPDA recovers the real gradient


def test_gcm_function_module_and_errors() -> None:
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(GCM(w=3.0, eps=0.1)(x), gcm(x, 3.0, 0.1))
    assert gcm(x.double()).dtype == torch.float64 and gcm(x[:0]).shape == (0, 1, 4, 4)
    with pytest.raises(ConfigError, match="w must be a finite number"):
        gcm(x, w=float("nan"))
    with pytest.raises(ConfigError, match="eps must be >= 0"):
        GCM(eps=-1.0)
    with pytest.raises(ConfigError, match="nn.Module classifier"):
        GCMClassifier(lambda t: t)  # type: ignore[arg-type]


def test_whitebox_variants_expose_gcm_masking(model: TinyNet, data) -> None:
    """Naive PGD through GCM is stalled by the shattered gradient; BPDA does as well as attacking the bare model."""
    x, y = data
    stack = build_defense_stack(["gcm"], model)
    kw = {"eps": 0.3, "steps": 10, "batch_size": 64}
    naive = whitebox_correct(stack, x, y, "naive", **kw).float().mean().item()
    e2e = whitebox_correct(stack, x, y, "e2e", **kw).float().mean().item()
    plain = acc(model, PGD(eps=0.3, steps=10, seed=0)(model, x, y), y)
    assert abs(e2e - plain) <= 2 / len(y)
    assert naive >= e2e + 0.2
    assert stack.classifier.gcm.bpda is False  # the policy was undone


def test_bpda_policy_sets_and_restores_flags(model: TinyNet) -> None:
    stack = build_defense_stack([{"name": "jpeg"}, {"name": "bit_depth", "bits": 4}, "gcm"], model)
    jpeg_stage, bit_stage = stack.preprocessor.stages
    with bpda_policy(stack, "nondifferentiable"):
        assert (jpeg_stage.bpda, bit_stage.bpda, stack.classifier.gcm.bpda) == (False, True, True)
    with bpda_policy(stack, "all"):
        assert jpeg_stage.bpda and bit_stage.bpda
    assert not (jpeg_stage.bpda or bit_stage.bpda or stack.classifier.gcm.bpda)
    with pytest.raises(ConfigError, match="BPDA policy"), bpda_policy(stack, "some"):  # type: ignore[arg-type]
        pass


# ----------------------------------------------------------------------------------------------- UniG
def test_unig_keeps_clean_predictions_and_clamps_p(model: TinyNet, data) -> None:
    x, _ = data
    model = copy.deepcopy(model).requires_grad_(True)
    unig = UniGClassifier(model, delta=0.5, steps=1, lr=10.0, seed=0)
    with torch.no_grad():
        logits, p = unig.defend(x)
        base = model(x).argmax(1)
    assert logits.shape == (len(x), K) and p.shape == (len(x), 16)
    assert (logits.argmax(1) == base).float().mean() >= 0.9
    assert p.min() >= 0.5 - 1e-6 and p.max() <= 1.5 + 1e-6
    assert not torch.equal(p, torch.ones_like(p))  # P really was drawn / optimised
    for prm in model.parameters():
        assert prm.grad is None  # the backbone is frozen, nothing accumulates


def test_unig_single_image_uses_references(model: TinyNet, data) -> None:
    x, _ = data
    unig = UniGClassifier(model, reference_images=x[-4:], num_reference=4, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            out = unig(x[:1])
    assert out.shape == (1, K) and torch.isfinite(out).all()
    with pytest.warns(UserWarning, match="single image without reference_images"):
        UniGClassifier(model, seed=0)(x[:1])


def test_unig_seeded_eot_and_gradients(model: TinyNet, data) -> None:
    x, y = data
    a, b = UniGClassifier(model, seed=3), UniGClassifier(model, seed=3)
    torch.testing.assert_close(a(x[:8]), b(x[:8]))  # a fresh instance replays the same draws
    assert UniGClassifier.randomized and build_defense_stack(["unig"], model).randomized
    xr = x[:8].clone().requires_grad_(True)
    eot = a.expected_logits(xr, samples=4)
    (g,) = torch.autograd.grad(F.cross_entropy(eot, y[:8]), xr)
    assert eot.shape == (8, K) and torch.isfinite(g).all() and g.abs().sum() > 0


def test_unig_errors(model: TinyNet) -> None:
    with pytest.raises(ConfigError, match="forward_features"):
        UniGClassifier(nn.Sequential(nn.Flatten(), nn.Linear(H * W, K)))
    with pytest.raises(ConfigError, match="delta must be a number"):
        UniGClassifier(model, delta=-0.1)
    with pytest.raises(ConfigError, match="steps must be an integer"):
        UniGClassifier(model, steps=1.5)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- GFA
@pytest.mark.parametrize("layers", ["first", "deep", ["conv"]])
def test_gfa_penalty_is_finite_differentiable_and_trainable(data, layers) -> None:
    x, y = data
    torch.manual_seed(0)
    net = TinyNet()
    penalty = gfa_penalty(net, x, y, layers)
    assert penalty.ndim == 0 and torch.isfinite(penalty) and 0 <= penalty.item() <= 2 * (1 + (layers != "first"))
    grads = torch.autograd.grad(penalty, list(net.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    start = penalty.item()
    for _ in range(15):
        pen, logits = gfa_penalty(net, x, y, layers, return_logits=True)
        loss = F.cross_entropy(logits, y) + 2.0 * pen
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert gfa_penalty(net, x, y, layers).item() < start - 0.02


def test_gfa_errors(data) -> None:
    x, y = data
    with pytest.raises(ConfigError, match="GFA layers must be one of"):
        gfa_penalty(TinyNet(), x, y, "middle")
    with pytest.raises(ConfigError, match="has no module"):
        gfa_penalty(TinyNet(), x, y, ["conv9"])


# ----------------------------------------------------------------------------------------------- transforms
TRANSFORMS = {
    "jpeg": (jpeg, JPEG, {"quality": 50}),
    "bit_depth": (bit_depth_reduction, BitDepthReduction, {"bits": 3}),
    "median": (median_smoothing, MedianSmoothing, {"kernel_size": 3}),
    "gaussian_blur": (gaussian_blur, GaussianBlur, {"kernel_size": 3, "sigma": 1.0}),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("n", [0, 1, 2])
@pytest.mark.parametrize("c", [1, 3])
def test_transforms_keep_shape_and_range(name: str, n: int, c: int) -> None:
    fn, cls, kw = TRANSFORMS[name]
    x = torch.rand(n, c, 16, 16, generator=torch.Generator().manual_seed(n))
    y = fn(x, **kw)
    assert y.shape == x.shape and y.dtype == x.dtype
    if n:
        assert y.min() >= 0 and y.max() <= 1 and not torch.equal(y, x)
        torch.testing.assert_close(cls(**kw)(x), y)  # function == module


def test_transform_gradients_and_bpda() -> None:
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for module in (JPEG(50), MedianSmoothing(3), GaussianBlur(3, 1.0)):  # differentiable: informative gradient
        (g,) = torch.autograd.grad(module(x).sum(), x)
        assert module.differentiable and torch.isfinite(g).all() and g.abs().sum() > 0
    (g,) = torch.autograd.grad(BitDepthReduction(3)(x).sum(), x)
    assert not BitDepthReduction.differentiable and g.abs().sum() == 0  # rounding: zero gradient
    for module in (BitDepthReduction(3, bpda=True), JPEG(50, bpda=True)):
        (g,) = torch.autograd.grad(module(x).sum(), x)
        assert torch.equal(g, torch.ones_like(g))  # BPDA: identity backward, same forward
    xd = torch.rand(1, 1, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2
    assert torch.autograd.gradcheck(lambda t: gaussian_blur(t, 3, 0.8), (xd.requires_grad_(True),))


def test_transform_errors() -> None:
    with pytest.raises(ShapeError, match="1 \\(grey\\) or 3 \\(RGB\\) channels"):
        jpeg(torch.rand(1, 2, 16, 16))
    with pytest.raises(ConfigError, match="JPEG quality must be a number in \\[1.0, 100.0\\]"):
        JPEG(quality=0)
    with pytest.raises(ConfigError, match="bits must be an integer in \\[1, 16\\]"):
        BitDepthReduction(bits=0)
    with pytest.raises(ConfigError, match="kernel_size must be an odd positive integer"):
        median_smoothing(torch.rand(1, 1, 8, 8), 4)
    with pytest.raises(ConfigError, match="sigma must be a number"):
        GaussianBlur(sigma=0.0)


# ----------------------------------------------------------------------------------------------- composition
class Recorder(nn.Module):
    """A stand-in restorer: records what it is given, returns x / 2."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return x / 2


def test_stack_composition_order(model: TinyNet, data) -> None:
    x, _ = data
    rec = Recorder()
    stack = build_defense_stack([{"name": "bit_depth", "bits": 1}, "trn", "gcm", {"name": "unig", "seed": 0}],
                                model, restorer=rec)
    assert stack.preprocessor.names == ("bit_depth", "trn")
    assert isinstance(stack.preprocessor.stages[1], RestorerStage)
    # wrappers in listed order, the first closest to the classifier: UniG(GCM(model))
    assert isinstance(stack.classifier, UniGClassifier) and isinstance(stack.classifier.classifier, GCMClassifier)
    assert stack.classifier.classifier.classifier is model
    assert stack.describe() == "bit_depth(bits=1) -> trn -> gcm -> unig(seed=0) -> classifier"
    with torch.no_grad():
        stack(x[:4])
    assert set(rec.seen[-1].unique().tolist()) <= {0.0, 1.0}  # bit depth ran before the restorer
    rec2 = Recorder()
    det = build_defense_stack(["trn", {"name": "bit_depth", "bits": 1}, "gcm"], model, restorer=rec2)
    with torch.no_grad():
        out = det(x[:4])
        torch.testing.assert_close(rec2.seen[-1], x[:4])  # restorer first this time
        torch.testing.assert_close(out, model(bit_depth_reduction(x[:4] / 2, 1)), atol=1e-5, rtol=0)
    pre = build_preprocessor(["trn", {"name": "bit_depth", "bits": 1}, "gcm"], restorer=rec2)
    assert pre.names == ("trn", "bit_depth") and not pre.differentiable  # wrappers are left to the classifier


def test_spec_errors_have_clear_messages(model: TinyNet) -> None:
    with pytest.raises(ConfigError, match="unknown defence 'jpg'; valid names: \\[.*'jpeg'"):
        parse_defense_spec([{"name": "jpg"}])
    with pytest.raises(ConfigError, match="unknown parameter\\(s\\) \\['qualty'\\]; valid parameters: \\['quality'"):
        parse_defense_spec([{"name": "jpeg", "qualty": 50}])
    with pytest.raises(ConfigError, match="comes after the classifier wrapper 'gcm'"):
        parse_defense_spec(["gcm", "jpeg"])
    with pytest.raises(ConfigError, match="must be a list"):
        parse_defense_spec("jpeg")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="defence #1 \\(jpeg\\): JPEG quality"):
        build_defense_stack(["median", {"name": "jpeg", "quality": 500}], model)
    with pytest.raises(ConfigError, match="defence #0 \\(trn\\): give 'checkpoint: PATH'"):
        build_defense_stack(["trn"], model)
    with pytest.raises(ConfigError, match="row 'bad': defence #0: unknown defence 'blurr'"):
        from_dict(DefenseEvalConfig, {"rows": [{"name": "bad", "defenses": ["blurr"]}]})
    with pytest.raises(ConfigError, match="unknown option\\(s\\) \\['defences'\\]"):
        from_dict(DefenseEvalConfig, {"rows": [{"name": "typo", "defences": ["jpeg"]}]})


# ----------------------------------------------------------------------------------------------- Square
def test_square_respects_budget_and_lowers_accuracy(model: TinyNet, data) -> None:
    x, y = data
    atk = create_attack("square", eps=0.3, queries=150, p_init=0.3, seed=0)
    assert isinstance(atk, Square)
    x_adv = atk(model, x, y)
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6
    assert acc(model, x_adv, y) <= acc(model, x, y) - 0.3
    assert atk.last_queries.shape == (len(x),) and atk.last_queries.max() <= 150 and atk.last_queries.min() >= 1
    torch.testing.assert_close(Square(eps=0.3, queries=150, p_init=0.3, seed=0)(model, x, y), x_adv)
    with pytest.raises(ConfigError, match="queries must be a positive integer"):
        Square(queries=0)
    with pytest.raises(ConfigError, match="only the Linf version"):
        Square(norm="l2")


# ----------------------------------------------------------------------------------------------- training options
def _npz(tmp_path: Path, n: int = 48) -> str:
    x, y = band_images(n, seed=5)
    path = tmp_path / "synthetic.npz"
    np.savez(path, images=x.numpy().astype(np.float32), labels=y.numpy())
    return str(path)


def test_train_classifier_gfa_and_adversarial(tmp_path: Path) -> None:
    cfg = ClassifierTrainConfig(dataset="npz", data_dir=_npz(tmp_path), epochs=1, batch_size=16, augment=False,
                                regularizer="gfa", gfa_layers="deep", gfa_lambda=0.5, adv_train="pgd", adv_eps=0.1,
                                adv_steps=2, limit_train=32, device="cpu", out=str(tmp_path / "guard"))
    meta = train_classifier(cfg)
    assert meta["config"]["regularizer"] == "gfa" and meta["config"]["adv_train"] == "pgd"
    assert (tmp_path / "guard.safetensors").is_file() and 0 <= meta["test_accuracy"] <= 1


def test_train_classifier_config_and_cli(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="regularizer: must be one of \\['none', 'gfa'\\]"):
        load_config(ClassifierTrainConfig, None, ["regularizer=dropout"])
    with pytest.raises(ConfigError, match="adv_steps >= 1"):
        ClassifierTrainConfig(adv_steps=0)
    args = build_parser().parse_args(["train-classifier", "--config", "c.yaml", "--regularizer", "gfa"])
    assert args.regularizer == "gfa"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-classifier", "--config", "c.yaml", "--regularizer", "l2"])
    args = build_parser().parse_args(["eval-defenses", "--config", "e.yaml", "--set", "n=10"])
    assert args.command == "eval-defenses" and args.set == ["n=10"]
    for name in ("classifier_fmnist_gfa", "classifier_fmnist_advtrain"):
        load_config(ClassifierTrainConfig, Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    cfg = load_config(DefenseEvalConfig, Path(__file__).parents[1] / "configs" / "eval_defenses_fmnist.yaml")
    assert cfg.n is None and cfg.n_subset == 1000 and len(cfg.rows) >= 10  # the full test set for the main table
    with pytest.raises(ConfigError, match="n_adaptive <= n_subset"):
        DefenseEvalConfig(n=None, n_subset=100, n_adaptive=200)
    with pytest.raises(ConfigError, match="n must be a positive integer"):
        DefenseEvalConfig(n=0)


# ----------------------------------------------------------------------------------------------- evaluation

def test_defense_evaluation_end_to_end(tmp_path: Path) -> None:
    from trn.model import create_trn
    from trn.restorer import Restorer

    torch.manual_seed(0)
    guard = create_classifier("small_cnn", in_channels=1, num_classes=K, image_size=H, width=4).eval()
    save_classifier(tmp_path / "guard", guard, "small_cnn", {"in_channels": 1, "num_classes": K, "image_size": H,
                                                             "width": 4}, {"class_names": ["a", "b", "c"]})
    guard._trn_meta = {"arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "num_classes": K, "image_size": H,
                                                            "width": 4}}
    Restorer(create_trn("trn_tiny"), guard, metadata={"image_shape": [1, H, W]}).save(tmp_path / "trn")
    rows = [{"name": "none"}, {"name": "bits", "defenses": [{"name": "bit_depth", "bits": 2}]},
            {"name": "gcm", "defenses": ["gcm"]}, {"name": "trn+unig", "defenses": ["trn", "unig"]},
            {"name": "later", "classifier": str(tmp_path / "not_trained_yet")}]
    cfg = from_dict(DefenseEvalConfig, {
        "dataset": "npz", "data_dir": _npz(tmp_path, 40), "guard": str(tmp_path / "guard"),
        "restorer": str(tmp_path / "trn"), "rows": rows, "n": None, "n_subset": 12, "n_adaptive": 6, "n_square": 4,
        "eps_sweep": [0.05, 0.1],
        "gray_box": ["fgsm", "pgd"], "adaptive_steps": 2, "eot_samples": 2, "square_queries": 10, "batch_size": 8,
        "device": "cpu", "out_dir": str(tmp_path / "eval")})
    with pytest.warns(UserWarning, match="skipping row 'later'"):
        report = run_defense_evaluation(cfg)
    res = report.results
    assert list(res["table"]) == ["none", "bits", "gcm", "trn+unig"] and "later" in res["skipped"]
    # gray-box columns on all 40 images; the sweep (eps 0.1 included) and white-box images on the 12 of n_subset
    assert (res["n"], res["n_subset"], res["n_adaptive"]) == (40, 12, 6) and "full test set (40 images)" in report.markdown
    assert set(res["sweep"]) == {"0.05", "0.1"} and all(len(v["pgd"]) == 4 for v in res["sweep"].values())
    for row in res["table"].values():
        assert set(row) == {"clean", "fgsm", "pgd", "whitebox_naive", "adaptive", "square"}
        assert all(0 <= v <= 1 for v in row.values())
        assert row["adaptive"] <= row["whitebox_naive"] + 1e-9
    assert res["whitebox"]["gcm"]["bpda"] is None and res["whitebox"]["trn+unig"]["bpda"] is not None
    # the held-constant-map attack runs where a two-stream TRN is in the stack, and counts in the worst case
    assert res["whitebox"]["trn+unig"]["gconst"] is not None and res["whitebox"]["gcm"]["gconst"] is None
    wb = res["whitebox"]["trn+unig"]
    assert wb["adaptive"] <= min(wb[v] for v in ("e2e", "gconst", "bpda")) + 1e-9
    assert "| map held constant |" in report.markdown
    for name in ("report.md", "report.json", "accuracy_vs_eps.png", "state.json"):
        assert (tmp_path / "eval" / name).is_file()
    assert "| trn+unig |" in report.markdown and "later" in report.markdown
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["n_square"] == 4
    with pytest.warns(UserWarning):
        again = run_defense_evaluation(cfg)  # resumed from state.json: same numbers
    assert again.results["table"] == res["table"]


def test_held_map_variant_differentiates_through_the_image_path_only() -> None:
    """``gconst``: the restorer's map is recomputed (same forward output) but carries no gradient."""
    from trn.defenses.stack import RestorerStage
    from trn.evaluate_defenses import _holding_maps
    from trn.restorer import Restorer

    r = Restorer.build((1, H, W), num_classes=K, arch="trn_tiny", seed=0)
    with torch.no_grad():
        r.net.head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    stage = RestorerStage(r)
    assert stage.has_map and not RestorerStage(Restorer.build((1, H, W), num_classes=K, two_stream=False)).has_map
    x = torch.rand(2, 1, H, W, generator=torch.Generator().manual_seed(2), requires_grad=True)
    (g_e2e,) = torch.autograd.grad(stage(x).sum(), x)
    with _holding_maps(stage, True):
        assert stage.hold_map
        out = stage(x)
        (g_held,) = torch.autograd.grad(out.sum(), x)
    assert not stage.hold_map  # restored afterwards
    xd = x.detach()
    torch.testing.assert_close(out.detach(), r(xd))
    (g_ref,) = torch.autograd.grad(r.net(x, r.gradient_map(xd)).sum(), x)  # map as a constant
    torch.testing.assert_close(g_held, g_ref)
    assert not torch.allclose(g_held, g_e2e)  # the map's own derivative is what e2e adds


def test_trn_map_from_a_downstream_classifier(tmp_path: Path) -> None:
    """``{name: trn, map_from: FILE}`` restores with the map of that classifier (trn checkpoint or TorchScript), the
    sanitize job resolves it to an absolute path, and a restorer that reads no map refuses it."""
    from trn.restorer import Restorer
    from trn.sanitize_io import prepare_defenses

    torch.manual_seed(0)
    r = Restorer.build(seed=0)
    with torch.no_grad():  # random weights: an initialised TRN may not read its map yet
        for p in r.net.parameters():
            p.normal_(0, 0.2)
    clf = create_classifier("zoo_mlp", hidden=8, depth=1).eval()
    save_classifier(tmp_path / "mlp", clf, "zoo_mlp", {"hidden": 8, "depth": 1}, {"image_shape": [1, 28, 28]})
    torch.jit.script(clf).save(str(tmp_path / "mlp.pt"))
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        want = r.with_map_from(clf)(x)
        for path in (tmp_path / "mlp", tmp_path / "mlp.pt"):
            stack = build_defense_stack([{"name": "trn", "map_from": str(path)}], r.guard, restorer=r)
            torch.testing.assert_close(stack.preprocessor(x), want, atol=1e-5, rtol=0)
        assert not torch.allclose(want, r(x), atol=1e-4)  # the guard's map gives another image
    spec = prepare_defenses([{"name": "trn", "map_from": str(tmp_path / "mlp")}], r)
    assert spec == [{"name": "trn", "map_from": str((tmp_path / "mlp").resolve())}]
    with pytest.raises(ConfigError, match="map_from classifier not found"):
        prepare_defenses([{"name": "trn", "map_from": str(tmp_path / "nope")}], r)
    one = Restorer.build(seed=0, two_stream=False)
    with pytest.raises(ConfigError, match="map_from needs a two-stream restorer"):
        build_defense_stack([{"name": "trn", "map_from": str(tmp_path / "mlp")}], one.guard, restorer=one)
