"""Where checkpoints are found: a path that exists, else the weights shipped with the package.

The repository's ``checkpoints/`` folder (``NAME.safetensors`` + ``NAME.json``) is installed with the wheel as the
package data ``trn/_weights/``. A checkpoint is named by a path; when that path does not exist and is a bare name or
``checkpoints/NAME`` relative to the working directory (the defaults of the CLI and the configs), the shipped copy of
``NAME`` is used instead, searched in this order:

1. ``$TRN_WEIGHTS_DIR/NAME`` (the environment override: a folder of ``NAME.safetensors`` + ``NAME.json`` files),
2. ``trn/_weights/NAME`` inside the installed package (a wheel),
3. ``checkpoints/NAME`` of the source checkout the package was imported from (an editable install).

    >>> resolve_checkpoint("checkpoints/trn_fmnist")   # from any working directory
    PosixPath('.../site-packages/trn/_weights/trn_fmnist')
    >>> resolve_checkpoint("/data/mine")                 # an explicit path must exist: no fallback
    Traceback (most recent call last):
    trn.errors.CheckpointError: checkpoint file not found: /data/mine.safetensors (...)

Reading a checkpoint (:func:`trn.checkpoint.load_checkpoint`, :func:`trn.checkpoint.checkpoint_digest`) resolves
through here; writing one (``save_checkpoint``, training outputs) never does, so nothing is written into the package.
"""

from __future__ import annotations

import os
from pathlib import Path

from trn.errors import CheckpointError

__all__ = ["ENV_VAR", "SHIPPED_PREFIX", "resolve_checkpoint", "shipped_checkpoints", "weights_dirs"]

ENV_VAR = "TRN_WEIGHTS_DIR"
SHIPPED_PREFIX = "checkpoints"  # a relative path under this folder name may fall back to the shipped copy
_PACKAGE_WEIGHTS = Path(__file__).resolve().parent / "_weights"        # wheel: package data
_SOURCE_WEIGHTS = Path(__file__).resolve().parent.parent / "checkpoints"  # editable install: the checkout's folder


def _stem(path: str | os.PathLike) -> Path:
    """``path`` without a ``.safetensors``/``.json`` suffix (a checkpoint is named without one)."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p


def _exists(stem: Path) -> bool:
    return stem.with_suffix(".safetensors").is_file()


def weights_dirs() -> list[Path]:
    """The folders searched for shipped weights, in order (the environment override first; only existing ones)."""
    dirs = []
    env = os.environ.get(ENV_VAR)
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(_PACKAGE_WEIGHTS)
    if (_SOURCE_WEIGHTS.parent / "pyproject.toml").is_file():  # only inside a source checkout
        dirs.append(_SOURCE_WEIGHTS)
    return [d for d in dirs if d.is_dir()]


def shipped_checkpoints() -> list[str]:
    """Names of the checkpoints :func:`resolve_checkpoint` can find by name (sorted)."""
    return sorted({p.stem for d in weights_dirs() for p in d.glob("*.safetensors") if "_train_state" not in p.stem})


def _shippable_name(path: str | os.PathLike) -> str | None:
    """The shipped name ``path`` may stand for: a bare ``NAME`` or ``checkpoints/NAME``; else None."""
    p = _stem(path)
    if p.is_absolute() or len(p.parts) == 0:
        return None
    if len(p.parts) == 1 or (len(p.parts) == 2 and p.parts[0] == SHIPPED_PREFIX):
        return p.name
    return None


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """The checkpoint (path without suffix) that ``name_or_path`` names, existing path first, then shipped weights.

    Args:
        name_or_path: a checkpoint path with or without ``.safetensors``/``.json``, or the name of a shipped
            checkpoint (``trn_fmnist``, ``checkpoints/fmnist_guard``).

    Returns:
        The path without suffix; ``path.with_suffix(".safetensors")`` exists.

    Raises:
        CheckpointError: nothing found; the message lists every place looked at.

    Example:
        >>> resolve_checkpoint("checkpoints/trn_fmnist").with_suffix(".safetensors").is_file()
        True
    """
    given = _stem(name_or_path)
    if _exists(given):
        return given
    name = _shippable_name(name_or_path)
    if name is None:
        raise CheckpointError(f"checkpoint file not found: {given}.safetensors (a checkpoint is NAME.safetensors + "
                              f"NAME.json)")
    looked = [given] + [d / name for d in weights_dirs()]
    for cand in looked[1:]:
        if _exists(cand):
            return cand
    where = ", ".join(str(p) + ".safetensors" for p in looked)
    env = os.environ.get(ENV_VAR)
    hint = f"{ENV_VAR}={env!r}" if env else f"set {ENV_VAR} to a folder holding {name}.safetensors + {name}.json"
    raise CheckpointError(f"checkpoint file not found for {str(name_or_path)!r}; looked at {where} ({hint}; shipped: "
                          f"{shipped_checkpoints() or 'none'})")
