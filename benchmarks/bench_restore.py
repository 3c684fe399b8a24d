"""In-process restoration throughput next to the guard's forward-only throughput, in the same run.

    python benchmarks/bench_restore.py                           # shipped checkpoints/trn_fmnist
    python benchmarks/bench_restore.py --checkpoint runs/my_trn  # another restorer checkpoint
    python benchmarks/bench_restore.py --tiny                    # untrained restorer (same arch): checks the script

Restoring costs a forward and a backward pass through the guard (the gradient map) plus the TRN itself, so it is
several times slower than classifying; the ratio printed at the end is that factor. Images: the Fashion-MNIST test
split when it is installed (any 28x28 grey data when the checkpoint wants it), else seeded uniform noise.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trn.data import load_fashion_mnist
from trn.errors import DataError
from trn.restorer import Restorer

REPO = Path(__file__).resolve().parent.parent


def load_restorer(args: argparse.Namespace, tmp: Path) -> tuple[Restorer, str]:
    """The checkpoint named by ``--checkpoint``, or an untrained one with ``--tiny`` (saved and reloaded)."""
    if args.tiny:
        r = Restorer.build(arch=args.arch, seed=0)
        r.save(tmp / "untrained")
        return Restorer.load(tmp / "untrained"), f"untrained {args.arch}"
    return Restorer.load(args.checkpoint), str(args.checkpoint)


def images(shape: tuple[int, int, int], n: int) -> tuple[torch.Tensor, str]:
    """``n`` images of ``shape``: Fashion-MNIST test images when they fit, else seeded noise."""
    if tuple(shape) == (1, 28, 28):
        try:
            ds = load_fashion_mnist(split="test")
        except DataError:  # not installed: noise costs the same to restore
            ds = None
        if ds is not None:
            reps = -(-n // len(ds))
            return ds.images.repeat(reps, 1, 1, 1)[:n].contiguous(), "Fashion-MNIST test"
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(0)), "uniform noise"


def throughput(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int,
               repeats: int) -> tuple[float, float]:
    """(median images/s, median ms per batch) of ``fn`` over ``x`` in batches, after one warm-up batch."""
    fn(x[:batch_size])
    rates, per_batch = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n_batches = 0
        for i in range(0, len(x), batch_size):
            fn(x[i : i + batch_size])
            n_batches += 1
        dt = time.perf_counter() - t0
        rates.append(len(x) / dt)
        per_batch.append(dt / n_batches * 1000)
    return statistics.median(rates), statistics.median(per_batch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "trn_fmnist")
    p.add_argument("--tiny", action="store_true", help="untrained restorer instead of a checkpoint")
    p.add_argument("--arch", default="trn_small_28", help="architecture for --tiny")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        restorer, name = load_restorer(args, Path(d))
    restorer = restorer.to(args.device)
    x, source = images(restorer.image_shape, args.images)
    x = x.to(args.device)

    def guard(b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return restorer.guard(b)

    def restore(b: torch.Tensor) -> torch.Tensor:
        return restorer.restore(b, batch_size=len(b))

    def restore_and_classify(b: torch.Tensor) -> torch.Tensor:
        return guard(restore(b))

    rows = [(label, *throughput(fn, x, args.batch_size, args.repeats))
            for label, fn in (("guard forward (no grad)", guard), ("restore", restore),
                              ("restore + guard", restore_and_classify))]
    print(f"restorer: {name}; {args.images} x {tuple(restorer.image_shape)} images ({source}); batch "
          f"{args.batch_size}; device {args.device}, {torch.get_num_threads()} torch thread(s); "
          f"{platform.processor() or platform.machine()}, python {sys.version.split()[0]}, torch {torch.__version__}")
    print()
    print("| pass | images/s | ms/batch |")
    print("|---|---:|---:|")
    for label, rate, ms in rows:
        print(f"| {label} | {rate:,.0f} | {ms:.1f} |")
    print()
    print(f"restore / guard-forward throughput ratio: {rows[1][1] / rows[0][1]:.3f} "
          f"(restoring one image costs {rows[0][1] / rows[1][1]:.1f} guard forwards)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
