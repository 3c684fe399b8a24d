"""Part files of a sanitisation job: what the workers write per batch, and their assembly into the final outputs.

Parquet and npz outputs are written in pieces (``OUTPUT/_parts/part-RUN-TAG-SEQ.{npz,parquet}``), one per batch, by
the worker that restored it; at the end one task assembles them into the mirrored Parquet files or the one ``.npz``.
A later run's part of the same row wins (parts sort by run). This module needs numpy and pyarrow only, no torch, so
that the Ray task that assembles the outputs starts in well under a second.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trn.errors import SanitizeError

__all__ = ["PARTS_DIR", "assemble_npz", "assemble_parquet", "latest_data", "list_parts", "part_name", "read_part",
           "write_part"]

PARTS_DIR = "_parts"  # per-batch pieces of Parquet / npz outputs, written by the workers, assembled at the end


def part_name(parts: Path, run: str, tag: str, seq: int, suffix: str) -> Path:
    return parts / f"part-{run}-{tag}-{seq:06d}{suffix}"


def write_part(parts: Path, name: Path, ids: list[str], data: np.ndarray | list[bytes]) -> None:
    """One batch's ok rows as a part file: npz (``index``, float32 ``images``) or Parquet (``id``, ``png``)."""
    parts.mkdir(parents=True, exist_ok=True)
    tmp = parts / f".{name.name}.tmp{name.suffix}"
    if name.suffix == ".npz":
        np.savez(tmp, index=np.array([int(i) for i in ids], dtype=np.int64),
                 images=np.asarray(data, dtype=np.float32))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "png": pa.array(list(data), pa.binary())}), tmp)
    os.replace(tmp, name)


def read_part(part: Path, data: bool = True) -> tuple[list[str], Any]:
    if part.suffix == ".npz":
        with np.load(part, allow_pickle=False) as z:
            return [str(i) for i in z["index"]], z["images"] if data else None
    import pyarrow.parquet as pq

    t = pq.read_table(part, columns=["id", "png"] if data else ["id"])
    return t.column("id").to_pylist(), t.column("png").to_pylist() if data else None


def list_parts(output: Path) -> list[Path]:
    d = output / PARTS_DIR
    return sorted(d.glob("part-*")) if d.is_dir() else []  # named by run first: later runs sort (and win) last


def latest_data(output: Path, ok: set[str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for part in list_parts(output):
        ids, values = read_part(part)
        for rid, v in zip(ids, values):
            if rid in ok:
                data[rid] = v
    lost = sorted(ok - data.keys())
    if lost:
        raise SanitizeError(f"{len(lost)} rows are ok in the manifest but their data is missing from "
                            f"{output / PARTS_DIR} (e.g. {lost[:3]}); rerun the same command to redo them")
    return data


def assemble_npz(output: Path, name: str, ok: Sequence[str], labels: np.ndarray, class_names: Sequence[str],
                 shape: tuple[int, int, int]) -> Path:
    """Write ``OUTPUT/name``: float32 ``images`` and ``labels`` of the ok rows in input order, their ``index``."""
    data = latest_data(output, set(ok))
    index = np.array(sorted(int(i) for i in ok), dtype=np.int64)
    images = np.stack([data[str(i)] for i in index]) if len(index) else np.zeros((0, *shape), np.float32)
    dest = output / name
    tmp = output / f".{name}.tmp.npz"
    np.savez(tmp, images=images.astype(np.float32, copy=False), labels=np.asarray(labels)[index].astype(np.int64),
             class_names=np.array(list(class_names), dtype=str), index=index)
    os.replace(tmp, dest)
    return dest


def assemble_parquet(output: Path, sources: dict[str, str], ok: Sequence[str], image_column: str) -> list[Path]:
    """Mirror each source Parquet file under OUTPUT with its ok rows (order kept) and the cleaned PNG bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = latest_data(output, set(ok))
    by_file: dict[str, list[int]] = {}
    for rid in ok:
        rel, k = rid.rsplit(":", 1)
        by_file.setdefault(rel, []).append(int(k))
    written = []
    for rel, keep in by_file.items():
        keep.sort()
        table = pq.read_table(sources[rel]).take(pa.array(keep, pa.int64()))
        pngs = pa.array([data[f"{rel}:{k}"] for k in keep], pa.binary())
        table = table.set_column(table.schema.get_field_index(image_column), image_column, pngs)
        dest = output / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, dest)
        written.append(dest)
    return written
