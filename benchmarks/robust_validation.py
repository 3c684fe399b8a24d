"""Robust restorers on their training run's validation split, white-box and black-box: the check that decides a stage.

    python benchmarks/robust_validation.py checkpoints/trn_fmnist_robust checkpoints/trn_fmnist_robust_wide

For each restorer checkpoint, the figures ``trn train-robust`` logs every ``val_every`` steps (clean and PGD-10
through the whole pipeline on ``val_images`` images), plus Square (score queries only) on the first
``--square-images`` of them and the per-image worst case of the two there. The split is the one of ``--config`` (its
``val_size`` and ``seed``: 2,000 images carved from the training set, never the test set). A restorer that masks its
gradients looks better under PGD than under Square; PGD-10 alone once preferred such a net (docs/design.md).
``--apgd-steps 100`` adds APGD-CE and APGD-DLR on the Square images, and the worst case and the masking check then
take every white-box attack, as the test-set evaluation does (a short PGD can under-attack a net without masking).
``--noise-std 0.05 --eot 8`` scores each restorer behind fresh Gaussian noise (a randomised defence), every gradient
attack averaging its gradients over 8 draws (EOT): the randomness ablation of docs/design.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("restorers", nargs="+", help="restorer checkpoints (NAME for NAME.safetensors + NAME.json)")
    p.add_argument("--config", default=str(REPO / "configs/trn_fmnist_robust.yaml"), help="whose validation split")
    p.add_argument("--square-queries", type=int, default=1000)
    p.add_argument("--square-images", type=int, default=200)
    p.add_argument("--apgd-steps", type=int, default=0, help="APGD-CE and -DLR steps on the Square images (0: off)")
    p.add_argument("--noise-std", type=float, help="fresh Gaussian noise in front of the restorer (default: the "
                   "config's noise_std)")
    p.add_argument("--eot", type=int, help="gradient attacks average over this many noise draws (default: the "
                   "config's val_eot_iter)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    from trn.config import load_config
    from trn.restorer import Restorer
    from trn.train_robust import RobustTrainConfig, validate_robust_restorer

    cfg = load_config(RobustTrainConfig, args.config, [f"val_square_queries={args.square_queries}",
                                                        f"val_square_images={args.square_images}",
                                                        f"val_apgd_steps={args.apgd_steps}",
                                                        f"threads={args.threads}",
                                                        *([f"noise_std={args.noise_std}"] if args.noise_std is not None
                                                          else []),
                                                        *([f"val_eot_iter={args.eot}"] if args.eot is not None else [])])
    rows = {}
    for path in args.restorers:
        rows[path] = validate_robust_restorer(Restorer.load(path), cfg)
        print(path, json.dumps({k: round(v, 4) for k, v in rows[path].items()}), flush=True)
    m, q, n = cfg.val_square_images, cfg.val_square_queries, cfg.val_apgd_steps
    apgd_cols = [f"APGD-CE/DLR-{n} (first {m})", f"every white-box attack (first {m})"] if n else []
    wb_name = "every white-box attack" if n else "PGD-10"
    print(f"\nvalidation split of {args.config} ({cfg.val_images} images; Square-{q} and the worst case on the "
          f"first {m}), accuracy %" + (f"; noise std {cfg.noise_std:g} in front, EOT over {cfg.val_eot_iter} draws"
                                         if cfg.noise_std else ""))
    print(" | ".join([f"| restorer | clean | PGD-10 | PGD-10 (first {m})", *apgd_cols, f"Square-{q} (first {m})",
                      f"worst case (first {m})", f"Square under {wb_name} by more than 2 points (masking) |"]))
    print("|---|" + "---:|" * (5 + len(apgd_cols)) + "---|")
    for path, r in rows.items():
        wb = r[f"val_whitebox_on{m}"]
        sq = r[f"val_bb_square{q}"]
        flag = f"**yes** ({100 * (wb - sq):.1f})" if r["val_masking_flag"] else "no"
        cells = [path, r["val_clean"], r["val_pgd10_gconst"], r[f"val_pgd10_on{m}"],
                 *([r[f"val_apgd{n}_on{m}"], wb] if n else []), sq, r[f"val_worst{m}"], flag]
        print("| " + " | ".join(c if isinstance(c, str) else f"{100 * c:.1f}" for c in cells) + " |")
    out = REPO / "runs/robust_validation.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "square_queries": q, "square_images": m, "apgd_steps": n,
                               "noise_std": cfg.noise_std, "eot_iter": cfg.val_eot_iter, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
