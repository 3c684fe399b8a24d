"""The ``trn`` stage's fallback restorer (:mod:`trn.defenses.fallback`): per-image routing on the primary's change,
gradients through the branch that produced each image, and the spec plumbing (sanitize, service)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from trn.defenses import FallbackRestorer, build_defense_stack, restoration_change
from trn.defenses.stack import RestorerStage
from trn.errors import CheckpointError, ConfigError
from trn.restorer import Restorer


class Clamp(nn.Module):
    """Primary stand-in: leaves pixels <= 0.5 alone, so only bright images change (by their excess over 0.5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(max=0.5)


class Invert(nn.Module):
    """Fallback stand-in that counts the images it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return 1 - x


def _mixed_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    dark = 0.1 + 0.3 * torch.rand(3, 1, 6, 6, generator=g)    # change 0: stays with the primary
    bright = 0.8 + 0.2 * torch.rand(3, 1, 6, 6, generator=g)  # change >= 0.3: goes to the fallback
    return torch.stack([dark[0], bright[0], dark[1], bright[1], bright[2], dark[2]])  # (6, 1, 6, 6), interleaved


def test_routes_each_image_on_its_own_change_and_runs_the_fallback_on_those_only() -> None:
    x = _mixed_batch()
    fb = Invert()
    stage = FallbackRestorer(Clamp(), fb, threshold=0.1)
    out = stage(x)
    bright = torch.tensor([False, True, False, True, True, False])
    assert torch.equal(stage.routed(x, x.clamp(max=0.5)), bright)
    torch.testing.assert_close(out[~bright], x[~bright])
    torch.testing.assert_close(out[bright], 1 - x[bright])
    assert fb.seen == 3  # the fallback saw the three routed images, not the batch
    for i in range(len(x)):  # an image's answer does not depend on its batch companions
        torch.testing.assert_close(stage(x[i:i + 1]), out[i:i + 1])
    fb.seen = 0
    torch.testing.assert_close(stage(x[~bright]), x[~bright])
    assert fb.seen == 0  # nothing routed: the fallback is not run at all
    assert torch.equal(restoration_change(x, out)[bright] > 0, torch.ones(3, dtype=torch.bool))


def test_gradients_flow_through_the_branch_that_produced_each_image() -> None:
    x = _mixed_batch().requires_grad_(True)
    out = FallbackRestorer(Clamp(), Invert(), threshold=0.1)(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    bright = torch.tensor([False, True, False, True, True, False])
    torch.testing.assert_close(g[~bright], torch.ones_like(g[~bright]))   # identity below the clamp
    torch.testing.assert_close(g[bright], -torch.ones_like(g[bright]))    # the fallback's 1 - x, not the clamp's 0


def test_bad_thresholds_and_mismatched_restorers_are_refused() -> None:
    for bad in (0, -0.1, float("nan"), float("inf"), True, "0.06"):
        with pytest.raises(ConfigError, match="fallback_above must be a positive number"):
            FallbackRestorer(Clamp(), Invert(), bad)
    with pytest.raises(ConfigError, match=r"restores \(3, 28, 28\) images but the primary restores \(1, 28, 28\)"):
        FallbackRestorer(Restorer.build((1, 28, 28)), Restorer.build((3, 28, 28)), 0.06)
    with pytest.raises(ConfigError, match="guard has 5 classes but the primary's has 10"):
        FallbackRestorer(Restorer.build(num_classes=10), Restorer.build(num_classes=5), 0.06)
    with pytest.raises(ValueError, match="two .N, C, H, W. tensors of one shape"):
        restoration_change(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))


@pytest.fixture(scope="module")
def two_restorers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Restorer, Path]:
    """A primary (in memory) and a fallback (saved), untrained but nudged so that both change images."""
    d = tmp_path_factory.mktemp("fallback")
    rs = []
    for seed in (0, 1):
        r = Restorer.build(seed=seed)
        with torch.no_grad():
            for p in r.net.parameters():
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed + 10))
        rs.append(r)
    rs[1].save(d / "fb")
    return rs[0], d / "fb"


def test_spec_builds_the_pair_and_checks_its_parameters(two_restorers: tuple[Restorer, Path]) -> None:
    primary, fb_path = two_restorers
    fallback = Restorer.load(fb_path)
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        change = restoration_change(x, primary(x))
        threshold = float(change.median())  # about half of the images go to the fallback
        spec = [{"name": "trn", "fallback": str(fb_path), "fallback_above": threshold}]
        stack = build_defense_stack(spec, primary.guard, restorer=primary)
        stage = stack.preprocessor.stages[0]
        assert isinstance(stage, RestorerStage) and isinstance(stage.restorer, FallbackRestorer)
        assert stage.has_map  # both are two-stream: holding the map constant is a distinct attack
        routed = change > threshold
        assert 0 < int(routed.sum()) < len(x)
        want = torch.where(routed.view(-1, 1, 1, 1), fallback(x), primary(x))
        torch.testing.assert_close(stack.preprocessor(x), want, atol=1e-5, rtol=0)
    stage.hold_map = True  # the adaptive "map held constant" view runs both restorers without create_graph
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(stage(xg).sum(), xg)
    assert g.abs().sum(dim=(1, 2, 3)).gt(0).all()
    for params, match in [
        ({"fallback": str(fb_path)}, "give both 'fallback: CHECKPOINT'"),
        ({"fallback_above": 0.06}, "give both 'fallback: CHECKPOINT'"),
        ({"fallback": str(fb_path), "fallback_above": -1}, r"defence #0 \(trn\): fallback_above must be a positive"),
        ({"fallback": 3, "fallback_above": 0.06}, "fallback must be a checkpoint path"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_defense_stack([{"name": "trn", **params}], primary.guard, restorer=primary)
    with pytest.raises(CheckpointError):
        build_defense_stack([{"name": "trn", "fallback": str(fb_path.parent / "nope"), "fallback_above": 0.06}],
                            primary.guard, restorer=primary)


def test_sanitize_and_the_service_resolve_the_fallback_path(two_restorers: tuple[Restorer, Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Actors and replicas run elsewhere: the fallback checkpoint becomes an absolute path; a missing one is named."""
    from trn.sanitize_io import prepare_defenses
    from trn.serve_config import app_args_from_mapping

    primary, fb_path = two_restorers
    monkeypatch.chdir(fb_path.parent)
    spec = prepare_defenses([{"name": "trn", "fallback": "fb", "fallback_above": 0.06}], primary)
    assert spec == [{"name": "trn", "fallback": str(fb_path.resolve()), "fallback_above": 0.06}]
    with pytest.raises(ConfigError, match=r"defence #0 \(trn\): fallback file not found"):
        prepare_defenses([{"name": "trn", "fallback": "nope", "fallback_above": 0.06}], primary)
    primary.save(fb_path.parent / "primary")
    args = app_args_from_mapping({"restorer": "primary",
                                  "defenses": [{"name": "trn", "fallback": "fb", "fallback_above": 0.06}]})
    assert args.with_resolved_paths().defenses == [
        {"name": "trn", "fallback": str(fb_path.resolve()), "fallback_above": 0.06}]
    with pytest.raises(ConfigError, match=r"defenses\[0\] \(trn\) fallback: file not found"):
        app_args_from_mapping({"restorer": "primary", "defenses": [
            {"name": "trn", "fallback": "missing", "fallback_above": 0.06}]}).with_resolved_paths()


def test_a_sanitize_job_records_the_fallback_checkpoint_hash(two_restorers: tuple[Restorer, Path],
                                                             tmp_path: Path) -> None:
    """Resuming must notice a fallback checkpoint that changed under the same path: its hash is in the job spec."""
    from trn.checkpoint import checkpoint_digest
    from trn.data import ImageDataset, save_npz
    from trn.sanitize_io import detect_input, job_spec, plan_job

    primary, fb_path = two_restorers
    primary.save(tmp_path / "primary")
    npz = save_npz(tmp_path / "in.npz", ImageDataset(torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.int64),
                                                     ("0",)), image_dtype="float32")
    plan = plan_job(detect_input(npz), Path(npz), tmp_path / "out")
    spec = [{"name": "trn", "fallback": str(fb_path), "fallback_above": 0.06}]
    recorded = job_spec(plan, tmp_path / "primary", spec, "reject", 1 << 20, "image")
    assert recorded["defenses_checkpoint_sha256"] == [checkpoint_digest(fb_path)]
    assert "defenses_checkpoint_sha256" not in job_spec(plan, tmp_path / "primary", [{"name": "trn"}], "reject",
                                                        1 << 20, "image")


def test_shipped_fallback_keeps_more_images_than_the_primary_under_a_short_square() -> None:
    """On real test images, the shipped pair (agnostic restorer, ``fashion-mnist-fallback`` above 0.06 RMS) keeps the
    primary's clean predictions on almost every clean image and survives an 8-query Square (the queries a similar-query
    detector allows) more often than the primary alone."""
    from trn.attacks import Square
    from trn.data import load_dataset

    test = load_dataset("fashion-mnist", None, "test").subset(256, 11)
    x, y = test.images, test.labels
    primary, fallback = Restorer.pretrained("fashion-mnist"), Restorer.pretrained("fashion-mnist-fallback")
    pair, guard = FallbackRestorer(primary, fallback, 0.06), primary.guard
    with torch.no_grad():
        agree = (guard(pair(x)).argmax(1) == guard(primary(x)).argmax(1)).float().mean().item()
    assert agree >= 0.97
    kept = {}
    for name, r in (("primary", primary), ("pair", pair)):
        def model(b: torch.Tensor, r: nn.Module = r) -> torch.Tensor:
            return guard(r(b).detach())
        x_adv = Square(eps=0.1, queries=8, p_init=0.3, seed=0)(model, x, y)
        with torch.no_grad():
            kept[name] = (model(x_adv).argmax(1) == y).float().mean().item()
    assert kept["pair"] > kept["primary"] + 0.02, kept  # 87.9 against 84.0 % when written
