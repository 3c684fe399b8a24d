"""How far a restored image depends on its batch companions: each image restored alone vs inside one batch.

    python benchmarks/batch_consistency.py                                    # shipped restorers, 256 test images
    python benchmarks/batch_consistency.py --checkpoints checkpoints/trn_fmnist --images 512 --alone 128

The gradient map is normalised per image, so any difference is float rounding, which CPU kernels do differently
for different batch sizes; it is amplified where the guard is very confident (its loss gradient is near zero and
the map divides by its RMS). Prints, per restorer, the largest pixel difference, how many of the images restored
alone differ by more than 0.001 (and by one 8-bit grey level), how many change the guard's label, and the largest
difference of the gradient maps (RMS units).
"""

from __future__ import annotations

import argparse
import sys

import torch

from trn.data import load_fashion_mnist
from trn.restorer import Restorer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoints", nargs="+", default=["checkpoints/trn_fmnist_agnostic", "checkpoints/trn_fmnist"])
    p.add_argument("--images", type=int, default=256, help="the batch: the first N Fashion-MNIST test images")
    p.add_argument("--alone", type=int, default=64, help="how many of them are also restored one at a time")
    args = p.parse_args(argv)
    x = load_fashion_mnist(split="test").images[: args.images]
    k = min(args.alone, len(x))
    print(f"first {len(x)} Fashion-MNIST test images as one batch; the first {k} also alone; "
          f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    print()
    print("| restorer | max pixel diff | alone vs batch > 0.001 | > 1/255 | guard label changed | max map diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for path in args.checkpoints:
        r = Restorer.load(path).eval()
        with torch.no_grad():
            batch = r.restore(x, batch_size=len(x))[:k]
            alone = torch.cat([r.restore(x[i : i + 1], batch_size=1) for i in range(k)])
            labels_differ = int((r.guard(batch).argmax(1) != r.guard(alone).argmax(1)).sum())
        maps = (r.gradient_map(x)[:k] - torch.cat([r.gradient_map(x[i : i + 1]) for i in range(k)])).abs().max()
        d = (batch - alone).abs().amax((1, 2, 3))
        print(f"| {path} | {float(d.max()):.4f} | {int((d > 1e-3).sum())} of {k} | {int((d > 1 / 255).sum())} of {k} "
              f"| {labels_differ} of {k} | {float(maps):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
