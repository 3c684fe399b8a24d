"""Ray Data sanitisation throughput against the plain in-process loop, on the same cores and the same images.

    python benchmarks/bench_sanitize.py                           # shipped checkpoints/trn_fmnist
    python benchmarks/bench_sanitize.py --checkpoint runs/my_trn  # another restorer checkpoint
    python benchmarks/bench_sanitize.py --tiny --images 1024      # untrained restorer (same arch): checks the script
    python benchmarks/bench_sanitize.py --nodes 1,2 --images 4096 # 1 vs 2 nodes of a local ray.cluster_utils cluster

Both sides do the work of one npz job: restore every image, classify it with the guard before and after, measure
Linf/L2, write the restored npz and a JSONL manifest row per image. The in-process loop runs in this process with ``--workers`` torch threads; the Ray side is
:func:`trn_workers.sanitize.sanitize` on a local Ray with ``--workers`` single-threaded actors (so both use the same
number of cores), writing its outputs and manifest to a temporary folder. Ray's own start (``ray.init``) is not
counted; actor start-up, planning and writing are. Two Ray figures are printed: end to end (the whole ``sanitize``
call) and steady state (first to last batch reaching the driver, which leaves out actor start-up), plus the fixed
start-up cost and the job size from which the end-to-end ratio reaches 0.8. Target on the 2-core development
machine: ratio >= 0.9 on a dataset-sized job (the default, 60,000 images: the size of Fashion-MNIST's training set).
The bytes the driver received from the workers are printed too (manifest columns only: the workers write the data).

``--nodes 1,2`` measures scaling instead: the same job on a local cluster of 1, then 2 one-CPU nodes (one actor per
node). All nodes share this machine's cores, so on the 2-core development machine (busy with other work) the ratio
is bounded by 2 and says more about the driver not being a bottleneck than about a real cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_restore import REPO, images, load_restorer  # beside this script (a script's folder is on sys.path)

from trn.data import ImageDataset, save_npz
from trn.restorer import Restorer


def in_process(restorer: Restorer, x: torch.Tensor, batch_size: int, out: Path) -> float:
    """Seconds for the loop a user would write without Ray: the sanitize actors' per-image work, and the same
    outputs written (a restored npz and a JSONL row per image)."""
    t0 = time.perf_counter()
    restored = []
    with (out / "manifest.jsonl").open("w") as f:
        for i in range(0, len(x), batch_size):
            b = x[i : i + batch_size].to(restorer.device)
            y = restorer.restore(b, batch_size=len(b))
            with torch.no_grad():
                before, after = restorer.guard(b).argmax(1), restorer.guard(y).argmax(1)
            d = (y - b).flatten(1)
            linf, l2 = d.abs().amax(1), d.norm(dim=1)
            for k in range(len(b)):
                f.write(json.dumps({"id": str(i + k), "status": "ok", "pred_before": int(before[k]),
                                    "pred_after": int(after[k]), "linf": float(linf[k]), "l2": float(l2[k])}) + "\n")
            restored.append(y.cpu())
    save_npz(out / "x.npz", ImageDataset(torch.cat(restored), torch.zeros(len(x), dtype=torch.int64), ("0",)),
             image_dtype="float32")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "trn_fmnist")
    p.add_argument("--tiny", action="store_true", help="untrained restorer instead of a checkpoint")
    p.add_argument("--arch", default="trn_small_28", help="architecture for --tiny")
    p.add_argument("--images", type=int, default=60000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="Ray actors = torch threads of the in-process loop")
    p.add_argument("--device", default="cpu", help="device of the in-process loop (the Ray actors take a GPU each "
                   "when the local Ray has enough)")
    p.add_argument("--nodes", default=None, metavar="LIST",
                   help="instead: scaling over a local multi-node cluster (ray.cluster_utils), e.g. '1,2': one "
                        "1-CPU node and one actor per node")
    args = p.parse_args(argv)
    if args.nodes:
        return scaling(args)
    logging.basicConfig(level=logging.WARNING)

    import ray

    from trn_workers.resources import local_num_cpus
    from trn_workers.sanitize import SanitizeConfig, sanitize

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        restorer, name = load_restorer(args, tmp)
        if args.tiny:
            checkpoint = tmp / "untrained"
        else:
            checkpoint = args.checkpoint
        x, source = images(restorer.image_shape, args.images)
        restorer = restorer.to(args.device)
        npz = save_npz(tmp / "bench.npz", ImageDataset(x, torch.zeros(len(x), dtype=torch.int64), ("0",)),
                       image_dtype="float32")

        torch.set_num_threads(args.workers)
        (tmp / "loop").mkdir()
        in_process(restorer, x[: args.batch_size], args.batch_size, tmp / "loop")  # warm-up
        t_loop = in_process(restorer, x, args.batch_size, tmp / "loop")

        t0 = time.perf_counter()
        for attempt in range(3):  # Ray gives its raylet a fixed 30 s to register: a busy machine can miss that
            try:
                ray.init(num_cpus=local_num_cpus(args.workers), include_dashboard=False, log_to_driver=False)
                break
            except Exception:
                ray.shutdown()
                if attempt == 2:
                    raise
        t_init = time.perf_counter() - t0
        arrivals: list[tuple[float, int]] = []
        try:
            t0 = time.perf_counter()
            report = sanitize(SanitizeConfig(npz, tmp / "out", checkpoint=checkpoint, workers=args.workers,
                                             batch_size=args.batch_size),
                              on_batch=lambda rows: arrivals.append((time.perf_counter(), len(rows))))
            t_ray = time.perf_counter() - t0
        finally:
            ray.shutdown()
    if report.ok != len(x):
        print(f"error: sanitize returned {report.ok} ok rows of {len(x)}", file=sys.stderr)
        return 1
    loop_rate = len(x) / t_loop
    ray_rate = len(x) / t_ray
    steady = None
    if len(arrivals) > 1 and arrivals[-1][0] > arrivals[0][0]:
        steady = (len(x) - arrivals[0][1]) / (arrivals[-1][0] - arrivals[0][0])
    print(f"restorer: {name}; {len(x)} x {tuple(restorer.image_shape)} images ({source}); batch {args.batch_size}; "
          f"{args.workers} worker(s); ray.init {t_init:.1f} s (not counted); torch {torch.__version__}, "
          f"ray {ray.__version__}")
    print()
    print("| run | seconds | images/s | vs in-process |")
    print("|---|---:|---:|---:|")
    print(f"| in-process loop ({args.workers} torch threads) | {t_loop:.1f} | {loop_rate:,.0f} | 1.00 |")
    print(f"| Ray Data sanitize, end to end ({args.workers} actors x 1 thread) | {t_ray:.1f} | {ray_rate:,.0f} | "
          f"{ray_rate / loop_rate:.2f} |")
    if steady is not None:
        print(f"| Ray Data sanitize, steady state (first to last batch) | "
              f"{arrivals[-1][0] - arrivals[0][0]:.1f} | {steady:,.0f} | {steady / loop_rate:.2f} |")
    print()
    print(f"Ray / in-process throughput ratio (end to end): {ray_rate / loop_rate:.2f} (target >= 0.9)")
    print(f"bytes the driver received: {report.driver_bytes:,} ({report.driver_bytes / len(x):.0f} per image; one "
          f"image is {x[0].numel() * 4:,} bytes as float32)")
    if steady is not None:
        fixed = t_ray - len(x) / steady  # actor start-up, planning, the last write: paid once per job
        line = f"fixed cost per job: {fixed:.1f} s (actor start-up, planning)"
        if steady > 0.8 * loop_rate:  # n / (fixed + n / steady) = 0.8 * loop_rate
            n08 = 0.8 * loop_rate * fixed / (1 - 0.8 * loop_rate / steady)
            line += f"; end to end reaches 0.8 of in-process from {n08:,.0f} images"
        print(line)
    return 0


def scaling(args: argparse.Namespace) -> int:
    """Throughput of the same job on local clusters of 1, 2, ... one-CPU nodes (one actor per node)."""
    import ray
    from ray.cluster_utils import Cluster

    from trn_workers.sanitize import SanitizeConfig, sanitize

    counts = [int(n) for n in args.nodes.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        restorer, name = load_restorer(args, tmp)
        checkpoint = tmp / "untrained" if args.tiny else args.checkpoint
        x, source = images(restorer.image_shape, args.images)
        npz = save_npz(tmp / "bench.npz", ImageDataset(x, torch.zeros(len(x), dtype=torch.int64), ("0",)),
                       image_dtype="float32")
        for k in counts:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
            try:
                for _ in range(k - 1):
                    cluster.add_node(num_cpus=1)
                cluster.wait_for_nodes()
                ray.init(address=cluster.address, log_to_driver=False)
                arrivals: list[float] = []
                t0 = time.perf_counter()
                report = sanitize(SanitizeConfig(npz, tmp / f"out{k}", checkpoint=checkpoint, workers=k,
                                                 batch_size=args.batch_size),
                                  on_batch=lambda rows, seen=arrivals: seen.append(time.perf_counter()))
                t = time.perf_counter() - t0
            finally:
                ray.shutdown()
                cluster.shutdown()
            steady = (len(x) - args.batch_size) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else float("nan")
            results.append((k, t, len(x) / t, steady, len(report.nodes), report.driver_bytes))
    print(f"restorer: {name}; {len(x)} x {tuple(restorer.image_shape)} images ({source}); batch {args.batch_size}; "
          f"local ray.cluster_utils cluster, 1 CPU per node, one actor per node; {os.cpu_count()} cores on this "
          f"machine; ray {ray.__version__}")
    print()
    print("| nodes | seconds | images/s end to end | images/s steady | nodes used | driver bytes/image |")
    print("|---:|---:|---:|---:|---:|---:|")
    for k, t, rate, steady, used, b in results:
        print(f"| {k} | {t:.1f} | {rate:,.0f} | {steady:,.0f} | {used} | {b / len(x):.0f} |")
    if len(results) > 1:
        print()
        print(f"scaling {results[0][0]} -> {results[-1][0]} nodes: end to end x{results[-1][2] / results[0][2]:.2f}, "
              f"steady state x{results[-1][3] / results[0][3]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
