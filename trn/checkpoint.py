"""Checkpoints as ``NAME.safetensors`` (tensors) plus ``NAME.json`` (metadata). Nothing is ever unpickled."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trn.errors import CheckpointError
from trn.weights import resolve_checkpoint

__all__ = ["checkpoint_digest", "checkpoint_paths", "load_checkpoint", "load_training_state", "save_checkpoint",
           "training_state"]


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """Return (tensors, metadata) paths for ``path`` given with or without the ``.safetensors`` suffix."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_suffix(".safetensors"), p.with_suffix(".json")


def checkpoint_digest(path: str | os.PathLike, length: int = 16) -> str:
    """Hex SHA-256 of the checkpoint's tensors file, first ``length`` digits: what caches and resumable jobs key on.

    ``path`` is resolved like :func:`load_checkpoint` (shipped weights when ``checkpoints/NAME`` is not here).
    """
    return hashlib.sha256(checkpoint_paths(resolve_checkpoint(path))[0].read_bytes()).hexdigest()[:length]


def save_checkpoint(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write ``state`` and JSON ``metadata`` atomically (temp file + rename); return the tensors path."""
    tensors_path, meta_path = checkpoint_paths(path)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tmp_t, tmp_m = tensors_path.with_suffix(".safetensors.tmp"), meta_path.with_suffix(".json.tmp")
    save_file(state, str(tmp_t))
    tmp_m.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
    os.chmod(tmp_t, 0o644)  # safetensors creates its file owner-only; a service may run as another user
    os.replace(tmp_t, tensors_path)
    os.replace(tmp_m, meta_path)
    return tensors_path


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    ``path`` goes through :func:`trn.weights.resolve_checkpoint`: a bare name or ``checkpoints/NAME`` that does not
    exist here falls back to the weights shipped with the package.

    Raises:
        CheckpointError: a file is missing, the tensors are not valid safetensors, or the JSON is malformed.
    """
    tensors_path, meta_path = checkpoint_paths(resolve_checkpoint(path))
    for p in (tensors_path, meta_path):
        if not p.is_file():
            raise CheckpointError(f"checkpoint file not found: {p} (a checkpoint is NAME.safetensors + NAME.json)")
    try:
        state = load_file(str(tensors_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint tensors {tensors_path}: {e}") from e
    try:
        metadata = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: {e}") from e
    if not isinstance(metadata, dict):
        raise CheckpointError(f"checkpoint metadata {meta_path} must be a JSON object")
    return state, metadata


def training_state(net: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """A network's weights and its optimizer's per-parameter state as flat safetensors keys (``net.*``, ``opt.*``).

    The inverse is :func:`load_training_state`; the trainers add their own keys (RNG state) and JSON metadata.
    """
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    for pid, s in opt.state_dict()["state"].items():
        for name, t in s.items():
            state[f"opt.{pid}.{name}"] = t if torch.is_tensor(t) else torch.tensor(t)
    return state


def load_training_state(state: dict[str, torch.Tensor], net: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load what :func:`training_state` wrote back into ``net`` and ``opt`` (in place)."""
    net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    sd = opt.state_dict()
    for key, t in state.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            sd["state"].setdefault(int(pid), {})[name] = t
    opt.load_state_dict(sd)
