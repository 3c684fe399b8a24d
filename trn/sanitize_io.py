"""The parts of ``trn sanitize`` that are not Ray: finding inputs, manifest rows, per-batch restoring and writing,
assembling the final files, and the job's report. :mod:`trn_workers.sanitize` schedules these on Ray Data.

Inputs (:func:`detect_input`, :func:`plan_job`):

* an image folder (PNG/JPEG, nested folders kept): one input per image file, its id the relative path;
* Parquet (a file, or a folder of them) with a column of encoded image bytes: one input per row, id ``file:row``;
* ``.npz`` arrays: one input per image, id the row number.

Folder policy, stated once (:func:`discover`): entries whose name starts with ``.`` (hidden files and folders) are
skipped and counted (the report's ``hidden``); symlinked folders are followed (counted as ``linked_folders``), and a
folder that leads back to one of its own ancestors (a symlink loop) becomes one error row under its path while
everything else is processed; an entry with an image suffix that is not a regular file (a FIFO, socket or device,
a broken or looping symlink) becomes an error row and is never opened; other files are not inputs and are ignored.

The manifest (:data:`MANIFEST_NAME`, JSON lines) holds exactly one row per input: at the start of a run the driver
rewrites it with the rows that stay done (atomically), and then appends each batch's rows, so a retried input's old
row is gone before its new one is written. Resuming is the set difference of the input ids and the manifest's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import torch

from trn.checkpoint import checkpoint_digest, checkpoint_paths
from trn.data import _IMAGE_KEYS, _LABEL_KEYS, IMAGE_SUFFIXES, to_float_images
from trn.defenses.spec import default_defenses, load_defense_spec, map_trn_checkpoints, uses_default_restorer
from trn.defenses.stack import RestorerStage, build_defense_stack
from trn.errors import ConfigError, DataError, InputError, SanitizeError, TRNError
from trn.imageio import DEFAULT_MAX_PIXELS, decode_image, encode_png
from trn.resize import ResizePolicy, fit_image
from trn.restorer import Restorer
from trn.sanitize_parts import PARTS_DIR, assemble_npz, assemble_parquet, list_parts, part_name, read_part, write_part

__all__ = [
    "MANIFEST_NAME",
    "PARTS_DIR",
    "SPEC_NAME",
    "BatchRestorer",
    "CheckpointBytes",
    "Entry",
    "InputKind",
    "JobPlan",
    "SanitizeConfig",
    "SanitizeError",
    "SanitizeReport",
    "append_manifest",
    "assemble_npz",
    "assemble_parquet",
    "build_stack",
    "check_spec",
    "detect_input",
    "discover",
    "error_row",
    "job_spec",
    "make_report",
    "plan_job",
    "png_names",
    "prepare_defenses",
    "prepare_output",
    "present_ids",
    "read_manifest",
    "read_npz_for_job",
    "read_npz_rows",
    "write_manifest",
]
log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
SPEC_NAME = "sanitize.json"
InputKind = Literal["folder", "parquet", "npz"]
MANIFEST_FIELDS = ("id", "status", "message", "label", "pred_before", "pred_after", "linf", "l2", "output", "node",
                   "worker")


# --------------------------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class SanitizeConfig:
    """One sanitisation job (run by :func:`trn_workers.sanitize.sanitize` on Ray Data).

    Attributes:
        input: image folder, ``.parquet`` file or folder of them, or ``.npz`` file.
        output: output folder (created); rerunning with the same folder resumes the job.
        checkpoint: restorer checkpoint (a path, or a shipped name: ``checkpoints/trn_fmnist_agnostic`` is found from any
            working directory, see :func:`trn.weights.resolve_checkpoint`).
        workers: actors in the pool; each loads the restorer once.
        batch_size: images per ``map_batches`` call (and per block, so that every actor gets work).
        num_gpus: GPUs per actor; None: 1 each if the cluster has enough GPUs, a share if fewer, 0 without.
        cpus_per_worker: logical CPUs per actor (also its torch thread count, rounded down, at least 1).
        image_column: Parquet column with the encoded image bytes.
        resize: images whose size differs from the model's: ``reject`` (error row) or ``resize`` (bilinear).
        max_pixels: larger images are refused from their header, before decoding.
        address: Ray cluster to join (``auto``, ``HOST:PORT``, ``ray://host:10001``); None: ``$RAY_ADDRESS`` if set,
            else a fresh local Ray.
        max_restarts: restarts of a dead actor; max_task_retries: retries of the batch it was running.
        retry_errors: on resume, process the inputs recorded as errors again (their rows are replaced).
        defenses: the defence stack: a YAML file holding the list, an inline YAML/JSON list
            (``'[{name: bit_depth, bits: 4}, trn]'``) or the list itself; None: ``[trn]``.
    """

    input: str | os.PathLike
    output: str | os.PathLike
    checkpoint: str | os.PathLike = "checkpoints/trn_fmnist_agnostic"
    workers: int = 2
    batch_size: int = 256
    num_gpus: float | None = None
    cpus_per_worker: float = 1.0
    image_column: str = "image"
    resize: Literal["reject", "resize"] = "reject"
    max_pixels: int = DEFAULT_MAX_PIXELS
    address: str | None = None
    max_restarts: int = 3
    max_task_retries: int = 3
    retry_errors: bool = False
    defenses: str | os.PathLike | Sequence[dict[str, Any] | str] | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.resize not in ("reject", "resize"):
            raise ConfigError(f"resize must be 'reject' or 'resize', got {self.resize!r}")
        if self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.max_restarts < -1 or self.max_task_retries < -1:
            raise ConfigError("max_restarts and max_task_retries must be >= 0, or -1 for 'forever'")
        load_defense_spec(self.defenses)  # names, parameters and order; values are checked when sanitize() builds it


# --------------------------------------------------------------------------------------------- Ray


# --------------------------------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class Entry:
    """One input found on disk: ``path`` to read, or ``error`` (then it is never opened)."""

    id: str
    path: str | None
    error: str | None = None


@dataclass
class Discovery:
    """What :func:`discover` found: inputs and error entries in sorted order, plus the policy's counts."""

    entries: list[Entry] = field(default_factory=list)
    hidden: int = 0  # hidden files and folders skipped (names starting with '.')
    linked_folders: int = 0  # symlinked folders followed


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device"}


def discover(root: Path, suffixes: Sequence[str], exclude: Path | None = None) -> Discovery:
    """Walk ``root`` (sorted; see the module docstring for hidden files, symlinked folders and non-regular files).

    Args:
        root: the folder.
        suffixes: lower-case file suffixes that make an input (``.png``...).
        exclude: a folder not to enter (an OUTPUT inside INPUT), compared by resolved path.

    Returns:
        The entries (``id``: path relative to ``root``, POSIX separators) and the counts.
    """
    found = Discovery()
    exclude_key = _key(exclude) if exclude is not None and exclude.exists() else None

    def walk(folder: Path, rel: str, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            names = sorted(os.listdir(folder))
        except OSError as e:
            found.entries.append(Entry(rel or ".", None, f"cannot list folder: {e.strerror or e}"))
            return
        for name in names:
            r = f"{rel}/{name}" if rel else name
            if name.startswith("."):
                found.hidden += 1
                continue
            p = folder / name
            is_input = p.suffix.lower() in suffixes
            try:
                st = os.stat(p)  # follows symlinks; never opens the file
            except OSError as e:
                if is_input or os.path.islink(p):
                    why = "symlink loop" if e.errno == 40 else "broken symlink" if os.path.islink(p) else "unreadable"
                    found.entries.append(Entry(r, None, f"{why}: {e.strerror or e}; not read"))
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key == exclude_key:
                    continue
                if key in ancestors:
                    found.entries.append(Entry(r, None, "symlink loop: this folder leads back to one of its own "
                                                        "ancestors; not entered"))
                    continue
                if os.path.islink(p):
                    found.linked_folders += 1
                walk(p, r, ancestors | {key})
            elif is_input:
                if stat.S_ISREG(st.st_mode):
                    found.entries.append(Entry(r, str(p)))
                else:
                    kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
                    found.entries.append(Entry(r, None, f"not a regular file ({kind}); not read"))

    walk(root, "", frozenset({_key(root)}))
    return found


def _key(p: Path) -> tuple[int, int]:
    st = os.stat(p)
    return st.st_dev, st.st_ino


def detect_input(path: str | os.PathLike) -> InputKind:
    """Classify ``path`` as ``npz``, ``parquet`` (a file, or a folder with ``.parquet`` files) or ``folder``.

    Raises:
        InputError: the path does not exist, is not a regular file or folder, has an unsupported suffix, or is a
            folder holding neither images nor Parquet files (or both).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"input not found: {p}")
    if p.is_file():
        if p.suffix.lower() == ".npz":
            return "npz"
        if p.suffix.lower() == ".parquet":
            return "parquet"
        raise InputError(f"{p}: unsupported input file; expected a .npz or .parquet file, or an image folder")
    if not p.is_dir():
        raise InputError(f"{p}: not a regular file or folder")
    found = discover(p, (*IMAGE_SUFFIXES, ".parquet"))
    kinds = {Path(e.id).suffix.lower() == ".parquet" for e in found.entries if e.path is not None}
    if kinds == {True, False}:
        raise InputError(f"{p} holds both Parquet files and images; point INPUT at one kind")
    if kinds == {True}:
        return "parquet"
    if kinds == {False}:
        return "folder"
    raise InputError(f"{p}: no images ({'/'.join(IMAGE_SUFFIXES)}) or .parquet files found (searched recursively)")


def png_names(rels: Iterable[str]) -> dict[str, str]:
    """Output path of each input (``a/b.jpg`` -> ``a/b.png``); ``b.jpg`` beside ``b.png`` becomes ``b.jpg.png``."""
    rels = list(rels)
    wanted = {rel: str(PurePosixPath(rel).with_suffix(".png")) for rel in rels}
    taken: dict[str, int] = {}
    for out in wanted.values():
        taken[out] = taken.get(out, 0) + 1
    names = {rel: (rel + ".png" if taken[out] > 1 and not rel.lower().endswith(".png") else out)
             for rel, out in wanted.items()}
    if len(set(names.values())) != len(names):
        raise InputError("two input files map to the same output PNG name; rename one of them")
    return names


# --------------------------------------------------------------------------------------------- plans
@dataclass
class NpzRows:
    """An npz input: float32 NCHW images (rows that failed the value check zeroed), labels, and those rows."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    bad: dict[int, str] = field(default_factory=dict)
    _digest: str | None = field(default=None, init=False, repr=False, compare=False)

    def digest(self) -> str:
        """What a resumed job must match: the arrays, not the file's bytes (zip timestamps change those). Hashed
        once (the job spec and the actors' check both need it)."""
        if self._digest is None:
            h = hashlib.sha256(np.ascontiguousarray(self.images, dtype=np.float32).tobytes())
            h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
            if self.bad:
                h.update(json.dumps(sorted(self.bad)).encode())
            self._digest = h.hexdigest()[:16]
        return self._digest


def read_npz_rows(path: str | os.PathLike) -> NpzRows:
    """Load an npz like :func:`trn.data.load_npz`, but a NaN / out-of-range image costs only its own row.

    Raises:
        DataError: unreadable file, no image array, bad layout or dtype, non-integer labels.
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # any failure to read the file is one clear error
        raise DataError(f"cannot read npz file {p}: {type(e).__name__}: {e}") from e
    key = next((k for k in _IMAGE_KEYS if k in arrays), None)
    if key is None:
        raise DataError(f"{p}: no image array; expected one of {list(_IMAGE_KEYS)}, found {sorted(arrays)}")
    raw = arrays[key]
    bad: dict[int, str] = {}
    if np.issubdtype(raw.dtype, np.floating) and raw.ndim >= 3:
        flat = raw.reshape(len(raw), -1)
        finite = np.isfinite(flat).all(1)
        with np.errstate(invalid="ignore"):  # a row holding NaN has a NaN minimum: not inside either
            inside = (flat.min(1) >= 0) & (flat.max(1) <= 1) if flat.size else np.ones(len(flat), bool)
        for i in np.flatnonzero(~(finite & inside)):
            bad[int(i)] = ("pixel values must be finite (this image holds NaN or infinite values)" if not finite[i]
                           else "pixel values must lie in [0, 1]")
        if bad:
            raw = raw.copy()
            raw[list(bad)] = 0
    images = to_float_images(raw, f"{p}:{key}").numpy()
    lkey = next((k for k in _LABEL_KEYS if k in arrays), None)
    if lkey is None:
        labels = np.full(len(images), -1, dtype=np.int64)
    else:
        labels = np.asarray(arrays[lkey]).reshape(-1)
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{p}:{lkey}: labels must be integers, got {labels.dtype}")
        if len(labels) != len(images):
            raise DataError(f"{p}: {len(images)} images but {len(labels)} labels")
        labels = labels.astype(np.int64)
    names = tuple(str(s) for s in arrays["class_names"].tolist()) if "class_names" in arrays else ()
    return NpzRows(images, labels, names, bad)


def read_npz_for_job(path: str | os.PathLike, digest: str) -> NpzRows:
    """A worker's own read of a planned npz input (:func:`read_npz_rows`), checked against the plan's digest.

    Raises:
        SanitizeError: the file no longer holds what the job was planned on.
        DataError: the file cannot be read any more.
    """
    rows = read_npz_rows(path)
    if rows.digest() != digest:
        raise SanitizeError(f"{path} changed after the job was planned; rerun the same command")
    return rows


@dataclass
class JobPlan:
    """Everything the driver knows before Ray starts: the inputs, their ids, and where each result goes."""

    kind: InputKind
    input: Path
    ids: list[str]
    paths: dict[str, str] = field(default_factory=dict)  # folder: id -> file to read
    refs: list[dict[str, Any]] = field(default_factory=list)  # parquet: {id, path, row_group, offset}
    outputs: dict[str, str] = field(default_factory=dict)  # id -> output path relative to OUTPUT
    npz: NpzRows | None = None
    sources: dict[str, Path] = field(default_factory=dict)  # parquet: output rel path -> source file
    errors: dict[str, str] = field(default_factory=dict)  # id -> message, decided on the driver (never read)
    hidden: int = 0
    linked_folders: int = 0

    @property
    def has_labels(self) -> bool:
        return self.npz is not None and bool((self.npz.labels >= 0).any())


def plan_job(kind: InputKind, path: Path, output: Path, image_column: str = "image") -> JobPlan:
    """List the inputs of a job (no pixels are decoded here).

    Raises:
        InputError / DataError / ConfigError: nothing to do, unreadable npz, or a column in no Parquet file.
    """
    if kind == "npz":
        rows = read_npz_rows(path)
        if len(rows.images) == 0:
            raise InputError(f"{path}: the npz holds no images")
        ids = [str(i) for i in range(len(rows.images))]
        return JobPlan("npz", path, ids, outputs=dict.fromkeys(ids, path.name), npz=rows,
                       errors={str(i): m for i, m in rows.bad.items()})
    exclude = output.resolve() if output.exists() else None
    path = path.absolute()  # workers read these paths from their own working directory
    if kind == "folder":
        found = discover(path, IMAGE_SUFFIXES, exclude)
        good = [e for e in found.entries if e.path is not None]
        if not good:
            raise InputError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} images found (searched recursively)")
        names = png_names(e.id for e in good)
        return JobPlan("folder", path, [e.id for e in found.entries], paths={e.id: e.path for e in good},
                       outputs=names, errors={e.id: e.error for e in found.entries if e.error},
                       hidden=found.hidden, linked_folders=found.linked_folders)
    return _plan_parquet(path, exclude, image_column)


def _plan_parquet(path: Path, exclude: Path | None, column: str) -> JobPlan:
    import pyarrow.parquet as pq

    if path.is_file():
        found = Discovery([Entry(path.name, str(path))])
    else:
        found = discover(path, (".parquet",), exclude)
    plan = JobPlan("parquet", path, [], hidden=found.hidden, linked_folders=found.linked_folders)
    missing_column = []
    for e in found.entries:
        if e.path is None:
            plan.ids.append(f"{e.id}:*")
            plan.errors[f"{e.id}:*"] = e.error or "not read"
            continue
        plan.sources[e.id] = Path(e.path)
        try:
            pf = pq.ParquetFile(e.path)
            names = pf.schema_arrow.names
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        except Exception as err:  # noqa: BLE001 - any failure to read a file's footer makes that file one error row
            plan.ids.append(f"{e.id}:*")
            plan.errors[f"{e.id}:*"] = f"unreadable Parquet file: {type(err).__name__}: {err}"
            continue
        if column not in names:
            missing_column.append((e.id, names))
            plan.ids.append(f"{e.id}:*")
            plan.errors[f"{e.id}:*"] = f"no column {column!r} (columns: {names})"
            continue
        start = 0
        for g, n in enumerate(sizes):
            for i in range(n):
                rid = f"{e.id}:{start + i}"
                plan.ids.append(rid)
                plan.refs.append({"id": rid, "path": e.path, "row_group": g, "offset": i})
                plan.outputs[rid] = e.id
            start += n
    if plan.sources and len(missing_column) == len(plan.sources):
        raise ConfigError(f"--image-column {column!r} is in none of the Parquet files; "
                          f"{missing_column[0][0]} has columns {missing_column[0][1]}")
    if not plan.refs and not plan.errors:
        raise InputError(f"{path}: no Parquet rows to sanitise")
    return plan


# --------------------------------------------------------------------------------------------- OUTPUT and spec
def prepare_output(output: Path) -> None:
    """Create OUTPUT and check that it is a writable folder.

    Raises:
        InputError: OUTPUT is an existing file (or other non-folder), or cannot be created or written.
    """
    if output.exists() and not output.is_dir():
        raise InputError(f"OUTPUT {output} exists and is not a folder; give a folder path (it is created)")
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output, prefix=".trn-write-test-"):
            pass
    except OSError as e:
        raise InputError(f"cannot write to OUTPUT {output}: {e.strerror or e}") from e


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_spec(output: Path, spec: dict[str, Any], implied: dict[str, Any] | None = None) -> None:
    """Record ``spec`` in OUTPUT, or check it against the recorded one (a rerun resumes only the same job).

    Args:
        implied: keys that older versions did not record, with the value their jobs implied.

    Raises:
        SanitizeError: OUTPUT holds a different job.
    """
    path = output / SPEC_NAME
    if path.is_file():
        old = {**(implied or {}), **json.loads(path.read_text())}
        diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        if diff:
            raise SanitizeError(f"{output} holds a different sanitize job ({', '.join(diff)} differ: "
                                f"{ {k: old.get(k) for k in diff} } vs { {k: spec.get(k) for k in diff} }); "
                                "use a new OUTPUT folder")
    else:
        atomic_write(path, (json.dumps(spec, indent=2) + "\n").encode())


# --------------------------------------------------------------------------------------------- manifest
def _json_value(v: Any) -> Any:
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else round(float(v), 6)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.str_):
        return str(v)
    return v


def _line(row: dict[str, Any]) -> str:
    return json.dumps({k: _json_value(row.get(k)) for k in MANIFEST_FIELDS}) + "\n"


def read_manifest(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Rows of a manifest by id (the last line for an id wins).

    A truncated last line (a job killed while writing it) is ignored with a warning; a malformed line elsewhere
    raises :class:`SanitizeError`.
    """
    p = Path(path)
    if not p.is_file():
        return {}
    data = p.read_bytes()
    lines = data.decode("utf-8", errors="replace").split("\n")
    rows: dict[str, dict[str, Any]] = {}
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[str(row["id"])] = row
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            if k >= len(lines) - 2 and not data.endswith(b"\n"):
                log.warning("%s: ignoring a truncated last line (interrupted job)", p)
                continue
            raise SanitizeError(f"{p}: line {k + 1} is not a manifest row ({e}); fix or delete the line") from e
    return rows


def write_manifest(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace the manifest with ``rows`` (atomically): how a run drops the rows it is about to redo."""
    atomic_write(path, "".join(_line(r) for r in rows).encode())


def append_manifest(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows, flushed and fsync'ed (written after their data, so an ok row always has its output)."""
    text = "".join(_line(r) for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def error_row(rid: str, message: str, label: int | None = None) -> dict[str, Any]:
    """The manifest row of an input that produced no output."""
    return {"id": rid, "status": "error", "message": message, "label": label, "pred_before": -1, "pred_after": -1}


# --------------------------------------------------------------------------------------------- parts
def present_ids(plan: JobPlan, output: Path) -> set[str]:
    """Ids whose output data exists (a manifest ok row without its data is redone)."""
    if plan.kind == "folder":
        return {i for i, rel in plan.outputs.items() if (output / rel).is_file()}
    ids: set[str] = set()
    for part in list_parts(output):
        ids.update(read_part(part, data=False)[0])
    return ids


# --------------------------------------------------------------------------------------------- restoring
@dataclass(frozen=True)
class CheckpointBytes:
    """A restorer checkpoint carried by value, so that workers on other nodes need no shared filesystem."""

    name: str
    tensors: bytes
    meta: bytes

    @classmethod
    def read(cls, path: str | os.PathLike) -> CheckpointBytes:
        t, m = checkpoint_paths(path)
        return cls(t.stem, t.read_bytes(), m.read_bytes())

    def write(self, directory: Path) -> Path:
        """Write the two files into ``directory`` (created); return the checkpoint's path without suffix."""
        directory.mkdir(parents=True, exist_ok=True)
        t, m = checkpoint_paths(directory / self.name)
        t.write_bytes(self.tensors)
        m.write_bytes(self.meta)
        return t.with_suffix("")

    def load(self, device: str) -> Restorer:
        with tempfile.TemporaryDirectory(prefix="trn-ckpt-") as d:
            return Restorer.load(self.write(Path(d)), device)


class BatchRestorer:
    """Decode, restore, measure and WRITE one batch; return only its manifest columns (no pixels).

    Folder inputs are written as PNG files at their output paths, Parquet and npz inputs as one part file per
    batch under ``OUTPUT/_parts`` (assembled at the end). Decoding happens per row, so one bad input costs one row.

    Args:
        restorer: the ``--checkpoint`` restorer (its guard gives ``pred_before``; its image shape is the job's).
        preprocessor: the defence stack's input side (makes the written images).
        guard_after: the guard inside the stack's classifier wrappers (``pred_after``).
        kind, output, run: the job's input kind, OUTPUT folder and run stamp (part names sort by run).
        renamed: folder inputs whose output name is not ``rel`` with ``.png`` (see :func:`png_names`).
        npz: an npz job's images (:func:`read_npz_rows`, read by the worker itself): its batches carry row
            ``index`` es, not pixels.
        node, worker: recorded in each row (where it ran).
    """

    def __init__(self, restorer: Restorer, preprocessor: torch.nn.Module, guard_after: torch.nn.Module,
                 kind: InputKind, output: str | os.PathLike, run: str, *, image_column: str = "image",
                 resize: ResizePolicy = "reject", max_pixels: int = DEFAULT_MAX_PIXELS,
                 renamed: dict[str, str] | None = None, npz: NpzRows | None = None, node: str = "",
                 worker: int = 0) -> None:
        if kind == "npz" and npz is None:
            raise ConfigError("an npz job's BatchRestorer needs the npz rows (npz=read_npz_rows(path))")
        self.restorer, self.preprocessor, self.guard_after = restorer, preprocessor, guard_after
        self.kind, self.output, self.run = kind, Path(output), run
        self.image_column, self.resize, self.max_pixels = image_column, resize, max_pixels
        self.renamed, self.npz = renamed or {}, npz
        self.shape = tuple(int(v) for v in restorer.image_shape)
        self.node, self.worker = node, worker
        self.device = restorer.device
        self._seq = 0
        self._row_group: tuple[tuple[str, int], list[Any]] | None = None

    def output_name(self, rid: str) -> str:
        if self.kind == "folder":
            return self.renamed.get(rid) or str(PurePosixPath(rid).with_suffix(".png"))
        return rid.rsplit(":", 1)[0] if self.kind == "parquet" else ""

    # ------------------------------------------------------------------ reading (per row, errors kept)
    def _decode(self, data: Any) -> np.ndarray:
        if isinstance(data, dict):  # Hugging Face ``datasets`` Image feature: {"bytes": ..., "path": ...}
            data = data.get("bytes")
        if data is None:
            raise InputError("no image bytes (null value)")
        img = decode_image(bytes(data), channels=self.shape[0], max_pixels=self.max_pixels)
        return fit_image(img, self.shape, self.resize)

    def _column(self, path: str, group: int) -> list[Any]:
        key = (path, group)
        if self._row_group is None or self._row_group[0] != key:
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path).read_row_group(group, columns=[self.image_column])
            self._row_group = (key, table.column(0).to_pylist())
        return self._row_group[1]

    def load(self, batch: dict[str, np.ndarray]) -> list[np.ndarray | str]:
        """One (C, H, W) float32 array or one error message per row."""
        out: list[np.ndarray | str] = []
        for i in range(len(batch["id"])):
            try:
                if self.kind == "npz":
                    assert self.npz is not None
                    out.append(fit_image(self.npz.images[int(batch["index"][i])], self.shape, self.resize))
                    continue
                if self.kind == "folder":
                    data: Any = batch["bytes"][i]
                else:
                    data = self._column(str(batch["path"][i]), int(batch["row_group"][i]))[int(batch["offset"][i])]
                out.append(self._decode(data))
            except Exception as e:  # noqa: BLE001 - untrusted input: any failure becomes this row's error message
                out.append(e.args[0] if isinstance(e, TRNError) and e.args else f"{type(e).__name__}: {e}")
        return out

    # ------------------------------------------------------------------ restoring and writing
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["id"]]
        loaded = self.load(batch)
        n = len(loaded)
        good = [i for i, v in enumerate(loaded) if not isinstance(v, str)]
        pred_before = np.full(n, -1, dtype=np.int64)
        pred_after = np.full(n, -1, dtype=np.int64)
        linf = np.full(n, np.nan, dtype=np.float32)
        l2 = np.full(n, np.nan, dtype=np.float32)
        status = np.array(["error" if isinstance(v, str) else "ok" for v in loaded], dtype=object)
        message = [v if isinstance(v, str) else "" for v in loaded]
        outputs = [""] * n
        if good:
            x = torch.from_numpy(np.stack([loaded[i] for i in good])).to(self.device)  # (B, C, H, W)
            # no_grad, not inference_mode: the gradient stream needs autograd through the guard (it enables it)
            with torch.no_grad():
                y = self.preprocessor(x)
                if self.kind != "npz":
                    y = (y * 255.0).round() / 255.0  # measure what the PNG holds
                pred_before[good] = self.restorer.guard(x).argmax(1).cpu().numpy()
                pred_after[good] = self.guard_after(y).argmax(1).cpu().numpy()
            d = (y - x).flatten(1)
            linf[good] = d.abs().amax(1).cpu().numpy()
            l2[good] = d.norm(dim=1).cpu().numpy()
            restored = y.cpu().numpy()
            for k, i in enumerate(good):
                try:
                    outputs[i] = self._write_one(ids[i], restored[k])
                except OSError as e:  # a full disk or a vanished OUTPUT: this row fails, the job goes on
                    status[i], message[i] = "error", f"cannot write output: {e.strerror or e}"
            self._write_part([ids[i] for i in good if status[i] == "ok"],
                             [restored[k] for k, i in enumerate(good) if status[i] == "ok"])
        labels = batch.get("label")
        return {
            "id": np.array(ids, dtype=object), "status": status, "message": np.array(message, dtype=object),
            "label": (np.asarray(labels, dtype=np.int64) if labels is not None else np.full(n, -1, np.int64)),
            "pred_before": pred_before, "pred_after": pred_after, "linf": linf, "l2": l2,
            "output": np.array([o if s == "ok" else "" for o, s in zip(outputs, status)], dtype=object),
            "node": np.full(n, self.node, dtype=object), "worker": np.full(n, self.worker, dtype=np.int64),
        }

    def _write_one(self, rid: str, img: np.ndarray) -> str:
        name = self.output_name(rid)
        if self.kind == "folder":
            atomic_write(self.output / name, encode_png(img))
        return name

    def _write_part(self, ids: list[str], images: list[np.ndarray]) -> None:
        if self.kind == "folder" or not ids:
            return
        self._seq += 1
        suffix = ".npz" if self.kind == "npz" else ".parquet"
        name = part_name(self.output / PARTS_DIR, self.run, f"{self.worker}-{time.time_ns() % 10**9:09d}",
                          self._seq, suffix)
        data: np.ndarray | list[bytes] = np.stack(images) if self.kind == "npz" else [encode_png(a) for a in images]
        write_part(self.output / PARTS_DIR, name, ids, data)


# --------------------------------------------------------------------------------------------- defences and spec
def build_stack(spec: list[dict[str, Any]], restorer: Restorer) -> Any:
    """The :class:`~trn.defenses.stack.DefenseStack` of ``spec`` around ``restorer``'s guard (driver and actors)."""
    return build_defense_stack(spec, restorer.guard, restorer=restorer if uses_default_restorer(spec) else None)


def prepare_defenses(defenses: Any, restorer: Restorer) -> list[dict[str, Any]]:
    """The job's defence stack (``--defenses``; None: ``[trn]``) in canonical form, ``trn`` checkpoints (and
    ``map_from`` / ``fallback`` files) made absolute, checked by building it once around ``restorer`` (on the
    driver, before Ray starts).

    Raises:
        ConfigError / CheckpointError: a bad spec or an unusable checkpoint.
    """
    spec = load_defense_spec(defenses)
    spec = default_defenses() if spec is None else spec

    def resolve(i: int, path: str, key: str = "checkpoint") -> str:
        t = checkpoint_paths(path)[0]
        if not t.is_file():
            raise ConfigError(f"--defenses: defence #{i} (trn): {key} file not found: {t}")
        return str(t.resolve().with_suffix(""))

    def resolve_classifier(i: int, path: str) -> str:
        p = Path(path).expanduser()
        for c in (p, Path(str(p) + ".safetensors")):
            if c.is_file():
                return str(p.resolve())
        raise ConfigError(f"--defenses: defence #{i} (trn): map_from classifier not found: {p}")

    spec = map_trn_checkpoints(spec, resolve)
    spec = map_trn_checkpoints(spec, resolve_classifier, key="map_from")  # actors read it: absolute paths
    spec = map_trn_checkpoints(spec, lambda i, p: resolve(i, p, "fallback"), key="fallback")  # so is a fallback
    try:
        stack = build_stack(spec, restorer)
    except ConfigError as e:
        raise ConfigError(f"--defenses: {e}") from e
    for i, stage in enumerate(stack.preprocessor.stages):  # input-side entries come first: stage i is entry i
        if isinstance(stage, RestorerStage) and tuple(stage.restorer.image_shape) != tuple(restorer.image_shape):
            raise ConfigError(f"--defenses: defence #{i} (trn) restores {tuple(stage.restorer.image_shape)} images, "
                              f"but the job decodes images for --checkpoint's restorer, {tuple(restorer.image_shape)}")
    return spec


def job_spec(plan: JobPlan, checkpoint: Path, defenses: list[dict[str, Any]], resize: str, max_pixels: int,
             image_column: str) -> dict[str, Any]:
    """What must match for a rerun to resume (rather than mix two jobs in one OUTPUT): see :func:`check_spec`."""
    spec: dict[str, Any] = {"input": str(plan.input.resolve()), "kind": plan.kind,
                            "checkpoint": str(checkpoint_paths(checkpoint)[0].resolve()),
                            "checkpoint_sha256": checkpoint_digest(checkpoint), "resize": resize,
                            "max_pixels": max_pixels, "defenses": defenses}
    stack_digests = [checkpoint_digest(e[k]) for e in defenses if e["name"] == "trn"
                     for k in ("checkpoint", "fallback") if e.get(k)]
    if stack_digests:
        spec["defenses_checkpoint_sha256"] = stack_digests
    if plan.kind == "parquet":
        spec["image_column"] = image_column
    if plan.npz is not None:
        spec["input_sha256"] = plan.npz.digest()
    return spec


# --------------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class SanitizeReport:
    """What a job did. Counts cover the whole manifest, this run and earlier (resumed) runs together."""

    kind: InputKind
    input: Path
    output: Path
    manifest: Path
    total: int
    ok: int
    errors: int
    skipped: int  # inputs already done by an earlier run
    processed: int  # inputs processed by this run
    seconds: float  # this run, from planning to the assembled outputs
    labelled: int = 0  # ok rows with a known label
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    mean_linf: float | None = None
    mean_l2: float | None = None
    nodes: tuple[str, ...] = ()
    error_examples: tuple[tuple[str, str], ...] = ()  # (id, message) of the first few errors
    defenses: str = "trn -> guard"  # the defence stack, described (DefenseStack.describe format)
    hidden: int = 0  # hidden entries skipped (folder/Parquet-folder inputs)
    linked_folders: int = 0  # symlinked folders followed
    driver_bytes: int = 0  # bytes of the batches the driver received from the workers (manifest columns only)

    def summary(self) -> str:
        """A Markdown-friendly summary (what ``trn sanitize`` prints)."""
        rate = f" ({self.processed / self.seconds:.1f} img/s)" if self.processed and self.seconds > 0 else ""
        lines = [
            f"sanitize {self.kind}: {self.input} -> {self.output}",
            f"defences: {self.defenses}",
            "",
            "| inputs | ok | error | already done | processed now | seconds |",
            "|---:|---:|---:|---:|---:|---:|",
            (f"| {self.total} | {self.ok} | {self.errors} | {self.skipped} | {self.processed} | "
             f"{self.seconds:.1f}{rate} |"),
            "",
        ]
        if self.accuracy_before is not None and self.accuracy_after is not None:
            lines.append(f"guard accuracy on {self.labelled} labelled images: before {self.accuracy_before:.2%}, "
                         f"after {self.accuracy_after:.2%}")
        if self.mean_linf is not None and self.mean_l2 is not None:
            lines.append(f"mean Linf(restored - input) {self.mean_linf:.4f}, mean L2 {self.mean_l2:.4f}")
        if self.hidden or self.linked_folders:
            lines.append(f"hidden entries skipped: {self.hidden}; symlinked folders followed: {self.linked_folders}")
        if self.nodes:
            lines.append(f"nodes: {len(self.nodes)}")
        for rid, msg in self.error_examples:
            lines.append(f"error {rid}: {msg}")
        lines.append(f"manifest: {self.manifest}")
        return "\n".join(lines)


def make_report(plan: JobPlan, rows: dict[str, dict[str, Any]], output: Path, skipped: int, processed: int,
                seconds: float, defenses: str, driver_bytes: int = 0) -> SanitizeReport:
    """The report of a finished job, after checking that every input has exactly one row.

    Raises:
        SanitizeError: an input has no row.
    """
    manifest = output / MANIFEST_NAME
    missing = [i for i in plan.ids if i not in rows]
    if missing:
        raise SanitizeError(f"{manifest}: {len(missing)} of {len(plan.ids)} inputs have no row (e.g. "
                            f"{missing[:3]}); rerun the same command to finish them")
    mine = [rows[i] for i in plan.ids]
    ok_rows = [r for r in mine if r["status"] == "ok"]
    errors = [(r["id"], r["message"]) for r in mine if r["status"] == "error"]
    labelled = [r for r in ok_rows if r.get("label") is not None and r["label"] >= 0]
    acc_b = sum(r["pred_before"] == r["label"] for r in labelled) / len(labelled) if labelled else None
    acc_a = sum(r["pred_after"] == r["label"] for r in labelled) / len(labelled) if labelled else None
    linf = [r["linf"] for r in ok_rows if r.get("linf") is not None]
    l2 = [r["l2"] for r in ok_rows if r.get("l2") is not None]
    return SanitizeReport(
        kind=plan.kind, input=plan.input, output=output, manifest=manifest, total=len(plan.ids), ok=len(ok_rows),
        errors=len(errors), skipped=skipped, processed=processed, seconds=seconds, labelled=len(labelled),
        accuracy_before=acc_b, accuracy_after=acc_a, mean_linf=float(np.mean(linf)) if linf else None,
        mean_l2=float(np.mean(l2)) if l2 else None, nodes=tuple(sorted({r["node"] for r in mine if r.get("node")})),
        error_examples=tuple(errors[:5]), defenses=defenses, hidden=plan.hidden,
        linked_folders=plan.linked_folders, driver_bytes=driver_bytes,
    )
