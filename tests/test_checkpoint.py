"""safetensors + JSON checkpoints: round trip, missing files, corrupt files; nothing is unpickled. Where a checkpoint
name is looked up (trn.weights): the given path, then $TRN_WEIGHTS_DIR, the wheel's package data, the checkout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trn.checkpoint import checkpoint_digest, checkpoint_paths, load_checkpoint, save_checkpoint
from trn.errors import CheckpointError
from trn.restorer import Restorer
from trn.weights import ENV_VAR, resolve_checkpoint, shipped_checkpoints, weights_dirs


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=g),
        "b": torch.arange(5, dtype=torch.int64),
        "half": torch.randn(2, generator=g).half(),
        "view": torch.randn(4, 4, generator=g).t(),  # non-contiguous tensors are saved too
    }


def test_checkpoint_paths() -> None:
    for given in ("run/m", "run/m.safetensors", "run/m.json"):
        assert checkpoint_paths(given) == (Path("run/m.safetensors"), Path("run/m.json"))


def test_round_trip(tmp_path: Path) -> None:
    state = _state()
    meta = {"arch": "x", "acc": 0.5, "nested": {"a": [1, 2]}, "path": tmp_path}  # non-JSON values become strings
    path = save_checkpoint(tmp_path / "sub" / "ckpt", state, meta)
    assert path == tmp_path / "sub" / "ckpt.safetensors" and (tmp_path / "sub" / "ckpt.json").is_file()
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["ckpt.json", "ckpt.safetensors"]  # no temp files
    loaded, meta2 = load_checkpoint(tmp_path / "sub" / "ckpt.safetensors")
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    assert meta2 == {"arch": "x", "acc": 0.5, "nested": {"a": [1, 2]}, "path": str(tmp_path)}


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c", {"w": torch.zeros(2)}, {"v": 1})
    save_checkpoint(tmp_path / "c", {"w": torch.ones(2)}, {"v": 2})
    state, meta = load_checkpoint(tmp_path / "c")
    assert torch.equal(state["w"], torch.ones(2)) and meta == {"v": 2}


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint file not found.*nope.safetensors"):
        load_checkpoint(tmp_path / "nope")
    save_checkpoint(tmp_path / "c", {"w": torch.zeros(2)}, {})
    (tmp_path / "c.json").unlink()
    with pytest.raises(CheckpointError, match=r"c\.json.*NAME.safetensors \+ NAME.json"):
        load_checkpoint(tmp_path / "c")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_tensors(tmp_path: Path, damage: str) -> None:
    save_checkpoint(tmp_path / "c", _state(), {})
    p = tmp_path / "c.safetensors"
    data = p.read_bytes()
    p.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00" * 64 + data, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="corrupt checkpoint tensors") as exc:
        load_checkpoint(tmp_path / "c")
    assert str(p) in str(exc.value)


def test_pickle_file_is_not_loaded(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "c.safetensors")  # a torch pickle posing as safetensors
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(CheckpointError, match="corrupt checkpoint tensors"):
        load_checkpoint(tmp_path / "c")


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "corrupt checkpoint metadata"), ("[1, 2]", "must be a JSON object"), ("", "corrupt")],
)
def test_corrupt_metadata(tmp_path: Path, text: str, message: str) -> None:
    save_checkpoint(tmp_path / "c", {"w": torch.zeros(2)}, {})
    (tmp_path / "c.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "c")
    (tmp_path / "c.json").write_bytes(b"\xff\xfe\x00bad utf8")
    with pytest.raises(CheckpointError, match="corrupt checkpoint metadata"):
        load_checkpoint(tmp_path / "c")


def test_metadata_is_plain_json(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c", {"w": torch.zeros(1)}, {"b": 1, "a": 2})
    assert json.loads((tmp_path / "c.json").read_text()) == {"a": 2, "b": 1}


def test_digest_follows_the_tensors_not_the_metadata(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "a", {"w": torch.zeros(3)}, {"note": "one"})
    d = checkpoint_digest(tmp_path / "a")
    assert len(d) == 16 and len(checkpoint_digest(tmp_path / "a.safetensors", 12)) == 12
    save_checkpoint(tmp_path / "a", {"w": torch.zeros(3)}, {"note": "two"})
    assert checkpoint_digest(tmp_path / "a") == d
    save_checkpoint(tmp_path / "a", {"w": torch.ones(3)}, {"note": "two"})
    assert checkpoint_digest(tmp_path / "a") != d


# --------------------------------------------------------------------------------------------- trn.weights
@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with no checkpoints/ folder, and no environment override."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


def test_existing_paths_win_and_explicit_paths_never_fall_back(elsewhere: Path) -> None:
    save_checkpoint(elsewhere / "checkpoints" / "trn_fmnist", _state(), {"mine": True})
    assert resolve_checkpoint("checkpoints/trn_fmnist") == Path("checkpoints/trn_fmnist")  # the local one shadows
    assert resolve_checkpoint("checkpoints/trn_fmnist.safetensors") == Path("checkpoints/trn_fmnist")
    assert load_checkpoint("checkpoints/trn_fmnist")[1] == {"mine": True}
    for explicit in (elsewhere / "trn_fmnist", "runs/trn_fmnist"):  # absolute, or relative outside checkpoints/
        with pytest.raises(CheckpointError, match=r"checkpoint file not found: .*runs/trn_fmnist.safetensors|"
                                                  r"checkpoint file not found: .*cwd/trn_fmnist.safetensors"):
            resolve_checkpoint(explicit)


def test_default_paths_fall_back_to_shipped_weights(elsewhere: Path) -> None:
    """``checkpoints/NAME`` (every CLI/config default) and a bare NAME find the shipped copy from any directory."""
    assert "trn_fmnist" in shipped_checkpoints() and "fmnist_guard" in shipped_checkpoints()
    found = resolve_checkpoint("checkpoints/trn_fmnist")
    assert found.is_absolute() and found.with_suffix(".safetensors").is_file() and found.parent in weights_dirs()
    assert resolve_checkpoint("fmnist_guard").parent == found.parent
    assert load_checkpoint("checkpoints/fmnist_guard")[1]["kind"] == "classifier"
    assert checkpoint_digest("checkpoints/trn_fmnist") == checkpoint_digest(found)
    # writing never resolves: a new checkpoint under the default name lands in the working directory
    save_checkpoint("checkpoints/trn_fmnist", _state(), {"kind": "mine"})
    assert (elsewhere / "checkpoints" / "trn_fmnist.safetensors").is_file()
    assert load_checkpoint("checkpoints/trn_fmnist")[1] == {"kind": "mine"}


def test_environment_override_and_error_lists_where_it_looked(elsewhere: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "weights"
    save_checkpoint(weights / "trn_fmnist", _state(), {"from": "env"})
    save_checkpoint(weights / "custom", _state(), {"from": "env"})
    monkeypatch.setenv(ENV_VAR, str(weights))
    assert weights_dirs()[0] == weights and "custom" in shipped_checkpoints()
    assert resolve_checkpoint("checkpoints/trn_fmnist") == weights / "trn_fmnist"  # the override comes first
    assert load_checkpoint("custom")[1] == {"from": "env"}
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("checkpoints/nothing_like_it")
    msg = str(e.value)
    assert "checkpoint file not found for 'checkpoints/nothing_like_it'" in msg
    assert f"{weights}/nothing_like_it.safetensors" in msg and f"{ENV_VAR}=" in msg and "trn_fmnist" in msg
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(CheckpointError, match=f"set {ENV_VAR} to a folder holding nothing_like_it.safetensors"):
        load_checkpoint("checkpoints/nothing_like_it")


def test_wheel_layout_package_data(elsewhere: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed from a wheel, the weights sit in trn/_weights/ and there is no checkout to fall back to."""
    import trn.weights as w

    pkg = tmp_path / "site-packages" / "trn" / "_weights"
    save_checkpoint(pkg / "trn_fmnist", _state(), {"from": "wheel"})
    monkeypatch.setattr(w, "_PACKAGE_WEIGHTS", pkg)
    monkeypatch.setattr(w, "_SOURCE_WEIGHTS", tmp_path / "no_checkout" / "checkpoints")
    assert weights_dirs() == [pkg] and shipped_checkpoints() == ["trn_fmnist"]
    assert load_checkpoint("checkpoints/trn_fmnist")[1] == {"from": "wheel"}
    with pytest.raises(CheckpointError, match="shipped: \\['trn_fmnist'\\]"):
        load_checkpoint("checkpoints/fmnist_guard")


def test_pretrained_from_another_directory(elsewhere: Path) -> None:
    r = Restorer.pretrained("fashion-mnist")
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert r.restore(x).shape == x.shape and r.image_shape == (1, 28, 28)
