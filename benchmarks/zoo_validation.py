"""Restorers against a zoo of classifiers on validation images: the per-member figures behind issue 10's choices.

    python benchmarks/zoo_validation.py checkpoints/trn_fmnist_agnostic checkpoints/trn_fmnist_agnostic_zoo5
    python benchmarks/zoo_validation.py checkpoints/trn_fmnist_agnostic --passes 2        # the net applied twice
    python benchmarks/zoo_validation.py checkpoints/trn_fmnist_agnostic --members fmnist_guard --attack cw --gate 0.06

The images are the agnostic net's validation split (500 images carved from the training set with its config's
``val_size`` and ``seed``; never the test set). For each restorer and each member (``checkpoints/NAME``), the attack is
crafted on the member alone (gray-box: PGD-10 at eps, or CW-L2 with an L2 budget of 15 x eps and 50 steps, as ``trn
eval``), and the member judges the restored images; the gradient map comes from the restorer's guard or, with ``--map
downstream``, from the member. Prints clean / attacked accuracy after restoration per member and their means (a first
row: undefended), and the mean PSNR (dB) to the clean image of the restored clean images, the attacked images and
their restorations. ``--json PATH`` also writes every row (per-member accuracies, means, PSNR),
``--plot PATH`` a PNG of mean accuracy against PSNR per restorer (:func:`trn.plots.plot_fidelity_tradeoff`).
``--passes N`` restores N times in a row; ``--gate T`` passes through untouched every image the restorer would change
by at most T RMS (:func:`trn.defenses.restoration_change`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
MEMBERS = "fmnist_guard,zoo_fmnist_mlp,zoo_fmnist_cnn,zoo_fmnist_mixer,zoo_fmnist_dwcnn"


def _row(restorer: str, accs: dict[str, list[float]], **psnr: float) -> dict:
    """One restorer's result: ``accs`` maps each member to its [clean, attacked] accuracy (%); means over members."""
    members = {n: {"clean": c, "attacked": a} for n, (c, a) in accs.items()}
    return {"restorer": restorer, "members": members,
            "clean": sum(v["clean"] for v in members.values()) / len(members),
            "attacked": sum(v["attacked"] for v in members.values()) / len(members), **psnr}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("restorers", nargs="+", help="restorer checkpoints")
    p.add_argument("--members", default=MEMBERS, help="comma-separated classifier checkpoints under checkpoints/")
    p.add_argument("--attack", choices=("pgd", "cw"), default="pgd")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--map", choices=("guard", "downstream"), default="guard")
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--gate", type=float, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--plot", type=Path, default=None, help="also plot accuracy against PSNR here (PNG)")
    args = p.parse_args(argv)
    if args.passes < 1:
        p.error("--passes must be >= 1")

    from trn.attacks import create_attack
    from trn.data import load_fashion_mnist
    from trn.defenses import restoration_change
    from trn.downstream import load_downstream
    from trn.fidelity import psnr_per_image
    from trn.restorer import Restorer
    from trn.train_agnostic import split_train_val

    split = json.loads((REPO / "checkpoints" / "trn_fmnist_agnostic.json").read_text()).get("config", {})
    _, val = split_train_val(load_fashion_mnist(split="train"), int(split.get("val_size", 500)),
                             int(split.get("seed", 0)))
    x, y = val.images.float(), val.labels
    atk = (create_attack("pgd", eps=args.eps, steps=10, seed=1) if args.attack == "pgd" else
           create_attack("cw", eps=15 * args.eps, steps=50))
    names = args.members.split(",")
    members = {n: load_downstream(str(REPO / "checkpoints" / n)).eval() for n in names}
    x_adv = {n: torch.cat([atk(m, x[i:i + 250], y[i:i + 250]) for i in range(0, len(x), 250)])
             for n, m in members.items()}  # crafted once per member, shared by every restorer
    print(f"{len(x)} validation images; {args.attack.upper()} (eps {args.eps}) crafted on each member; map from "
          f"{args.map}; {args.passes} pass(es){'' if args.gate is None else f'; gate {args.gate}'}; accuracy % "
          "clean / attacked, after restoration\n")
    print("| restorer | " + " | ".join(names) + " | mean | PSNR clean / attacked -> restored |")
    print("|---|" + "---:|" * (len(names) + 2))
    with torch.no_grad():  # the undefended row: each member on the clean and the attacked images themselves
        raw = [[100 * (m(z).argmax(1) == y).float().mean().item() for z in (x, x_adv[n])] for n, m in members.items()]
    psnr_adv = sum(psnr_per_image(x_adv[n], x).mean().item() for n in names) / len(names)
    rows = [_row("none", dict(zip(names, raw)), psnr_attacked=psnr_adv)]
    print("| none (undefended) | " + " | ".join(f"{c:.1f} / {a:.1f}" for c, a in raw)
          + f" | {rows[0]['clean']:.1f} / {rows[0]['attacked']:.1f} | - / {psnr_adv:.1f} -> - |")
    for ck in args.restorers:
        base = Restorer.load(ck)
        psnr, per = [0.0, 0.0, 0.0], {}
        for n, m in members.items():
            r = base.with_map_from(m) if args.map == "downstream" else base

            def restore(z: torch.Tensor, r: Restorer = r) -> torch.Tensor:
                out = z
                for _ in range(args.passes):
                    out = r.restore(out, batch_size=250)
                if args.gate is not None:  # (N,) per-image change of the first pass decides
                    keep = restoration_change(z, r.restore(z, batch_size=250)) <= args.gate
                    out = torch.where(keep.view(-1, 1, 1, 1), z, out)
                return out

            with torch.no_grad():
                restored = [restore(z) for z in (x, x_adv[n])]
                accs = [100 * (m(z).argmax(1) == y).float().mean().item() for z in restored]
            for i, z in enumerate((restored[0], x_adv[n], restored[1])):
                psnr[i] += psnr_per_image(z, x).mean().item() / len(names)
            per[n] = accs
        row = _row(Path(ck).name, per, psnr_clean=psnr[0], psnr_attacked=psnr[1], psnr_restored=psnr[2])
        rows.append(row)
        print(f"| {row['restorer']} | " + " | ".join(f"{c:.1f} / {a:.1f}" for c, a in per.values())
              + f" | {row['clean']:.1f} / {row['attacked']:.1f} | {psnr[0]:.1f} / {psnr[1]:.1f} -> {psnr[2]:.1f} |",
              flush=True)
    results = {"attack": args.attack, "eps": args.eps, "map": args.map, "images": len(x), "passes": args.passes,
               "gate": args.gate, "rows": rows}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    if args.plot is not None:
        from trn.plots import plot_fidelity_tradeoff

        print(f"wrote {plot_fidelity_tradeoff(args.plot, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
