"""Adversarial training of a restorer through the whole pipeline (trn.train_robust) and the shipped robust restorer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trn.attacks import create_attack
from trn.checkpoint import load_checkpoint
from trn.errors import CheckpointError, ConfigError
from trn.restorer import Restorer
from trn.train_robust import (
    RobustTrainConfig,
    adaptive_pipeline,
    robust_loss,
    train_robust,
    validate_robust_restorer,
    validation_images,
)

S = 28


def _nudged(seed: int = 0) -> Restorer:
    """A tiny restorer whose network really changes images (Restorer.build's zero head is the identity)."""
    r = Restorer.build((1, S, S), num_classes=10, arch="trn_tiny", seed=seed, mode="hybrid")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in r.net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return r


def _input_grad(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return g


@pytest.mark.parametrize("kind", ["gconst", "e2e"])
def test_adaptive_pipeline_differentiates_the_restorer(kind: str) -> None:
    """The training attack's gradient is the chain rule through the restorer, not the guard's gradient alone."""
    r = _nudged()
    x, y = torch.rand(6, 1, S, S), torch.randint(0, 10, (6,))
    through = _input_grad(adaptive_pipeline(r, kind), x, y)
    guard_only = _input_grad(r.guard, x, y)
    assert not torch.allclose(through, guard_only, atol=1e-6)
    if kind == "gconst":  # the same gradient computed by hand: the map is a constant, the net is differentiated
        g = r.gradient_map(x)
        by_hand = _input_grad(lambda z: r.guard(r.net(z, g)), x, y)
        torch.testing.assert_close(through, by_hand)


def test_bpda_pipeline_is_identity_backward() -> None:
    """BPDA: the forward pass is the restorer's, the backward pass the guard's gradient at the restored image."""
    r = _nudged()
    x, y = torch.rand(4, 1, S, S), torch.randint(0, 10, (4,))
    model = adaptive_pipeline(r, "bpda")
    with torch.no_grad():
        torch.testing.assert_close(model(x), r.guard(r(x)))
        restored = r(x)
    torch.testing.assert_close(_input_grad(model, x, y), _input_grad(r.guard, restored, y))


def test_unknown_kind_and_bad_config_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown adaptive attack kind"):
        adaptive_pipeline(_nudged(), "guard_only")
    with pytest.raises(ConfigError, match="kinds must map"):
        RobustTrainConfig(kinds={"guard_only": 1.0})
    with pytest.raises(ConfigError, match="loss must be"):
        RobustTrainConfig(loss="mse")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="val_images"):
        RobustTrainConfig(val_size=10, val_images=20)
    with pytest.raises(ConfigError, match="square_queries"):
        RobustTrainConfig(kinds={"square": 1.0}, square_queries=0)


def test_robust_loss_trades_parts() -> None:
    """TRADES: zero robustness term when the attacked image equals the clean one; positive once it differs."""
    r = _nudged()
    x, y = torch.rand(8, 1, S, S), torch.randint(0, 10, (8,))
    cfg = RobustTrainConfig(beta=6.0, fidelity=0.0)
    loss, parts = robust_loss(r, x, x.clone(), y, cfg)
    assert parts["rob"] == pytest.approx(0.0, abs=1e-5)
    assert loss.item() == pytest.approx(parts["ce"], rel=1e-4)
    x_adv = create_attack("pgd", eps=0.1, steps=3, seed=0)(adaptive_pipeline(r, "gconst"), x, y)
    _, parts_adv = robust_loss(r, x, x_adv, y, cfg)
    assert parts_adv["rob"] > 1e-4


def test_train_robust_runs_resumes_and_saves(tmp_path) -> None:
    """A tiny stage stops at max_steps (checkpoint marked incomplete), the rerun resumes and completes it."""
    out = tmp_path / "robust"
    cfg = RobustTrainConfig(init_from=None, arch="trn_tiny", limit_train=96, val_size=64, val_images=32, epochs=1,
                            batch_size=32, val_every=2, save_every=1, attack_steps=1, max_steps=2, threads=1,
                            out=str(out), device="cpu")
    train_robust(cfg)
    meta = load_checkpoint(out, "cpu")[1]
    assert (meta["step"], meta["total_steps"], meta["complete"]) == (2, 3, False)
    before = Restorer.load(out).net.state_dict()
    r = train_robust(cfg)
    meta = load_checkpoint(out, "cpu")[1]
    assert (meta["step"], meta["complete"]) == (3, True)
    assert [h["step"] for h in meta["history"]] == [2, 3]  # validation after step 2 (first run) and 3 (resumed)
    assert any(not torch.equal(before[k], v) for k, v in r.net.state_dict().items())  # step 3 trained the net
    with pytest.raises(CheckpointError, match="different config"):
        train_robust(RobustTrainConfig(**{**cfg.__dict__, "beta": 1.0}))


def test_square_kind_trains_on_score_query_images(tmp_path, monkeypatch) -> None:
    """kind "square": the batch's attacked images come from a Square of ``square_queries`` queries on the pipeline's
    scores (no gradient), within eps of the clean batch, and validation reports the Square accuracy."""
    from trn import train_robust as tr

    seen: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []
    real_attack = tr._training_attack

    def spy_attack(cfg, kind, seed):
        atk = real_attack(cfg, kind, seed)

        def run(model, x, y):
            x_adv = atk(model, x, y)
            seen.append((type(atk).__name__, atk.queries, x, x_adv))
            return x_adv
        return run

    monkeypatch.setattr(tr, "_training_attack", spy_attack)
    out = tmp_path / "sq"
    cfg = RobustTrainConfig(init_from=None, arch="trn_tiny", two_stream=False, limit_train=64, val_size=32,
                            val_images=16, epochs=1, batch_size=32, val_every=2, save_every=2, kinds={"square": 1.0},
                            square_queries=3, threads=1, out=str(out), device="cpu")
    train_robust(cfg)
    # two training batches of 32, then the validation check (16 images) with the same short Square
    assert [(name, q, len(x)) for name, q, x, _ in seen] == [("Square", 3, 32), ("Square", 3, 32), ("Square", 3, 16)]
    for _, _, x, x_adv in seen:
        assert (x_adv - x).abs().amax() <= 0.1 + 1e-6 and (x_adv != x).any()
    meta = load_checkpoint(out, "cpu")[1]
    assert 0.0 <= meta["history"][-1]["val_square3"] <= 1.0 and "val_pgd10_gconst" in meta["history"][-1]
    assert meta["threat_model"].startswith("query black-box (")


def test_guard_kind_attacks_the_guard_alone(tmp_path, monkeypatch) -> None:
    """kind "guard" (gray-box): the training attack is handed the frozen guard itself, not a pipeline through the
    restorer, and validation reports the gray-box accuracy."""
    from trn import train_robust as tr

    targets: list = []
    real_attack = tr._training_attack

    def spy_attack(cfg, kind, seed):
        atk = real_attack(cfg, kind, seed)

        def run(model, x, y):
            targets.append(model)
            return atk(model, x, y)
        return run

    monkeypatch.setattr(tr, "_training_attack", spy_attack)
    out = tmp_path / "gray"
    cfg = RobustTrainConfig(init_from=None, arch="trn_tiny", limit_train=32, val_size=32, val_images=16, epochs=1,
                            batch_size=32, val_every=1, save_every=1, kinds={"guard": 1.0}, attack_steps=1,
                            threads=1, out=str(out), device="cpu")
    r = train_robust(cfg)
    assert len(targets) == 1 and isinstance(targets[0], torch.nn.Module)
    assert all(torch.equal(a, b) for a, b in zip(targets[0].state_dict().values(), r.guard.state_dict().values()))
    meta = load_checkpoint(out, "cpu")[1]
    assert "val_pgd10_guard" in meta["history"][-1] and meta["threat_model"].startswith("gray-box")


def test_init_from_must_share_the_guard(tmp_path) -> None:
    r = _nudged()
    r.save(tmp_path / "other")  # its guard is a random tiny CNN, not the shipped guard
    cfg = RobustTrainConfig(init_from=str(tmp_path / "other"), out=str(tmp_path / "x"), limit_train=8, val_size=8,
                            val_images=8, device="cpu")
    with pytest.raises(CheckpointError, match="its guard is not"):
        train_robust(cfg)


def test_shipped_robust_restorer_beats_gray_box_net_under_adaptive_pgd() -> None:
    """On real test images, the adversarially trained restorer survives a short adaptive PGD far better."""
    from trn.data import load_dataset

    test = load_dataset("fashion-mnist", None, "test").subset(128, 7)
    x, y = test.images, test.labels
    accs = {}
    for name in ("fashion-mnist-guard", "fashion-mnist-robust"):
        r = Restorer.pretrained(name)
        pipe = adaptive_pipeline(r, "gconst")
        x_adv = create_attack("pgd", eps=0.1, steps=10, seed=0)(pipe, x, y)
        with torch.no_grad():
            accs[name] = (pipe(x_adv).argmax(1) == y).float().mean().item()
    assert accs["fashion-mnist-robust"] > accs["fashion-mnist-guard"] + 0.3, accs


def test_widen_to_continues_from_the_same_function(tmp_path) -> None:
    """``widen_to`` starts the run from init_from's net widened with its output unchanged, and saves the wide net."""
    base = RobustTrainConfig(init_from=None, arch="trn_tiny", limit_train=64, val_size=16, val_images=16, epochs=1,
                             batch_size=32, attack_steps=1, threads=1, out=str(tmp_path / "narrow"), device="cpu")
    narrow = train_robust(base)
    wide_cfg = RobustTrainConfig(**{**base.__dict__, "init_from": base.out, "widen_to": 8, "max_steps": 0,
                                    "out": str(tmp_path / "wide")})
    wide = train_robust(wide_cfg)  # max_steps 0: saved as widened, untrained
    assert load_checkpoint(tmp_path / "wide", "cpu")[1]["trn"]["width"] == 8
    x = torch.rand(4, 1, S, S)
    with torch.no_grad():
        torch.testing.assert_close(Restorer.load(tmp_path / "wide")(x), narrow(x), rtol=0, atol=1e-6)
    assert wide.net.cfg.width == 8 and narrow.net.cfg.width == 4
    with pytest.raises(ConfigError, match="widen_to needs init_from"):
        RobustTrainConfig(init_from=None, widen_to=8)


def test_validation_with_square_catches_masked_gradients(monkeypatch, caplog) -> None:
    """``val_square_queries``: on a restorer whose gradient is zero (masked), PGD-10 finds nothing beyond its random
    start, Square still breaks images, the run's log flags it, and the reported worst case counts an image only if
    both attacks failed on it. The same net with its gradient intact is not flagged."""
    r = Restorer.load("checkpoints/trn_fmnist_robust")
    cfg = RobustTrainConfig(val_size=64, val_images=64, val_square_queries=300, val_square_images=48, threads=1,
                            device="cpu")
    with caplog.at_level("WARNING", logger="trn.robustness"):
        honest = validate_robust_restorer(r, cfg)
    assert "SANITY CHECK FAILED" not in caplog.text and honest["val_masking_flag"] == 0.0
    assert honest["val_bb_square300"] >= honest["val_pgd10_on48"] - 0.02
    forward = r.net.forward
    monkeypatch.setattr(r.net, "forward", lambda x, g=None: forward(x, g).detach() + 0 * x)  # same output, zero grad
    with caplog.at_level("WARNING", logger="trn.robustness"):
        v = validate_robust_restorer(r, cfg)
    assert "SANITY CHECK FAILED (white-box >= black-box)" in caplog.text and v["val_masking_flag"] == 1.0
    assert v["val_clean"] > 0.75
    assert v["val_bb_square300"] < v["val_pgd10_on48"] - 0.15, v  # the gradient attack is blind, the query one is not
    assert v["val_worst48"] <= min(v["val_bb_square300"], v["val_pgd10_on48"])
    assert v["val_worst48"] >= v["val_bb_square300"] + v["val_pgd10_on48"] - 1
    assert "val_bb_square300" not in validate_robust_restorer(r, RobustTrainConfig(val_size=64, val_images=16,
                                                                                   threads=1, device="cpu"))
    with pytest.raises(ConfigError, match="val_square_images"):
        RobustTrainConfig(val_images=16, val_square_queries=10, val_square_images=32)


def test_validation_with_apgd_takes_every_whitebox_attack(monkeypatch) -> None:
    """``val_apgd_steps``: APGD-CE/DLR join PGD-10 on the Square images; the white-box figure is the per-image
    conjunction (never above either attack), the worst case never above it or Square, and the masking flag compares
    Square with it: the zero-gradient net stays flagged, since APGD is as blind as PGD there."""
    r = Restorer.load("checkpoints/trn_fmnist_robust")
    cfg = RobustTrainConfig(val_size=48, val_images=48, val_square_queries=200, val_square_images=32,
                            val_apgd_steps=10, threads=1, device="cpu")
    v = validate_robust_restorer(r, cfg)
    assert v["val_whitebox_on32"] <= min(v["val_apgd10_on32"], v["val_pgd10_on32"])
    assert v["val_whitebox_on32"] >= v["val_apgd10_on32"] + v["val_pgd10_on32"] - 1
    assert v["val_worst32"] <= min(v["val_whitebox_on32"], v["val_bb_square200"])
    assert v["val_apgd10_on32"] < v["val_clean"]  # the attack does something on an honest net
    forward = r.net.forward
    monkeypatch.setattr(r.net, "forward", lambda x, g=None: forward(x, g).detach() + 0 * x)  # same output, zero grad
    masked = validate_robust_restorer(r, cfg)
    assert masked["val_masking_flag"] == 1.0 and masked["val_apgd10_on32"] > masked["val_bb_square200"] + 0.1
    with pytest.raises(ConfigError, match="val_apgd_steps needs val_square_queries"):
        RobustTrainConfig(val_apgd_steps=10)


def test_val_from_guard_validates_on_images_the_guard_held_out() -> None:
    """A stacked defence is chosen on images its guard never trained on: the guard run's own validation split."""
    from trn.data import load_dataset
    from trn.train_classifier import validation_indices

    cfg = RobustTrainConfig(guard="checkpoints/fmnist_guard_pgdat", init_from=None, two_stream=False,
                            val_from_guard=True, val_size=2000, val_images=300)
    x, y = validation_images(cfg)
    full = load_dataset("fashion-mnist", None, "train")
    held_out = validation_indices(len(full), 0.1, 0)[0]  # fmnist_guard_pgdat.json: val_size 0.1, seed 0
    assert x.shape == (300, 1, S, S)
    assert torch.equal(x, full.images[held_out[:300]]) and torch.equal(y, full.labels[held_out[:300]])
    own = validation_images(RobustTrainConfig(guard="checkpoints/fmnist_guard_pgdat", val_size=2000, val_images=300))
    assert not torch.equal(own[0], x)  # without the option: the run's own seeded split
    with pytest.raises(ConfigError, match="fewer than val_size"):
        validation_images(RobustTrainConfig(**{**cfg.__dict__, "val_size": 7000, "val_images": 10}))
    with pytest.raises(CheckpointError, match="names no validation split"):  # the shipped guard trained on all 60k
        validation_images(RobustTrainConfig(**{**cfg.__dict__, "guard": "checkpoints/fmnist_guard"}))


def test_noise_std_noises_training_and_validation_and_eot_averages_draws(monkeypatch) -> None:
    """``noise_std``: the restorer sees freshly noised images at every call, in validation and in the training loss
    (whose fidelity target stays the clean image), and with ``val_eot_iter`` each PGD step averages its gradient over
    that many draws (so the restorer runs about that many times as often); noise that drowns the image drowns the
    clean accuracy with it."""
    r = Restorer.load("checkpoints/trn_fmnist_robust")
    cfg = RobustTrainConfig(val_size=32, val_images=32, threads=1, device="cpu")
    noisy = RobustTrainConfig(**{**cfg.__dict__, "noise_std": 0.05, "val_eot_iter": 4})
    x, y = validation_images(cfg)
    seen: list[torch.Tensor] = []
    forward = r.net.forward
    monkeypatch.setattr(r.net, "forward", lambda xb, g=None: (seen.append(xb.detach().clone()), forward(xb, g))[1])
    plain = validate_robust_restorer(r, cfg)
    assert torch.equal(seen[0], x)  # no noise: the clean pass reads the images as they are
    n_plain = len(seen)
    seen.clear()
    validate_robust_restorer(r, noisy)
    assert 0.02 < (seen[0] - x).std() < 0.08  # the clean pass reads noised images
    assert len(seen) >= 3 * n_plain  # every gradient of the attack is an average over 4 noise draws
    seen.clear()
    robust_loss(r, x[:8], x[:8], y[:8], noisy)
    assert 0.02 < (seen[0] - torch.cat([x[:8], x[:8]])).std() < 0.08  # the training loss reads noised images too
    drowned = validate_robust_restorer(r, RobustTrainConfig(**{**cfg.__dict__, "noise_std": 1.0}))
    assert drowned["val_clean"] < plain["val_clean"] - 0.3
    with pytest.raises(ConfigError, match="noise_std"):
        RobustTrainConfig(noise_std=-0.1)
