"""Cross-check our PGD / APGD numbers against an independent attack library (IBM's Adversarial Robustness Toolbox).

For each model, the same attack settings run twice on the same seeded Fashion-MNIST test images -- once with
:mod:`trn.attacks`, once with ART (``adversarial-robustness-toolbox``, in the ``bench`` extra) -- and the robust
accuracies are compared: they should agree within ``--tolerance`` points (2 by default). Random starts differ between
the libraries, so the agreement is statistical, not exact.

Models: classifier checkpoints (``--classifier``, e.g. the shipped guard and the adversarially trained guard), and
optionally restorer checkpoints in front of the frozen guard (``--restorer``), attacked through a white-box view of
:mod:`trn.robustness` (``--variant``: ``gconst`` holds the gradient map constant, ``e2e`` differentiates it).

    python benchmarks/crosscheck_attacks.py --n 500 \\
        --classifier checkpoints/fmnist_guard --classifier checkpoints/fmnist_guard_advtrain \\
        --out runs/crosscheck_attacks

Writes ``OUT/crosscheck.json`` and ``OUT/crosscheck.md``; exits 1 when a pair differs by more than the tolerance.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trn.attacks import APGD, PGD
from trn.classifiers import load_classifier
from trn.data import load_dataset
from trn.robustness import attack_view, correct_mask, defended_model
from trn.utils import batches

log = logging.getLogger("crosscheck")


def _art_classifier(model: nn.Module, shape: tuple[int, ...], num_classes: int):
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=shape, nb_classes=num_classes,
                             clip_values=(0.0, 1.0), device_type="cpu")


def _art_attacks(clf, eps: float, pgd_steps: int, apgd_steps: int, batch_size: int, seed: int) -> dict:
    from art.attacks.evasion import AutoProjectedGradientDescent, ProjectedGradientDescent

    np.random.seed(seed)
    return {
        f"PGD-{pgd_steps}": ProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=2.5 * eps / pgd_steps,
                                                     max_iter=pgd_steps, num_random_init=1, batch_size=batch_size,
                                                     verbose=False),
        f"APGD-CE-{apgd_steps}": AutoProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=2 * eps,
                                                              max_iter=apgd_steps, nb_random_init=1,
                                                              loss_type="cross_entropy", batch_size=batch_size,
                                                              verbose=False),
        f"APGD-DLR-{apgd_steps}": AutoProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=2 * eps,
                                                               max_iter=apgd_steps, nb_random_init=1,
                                                               loss_type="difference_logits_ratio",
                                                               batch_size=batch_size, verbose=False),
    }


def _ours(eps: float, pgd_steps: int, apgd_steps: int, seed: int) -> dict:
    return {f"PGD-{pgd_steps}": PGD(eps=eps, steps=pgd_steps, seed=seed),
            f"APGD-CE-{apgd_steps}": APGD(eps=eps, steps=apgd_steps, loss="ce", seed=seed),
            f"APGD-DLR-{apgd_steps}": APGD(eps=eps, steps=apgd_steps, loss="dlr", seed=seed)}


def crosscheck(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> dict:
    """Robust accuracy of ``model`` under each attack, ours and ART's, on the same images."""
    shape, k = tuple(x.shape[1:]), int(model(x[:1]).shape[1])
    ours = _ours(args.eps, args.pgd_steps, args.apgd_steps, args.seed)
    art = _art_attacks(_art_classifier(model, shape, k), args.eps, args.pgd_steps, args.apgd_steps, args.batch_size,
                       args.seed)
    out = {"clean": correct_mask(model, x, y, args.batch_size).float().mean().item(), "attacks": {}}
    for label in ours:
        t0 = time.time()
        adv = torch.cat([ours[label](model, x[s], y[s]) for s in batches(len(x), args.batch_size)])
        t1 = time.time()
        adv_art = torch.from_numpy(art[label].generate(x=x.numpy(), y=y.numpy())).float()
        t2 = time.time()
        assert (adv - x).abs().max() <= args.eps + 1e-5 and (adv_art - x).abs().max() <= args.eps + 1e-5
        a, b = (correct_mask(model, t, y, args.batch_size).float().mean().item() for t in (adv, adv_art))
        out["attacks"][label] = {"ours": a, "art": b, "diff_points": round(100 * (a - b), 2),
                                 "within_tolerance": abs(a - b) * 100 <= args.tolerance,
                                 "seconds_ours": round(t1 - t0, 1), "seconds_art": round(t2 - t1, 1)}
        log.info("%s | %s: ours %.2f%%, ART %.2f%% (%.0f s / %.0f s)", name, label, 100 * a, 100 * b, t1 - t0, t2 - t1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classifier", action="append", default=[], help="classifier checkpoint (repeatable)")
    p.add_argument("--restorer", action="append", default=[], help="restorer checkpoint in front of --guard")
    p.add_argument("--guard", default="checkpoints/fmnist_guard", help="the frozen guard behind --restorer")
    p.add_argument("--variant", default="gconst", choices=["e2e", "gconst", "bpda"], help="restorer rows' view")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--pgd-steps", type=int, default=40)
    p.add_argument("--apgd-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=2.0, help="allowed difference in accuracy points")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/crosscheck_attacks")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if not args.classifier and not args.restorer:
        args.classifier = ["checkpoints/fmnist_guard", "checkpoints/fmnist_guard_advtrain"]
    data = load_dataset("fashion-mnist", None, "test").subset(args.n, args.seed)
    x, y = data.images, data.labels
    results: dict = {"settings": {k: v for k, v in vars(args).items()}, "models": {}}
    for path in args.classifier:
        model, _ = load_classifier(path)
        results["models"][path] = crosscheck(path, model.requires_grad_(False), x, y, args)
    if args.restorer:
        from trn.restorer import Restorer

        guard, _ = load_classifier(args.guard)
        for path in args.restorer:
            stack = defended_model(guard.requires_grad_(False), Restorer.load(path))
            with attack_view(stack, args.variant) as view:  # ART differentiates this view, we do too
                name = f"{path} + guard ({args.variant})"
                results["models"][name] = crosscheck(name, view, x, y, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "crosscheck.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"### Attack cross-check vs ART, Linf eps {args.eps}, {len(x)} seeded Fashion-MNIST test images", "",
             "| model | clean | attack | ours | ART | diff (points) | within " + f"{args.tolerance:g} |",
             "|---|---:|---|---:|---:|---:|---|"]
    ok = True
    for name, r in results["models"].items():
        for label, a in r["attacks"].items():
            ok &= a["within_tolerance"]
            lines.append(f"| {name} | {100 * r['clean']:.1f} | {label} | {100 * a['ours']:.1f} | {100 * a['art']:.1f} "
                         f"| {a['diff_points']:+.1f} | {'yes' if a['within_tolerance'] else '**no**'} |")
    (out / "crosscheck.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
