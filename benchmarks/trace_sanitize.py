"""Where a sanitise job's fixed cost goes, as ``trn sanitize`` runs it (the job starts and stops its own local Ray).

    python benchmarks/trace_sanitize.py                  # 2,048 Fashion-MNIST test images, 2 actors, shipped checkpoint
    python benchmarks/trace_sanitize.py --images 512 --runs 3

Prints, per run, seconds from the start of :func:`trn_workers.sanitize.sanitize`: Ray's start (``connect_ray``),
building the Ray dataset (importing Ray Data included), the first and last batch reaching the driver, the start and
end of the task that assembles the npz from the workers' parts, and the end (after Ray's shutdown); plus the CPU
seconds that Ray Data's own helper actors (``_StatsActor``, ``_AutoscalingCoordinatorActor``,
``ActorLocationTracker``) had used when the last batch arrived (read from /proc: Linux only, else n/a). Import costs
of one worker: ``python -X importtime -c "import torch, ray; import trn_workers.sanitize, ray.data"``.

``--no-bytecode`` runs Ray's processes without the compiled ``.pyc`` files (an empty ``PYTHONPYCACHEPREFIX``; needs
``PYTHONDONTWRITEBYTECODE=1``): each one then compiles torch, pandas and Ray from source, as on a machine whose
packages were installed without bytecode (``scripts/setup.sh`` installs with ``--compile-bytecode``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HELPERS = ("_StatsActor", "_AutoscalingCoordinatorActor", "ActorLocationTracker")


def helper_cpu_seconds() -> float | None:
    """CPU seconds (user + system) used so far by the processes of Ray Data's helper actors on this machine."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            if any(h in cmd for h in HELPERS):
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except OSError:
            continue
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-bytecode", action="store_true",
                   help="Ray's processes ignore compiled .pyc files (an empty PYTHONPYCACHEPREFIX): what a job costs "
                        "where the packages were installed without bytecode and PYTHONDONTWRITEBYTECODE is set")
    args = p.parse_args(argv)
    if args.no_bytecode:  # Ray's processes inherit this process's environment when it starts a local Ray
        if not os.environ.get("PYTHONDONTWRITEBYTECODE"):
            p.error("--no-bytecode needs PYTHONDONTWRITEBYTECODE=1, or the first run writes the bytecode it avoids")
        os.environ["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="trn-no-pycache-")

    import trn_workers.sanitize as job
    from trn.data import ImageDataset, load_fashion_mnist, save_npz

    x = load_fashion_mnist(split="test").images[: args.images]
    print(f"{len(x)} Fashion-MNIST test images, {args.workers} actors, batch {args.batch_size}, shipped checkpoint; "
          f"{os.cpu_count()} cores")
    print()
    print("| run | Ray start | dataset built | first batch | last batch | assembly starts | assembled | end | "
          "helper actors' CPU s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    connect, build, assemble, n = job.connect_ray, job._dataset, job._assemble, len(x)
    for run in range(1, args.runs + 1):
        marks: dict[str, float] = {}
        arrivals: list[float] = []
        helpers: list[float | None] = [None]
        seen = [0]

        def timed_connect(*a, _marks=marks, **kw):
            r = connect(*a, **kw)
            _marks["ray"] = time.perf_counter()
            return r

        def on_batch(rows, _arrivals=arrivals, _helpers=helpers, _seen=seen):
            _arrivals.append(time.perf_counter())
            _seen[0] += len(rows)
            if _seen[0] >= n:  # the last batch: the helper actors are still alive
                _helpers[0] = helper_cpu_seconds()

        def timed_build(*a, _marks=marks, **kw):
            ds = build(*a, **kw)
            _marks["dataset"] = time.perf_counter()
            return ds

        def timed_assemble(*a, _marks=marks, **kw):
            _marks["assembly"] = time.perf_counter()
            assemble(*a, **kw)
            _marks["assembled"] = time.perf_counter()

        job.connect_ray, job._dataset, job._assemble = timed_connect, timed_build, timed_assemble
        try:
            with tempfile.TemporaryDirectory() as d:
                npz = save_npz(Path(d) / "in.npz", ImageDataset(x, torch.zeros(len(x), dtype=torch.int64), ("0",)),
                               image_dtype="float32")
                t0 = time.perf_counter()
                report = job.sanitize(job.SanitizeConfig(npz, Path(d) / "out", workers=args.workers,
                                                         batch_size=args.batch_size), on_batch=on_batch)
                end = time.perf_counter()
        finally:
            job.connect_ray, job._dataset, job._assemble = connect, build, assemble
        if report.ok != len(x):
            print(f"error: {report.ok} ok rows of {len(x)}", file=sys.stderr)
            return 1
        cpu = "n/a" if helpers[0] is None else f"{helpers[0]:.1f}"
        print(f"| {run} | {marks['ray'] - t0:.1f} | {marks['dataset'] - t0:.1f} | {arrivals[0] - t0:.1f} | "
              f"{arrivals[-1] - t0:.1f} | {marks['assembly'] - t0:.1f} | {marks['assembled'] - t0:.1f} | "
              f"{end - t0:.1f} | {cpu} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
