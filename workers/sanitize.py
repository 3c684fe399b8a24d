"""``trn sanitize INPUT OUTPUT``: restore a whole dataset with TRN on Ray Data, resumably, losing nothing.

Inputs and what OUTPUT holds afterwards (always with ``manifest.jsonl`` and ``sanitize.json`` beside the data):

* an image folder (PNG/JPEG, nested folders kept): the cleaned images as PNG at the same relative paths
  (``a/b.jpg`` -> ``OUTPUT/a/b.png``);
* Parquet (a file, or a folder of them) with a column of encoded image bytes (``--image-column``; a
  ``{"bytes": ...}`` struct as written by Hugging Face ``datasets`` works too): each file mirrored under OUTPUT with
  the image column replaced by the cleaned PNG bytes and every other column kept;
* ``.npz`` arrays: ``OUTPUT/<name>.npz`` with float32 ``images``, ``labels``, and ``index`` (the input row of each
  output row).

What runs where: the driver lists the inputs (:func:`trn.sanitize_io.plan_job`; no pixels decoded), drops the
manifest rows it will redo, and builds a Ray Data pipeline: ``read_binary_files(include_paths=True)`` for folders,
row-group references read by the workers for Parquet, Arrow tensor blocks for npz, then ``map_batches`` with
:class:`RestoreWorker`, a callable class that loads the defence stack once per actor and, per batch, decodes,
restores, **writes** the outputs (PNG files, or one part file per batch) and returns only the manifest columns. The
driver appends those rows to the manifest; npz / Parquet outputs are assembled from the parts by a Ray task. The
driver never receives a pixel (``SanitizeReport.driver_bytes`` counts what it did receive). On a multi-node cluster
INPUT and OUTPUT must be on a shared filesystem; checkpoints travel to the actors as bytes.

Ray: ``--address`` (or ``RAY_ADDRESS``, as set by ``ray job submit``) joins that cluster; without either, a fresh
local Ray is started (``address="local"``), never whichever cluster Ray last recorded on the machine. Failing to
start or reach Ray, or a Ray failure mid-job, is a one-line :class:`~trn.sanitize_io.SanitizeError`; rows already
written are kept, and rerunning the same command resumes.

    >>> report = sanitize(SanitizeConfig("runs/fmnist_pgd.npz", "runs/fmnist_pgd_clean", workers=2))
    >>> report.ok, report.errors, report.accuracy_after
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from trn.defenses.spec import default_defenses, describe_defenses, map_trn_checkpoints
from trn.errors import ShapeError, one_line
from trn.restorer import Restorer
from trn.sanitize_io import (
    MANIFEST_NAME,
    SPEC_NAME,
    BatchRestorer,
    CheckpointBytes,
    JobPlan,
    SanitizeConfig,
    SanitizeError,
    SanitizeReport,
    append_manifest,
    assemble_npz,
    assemble_parquet,
    build_stack,
    check_spec,
    detect_input,
    error_row,
    job_spec,
    make_report,
    plan_job,
    prepare_defenses,
    prepare_output,
    present_ids,
    read_manifest,
    read_npz_for_job,
    write_manifest,
)
from trn.weights import resolve_checkpoint
from trn_workers.resources import (
    ActorPool,
    cluster_gpus,
    connect_ray,
    gpus_per_actor,
    local_num_cpus,
    map_batches_resource_kwargs,
)

__all__ = [
    "MANIFEST_NAME",
    "SPEC_NAME",
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


class RestoreWorker:
    """Ray Data callable class: builds the defence stack once per actor, then runs
    :class:`~trn.sanitize_io.BatchRestorer` on each batch (which writes the outputs and returns manifest columns).

    ``defenses`` is the canonical stack (plain data); the checkpoint of each ``trn`` entry that has one comes as
    bytes in ``defense_checkpoints`` (entry index -> bytes), like the main ``checkpoint``. Folder batches come from
    ``read_binary_files(include_paths=True)``: their ids are the paths relative to ``root``. An npz job's batches
    are row indices: each actor reads the npz at ``root`` itself (checked against the plan's ``npz_digest``).
    """

    def __init__(self, checkpoint: CheckpointBytes, defenses: list[dict[str, Any]],
                 defense_checkpoints: dict[int, CheckpointBytes], use_gpu: bool, threads: int, root: str,
                 npz_digest: str | None = None, **job: Any) -> None:
        import tempfile

        import ray

        torch.set_num_threads(max(1, threads))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        restorer = checkpoint.load(device)
        with tempfile.TemporaryDirectory(prefix="trn-defense-ckpt-") as d:  # loaded into memory before it goes
            spec = map_trn_checkpoints(defenses, lambda i, path: str(defense_checkpoints[i].write(Path(d) / str(i)))
                                       if i in defense_checkpoints else path)
            stack = build_stack(spec, restorer)
        self.root = root
        npz = read_npz_for_job(root, npz_digest) if npz_digest is not None else None
        self.job = BatchRestorer(restorer, stack.preprocessor, stack.classifier, npz=npz,
                                 node=ray.get_runtime_context().get_node_id(), worker=os.getpid(), **job)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "id" not in batch:  # read_binary_files: {"bytes", "path"}
            batch = {**batch, "id": np.array([os.path.relpath(str(p), self.root).replace(os.sep, "/")
                                              for p in batch["path"]], dtype=object)}
        return self.job(batch)


def _dataset(plan: JobPlan, todo: list[str], batch_size: int) -> Any:
    """The Ray dataset of the inputs still to do, about one block per batch so that every actor gets work."""
    import ray.data

    blocks = max(1, math.ceil(len(todo) / batch_size))
    if plan.kind == "folder":
        # reading is I/O: its tasks take no CPU slot, or they could wait forever behind an actor pool that holds
        # every CPU of the cluster
        return ray.data.read_binary_files([plan.paths[i] for i in todo], include_paths=True, num_cpus=0,
                                          ignore_missing_paths=True, override_num_blocks=blocks)
    if plan.kind == "parquet":
        want = set(todo)
        return ray.data.from_items([r for r in plan.refs if r["id"] in want], override_num_blocks=blocks)
    # npz: row indices only, each actor reads the file itself (from_items runs no task: from_arrow would start a
    # metadata task on a worker that Ray then does not reuse for an actor, and would ship every pixel from here)
    assert plan.npz is not None
    labels = plan.npz.labels
    return ray.data.from_items([{"id": i, "index": int(i), "label": int(labels[int(i)])} for i in todo],
                               override_num_blocks=blocks)


def _batch_bytes(batch: dict[str, np.ndarray]) -> int:
    """Bytes the driver received in one batch (object columns: the length of each value)."""
    total = 0
    for v in batch.values():
        a = np.asarray(v)
        total += sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in a) if a.dtype == object else a.nbytes
    return total


def _rows(batch: dict[str, np.ndarray], has_labels: bool) -> list[dict[str, Any]]:
    rows = []
    for i in range(len(batch["id"])):
        ok = batch["status"][i] == "ok"
        label = int(batch["label"][i])
        rows.append({"id": str(batch["id"][i]), "status": str(batch["status"][i]), "message": str(batch["message"][i]),
                     "label": label if has_labels and label >= 0 else None,
                     "pred_before": int(batch["pred_before"][i]), "pred_after": int(batch["pred_after"][i]),
                     "linf": float(batch["linf"][i]), "l2": float(batch["l2"][i]),
                     "output": str(batch["output"][i]) if ok else None,
                     "node": str(batch["node"][i]), "worker": int(batch["worker"][i])})
    return rows


def _assemble(plan: JobPlan, output: Path, rows: dict[str, dict[str, Any]], image_column: str) -> None:
    """Assemble npz / Parquet outputs from the workers' parts, in a Ray task (the driver handles no pixels)."""
    import ray

    ok = [i for i in plan.ids if rows[i]["status"] == "ok"]
    if plan.kind == "npz":
        assert plan.npz is not None
        fn, args = assemble_npz, (output, plan.input.name, ok, plan.npz.labels, plan.npz.class_names,
                                  plan.npz.images.shape[1:])
    else:
        fn, args = assemble_parquet, (output, {k: str(v) for k, v in plan.sources.items()}, ok, image_column)
    try:
        ray.get(ray.remote(fn).options(num_cpus=0, max_retries=2).remote(*args))
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else e
        if isinstance(cause, SanitizeError):
            raise cause from None
        raise SanitizeError(f"assembling the outputs failed: {one_line(cause)}; rerun the same command") from None


def _run(cfg: SanitizeConfig, plan: JobPlan, todo: list[str], output: Path, run: str,
         on_batch: Callable[[list[dict[str, Any]]], None] | None, defenses: list[dict[str, Any]],
         checkpoint: Path) -> tuple[int, int]:
    """Run the pipeline over ``todo``, appending manifest rows; return (rows received, bytes received)."""
    pool = ActorPool(cfg.workers, cfg.cpus_per_worker, gpus_per_actor(cfg.num_gpus, cfg.workers, cluster_gpus()),
                     cfg.max_restarts, cfg.max_task_retries)
    log.info("sanitising %d inputs with %d actor(s), %g CPU / %g GPU each", len(todo), pool.workers,
             pool.num_cpus, pool.num_gpus)
    renamed = {i: o for i, o in plan.outputs.items()
               if plan.kind == "folder" and o != str(PurePosixPath(i).with_suffix(".png"))}
    ds = _dataset(plan, todo, cfg.batch_size).map_batches(
        RestoreWorker,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "checkpoint": CheckpointBytes.read(checkpoint), "defenses": defenses,
            "defense_checkpoints": {i: CheckpointBytes.read(e["checkpoint"]) for i, e in enumerate(defenses)
                                    if e["name"] == "trn" and e.get("checkpoint")},
            "use_gpu": pool.num_gpus > 0, "threads": int(pool.num_cpus), "root": str(plan.input.absolute()),
            "npz_digest": plan.npz.digest() if plan.npz is not None else None,
            "kind": plan.kind, "output": str(output.absolute()), "run": run, "image_column": cfg.image_column,
            "resize": cfg.resize, "max_pixels": cfg.max_pixels, "renamed": renamed,
        },
        **map_batches_resource_kwargs(pool),
    )
    seen: set[str] = set()
    received = 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            received += _batch_bytes(batch)
            rows = _rows(batch, plan.has_labels)
            append_manifest(output / MANIFEST_NAME, rows)
            seen.update(r["id"] for r in rows)
            if on_batch is not None:
                on_batch(rows)
    except (KeyboardInterrupt, SanitizeError):
        raise
    except Exception as e:  # noqa: BLE001 - a Ray failure mid-job: rows so far are kept, rerunning resumes
        raise SanitizeError(f"the Ray job failed after {len(seen)} of {len(todo)} inputs: {one_line(e)}; "
                            "rows written so far are kept, rerun the same command to resume") from None
    lost = [i for i in todo if i not in seen]
    if lost and plan.kind == "folder":  # read_binary_files(ignore_missing_paths): a file that vanished meanwhile
        append_manifest(output / MANIFEST_NAME, [error_row(i, "file vanished before it was read") for i in lost])
        seen.update(lost)
    return len(seen), received


# --------------------------------------------------------------------------------------------- the job
def sanitize(cfg: SanitizeConfig, on_batch: Callable[[list[dict[str, Any]]], None] | None = None) -> SanitizeReport:
    """Run (or resume) one job; see the module docstring.

    Uses the Ray instance this process is connected to, or connects (``cfg.address`` / ``$RAY_ADDRESS``, else a
    fresh local Ray sized for the pool) and disconnects at the end.

    Args:
        cfg: the job.
        on_batch: called on the driver with the manifest rows of each batch once they are written (progress hooks,
            tests that kill an actor mid-job).

    Raises:
        InputError / DataError / ConfigError / CheckpointError: before Ray starts, for a bad input, OUTPUT,
            checkpoint or defence stack.
        SanitizeError: OUTPUT holds another job, Ray could not run it, or an input is left without a row.
    """
    import ray

    t0 = time.perf_counter()
    src, output = Path(cfg.input), Path(cfg.output)
    kind = detect_input(src)
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    restorer = Restorer.load(checkpoint)  # fail early on a bad checkpoint; the actors load their own copy
    defenses = prepare_defenses(cfg.defenses, restorer)
    plan = plan_job(kind, src, output, cfg.image_column)
    if plan.npz is not None:  # npz arrays share one shape: check it once rather than fail every row
        (c, h, w), (rc, rh, rw) = plan.npz.images.shape[1:], restorer.image_shape
        if c != rc:
            raise ShapeError(f"{src}: images have {c} channel(s) but the restorer needs {rc}")
        if (h, w) != (rh, rw) and cfg.resize == "reject":
            raise ShapeError(f"{src}: images are {h}x{w} but the restorer needs {rh}x{rw} (--resize resize to "
                             "resize them)")
    prepare_output(output)
    check_spec(output, job_spec(plan, checkpoint, defenses, cfg.resize, cfg.max_pixels, cfg.image_column),
               implied={"defenses": default_defenses()})

    manifest = output / MANIFEST_NAME
    done = read_manifest(manifest)
    present = present_ids(plan, output)
    keep = {i: done[i] for i in plan.ids if i in done and (
        (done[i]["status"] == "ok" and i in present) or (done[i]["status"] == "error" and not cfg.retry_errors))}
    write_manifest(manifest, (keep[i] for i in plan.ids if i in keep))  # one row per input, before any new row
    todo = [i for i in plan.ids if i not in keep]
    skipped = len(plan.ids) - len(todo)
    labels = plan.npz.labels if plan.has_labels and plan.npz is not None else None
    pre = [error_row(i, plan.errors[i], int(labels[int(i)]) if labels is not None else None)
           for i in todo if i in plan.errors]
    append_manifest(manifest, pre)
    todo = [i for i in todo if i not in plan.errors]
    final = output / (plan.input.name if kind == "npz" else "")
    needs_assembly = kind != "folder" and (bool(todo) or bool(pre) or not final.exists()
                                          or (kind == "parquet" and not all((output / r).exists()
                                                                            for r in plan.sources)))
    processed, received = len(pre), 0
    started = False
    try:
        if todo or needs_assembly:
            started = connect_ray(cfg.address, local_num_cpus(cfg.workers, cfg.cpus_per_worker))
        if todo:
            run = f"{time.time_ns():020d}"  # parts sort by run: a later run's data wins
            n, received = _run(cfg, plan, todo, output, run, on_batch, defenses, checkpoint)
            processed += n
        rows = read_manifest(manifest)
        report = make_report(plan, rows, output, skipped, processed, time.perf_counter() - t0,
                             describe_defenses(defenses, "guard"), received)
        if needs_assembly:
            _assemble(plan, output, rows, cfg.image_column)
    finally:
        if started:
            ray.shutdown()
    return report if not needs_assembly else _with_time(report, time.perf_counter() - t0)


def _with_time(report: SanitizeReport, seconds: float) -> SanitizeReport:
    from dataclasses import replace

    return replace(report, seconds=seconds)


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
