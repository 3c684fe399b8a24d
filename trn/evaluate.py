"""Robustness evaluation: gray-box and adaptive white-box, always side by side (``trn eval --config ...``).

* gray-box: the attacker attacks the guard classifier and does not know a defence is there. Adversarial images depend
  only on the guard, so they are computed once per (attack, eps) and shared by every defence row (and cached).
* adaptive white-box, four PGD variants and their per-image worst case (an image counts as robust only if every
  variant failed on it):

  - ``e2e``: through the whole pipeline -- gradient-map estimation differentiated with ``create_graph=True``, then
    the TRN, then the guard;
  - ``gconst``: the same, but the gradient map is recomputed at every step and held constant in the backward pass.
    For a ReLU guard the map is piecewise constant in ``x`` with jumps first-order gradients do not see, so its
    exact derivative can mislead more than it helps (only for restorers with a gradient stream);
  - ``smooth``: the exact map forward, differentiated through a softplus copy of the guard (only with a gradient stream);
  - ``bpda``: the restorer treated as the identity in the backward pass (Athalye et al. 2018).

The gray-box cache (keyed on the images' content, checked against the budget on load), the white-box variants and
the worst case come from :mod:`trn.robustness`, the harness every robustness report shares.

Outputs in ``out_dir``: ``report.md``, ``report.json``, ``samples.png`` (clean / adversarial / gradient map /
restored) and ``accuracy_vs_eps.png``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from trn.attacks import PGD
from trn.checkpoint import checkpoint_digest
from trn.classifiers import load_classifier
from trn.config import to_dict
from trn.data import load_dataset
from trn.errors import ConfigError
from trn.gradients import GradientMapEstimator, estimate_gradient_map, map_channels
from trn.restorer import Restorer
from trn.robustness import (
    Pipeline,
    accuracy,
    bpda,
    defended_model,
    gray_box_images,
    make_attack,
    variants_for,
    whitebox_correct,
    worst_case,
)
from trn.utils import pick_device, seed_everything

__all__ = ["EvalConfig", "EvalReport", "Pipeline", "bpda", "make_attack", "run_evaluation"]
log = logging.getLogger(__name__)

ADAPTIVE_KINDS = ("e2e", "gconst", "smooth", "bpda")
ATTACK_LABELS = {"clean": "clean", "fgsm": "FGSM", "bim": "BIM-20", "pgd": "PGD-40", "mim": "MIM-20",
                 "cw": "CW-L2", "deepfool": "DeepFool-L2"}


@dataclass(frozen=True)
class EvalConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    guard: str = "checkpoints/fmnist_guard"
    restorer: str = "checkpoints/trn_fmnist"
    ablations: dict[str, str] = field(default_factory=lambda: {      # row name -> restorer checkpoint trained the
        "TRN one-stream (ablation)": "checkpoints/trn_fmnist_onestream",   # same way, with one thing changed
        "TRN argmax estimation (ablation)": "checkpoints/trn_fmnist_argmax",
        "TRN top-k estimation (ablation)": "checkpoints/trn_fmnist_topk",
    })
    estimator_ablation: list[str] = field(default_factory=list)  # extra rows: the same net fed another map mode
    oracle: bool = True                      # TRN fed the true-label gradient (ablation only)
    n_main: int | None = None                # images for the eps_main table (None: the full split)
    n_subset: int = 1000                     # seeded subset for the eps sweep and the adaptive rows
    seed: int = 0
    eps_main: float = 0.1
    eps_sweep: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    attacks: list[str] = field(default_factory=lambda: ["fgsm", "bim", "pgd", "mim", "cw", "deepfool"])
    l2_per_linf: float = 15.0                # CW / DeepFool L2 budget = l2_per_linf * Linf eps (1.5 at eps 0.1)
    adaptive_steps: int = 40
    adaptive_eps: list[float] = field(default_factory=lambda: [0.1])
    batch_size: int = 500
    device: str = "auto"
    out_dir: str = "runs/eval_fmnist"
    cache: bool = True                       # reuse gray-box images across runs (keyed on images + guard + attack)


@dataclass
class EvalReport:
    results: dict
    markdown: str


def _gray_box(guard: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str, eps: float, cfg: EvalConfig,
              device: torch.device) -> torch.Tensor:
    """Adversarial images against the guard alone (:func:`trn.robustness.gray_box_images`, cached by content)."""
    if name == "clean":
        return x
    cache = Path(cfg.out_dir) / "cache" if cfg.cache else None
    return gray_box_images(guard, x, y, make_attack(name, eps, cfg), cache_dir=cache,
                           guard_id=checkpoint_digest(cfg.guard, 12), dataset_id=f"{cfg.dataset}:{cfg.data_dir}",
                           batch_size=cfg.batch_size, device=device, desc=f"gray-box {name} eps={eps:g} (n={len(x)})")


def _defences(cfg: EvalConfig, guard: nn.Module, device: torch.device) -> tuple[dict, dict]:
    """Name -> (x -> logits) for gray-box rows; name -> defended model (guard(restorer(x))) for adaptive rows."""
    trn = Restorer.load(cfg.restorer, device)
    rows: dict[str, Callable] = {"no defence": guard, "TRN": lambda x: guard(trn(x))}
    adaptive: dict[str, nn.Module] = {"TRN": defended_model(guard, trn)}
    for mode in cfg.estimator_ablation:
        if trn.net.cfg.two_stream and map_channels(mode, trn.net.cfg.in_channels) != trn.net.map_channels:
            raise ConfigError(f"estimator_ablation {mode!r} gives maps the restorer's network cannot read")
        est = GradientMapEstimator(mode, trn.estimator.k, trn.estimator.scale, trn.estimator.confidence)
        rows[f"TRN (estimation: {mode})"] = lambda x, est=est: guard(trn.net(x, est(x, trn.guard)))
    for name, path in cfg.ablations.items():
        r = Restorer.load(path, device)
        rows[name] = lambda x, r=r: guard(r(x))
        adaptive[name] = defended_model(guard, r)
    if cfg.oracle and trn.net.cfg.two_stream:
        scale, copies = trn.estimator.scale, trn.net.map_channels // trn.net.cfg.in_channels  # dual: in both halves

        def oracle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            g = estimate_gradient_map(x, trn.guard, "oracle", scale=scale, y=y)
            return guard(trn.net(x, g.repeat(1, copies, 1, 1)))

        rows["TRN + oracle gradient (ablation)"] = oracle
    return rows, {"adaptive": adaptive, "restorer": trn}


def run_evaluation(cfg: EvalConfig) -> EvalReport:
    """Run every row x column of the report; write Markdown, JSON and PNGs to ``cfg.out_dir``."""
    from trn.plots import plot_accuracy_vs_eps, save_sample_grid

    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    guard, _ = load_classifier(cfg.guard, device)
    for p in guard.parameters():
        p.requires_grad_(False)
    test = load_dataset(cfg.dataset, cfg.data_dir, "test")
    main = test.subset(cfg.n_main, cfg.seed)
    sub = test.subset(cfg.n_subset, cfg.seed)
    rows, extra = _defences(cfg, guard, device)
    results: dict = {"config": to_dict(cfg), "n_main": len(main), "n_subset": len(sub), "gray_box": {},
                     "sweep": {}, "adaptive": {}}

    def row_accuracies(x_adv: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        accs = {}
        for name, fn in rows.items():
            accs[name] = accuracy(fn, x_adv, y, cfg.batch_size, device, needs_labels="oracle" in name)
        return accs

    # 1. gray-box at eps_main on the main set
    for name in ["clean", *cfg.attacks]:
        x_adv = _gray_box(guard, main.images, main.labels, name, cfg.eps_main, cfg, device)
        results["gray_box"][name] = row_accuracies(x_adv, main.labels)
        log.info("gray-box %s: %s", name, results["gray_box"][name])
        if name == "pgd":
            save_sample_grid(out / "samples.png", main.images[:8], x_adv[:8], extra["restorer"], device)
    # 2. gray-box eps sweep on the subset
    for eps in cfg.eps_sweep:
        results["sweep"][str(eps)] = {}
        for name in cfg.attacks:
            x_adv = _gray_box(guard, sub.images, sub.labels, name, eps, cfg, device)
            results["sweep"][str(eps)][name] = row_accuracies(x_adv, sub.labels)
    # 3. adaptive white-box on the subset: each variant, then the per-image worst case over them
    for eps in cfg.adaptive_eps:
        e = str(eps)
        results["adaptive"][e] = {"no defence": results["sweep"].get(e, {}).get("pgd", {}).get("no defence")}
        for name, stack in extra["adaptive"].items():
            atk = PGD(eps=eps, steps=cfg.adaptive_steps, seed=cfg.seed)
            per_kind = {kind: whitebox_correct(stack, sub.images, sub.labels, kind, atk,
                                               batch_size=min(cfg.batch_size, 250), device=device,
                                               desc=f"adaptive {kind} PGD-{cfg.adaptive_steps} {name} eps={eps:g}")
                        for kind in variants_for(stack, naive=False)}
            worst = worst_case(per_kind)
            results["adaptive"][e][name] = {**{k: v.float().mean().item() for k, v in per_kind.items()},
                                            "worst": worst.float().mean().item()}
            log.info("adaptive eps=%g %s: %s", eps, name, results["adaptive"][e][name])
    results["seconds"] = round(time.time() - t0, 1)
    md = render_markdown(results, cfg)
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_accuracy_vs_eps(out / "accuracy_vs_eps.png", results)
    return EvalReport(results, md)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def render_markdown(results: dict, cfg: EvalConfig) -> str:
    """The report's tables: gray-box at eps_main, adaptive/BPDA, and the eps sweep."""
    attacks = ["clean", *cfg.attacks]
    names = list(results["gray_box"]["clean"])
    l2 = cfg.l2_per_linf * cfg.eps_main
    lines = [
        f"### Gray-box (attacker targets the guard), Linf eps = {cfg.eps_main}, {results['n_main']} test images",
        f"CW-L2 and DeepFool use an L2 budget of {l2:g} (= {cfg.l2_per_linf:g} x eps). Accuracy in %.",
        "",
        "| defence | " + " | ".join(ATTACK_LABELS[a] for a in attacks) + " |",
        "|---|" + "---:|" * len(attacks),
    ]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_pct(results["gray_box"][a].get(n)) for a in attacks) + " |")
    for eps in cfg.adaptive_eps:
        e = str(eps)
        lines += [
            "",
            f"### Adaptive white-box, Linf eps = {eps}, PGD-{cfg.adaptive_steps}, {results['n_subset']} test images",
            ("The attacker knows the whole pipeline. end-to-end: gradients through gradient-map estimation "
             "(create_graph), the TRN and the guard; map held constant: the same with the map recomputed each step "
             "but constant in the backward pass; smooth map: the exact map forward, differentiated through the guard "
             "with its ReLUs as softplus; BPDA: the restorer as the identity in the backward pass. "
             "Worst case: an image counts only if every variant failed. Accuracy in %."),
            "",
            "| defence | gray-box PGD-40 | end-to-end | map held constant | smooth map | BPDA | **worst case** |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        gb = results["sweep"].get(e, {}).get("pgd", {})
        for n, v in results["adaptive"][e].items():
            if n == "no defence":
                lines.append(f"| {n} | {_pct(gb.get(n))} | {_pct(v)} | - | - | - | **{_pct(v)}** |")
                continue
            cells = " | ".join("-" if k not in v else _pct(v[k]) for k in ADAPTIVE_KINDS)
            lines.append(f"| {n} | {_pct(gb.get(n))} | {cells} | **{_pct(v['worst'])}** |")
    lines += ["", f"### Gray-box eps sweep, {results['n_subset']} test images (accuracy %)", "",
              "| defence | eps | " + " | ".join(ATTACK_LABELS[a] for a in cfg.attacks) + " |",
              "|---|---:|" + "---:|" * len(cfg.attacks)]
    for n in names:
        for e, per in results["sweep"].items():
            lines.append(f"| {n} | {e} | " + " | ".join(_pct(per[a].get(n)) for a in cfg.attacks) + " |")
    lines.append("")
    return "\n".join(lines)
