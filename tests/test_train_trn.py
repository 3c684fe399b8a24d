"""TRN training on a tiny synthetic dataset and guard: the checkpoint and its metadata, resuming after an
interruption from the saved step, and config validation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import trn.train_trn as train_mod
from trn.classifiers import create_classifier, save_classifier
from trn.config import from_dict, load_config, to_dict
from trn.data import ImageDataset, save_npz
from trn.errors import CheckpointError, ConfigError
from trn.restorer import Restorer
from trn.train_trn import TRNTrainConfig, train_trn

N, S, K = 16, 8, 3
BATCH = 8
VAL = 4  # training images held out for the per-epoch check
STEPS_PER_EPOCH = -(-(N - VAL) // BATCH)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup(tmp_path: Path) -> dict:
    """A saved tiny guard and a synthetic npz dataset (used for both splits); returns config overrides."""
    kw = {"in_channels": 1, "num_classes": K, "image_size": S, "width": 4}
    torch.manual_seed(0)
    guard = create_classifier("small_cnn", **kw).eval()
    x = torch.randint(0, 256, (N, 1, S, S), generator=torch.Generator().manual_seed(1)).float() / 255
    with torch.no_grad():
        y = guard(x).argmax(1)
    data = save_npz(tmp_path / "data.npz", ImageDataset(x, y, ("a", "b", "c"), "tiny"))
    save_classifier(tmp_path / "guard", guard, "small_cnn", kw,
                    {"image_shape": [1, S, S], "class_names": ["a", "b", "c"], "test_accuracy": 1.0})
    return {"dataset": "npz", "data_dir": str(data), "guard": str(tmp_path / "guard"), "arch": "trn_tiny",
            "attacks": ["fgsm", "pgd", "cw"], "attack_steps": 1, "cw_steps": 2, "chunks": 2, "epochs": 2,
            "batch_size": BATCH, "val_size": VAL, "device": "cpu", "out": str(tmp_path / "trn")}


def _opt_steps(out: str) -> set[int]:
    state = load_file(out + "_train_state.safetensors")
    return {int(v) for k, v in state.items() if k.endswith(".step")}


def test_tiny_run_writes_a_checkpoint_naming_the_guard(setup: dict, tmp_path: Path) -> None:
    cfg = TRNTrainConfig(**setup)
    r = train_trn(cfg)
    assert isinstance(r, Restorer) and not r.training
    meta = json.loads((tmp_path / "trn.json").read_text())
    assert meta["kind"] == "restorer"
    assert meta["guard"]["path"] == setup["guard"] and meta["guard"]["arch"] == "small_cnn"
    assert meta["config"] == json.loads(json.dumps(to_dict(cfg)))
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    assert {"clean", "clean_restored", "pgd", "pgd_restored"} <= set(meta["history"][0])
    assert meta["train_images"] == N - VAL and meta["val_images"] == VAL  # the check images come from training
    assert meta["class_names"] == ["a", "b", "c"] and meta["image_shape"] == [1, S, S]
    assert meta["estimator"] == {"mode": "topk", "k": 3, "scale": "std"}
    back = Restorer.load(tmp_path / "trn")
    assert back.net.cfg.width == 4 and any((p != 0).any() for p in back.net.head.parameters())  # it trained
    x = torch.rand(3, 1, S, S)
    with torch.no_grad():
        torch.testing.assert_close(back(x), r(x))
    assert _opt_steps(cfg.out) == {2 * STEPS_PER_EPOCH}
    assert json.loads((tmp_path / "trn_train_state.json").read_text())["epoch"] == 2


def test_resume_continues_from_the_saved_step(setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    cfg = TRNTrainConfig(**setup)
    real = train_mod.make_adversarial_batch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):  # dies on the first batch of epoch 2
        calls["n"] += 1
        if calls["n"] > STEPS_PER_EPOCH:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "make_adversarial_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_trn(cfg)
    assert not (tmp_path / "trn.safetensors").exists()
    assert json.loads((tmp_path / "trn_train_state.json").read_text())["epoch"] == 1
    assert _opt_steps(cfg.out) == {STEPS_PER_EPOCH}
    saved_net = {k[4:]: v for k, v in load_file(cfg.out + "_train_state.safetensors").items() if k.startswith("net.")}

    calls["n"] = -10**6  # let the rest run, still counting
    seen: list[dict] = []
    real_load = train_mod._load_train_state

    def spy(cfg_, restorer, opt):  # the net the resumed run starts from is the saved one
        out = real_load(cfg_, restorer, opt)
        seen.append({k: v.clone() for k, v in restorer.net.state_dict().items()})
        return out

    monkeypatch.setattr(train_mod, "_load_train_state", spy)
    with caplog.at_level(logging.INFO, logger="trn.train_trn"):
        train_trn(cfg)
    assert "after epoch 1" in caplog.text
    assert calls["n"] == -10**6 + STEPS_PER_EPOCH  # only epoch 2 was trained
    assert all(torch.equal(seen[0][k], v) for k, v in saved_net.items())
    assert _opt_steps(cfg.out) == {2 * STEPS_PER_EPOCH}  # AdamW's step counter carried on from the saved one
    meta = json.loads((tmp_path / "trn.json").read_text())
    assert [h["epoch"] for h in meta["history"]] == [1, 2]  # the epoch before the interruption is not forgotten


def test_resume_refuses_a_different_config(setup: dict) -> None:
    train_trn(TRNTrainConfig(**{**setup, "epochs": 1}))
    with pytest.raises(CheckpointError, match="different config; delete it or set resume: false"):
        train_trn(TRNTrainConfig(**{**setup, "epochs": 1, "lr": 0.01}))
    train_trn(TRNTrainConfig(**{**setup, "epochs": 1, "lr": 0.01, "resume": False}))  # explicit fresh start


def test_one_stream_tiny_run(setup: dict, tmp_path: Path) -> None:
    r = train_trn(TRNTrainConfig(**{**setup, "epochs": 1, "two_stream": False, "attacks": ["fgsm"]}))
    assert r.net.grad_stream is None
    assert json.loads((tmp_path / "trn.json").read_text())["trn"]["two_stream"] is False


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="attacks must be a non-empty subset"):
        TRNTrainConfig(attacks=["deepfool"])
    with pytest.raises(ConfigError, match="attacks must be a non-empty subset"):
        TRNTrainConfig(attacks=[])
    with pytest.raises(ConfigError, match="need 0 <= eps_min <= eps_max"):
        TRNTrainConfig(eps_min=0.3, eps_max=0.1)
    with pytest.raises(ConfigError, match="need 1 <= clean_chunks <= chunks"):
        TRNTrainConfig(chunks=2, clean_chunks=3)


def test_init_from_fine_tunes_and_records_the_earlier_stage(setup: dict, tmp_path: Path) -> None:
    stage1 = train_trn(TRNTrainConfig(**{**setup, "epochs": 1, "out": str(tmp_path / "s1")}))
    cfg = TRNTrainConfig(**{**setup, "epochs": 1, "lr": 0.0, "init_from": str(tmp_path / "s1")})
    stage2 = train_trn(cfg)  # lr 0: the fine-tuned net must be exactly stage 1's
    for (k, a), b in zip(stage1.net.state_dict().items(), stage2.net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    init = json.loads((tmp_path / "trn.json").read_text())["init_from"]
    assert init["path"] == str(tmp_path / "s1") and init["config"]["out"] == str(tmp_path / "s1")
    assert [h["epoch"] for h in init["history"]] == [1]


def test_init_from_refuses_another_architecture_or_guard(setup: dict, tmp_path: Path) -> None:
    train_trn(TRNTrainConfig(**{**setup, "epochs": 1, "two_stream": False, "out": str(tmp_path / "one")}))
    with pytest.raises(CheckpointError, match="network .* differs"):
        train_trn(TRNTrainConfig(**{**setup, "epochs": 1, "init_from": str(tmp_path / "one")}))
    with pytest.raises(CheckpointError, match="not a restorer checkpoint"):
        train_trn(TRNTrainConfig(**{**setup, "epochs": 1, "init_from": setup["guard"]}))
    train_trn(TRNTrainConfig(**{**setup, "epochs": 1, "out": str(tmp_path / "two")}))
    meta = json.loads((tmp_path / "two.json").read_text())
    meta["guard"]["path"] = str(tmp_path / "another_guard")
    (tmp_path / "two.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="trained against guard"):
        train_trn(TRNTrainConfig(**{**setup, "epochs": 1, "init_from": str(tmp_path / "two")}))
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        train_trn(TRNTrainConfig(**{**setup, "epochs": 1, "init_from": str(tmp_path / "missing")}))


def test_shipped_configs_load() -> None:
    cfg = load_config(TRNTrainConfig, ROOT / "configs" / "trn_fmnist.yaml")
    assert cfg.two_stream and cfg.out == "checkpoints/trn_fmnist" and cfg.guard == "checkpoints/fmnist_guard"
    # the shipped TRN is a short hybrid-map fine-tune (stage 3) of the top-k TRN
    topk = load_config(TRNTrainConfig, ROOT / "configs" / "trn_fmnist_topk.yaml")
    assert cfg.estimator_mode == "hybrid" and topk.estimator_mode == "topk" and cfg.init_from == topk.out
    stage3 = {"estimator_mode", "estimator_confidence", "epochs", "limit_train", "lr", "seed", "out", "init_from"}
    assert {k: v for k, v in to_dict(cfg).items() if k not in stage3} == \
        {k: v for k, v in to_dict(topk).items() if k not in stage3}
    # each two-stage ablation differs from the top-k TRN in one thing (and its paths)
    unused = {"estimator_mode", "estimator_k", "estimator_scale", "estimator_confidence"}  # no gradient stream
    ablations = {"trn_fmnist_onestream": {"two_stream": False}, "trn_fmnist_argmax": {"estimator_mode": "argmax"}}
    for name, changed in ablations.items():
        ab = load_config(TRNTrainConfig, ROOT / "configs" / f"{name}.yaml")
        diff = {k: v for k, v in to_dict(ab).items() if v != getattr(topk, k)}
        if not ab.two_stream:
            diff = {k: v for k, v in diff.items() if k not in unused}
        assert diff == {**changed, "out": f"checkpoints/{name}", "init_from": f"runs/{name}_stage1"}
    stage1_of = {"trn_fmnist_topk": "trn_fmnist_stage1", "trn_fmnist_onestream": "trn_fmnist_onestream_stage1",
                 "trn_fmnist_argmax": "trn_fmnist_argmax_stage1"}
    for c, s1 in stage1_of.items():  # stage 2 starts from what its stage-1 config writes, with the same settings
        stage2 = load_config(TRNTrainConfig, ROOT / "configs" / f"{c}.yaml")
        stage1 = load_config(TRNTrainConfig, ROOT / "configs" / f"{s1}.yaml")
        assert stage1.out == stage2.init_from and stage1.init_from is None
        free = {"epochs", "lr", "guard_weight", "seed", "out", "init_from"}
        assert {k: v for k, v in to_dict(stage1).items() if k not in free} == \
            {k: v for k, v in to_dict(stage2).items() if k not in free}


@pytest.mark.parametrize("name", ["trn_fmnist", "trn_fmnist_onestream", "trn_fmnist_argmax", "trn_fmnist_topk"])
def test_shipped_checkpoints_were_made_by_their_configs(name: str) -> None:
    """The config each shipped TRN records is its config file (fields added since take their defaults)."""
    meta = json.loads((ROOT / "checkpoints" / f"{name}.json").read_text())
    recorded = from_dict(TRNTrainConfig, meta["config"])
    shipped = load_config(TRNTrainConfig, ROOT / "configs" / f"{name}.yaml")
    # trained under other names (argmax and top-k: the main TRN's), and resume is how a run was started, not what
    # it trained
    renamed = {"trn_fmnist_argmax": {"out", "init_from"}, "trn_fmnist_topk": {"out"}}
    skip = renamed.get(name, set()) | {"resume"}
    assert {k: v for k, v in to_dict(recorded).items() if k not in skip} == \
        {k: v for k, v in to_dict(shipped).items() if k not in skip}
    # the checkpoint it started from: stage 1, or for the TRN the top-k TRN (trained under the TRN's name)
    stage1 = from_dict(TRNTrainConfig, meta["init_from"]["config"])
    prev = {"trn_fmnist": "trn_fmnist_topk", "trn_fmnist_topk": "trn_fmnist_stage1"}.get(name, f"{name}_stage1")
    stage1_file = load_config(TRNTrainConfig, ROOT / "configs" / f"{prev}.yaml")
    assert {k: v for k, v in to_dict(stage1).items() if k != "out"} == \
        {k: v for k, v in to_dict(stage1_file).items() if k != "out"}
    assert meta["guard"]["path"] == shipped.guard and meta["trn"]["two_stream"] == shipped.two_stream
