"""Gray-box figures of the shipped restorers side by side.

FGSM, PGD-40 and CW-L2 are crafted on the guard alone (the attacker does not know a restorer is there) with the
evaluation's settings (trn.evaluate.make_attack; Linf 0.1, CW at L2 1.5), on 1,000 seeded test images. Prints the
guard's accuracy without a defence and behind each restorer, and the PSNR of the restored images against the clean
ones; writes runs/graybox_robust/results.json.

    python benchmarks/graybox_restorers.py                       # the shipped restorers
    python benchmarks/graybox_restorers.py fashion-mnist-robust checkpoints/trn_fmnist_robust   # names or paths
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from trn.data import load_dataset
from trn.evaluate import EvalConfig, make_attack
from trn.fidelity import psnr_per_image
from trn.restorer import PRETRAINED, Restorer

RESTORERS = ("fashion-mnist", "fashion-mnist-robust")


def _load(spec: str) -> Restorer:
    """A pretrained name (``fashion-mnist-robust``) or a checkpoint path."""
    return Restorer.pretrained(spec) if spec in PRETRAINED else Restorer.load(spec)


def main(specs: list[str]) -> None:
    torch.set_num_threads(1)
    test = load_dataset("fashion-mnist", None, "test").subset(1000, 0)
    x, y = test.images, test.labels
    restorers = {spec: _load(spec) for spec in specs or RESTORERS}
    guard = next(iter(restorers.values())).guard
    cfg = EvalConfig()
    out: dict[str, dict[str, float]] = {}
    for attack in ("clean", "fgsm", "pgd", "cw"):
        if attack == "clean":
            x_in = x
        else:
            atk = make_attack(attack, 0.1, cfg)
            x_in = torch.cat([atk(guard, x[i : i + 250], y[i : i + 250]) for i in range(0, len(x), 250)])
        with torch.no_grad():
            row = {"no defence": (guard(x_in).argmax(1) == y).float().mean().item()}
            for name, r in restorers.items():
                restored = r.restore(x_in)
                row[name] = (guard(restored).argmax(1) == y).float().mean().item()
                row[f"{name} psnr"] = psnr_per_image(restored, x).mean().item()
        out[attack] = row
        print(attack, {k: round(v, 4) for k, v in row.items()}, flush=True)
    path = Path("runs/graybox_robust/results.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
