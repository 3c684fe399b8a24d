"""safetensors + JSON checkpoints: round trip, missing files, corrupt files; nothing is unpickled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trn.checkpoint import checkpoint_digest, checkpoint_paths, load_checkpoint, save_checkpoint
from trn.errors import CheckpointError


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
