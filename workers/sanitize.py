"""``trn sanitize INPUT OUTPUT``: restore a whole dataset with TRN on Ray Data, resumably, losing nothing.

Inputs and what OUTPUT holds afterwards (always with ``manifest.jsonl`` and ``sanitize.json`` beside the data):

* an image folder (PNG/JPEG, nested folders kept): the cleaned images as PNG at the same relative paths
  (``a/b.jpg`` -> ``OUTPUT/a/b.png``);
* Parquet (a file, or a folder of them) with a column of encoded image bytes (``--image-column``; a
  ``{"bytes": ...}`` struct as written by Hugging Face ``datasets`` works too): each file mirrored under OUTPUT with
  the image column replaced by the cleaned PNG bytes and every other column kept;
* ``.npz`` arrays (:func:`trn.data.load_npz`): ``OUTPUT/<name>.npz`` with float32 ``images``, ``labels``, and
  ``index`` (the input row of each output row).

What "restore" means is a defence stack (``--defenses``, see :mod:`trn.defenses.stack` and
:mod:`workers.defense_spec`): by default ``[trn]``, the ``--checkpoint`` restorer alone; with, e.g.,
``[{name: bit_depth, bits: 4}, trn, {name: gcm}]`` the actors write what the input side (bit depth, then TRN) gives,
and the classifier wrappers (GCM) wrap the guard for the manifest's ``pred_after``. A ``trn`` entry without its own
``checkpoint`` is the ``--checkpoint`` restorer, which also sets the image size and provides the guard.

Rows that fail (corrupt file, wrong size under ``--resize reject``...) are left out of the data and recorded in the
manifest as ``status: error`` with the message. The manifest has one line per input: ``id``, ``status``,
``message``, ``label`` (npz labels, else null), the guard's ``pred_before`` / ``pred_after``, ``linf`` / ``l2`` of
``restored - input`` (restored as written: PNG outputs are measured after rounding to 8 bits), ``output``, and the
``node`` / ``worker`` (pid) that processed it.

How it runs: the driver lists the inputs (paths, Parquet row references or npz rows; no pixels are decoded there),
skips those the manifest already records, and hands the rest to ``map_batches`` with :class:`RestoreWorker`, a
callable class that loads the restorer once per actor and reads, decodes, restores and encodes each batch, one row
at a time for the decoding so that a bad file only costs its own row. The driver writes each batch's data and then
appends its manifest lines (flushed), so a killed job resumes where it stopped: run the same command again.
At the end every input must have exactly one manifest row (``ok + error == inputs``), or :class:`SanitizeError`.

    >>> report = sanitize(SanitizeConfig("runs/fmnist_pgd.npz", "runs/fmnist_pgd_clean", workers=2))
    >>> report.ok, report.errors, report.accuracy_after

The input folder/Parquet files are read by the actors from their paths; the checkpoints (``--checkpoint`` and those
of ``trn`` entries in the stack) travel to them as bytes, the stack itself as plain JSON data. On a multi-node
cluster (``--address``) folder and Parquet inputs must be on a shared filesystem; npz inputs travel through Ray's
object store.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import torch

from trn.checkpoint import checkpoint_digest, checkpoint_paths
from trn.data import IMAGE_SUFFIXES, ImageDataset, load_npz, save_npz
from trn.defenses.stack import RestorerStage, build_defense_stack
from trn.errors import ConfigError, InputError, ShapeError, TRNError
from trn.imageio import DEFAULT_MAX_PIXELS, decode_image, encode_png
from trn.restorer import Restorer
from workers.defense_spec import (
    default_defenses,
    describe_defenses,
    load_defense_spec,
    map_trn_checkpoints,
    uses_default_restorer,
)
from workers.resources import ActorPool, cluster_gpus, gpus_per_actor, local_num_cpus, map_batches_resource_kwargs

__all__ = [
    "MANIFEST_NAME",
    "SPEC_NAME",
    "InputKind",
    "RestoreWorker",
    "SanitizeConfig",
    "SanitizeError",
    "SanitizeReport",
    "detect_input",
    "read_manifest",
    "run_sanitize_command",
    "sanitize",
]
log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
SPEC_NAME = "sanitize.json"
PARTS_DIR = "_parts"  # per-batch pieces of Parquet / npz outputs, assembled into the final files at the end
InputKind = Literal["folder", "parquet", "npz"]


class SanitizeError(TRNError, RuntimeError):
    """The job cannot account for every input, or OUTPUT belongs to a different job."""


# --------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SanitizeConfig:
    """One sanitisation job.

    Attributes:
        input: image folder, ``.parquet`` file or folder of them, or ``.npz`` file.
        output: output folder (created); rerunning with the same folder resumes the job.
        checkpoint: restorer checkpoint (``NAME`` of ``NAME.safetensors`` + ``NAME.json``).
        workers: actors in the pool; each loads the restorer once.
        batch_size: images per ``map_batches`` call (and per block, so that every actor gets work).
        num_gpus: GPUs per actor; None: 1 each if the cluster has enough GPUs, a share if fewer, 0 without.
        cpus_per_worker: logical CPUs per actor (also its torch thread count, rounded down, at least 1).
        image_column: Parquet column with the encoded image bytes.
        resize: images whose size differs from the model's: ``reject`` (error row) or ``resize`` (bilinear).
        max_pixels: larger images are refused from their header, before decoding.
        address: Ray cluster to join (``auto``, ``ray://host:10001``); None starts a local Ray when none is running.
        max_restarts: restarts of a dead actor; max_task_retries: retries of the batch it was running.
        retry_errors: on resume, process the inputs recorded as errors again (default: they count as done).
        defenses: the defence stack: a YAML file holding the list, an inline YAML/JSON list
            (``'[{name: bit_depth, bits: 4}, trn]'``) or the list itself; None: ``[trn]``. Input-side stages make
            the written images; classifier wrappers (gcm, unig) wrap the guard for ``pred_after``. A ``trn`` entry
            without ``checkpoint`` uses ``checkpoint``. Part of what a resumed job must match.
    """

    input: str | os.PathLike
    output: str | os.PathLike
    checkpoint: str | os.PathLike = "checkpoints/trn_fmnist"
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
        ActorPool(self.workers, self.cpus_per_worker, 0.0, self.max_restarts, self.max_task_retries)  # validates
        load_defense_spec(self.defenses)  # names, parameters and order; values are checked when sanitize() builds it


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
        if self.nodes:
            lines.append(f"nodes: {len(self.nodes)}")
        for rid, msg in self.error_examples:
            lines.append(f"error {rid}: {msg}")
        lines.append(f"manifest: {self.manifest}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- inputs
def detect_input(path: str | os.PathLike) -> InputKind:
    """Classify ``path`` as ``npz``, ``parquet`` (a file, or a folder with ``.parquet`` files) or ``folder``.

    Raises:
        InputError: the path does not exist, has an unsupported suffix, or is a folder holding neither images nor
            Parquet files (or both).
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
    has_parquet = any(_parquet_files(p))
    has_images = any(_image_files(p, None))
    if has_parquet and has_images:
        raise InputError(f"{p} holds both Parquet files and images; point INPUT at one kind")
    if has_parquet:
        return "parquet"
    if has_images:
        return "folder"
    raise InputError(f"{p}: no images ({'/'.join(IMAGE_SUFFIXES)}) or .parquet files found (searched recursively)")


def _walk(root: Path, exclude: Path | None) -> Iterable[Path]:
    """Files under ``root``, sorted, skipping hidden entries and the ``exclude`` folder (an OUTPUT inside INPUT)."""
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".")
                             and (exclude is None or (d / n).resolve() != exclude))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield d / name


def _image_files(root: Path, exclude: Path | None) -> Iterable[Path]:
    return (f for f in _walk(root, exclude) if f.suffix.lower() in IMAGE_SUFFIXES)


def _parquet_files(root: Path, exclude: Path | None = None) -> Iterable[Path]:
    return (f for f in _walk(root, exclude) if f.suffix.lower() == ".parquet")


def _png_names(rels: list[str]) -> dict[str, str]:
    """Output path of each input (``a/b.jpg`` -> ``a/b.png``); ``b.jpg`` beside ``b.png`` becomes ``b.jpg.png``."""
    wanted = {rel: str(PurePosixPath(rel).with_suffix(".png")) for rel in rels}
    taken: dict[str, int] = {}
    for out in wanted.values():
        taken[out] = taken.get(out, 0) + 1
    names = {rel: (rel + ".png" if taken[out] > 1 and not rel.lower().endswith(".png") else out)
             for rel, out in wanted.items()}
    if len(set(names.values())) != len(names):
        raise InputError("two input files map to the same output PNG name; rename one of them")
    return names


@dataclass
class _Plan:
    """Everything the driver knows before Ray starts: the inputs, their ids, and where each result goes."""

    kind: InputKind
    input: Path
    ids: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)  # folder / parquet: references the actors read
    outputs: dict[str, str] = field(default_factory=dict)  # id -> output path relative to OUTPUT
    dataset: ImageDataset | None = None  # npz: the arrays
    has_labels: bool = False
    sources: dict[str, Path] = field(default_factory=dict)  # parquet: output rel path -> source file
    driver_errors: dict[str, str] = field(default_factory=dict)  # parquet: id -> message (unreadable file)


def _plan_folder(root: Path, output: Path) -> _Plan:
    files = list(_image_files(root, output.resolve()))
    if not files:
        raise InputError(f"{root}: no {'/'.join(IMAGE_SUFFIXES)} images found (searched recursively)")
    rels = [f.relative_to(root).as_posix() for f in files]
    rows = [{"id": rel, "path": str(f.resolve())} for rel, f in zip(rels, files)]
    return _Plan("folder", root, rels, rows=rows, outputs=_png_names(rels))


def _plan_parquet(path: Path, output: Path, column: str) -> _Plan:
    import pyarrow.parquet as pq

    files = [path] if path.is_file() else list(_parquet_files(path, output.resolve()))
    base = path.parent if path.is_file() else path
    plan = _Plan("parquet", path, [])
    missing_column = []
    for f in files:
        rel = f.relative_to(base).as_posix()
        plan.sources[rel] = f
        try:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        except Exception as e:  # noqa: BLE001 - any failure to read a file's footer makes that file one error row
            plan.ids.append(f"{rel}:*")
            plan.driver_errors[f"{rel}:*"] = f"unreadable Parquet file: {type(e).__name__}: {e}"
            continue
        if column not in names:
            missing_column.append((rel, names))
            plan.ids.append(f"{rel}:*")
            plan.driver_errors[f"{rel}:*"] = f"no column {column!r} (columns: {names})"
            continue
        start = 0
        for g, n in enumerate(sizes):
            for i in range(n):
                rid = f"{rel}:{start + i}"
                plan.ids.append(rid)
                plan.rows.append({"id": rid, "path": str(f.resolve()), "row_group": g, "offset": i})
                plan.outputs[rid] = rel
            start += n
    if files and len(missing_column) == len(files):
        raise ConfigError(f"--image-column {column!r} is in none of the Parquet files; "
                          f"{missing_column[0][0]} has columns {missing_column[0][1]}")
    if not plan.ids:
        raise InputError(f"{path}: no Parquet rows to sanitise")
    return plan


def _plan_npz(path: Path) -> _Plan:
    ds = load_npz(path)
    if len(ds) == 0:
        raise InputError(f"{path}: the npz holds no images")
    ids = [str(i) for i in range(len(ds))]
    return _Plan("npz", path, ids, outputs=dict.fromkeys(ids, path.name), dataset=ds,
                 has_labels=bool((ds.labels >= 0).any()))


# --------------------------------------------------------------------------------------------- the actor
@dataclass(frozen=True)
class _CheckpointBytes:
    """A restorer checkpoint carried by value, so that actors on other nodes need no shared filesystem."""

    name: str
    tensors: bytes
    meta: bytes

    @classmethod
    def read(cls, path: str | os.PathLike) -> _CheckpointBytes:
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


def _build_stack(spec: list[dict[str, Any]], restorer: Restorer) -> Any:
    """The :class:`~trn.defenses.stack.DefenseStack` of ``spec`` around ``restorer``'s guard (driver and actors)."""
    return build_defense_stack(spec, restorer.guard, restorer=restorer if uses_default_restorer(spec) else None)


class RestoreWorker:
    """Ray Data callable class: read, decode, restore and encode one batch (the defence stack built once per actor).

    ``defenses`` is the canonical stack (plain data; None: ``[trn]``); the checkpoint of each ``trn`` entry that has
    one comes as bytes in ``defense_checkpoints`` (entry index -> bytes), like the main ``checkpoint``. The input
    side of the stack makes the restored images; ``pred_before`` is the plain guard's prediction on the input,
    ``pred_after`` the prediction of the guard inside the stack's classifier wrappers on the restored image.

    Input batch columns: ``id`` and, by kind, ``path`` (folder), ``path``/``row_group``/``offset`` (Parquet) or
    ``image`` (npz, float32 NCHW). Output columns: ``id status message pred_before pred_after linf l2 node worker``
    and ``png`` (encoded bytes; folder/Parquet) or ``restored`` (float32 NCHW; npz). Error rows get -1 predictions,
    NaN distances and empty/zero images. Decoding happens per row, so one bad file costs one row, never the batch.
    """

    def __init__(self, checkpoint: _CheckpointBytes, kind: InputKind, image_column: str = "image",
                 resize: Literal["reject", "resize"] = "reject", max_pixels: int = DEFAULT_MAX_PIXELS,
                 use_gpu: bool = False, threads: int = 1, defenses: list[dict[str, Any]] | None = None,
                 defense_checkpoints: dict[int, _CheckpointBytes] | None = None) -> None:
        import ray

        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.restorer = checkpoint.load(self.device)
        extra = defense_checkpoints or {}
        with tempfile.TemporaryDirectory(prefix="trn-defense-ckpt-") as d:  # loaded into memory before it goes
            spec = map_trn_checkpoints(default_defenses() if defenses is None else defenses,
                                       lambda i, path: str(extra[i].write(Path(d) / str(i))) if i in extra else path)
            stack = _build_stack(spec, self.restorer)
        self.preprocessor, self.guard_after = stack.preprocessor, stack.classifier
        self.kind, self.image_column, self.resize, self.max_pixels = kind, image_column, resize, max_pixels
        self.channels, self.height, self.width = (int(v) for v in self.restorer.image_shape)
        self.node = ray.get_runtime_context().get_node_id()
        self.pid = os.getpid()
        self._row_group: tuple[tuple[str, int], list[Any]] | None = None  # cache: ((path, group), column values)

    # -------------------------------------------------------------- reading (per row, errors kept)
    def _decode(self, data: Any) -> np.ndarray:
        if isinstance(data, dict):  # Hugging Face ``datasets`` Image feature: {"bytes": ..., "path": ...}
            data = data.get("bytes")
        if data is None:
            raise InputError("no image bytes (null value)")
        return decode_image(bytes(data), channels=self.channels, size=(self.height, self.width),
                            resize=self.resize, max_pixels=self.max_pixels)

    def _column(self, path: str, group: int) -> list[Any]:
        key = (path, group)
        if self._row_group is None or self._row_group[0] != key:
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path).read_row_group(group, columns=[self.image_column])
            self._row_group = (key, table.column(0).to_pylist())
        return self._row_group[1]

    def _load(self, batch: dict[str, np.ndarray]) -> list[np.ndarray | str]:
        """One (C, H, W) float32 array or one error message per row."""
        out: list[np.ndarray | str] = []
        if self.kind == "npz":
            for img in batch["image"]:
                try:
                    out.append(self._fit(np.asarray(img, dtype=np.float32)))
                except TRNError as e:
                    out.append(str(e))
            return out
        for i in range(len(batch["id"])):
            try:
                if self.kind == "folder":
                    data: Any = Path(str(batch["path"][i])).read_bytes()
                else:
                    data = self._column(str(batch["path"][i]), int(batch["row_group"][i]))[int(batch["offset"][i])]
                out.append(self._decode(data))
            except Exception as e:  # noqa: BLE001 - untrusted input: any failure becomes this row's error message
                out.append(e.args[0] if isinstance(e, TRNError) and e.args else f"{type(e).__name__}: {e}")
        return out

    def _fit(self, img: np.ndarray) -> np.ndarray:
        """npz rows: check the shape against the model's, resizing under the ``resize`` policy."""
        if img.shape[0] != self.channels:
            raise ShapeError(f"image has {img.shape[0]} channel(s) but the model needs {self.channels}")
        if img.shape[1:] != (self.height, self.width):
            if self.resize == "reject":
                raise ShapeError(f"image is {img.shape[1]}x{img.shape[2]} but the model needs {self.height}x"
                                 f"{self.width} (resize policy is 'reject')")
            t = torch.nn.functional.interpolate(torch.from_numpy(img)[None], size=(self.height, self.width),
                                                mode="bilinear", align_corners=False)
            img = t[0].clamp(0, 1).numpy()
        if not np.isfinite(img).all() or img.min() < 0 or img.max() > 1:
            raise InputError("pixel values must be finite and lie in [0, 1]")
        return img

    # -------------------------------------------------------------- restoring
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        loaded = self._load(batch)
        n = len(loaded)
        good = [i for i, v in enumerate(loaded) if not isinstance(v, str)]
        pred_before = np.full(n, -1, dtype=np.int64)
        pred_after = np.full(n, -1, dtype=np.int64)
        linf = np.full(n, np.nan, dtype=np.float32)
        l2 = np.full(n, np.nan, dtype=np.float32)
        restored = np.zeros((n, self.channels, self.height, self.width), dtype=np.float32)
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
            restored[good] = y.cpu().numpy()
        result = {
            "id": np.asarray(batch["id"]).astype(str),
            "status": np.array(["error" if isinstance(v, str) else "ok" for v in loaded]),
            "message": np.array([v if isinstance(v, str) else "" for v in loaded]),
            "pred_before": pred_before, "pred_after": pred_after, "linf": linf, "l2": l2,
            "node": np.full(n, self.node), "worker": np.full(n, self.pid, dtype=np.int64),
        }
        if self.kind == "npz":
            result["restored"] = restored
        else:
            png = np.empty(n, dtype=object)
            png[:] = [b"" if isinstance(loaded[i], str) else encode_png(restored[i]) for i in range(n)]
            result["png"] = png
        return result


# --------------------------------------------------------------------------------------------- manifest
def _json_value(v: Any) -> Any:
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else round(float(v), 6)
    if isinstance(v, np.integer):
        return int(v)
    return v


def read_manifest(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Rows of a manifest by id; the last line for an id wins (a retried input supersedes its earlier row).

    A truncated last line (a job killed while writing it) is ignored with a warning; a malformed line elsewhere
    raises :class:`SanitizeError`.
    """
    p = Path(path)
    if not p.is_file():
        return {}
    lines = p.read_text().split("\n")
    rows: dict[str, dict[str, Any]] = {}
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[str(row["id"])] = row
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            if k >= len(lines) - 2 and not p.read_bytes().endswith(b"\n"):
                log.warning("%s: ignoring a truncated last line (interrupted job)", p)
                continue
            raise SanitizeError(f"{p}: line {k + 1} is not a manifest row ({e}); fix or delete the line") from e
    return rows


class _ManifestWriter:
    """Appends rows to ``manifest.jsonl``, flushed and fsync'ed per batch (written after the batch's data)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.is_file():  # drop a truncated last line left by an interrupted job before appending after it
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)

    def append(self, rows: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps({k: _json_value(v) for k, v in r.items()}) + "\n" for r in rows)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------- outputs
def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class _Outputs:
    """Writes each batch's data under OUTPUT (before its manifest rows) and assembles the final files."""

    def __init__(self, plan: _Plan, output: Path, image_column: str) -> None:
        self.plan, self.output, self.image_column = plan, output, image_column
        self.parts = output / PARTS_DIR
        self._run = f"{time.time_ns():020d}"  # parts sort by run, then by batch: later data wins
        self._seq = 0

    def present(self) -> set[str]:
        """Ids whose output data exists (a manifest row without its data is redone)."""
        if self.plan.kind == "folder":
            return {i for i, rel in self.plan.outputs.items() if (self.output / rel).is_file()}
        ids: set[str] = set()
        for part in sorted(self.parts.glob("part-*")) if self.parts.is_dir() else []:
            ids.update(self._read_part(part, data=False)[0])
        return ids

    def write(self, batch: dict[str, np.ndarray]) -> None:
        ok = np.flatnonzero(batch["status"] == "ok")
        if self.plan.kind == "folder":
            for i in ok:
                _atomic_write(self.output / self.plan.outputs[str(batch["id"][i])], bytes(batch["png"][i]))
            return
        if len(ok) == 0:
            return
        self._seq += 1
        name = self.parts / f"part-{self._run}-{self._seq:06d}"
        ids = [str(batch["id"][i]) for i in ok]
        if self.plan.kind == "npz":
            buf_path = name.with_suffix(".npz")
            self.parts.mkdir(parents=True, exist_ok=True)
            tmp = buf_path.with_name(f".{buf_path.name}.tmp.npz")
            np.savez(tmp, index=np.array([int(i) for i in ids], dtype=np.int64),
                     images=np.asarray(batch["restored"][ok], dtype=np.float32))
            os.replace(tmp, buf_path)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"id": pa.array(ids, pa.string()),
                              "png": pa.array([bytes(batch["png"][i]) for i in ok], pa.binary())})
            self.parts.mkdir(parents=True, exist_ok=True)
            tmp = self.parts / f".{name.name}.tmp.parquet"
            pq.write_table(table, tmp)
            os.replace(tmp, name.with_suffix(".parquet"))

    def _read_part(self, part: Path, data: bool = True) -> tuple[list[str], Any]:
        """(ids, images or PNG bytes) of one part; ``data=False`` reads the ids only."""
        if part.suffix == ".npz":
            with np.load(part, allow_pickle=False) as z:
                return [str(i) for i in z["index"]], z["images"] if data else None
        import pyarrow.parquet as pq

        t = pq.read_table(part, columns=["id", "png"] if data else ["id"])
        return t.column("id").to_pylist(), t.column("png").to_pylist() if data else None

    def _latest(self, ok: set[str]) -> dict[str, Any]:
        """The newest data of each ok id, from the parts."""
        data: dict[str, Any] = {}
        for part in sorted(self.parts.glob("part-*")) if self.parts.is_dir() else []:
            ids, values = self._read_part(part)
            for rid, v in zip(ids, values):
                if rid in ok:
                    data[rid] = v
        return data

    def assemble(self, rows: dict[str, dict[str, Any]]) -> None:
        """Write the final npz / Parquet files from the parts (folder outputs are final already)."""
        ok = {i for i, r in rows.items() if r["status"] == "ok"}
        if self.plan.kind == "folder":
            return
        data = self._latest(ok)
        lost = sorted(ok - data.keys())
        if lost:
            raise SanitizeError(f"{len(lost)} rows are ok in the manifest but their data is missing from "
                                f"{self.parts} (e.g. {lost[:3]}); rerun the same command to redo them")
        if self.plan.kind == "npz":
            ds = self.plan.dataset
            assert ds is not None
            index = np.array(sorted(int(i) for i in ok), dtype=np.int64)
            c, h, w = (data[str(index[0])].shape if len(index) else ds.shape)
            images = np.stack([data[str(i)] for i in index]) if len(index) else np.zeros((0, c, h, w), np.float32)
            out = ImageDataset(torch.from_numpy(images), ds.labels[torch.from_numpy(index)], ds.class_names, ds.name)
            save_npz(self.output / self.plan.input.name, out, image_dtype="float32", index=index)
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        for rel, src in self.plan.sources.items():
            keep = [int(rid.rsplit(":", 1)[1]) for rid in ok if rid.rsplit(":", 1)[0] == rel]
            if not keep:
                continue
            keep.sort()
            table = pq.read_table(src).take(pa.array(keep, pa.int64()))
            pngs = pa.array([data[f"{rel}:{k}"] for k in keep], pa.binary())
            table = table.set_column(table.schema.get_field_index(self.image_column), self.image_column, pngs)
            dest = self.output / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp")
            pq.write_table(table, tmp)
            os.replace(tmp, dest)


# --------------------------------------------------------------------------------------------- the job
def _prepare_defenses(cfg: SanitizeConfig, restorer: Restorer) -> list[dict[str, Any]]:
    """The job's defence stack in canonical form, ``trn`` checkpoints made absolute, checked by building it once.

    Building it here (on the driver, before Ray starts) checks every value (``bits: 99``...), loads the checkpoints
    of ``trn`` entries and UniG's reference images, and checks that those restorers take the images the job
    decodes (the ``--checkpoint`` restorer's size).

    Raises:
        ConfigError / CheckpointError: a bad spec or an unusable checkpoint.
    """
    spec = load_defense_spec(cfg.defenses)
    spec = default_defenses() if spec is None else spec

    def resolve(i: int, path: str) -> str:
        t = checkpoint_paths(path)[0]
        if not t.is_file():
            raise ConfigError(f"--defenses: defence #{i} (trn): checkpoint file not found: {t}")
        return str(t.resolve().with_suffix(""))

    spec = map_trn_checkpoints(spec, resolve)
    try:
        stack = _build_stack(spec, restorer)
    except ConfigError as e:
        raise ConfigError(f"--defenses: {e}") from e
    for i, stage in enumerate(stack.preprocessor.stages):  # input-side entries come first: stage i is entry i
        if isinstance(stage, RestorerStage) and tuple(stage.restorer.image_shape) != tuple(restorer.image_shape):
            raise ConfigError(f"--defenses: defence #{i} (trn) restores {tuple(stage.restorer.image_shape)} images, "
                              f"but the job decodes images for --checkpoint's restorer, {tuple(restorer.image_shape)}")
    return spec


def _spec(cfg: SanitizeConfig, plan: _Plan, checkpoint: Path, defenses: list[dict[str, Any]]) -> dict[str, Any]:
    """What must match for a rerun to resume (rather than mix two jobs in one OUTPUT)."""
    spec: dict[str, Any] = {"input": str(plan.input.resolve()), "kind": plan.kind,
                            "checkpoint": str(checkpoint_paths(checkpoint)[0].resolve()),
                            "checkpoint_sha256": checkpoint_digest(checkpoint), "resize": cfg.resize,
                            "max_pixels": cfg.max_pixels, "defenses": defenses}
    stack_digests = [checkpoint_digest(e["checkpoint"]) for e in defenses if e["name"] == "trn" and e.get("checkpoint")]
    if stack_digests:
        spec["defenses_checkpoint_sha256"] = stack_digests
    if plan.kind == "parquet":
        spec["image_column"] = cfg.image_column
    if plan.dataset is not None:  # npz: the arrays themselves (the file's bytes change with zip timestamps)
        h = hashlib.sha256(plan.dataset.images.numpy().tobytes())
        h.update(plan.dataset.labels.numpy().tobytes())
        spec["input_sha256"] = h.hexdigest()[:16]
    return spec


# Keys that older versions did not write to sanitize.json, with the value their jobs implied.
_IMPLIED_BEFORE = {"defenses": default_defenses()}


def _check_spec(output: Path, spec: dict[str, Any]) -> None:
    path = output / SPEC_NAME
    if path.is_file():
        old = {**_IMPLIED_BEFORE, **json.loads(path.read_text())}
        diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        if diff:
            raise SanitizeError(f"{output} holds a different sanitize job ({', '.join(diff)} differ: "
                                f"{ {k: old.get(k) for k in diff} } vs { {k: spec.get(k) for k in diff} }); "
                                "use a new OUTPUT folder")
    else:
        output.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, (json.dumps(spec, indent=2) + "\n").encode())


def _init_ray(cfg: SanitizeConfig) -> bool:
    """Connect to ``cfg.address`` or start a local Ray sized for the pool; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.address:
        ray.init(address=cfg.address)
    else:
        ray.init(num_cpus=local_num_cpus(cfg.workers, cfg.cpus_per_worker), include_dashboard=False)
    return True


def _dataset(plan: _Plan, todo: list[str], batch_size: int) -> Any:
    """The Ray dataset of the inputs still to do, one block per batch so that every actor gets work."""
    import ray.data

    blocks = max(1, math.ceil(len(todo) / batch_size))
    if plan.kind != "npz":
        want = set(todo)
        return ray.data.from_items([r for r in plan.rows if r["id"] in want], override_num_blocks=blocks)
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    assert plan.dataset is not None
    index = np.array([int(i) for i in todo], dtype=np.int64)
    images = plan.dataset.images.numpy()
    tables = []
    for s in range(0, len(index), batch_size):
        idx = index[s : s + batch_size]
        tables.append(pa.table({"id": pa.array([str(i) for i in idx], pa.string()),
                                "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(images[idx]))}))
    return ray.data.from_arrow(tables)


def _manifest_rows(plan: _Plan, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    labels = plan.dataset.labels if plan.dataset is not None and plan.has_labels else None
    rows = []
    for i in range(len(batch["id"])):
        rid = str(batch["id"][i])
        ok = batch["status"][i] == "ok"
        rows.append({
            "id": rid, "status": str(batch["status"][i]), "message": str(batch["message"][i]),
            "label": int(labels[int(rid)]) if labels is not None else None,
            "pred_before": int(batch["pred_before"][i]), "pred_after": int(batch["pred_after"][i]),
            "linf": float(batch["linf"][i]), "l2": float(batch["l2"][i]),
            "output": plan.outputs.get(rid) if ok else None,
            "node": str(batch["node"][i]), "worker": int(batch["worker"][i]),
        })
    return rows


def _driver_error_row(rid: str, message: str) -> dict[str, Any]:
    return {"id": rid, "status": "error", "message": message, "label": None, "pred_before": -1, "pred_after": -1,
            "linf": None, "l2": None, "output": None, "node": None, "worker": None}


def sanitize(cfg: SanitizeConfig, on_batch: Callable[[list[dict[str, Any]]], None] | None = None) -> SanitizeReport:
    """Run (or resume) one job; see the module docstring.

    Uses the Ray instance this process is connected to, or starts one (``cfg.address`` or a local Ray sized for
    the pool) and shuts it down at the end.

    Args:
        cfg: the job.
        on_batch: called on the driver with the manifest rows of each batch once they are written (progress hooks,
            tests that kill an actor mid-job).

    Raises:
        InputError / DataError / ConfigError / CheckpointError: before Ray starts, for a bad input, checkpoint or
            defence stack.
        SanitizeError: OUTPUT holds another job, or the manifest does not account for every input exactly once.
    """
    t0 = time.perf_counter()
    src, output = Path(cfg.input), Path(cfg.output)
    kind = detect_input(src)
    restorer = Restorer.load(cfg.checkpoint)  # fail early on a bad checkpoint; the actors load their own copy
    defenses = _prepare_defenses(cfg, restorer)  # likewise for the defence stack
    plan = {"folder": lambda: _plan_folder(src, output),
            "parquet": lambda: _plan_parquet(src, output, cfg.image_column),
            "npz": lambda: _plan_npz(src)}[kind]()
    if plan.dataset is not None:  # npz arrays share one shape: check it once rather than fail every row
        (c, h, w), (rc, rh, rw) = plan.dataset.shape, restorer.image_shape
        if c != rc:
            raise ShapeError(f"{src}: images have {c} channel(s) but the restorer needs {rc}")
        if (h, w) != (rh, rw) and cfg.resize == "reject":
            raise ShapeError(f"{src}: images are {h}x{w} but the restorer needs {rh}x{rw} (--resize resize to "
                             "resize them)")
    _check_spec(output, _spec(cfg, plan, Path(cfg.checkpoint), defenses))
    outputs = _Outputs(plan, output, cfg.image_column)
    manifest_path = output / MANIFEST_NAME
    done = read_manifest(manifest_path)
    present = outputs.present()
    finished = {i for i, r in done.items()
                if (r["status"] == "ok" and i in present) or (r["status"] == "error" and not cfg.retry_errors)}
    todo = [i for i in plan.ids if i not in finished]
    skipped = len(plan.ids) - len(todo)
    writer = _ManifestWriter(manifest_path)
    todo_set = set(todo)
    pre = [_driver_error_row(i, m) for i, m in plan.driver_errors.items() if i in todo_set]
    if pre:
        writer.append(pre)
    todo = [i for i in todo if i not in plan.driver_errors]
    processed = len(pre) + (_run(cfg, plan, todo, outputs, writer, on_batch, defenses) if todo else 0)
    rows = read_manifest(manifest_path)
    _account(plan, rows, manifest_path)
    outputs.assemble(rows)
    return _report(plan, rows, output, manifest_path, skipped, processed, time.perf_counter() - t0,
                   describe_defenses(defenses, "guard"))


def _run(cfg: SanitizeConfig, plan: _Plan, todo: list[str], outputs: _Outputs, writer: _ManifestWriter,
         on_batch: Callable[[list[dict[str, Any]]], None] | None, defenses: list[dict[str, Any]]) -> int:
    """Run the Ray Data pipeline over ``todo``; return how many rows came back (== len(todo), or raise)."""
    import ray

    started = _init_ray(cfg)
    try:
        pool = ActorPool(cfg.workers, cfg.cpus_per_worker, gpus_per_actor(cfg.num_gpus, cfg.workers, cluster_gpus()),
                         cfg.max_restarts, cfg.max_task_retries)
        log.info("sanitising %d inputs with %d actor(s), %g CPU / %g GPU each", len(todo), pool.workers,
                 pool.num_cpus, pool.num_gpus)
        ds = _dataset(plan, todo, cfg.batch_size).map_batches(
            RestoreWorker,
            batch_size=cfg.batch_size,
            batch_format="numpy",
            fn_constructor_kwargs={
                "checkpoint": _CheckpointBytes.read(cfg.checkpoint), "kind": plan.kind,
                "image_column": cfg.image_column, "resize": cfg.resize, "max_pixels": cfg.max_pixels,
                "use_gpu": pool.num_gpus > 0, "threads": int(pool.num_cpus),
                "defenses": defenses,  # plain JSON data; the checkpoints of its trn entries travel as bytes
                "defense_checkpoints": {i: _CheckpointBytes.read(e["checkpoint"]) for i, e in enumerate(defenses)
                                        if e["name"] == "trn" and e.get("checkpoint")},
            },
            **map_batches_resource_kwargs(pool),
        )
        seen: set[str] = set()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            outputs.write(batch)  # data first, then the manifest: an ok row always has its data
            rows = _manifest_rows(plan, batch)
            writer.append(rows)
            seen.update(r["id"] for r in rows)
            if on_batch is not None:
                on_batch(rows)
    finally:
        if started:
            ray.shutdown()
    missing = set(todo) - seen
    if missing:
        raise SanitizeError(f"Ray returned {len(seen)} of {len(todo)} inputs; missing e.g. {sorted(missing)[:5]} "
                            "(rerun the same command to finish them)")
    return len(seen)


def _account(plan: _Plan, rows: dict[str, dict[str, Any]], manifest: Path) -> None:
    """Every input has exactly one manifest row (ok + error == inputs), and nothing else is in it."""
    ids = set(plan.ids)
    missing = [i for i in plan.ids if i not in rows]
    extra = sorted(set(rows) - ids)
    ok = sum(1 for i in ids if i in rows and rows[i]["status"] == "ok")
    err = sum(1 for i in ids if i in rows and rows[i]["status"] == "error")
    if missing or extra or ok + err != len(ids):
        raise SanitizeError(f"{manifest}: {ok} ok + {err} error rows for {len(ids)} inputs; "
                            f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unknown (e.g. {extra[:3]})")


def _report(plan: _Plan, rows: dict[str, dict[str, Any]], output: Path, manifest: Path, skipped: int,
            processed: int, seconds: float, defenses: str) -> SanitizeReport:
    ok_rows = [r for r in rows.values() if r["status"] == "ok"]
    errors = [(i, r["message"]) for i, r in rows.items() if r["status"] == "error"]
    labelled = [r for r in ok_rows if r.get("label") is not None and r["label"] >= 0]
    acc_b = sum(r["pred_before"] == r["label"] for r in labelled) / len(labelled) if labelled else None
    acc_a = sum(r["pred_after"] == r["label"] for r in labelled) / len(labelled) if labelled else None
    linf = [r["linf"] for r in ok_rows if r.get("linf") is not None]
    l2 = [r["l2"] for r in ok_rows if r.get("l2") is not None]
    return SanitizeReport(
        kind=plan.kind, input=plan.input, output=output, manifest=manifest, total=len(plan.ids), ok=len(ok_rows),
        errors=len(errors), skipped=skipped, processed=processed, seconds=seconds, labelled=len(labelled),
        accuracy_before=acc_b, accuracy_after=acc_a, mean_linf=float(np.mean(linf)) if linf else None,
        mean_l2=float(np.mean(l2)) if l2 else None,
        nodes=tuple(sorted({r["node"] for r in rows.values() if r.get("node")})),
        error_examples=tuple(errors[:5]), defenses=defenses,
    )


def run_sanitize_command(args: argparse.Namespace) -> int:
    """``trn sanitize`` (see :func:`trn.cli.build_parser`): run the job and print its summary."""
    cfg = SanitizeConfig(
        input=args.input, output=args.output, checkpoint=args.checkpoint, workers=args.workers,
        batch_size=args.batch_size, num_gpus=args.num_gpus, image_column=args.image_column, resize=args.resize,
        address=args.address, defenses=getattr(args, "defenses", None),
        cpus_per_worker=getattr(args, "cpus_per_worker", 1.0), retry_errors=getattr(args, "retry_errors", False),
    )
    report = sanitize(cfg)
    print(report.summary())
    return 0

