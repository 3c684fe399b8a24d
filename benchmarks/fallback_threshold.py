"""Choose the ``trn`` stage's ``fallback_above`` on validation images, and show what routing buys before any service.

    python benchmarks/fallback_threshold.py   # agnostic -> shipped fallback, the agnostic net's 500 validation images
    python benchmarks/fallback_threshold.py --fallback checkpoints/trn_fmnist_robust   # another fallback candidate

The images are the primary restorer's own validation split (``split_train_val`` with its training config's
``val_size`` and ``seed``: carved from the training set, never trained on, never the test set). Prints, for clean images
and for images with Square's opening move (vertical +-eps stripes, one random sign per column), the quantiles of the
primary's per-image RMS change; then, for thresholds at quantiles of the clean change, the fraction routed to the
fallback and the guard's accuracy after the primary alone, the fallback alone and the routed pair at ``--threshold``;
then a short in-process Square (``--queries``, no detector, ``--seeds`` seeds) against each: the images it breaks
within that many queries are the ones a similar-query detector, which needs repeated queries, cannot stop; and each
one's gray-box accuracy (PGD-40 crafted on the guard alone), which routing must not give away.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--primary", default=str(REPO / "checkpoints" / "trn_fmnist_agnostic"))
    p.add_argument("--fallback", default=str(REPO / "checkpoints" / "trn_fmnist_fallback"))
    p.add_argument("--quantiles", default="0.95,0.98,0.99,0.995")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--threshold", type=float, default=0.06, help="fallback_above for the Square comparison")
    p.add_argument("--queries", type=int, default=8, help="in-process Square queries per image (0: skip); a "
                   "similar-query detector refuses a client after about this many")
    p.add_argument("--seeds", type=int, default=3, help="Square seeds to average over")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from trn.attacks import Square, create_attack
    from trn.data import load_fashion_mnist
    from trn.defenses import FallbackRestorer, restoration_change
    from trn.restorer import Restorer
    from trn.train_agnostic import split_train_val

    primary, fallback = Restorer.load(args.primary), Restorer.load(args.fallback)
    guard = primary.guard
    cfg = json.loads(Path(args.primary + ".json").read_text()).get("config", {})
    val_size, split_seed = int(cfg.get("val_size", 500)), int(cfg.get("seed", 0))
    _, val = split_train_val(load_fashion_mnist(split="train"), val_size, split_seed)
    x, y = val.images.float(), val.labels
    g = torch.Generator().manual_seed(args.seed)
    stripes = torch.randint(0, 2, (len(x), x.shape[1], 1, x.shape[3]), generator=g).float() * 2 - 1
    noisy = (x + args.eps * stripes).clamp(0, 1)  # (N, C, H, W): Square's first query
    print(f"{len(x)} validation images (val_size {val_size}, seed {split_seed} of {Path(args.primary).name}'s "
          f"config); primary {Path(args.primary).name}, fallback {Path(args.fallback).name}; eps {args.eps}")

    def restore(r: torch.nn.Module, xx: torch.Tensor) -> torch.Tensor:
        return torch.cat([r(xx[i:i + 250]).detach() for i in range(0, len(xx), 250)])

    def acc(z: torch.Tensor) -> float:
        with torch.no_grad():
            return 100 * (guard(z).argmax(1) == y).float().mean().item()

    out = {}
    for name, xx in (("clean", x), ("stripes", noisy)):
        rp, rf = restore(primary, xx), restore(fallback, xx)
        out[name] = (xx, rp, rf, restoration_change(xx, rp))
    qs = [float(q) for q in args.quantiles.split(",")]
    levels = torch.tensor([0.5, 0.9, *qs])
    print("\n| input | guard alone | primary | fallback | primary's change: " +
          " | ".join(f"q{q:g}" for q in levels.tolist()) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(levels))
    for name, (xx, rp, rf, ch) in out.items():
        cells = " | ".join(f"{v:.4f}" for v in torch.quantile(ch, levels).tolist())
        print(f"| {name} | {acc(xx):.1f} | {acc(rp):.1f} | {acc(rf):.1f} | {cells} |")
    print("\n| threshold (clean quantile) | routed clean | routed stripes | routed pair: clean acc | stripes acc |")
    print("|---|---:|---:|---:|---:|")
    for q in qs:
        t = torch.quantile(out["clean"][3], q).item()
        row = []
        for name in ("clean", "stripes"):
            xx, rp, rf, ch = out[name]
            row.append(((ch > t).float().mean().item(), acc(torch.where((ch > t).view(-1, 1, 1, 1), rf, rp))))
        print(f"| {t:.4f} (q{q:g}) | {100 * row[0][0]:.1f} % | {100 * row[1][0]:.1f} % | {row[0][1]:.1f} | "
              f"{row[1][1]:.1f} |")
    if args.queries <= 0:
        return 0
    seeds = range(args.seed, args.seed + args.seeds)
    print(f"\nIn-process Square, {args.queries} queries, p_init 0.3, no detector, threshold {args.threshold}; robust "
          f"accuracy over all {len(x)} images, averaged over {len(seeds)} Square seeds; gray-box: PGD-40 crafted on the "
          "guard alone (the attacker ignores the restorers; such images are noisy too, so the pair routes most of them):")
    print("| model | clean acc | robust | broken within 2 queries (mean) | gray-box PGD-40 |")
    print("|---|---:|---:|---:|---:|")
    pair = FallbackRestorer(primary, fallback, args.threshold)
    x_gray = torch.cat([create_attack("pgd", eps=args.eps, steps=40, seed=args.seed)(guard, x[i:i + 250], y[i:i + 250])
                        for i in range(0, len(x), 250)])
    for name, r in (("primary", primary), ("fallback", fallback), ("routed pair", pair)):
        def model(b: torch.Tensor, r: torch.nn.Module = r) -> torch.Tensor:
            return guard(r(b).detach())
        with torch.no_grad():
            ok = (model(x).argmax(1) == y)
        idx = ok.nonzero().flatten()
        robust, early, t0 = [], [], time.perf_counter()
        for seed in seeds:
            atk = Square(eps=args.eps, queries=args.queries, p_init=0.3, seed=seed)
            xa = atk(model, x[idx], y[idx])
            with torch.no_grad():
                broke = model(xa).argmax(1) != y[idx]
            robust.append(100 * (len(idx) - int(broke.sum())) / len(x))
            early.append(int((broke & (atk.last_queries <= 2)).sum()))
        print(f"| {name} | {100 * ok.float().mean().item():.1f} | {sum(robust) / len(robust):.1f} % | "
              f"{sum(early) / len(early):.1f} ({time.perf_counter() - t0:.0f} s) | {acc(restore(r, x_gray)):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
