"""The defence table: TRN against (and stacked with) related defences, ``trn eval-defenses --config ...``.

Rows are defences and stacks built from config (:func:`~trn.defenses.stack.build_defense_stack`: input transforms ->
TRN -> classifier wrappers), optionally around another classifier checkpoint (the GFA and adversarially trained
guards). Columns, all at one Linf budget ``eps``:

* **clean** and **gray-box** FGSM / PGD-40 / CW-L2 on ``n`` seeded test images (None: the full test set), and the
  gray-box PGD eps sweep on ``n_subset`` of them (a cheaper seeded subset). Gray-box images are crafted once on
  the undefended guard (the attacker does not know about the defence) and shared by every row; for rows with their
  own classifier (GFA, adversarial training) they are therefore transfer attacks. Cached on disk by
  :func:`trn.robustness.gray_box_images` (keyed on the images' content, checked against the budget on load; the same
  keys as :mod:`trn.evaluate`, so the two evaluations can share one cache).
* **white-box** PGD through the whole defended model on ``n_adaptive`` of the ``n_subset`` images, in up to four
  variants:
  ``naive`` (autograd through everything as built: what a careless evaluation reports; run only where it differs),
  ``e2e`` (autograd through every differentiable part -- the TRN including its gradient-map estimation --, BPDA where
  the gradient is shattered or zero: bit depth, GCM; EOT over ``eot_samples`` draws where the output is random: UniG),
  ``gconst`` (``e2e`` with each TRN's gradient map held constant in the backward pass; rows with a two-stream TRN),
  ``smooth`` (``e2e`` with each TRN's map differentiated through a softplus copy of its guard; the same rows)
  and ``bpda`` (the whole input side treated as the identity in the backward pass). **adaptive** is the per-image
  worst case over the variants run: an image counts as robust only if every attack failed on it.
* **Square**: the score-based black-box attack (logits only, ``square_queries`` queries) on ``n_square`` of the
  white-box images; it needs no gradient, so gradient masking does not stop it.

Outputs in ``out_dir``: ``report.md``, ``report.json``, ``accuracy_vs_eps.png`` (gray-box PGD vs eps, adaptive points
at ``eps``) and ``state.json`` (finished cells, reused on a re-run with the same settings when ``resume`` is on).
Warnings in the report flag the signatures of gradient masking (naive >> adaptive, Square < white-box). The
white-box variants, EOT (gradients averaged over draws), Square and the worst case come from :mod:`trn.robustness`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trn.attacks import PGD
from trn.checkpoint import checkpoint_digest
from trn.classifiers import load_classifier
from trn.config import from_dict, to_dict
from trn.data import load_dataset
from trn.defenses.stack import parse_defense_spec
from trn.errors import ConfigError
from trn.evaluate import ATTACK_LABELS
from trn.robustness import (
    VARIANTS,
    BuiltRow,
    DefenseRow,
    accuracy,
    content_digest,
    gray_box_images,
    holding_maps,
    make_attack,
    square_correct,
    variants_for,
    whitebox_correct,
)
from trn.robustness import build_rows as _build_rows
from trn.utils import pick_device, seed_everything

__all__ = [
    "DefenseEvalConfig",
    "DefenseReport",
    "DefenseRow",
    "build_rows",
    "plot_defenses",
    "render_defense_markdown",
    "run_defense_evaluation",
    "whitebox_correct",
]
log = logging.getLogger(__name__)

def _default_rows() -> list[DefenseRow]:
    return [
        DefenseRow("no defence"),
        DefenseRow("TRN", ["trn"]),
        DefenseRow("JPEG (q=50)", [{"name": "jpeg", "quality": 50}]),
        DefenseRow("bit depth (3 bits)", [{"name": "bit_depth", "bits": 3}]),
        DefenseRow("median 3x3", [{"name": "median", "kernel_size": 3}]),
        DefenseRow("Gaussian blur", [{"name": "gaussian_blur", "kernel_size": 3, "sigma": 1.0}]),
        DefenseRow("GCM", ["gcm"]),
        DefenseRow("UniG", ["unig"]),
        DefenseRow("GFA-trained guard (FIRST)", [], "checkpoints/fmnist_guard_gfa"),
        DefenseRow("PGD adversarial training", [], "checkpoints/fmnist_guard_advtrain"),
        DefenseRow("JPEG -> TRN", [{"name": "jpeg", "quality": 50}, "trn"]),
        DefenseRow("TRN -> UniG", ["trn", "unig"]),
    ]


@dataclass(frozen=True)
class DefenseEvalConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    guard: str = "checkpoints/fmnist_guard"      # the undefended classifier; gray-box attacks are crafted on it
    restorer: str = "checkpoints/trn_fmnist"     # the TRN of 'trn' entries that name no checkpoint
    rows: list[DefenseRow] = field(default_factory=_default_rows)
    skip_missing: bool = True                    # skip (and list) rows whose checkpoint does not exist yet
    n: int | None = 1000                         # seeded test subset for the clean and gray-box columns (None: all)
    n_subset: int = 1000                         # seeded test subset for the eps sweep; white-box images come from it
    n_adaptive: int = 200                        # white-box columns: a seeded subset of the n_subset images
    n_square: int = 100                          # Square column: a seeded subset of the n_adaptive images
    seed: int = 0
    eps: float = 0.1                             # Linf budget of every column
    eps_sweep: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])  # gray-box PGD-40, for the plot
    gray_box: list[str] = field(default_factory=lambda: ["fgsm", "pgd", "cw"])  # trn.evaluate.make_attack names
    l2_per_linf: float = 15.0                    # CW-L2 budget = l2_per_linf * eps (as in trn.evaluate)
    adaptive_steps: int = 40                     # PGD steps of the white-box attacks
    adaptive_alpha: float | None = None          # PGD step; None: 2.5 * eps / steps
    eot_samples: int = 8                         # EOT draws per gradient for randomised rows (UniG)
    naive: bool = True                           # also run the naive white-box attack where it differs
    square_queries: int = 1000                   # Square query budget per image
    square_p_init: float = 0.3                   # Square's initial square size (fraction of pixels); ours for 28x28
    batch_size: int = 250                        # also the batch UniG unifies over
    device: str = "auto"
    out_dir: str = "runs/eval_defenses_fmnist"
    cache: bool = True                           # reuse gray-box images (keyed on images + guard + attack)
    cache_dir: str | None = None                 # None: out_dir/cache
    resume: bool = True                          # reuse finished cells from out_dir/state.json

    def __post_init__(self) -> None:
        for name in ("n", "n_subset", "n_adaptive", "n_square", "adaptive_steps", "eot_samples", "square_queries",
                     "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.n_square <= self.n_adaptive <= self.n_subset:
            raise ConfigError(f"need n_square <= n_adaptive <= n_subset (nested subsets), got {self.n_square}, "
                              f"{self.n_adaptive}, {self.n_subset}")
        if not 0 < self.eps <= 1 or any(not 0 < e <= 1 for e in self.eps_sweep):
            raise ConfigError(f"eps and eps_sweep must lie in (0, 1], got {self.eps}, {self.eps_sweep}")
        names = [r.name for r in self.rows]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"row names must be unique; repeated: {dup}")
        if not self.rows:
            raise ConfigError("rows is empty: nothing to evaluate")
        for row in self.rows:  # spec errors surface when the config is read, naming the row
            try:
                parse_defense_spec(row.defenses)
            except ConfigError as e:
                raise ConfigError(f"row {row.name!r}: {e}") from e


@dataclass
class DefenseReport:
    results: dict
    markdown: str


# ----------------------------------------------------------------------------------------------- rows
_Row = BuiltRow
_holding_maps = holding_maps  # kept for callers of the old private name


def build_rows(cfg: DefenseEvalConfig, guard: nn.Module, device: torch.device,
               reference_images: Callable[[], torch.Tensor] | None = None) -> tuple[list[BuiltRow], dict[str, str]]:
    """Every row's defended model (:func:`trn.robustness.build_rows` with this config); (rows, skipped -> reason)."""
    return _build_rows(cfg.rows, guard, cfg.guard, device, default_restorer=cfg.restorer,
                       skip_missing=cfg.skip_missing, seed=cfg.seed, reference_images=reference_images)


def _gray(guard: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str, eps: float, cfg: DefenseEvalConfig,
          cache_dir: Path | None, device: torch.device) -> torch.Tensor:
    return gray_box_images(guard, x, y, make_attack(name, eps, cfg), cache_dir=cache_dir,
                           guard_id=checkpoint_digest(cfg.guard, 12), dataset_id=f"{cfg.dataset}:{cfg.data_dir}",
                           batch_size=cfg.batch_size, device=device, desc=f"gray-box {name} eps={eps:g} (n={len(x)})")


# ----------------------------------------------------------------------------------------------- resumable cells
class _Cells:
    """Finished (row, column) results in ``state.json``, keyed by everything they depend on."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.done: dict[str, Any] = {}
        if enabled and path.is_file():
            try:
                self.done = json.loads(path.read_text())
            except json.JSONDecodeError:
                log.warning("ignoring unreadable %s", path)

    def get(self, key_parts: list, compute: Callable[[], Any]) -> Any:
        key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
        if self.enabled and key in self.done:
            return self.done[key]
        value = compute()
        self.done[key] = value
        if self.enabled:
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.done))
            tmp.replace(self.path)
        return value


def _subset_index(n: int, k: int, seed: int) -> torch.Tensor:
    """Sorted seeded choice of k of range(n) (all, in order, when k >= n)."""
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


# ----------------------------------------------------------------------------------------------- main
def run_defense_evaluation(cfg: DefenseEvalConfig) -> DefenseReport:
    """Evaluate every row x column; write report.md, report.json and accuracy_vs_eps.png to ``cfg.out_dir``."""
    if isinstance(cfg, dict):
        cfg = from_dict(DefenseEvalConfig, cfg)
    for name in cfg.gray_box:  # fail on an unknown attack before any work
        make_attack(name, cfg.eps, cfg)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    guard, _ = load_classifier(cfg.guard, device)
    for p in guard.parameters():
        p.requires_grad_(False)
    test = load_dataset(cfg.dataset, cfg.data_dir, "test")
    main = test.subset(cfg.n, cfg.seed)
    sub = test.subset(cfg.n_subset, cfg.seed)  # the same images as main when n == n_subset
    idx_adv = _subset_index(len(sub), cfg.n_adaptive, cfg.seed)
    idx_sq_in_adv = _subset_index(len(idx_adv), cfg.n_square, cfg.seed + 1)
    x_adv_set, y_adv_set = sub.images[idx_adv], sub.labels[idx_adv]
    x_sq, y_sq = x_adv_set[idx_sq_in_adv], y_adv_set[idx_sq_in_adv]

    loaded: list[torch.Tensor] = []

    def references() -> torch.Tensor:  # training images that pad UniG's small batches, loaded on first use
        if not loaded:
            loaded.append(load_dataset(cfg.dataset, cfg.data_dir, "train").subset(16, cfg.seed).images.to(device))
        return loaded[0]

    rows, skipped = build_rows(cfg, guard, device, references)
    cells = _Cells(out / "state.json", cfg.resume)
    cache_dir = (Path(cfg.cache_dir) if cfg.cache_dir else out / "cache") if cfg.cache else None

    # gray-box images: crafted once on the undefended guard, shared by every row
    gray: dict[str, torch.Tensor] = {"clean": main.images}
    for name in cfg.gray_box:
        gray[name] = _gray(guard, main.images, main.labels, name, cfg.eps, cfg, cache_dir, device)
    same = len(sub) == len(main)
    sweep_imgs = {e: (gray["pgd"] if same and e == cfg.eps and "pgd" in gray else
                      _gray(guard, sub.images, sub.labels, "pgd", e, cfg, cache_dir, device))
                  for e in cfg.eps_sweep}

    def common(n: int) -> dict:  # what every cell computed on n images depends on besides its own settings
        x, y = (main.images, main.labels) if n == len(main) else (sub.images, sub.labels)
        return {"dataset": cfg.dataset, "data_dir": cfg.data_dir, "n": n, "seed": cfg.seed, "eps": cfg.eps,
                "batch_size": cfg.batch_size, "content": content_digest(x, y),
                "harness": 2}  # 2: EOT averages gradients (trn.robustness); cells of older runs are recomputed

    data = _EvalData(main.labels, gray, sub.labels, sweep_imgs, x_adv_set, y_adv_set, x_sq, y_sq, idx_sq_in_adv,
                     common(len(main)), common(len(sub)))
    results: dict = {"config": to_dict(cfg), "n": len(main), "n_subset": len(sub), "n_adaptive": len(idx_adv),
                     "n_square": len(x_sq),
                     "eps": cfg.eps, "rows": {}, "skipped": skipped, "table": {}, "whitebox": {}, "square": {},
                     "sweep": {str(e): {"pgd": {}} for e in cfg.eps_sweep}, "adaptive": {str(cfg.eps): {}},
                     "notes": [], "seconds": {}}
    for row in rows:
        r = _evaluate_row(row, cfg, data, cells, device)
        results["rows"][row.name] = r["info"]
        results["table"][row.name] = r["table"]
        results["whitebox"][row.name] = r["whitebox"]
        results["square"][row.name] = r["square"]
        results["adaptive"][str(cfg.eps)][row.name] = r["whitebox"]["adaptive"]
        for e, acc in r["sweep"].items():
            results["sweep"][str(e)]["pgd"][row.name] = acc
        results["seconds"][row.name] = r["seconds"]
        results["notes"] += r["notes"]
        log.info("%s: %s (%.0f s)", row.name, {k: (round(v, 4) if v is not None else None)
                                               for k, v in r["table"].items()}, sum(r["seconds"].values()))
    results["total_seconds"] = round(time.time() - t_start, 1)
    md = render_defense_markdown(results, cfg)
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    if rows:
        plot_defenses(out / "accuracy_vs_eps.png", results)
    return DefenseReport(results, md)


@dataclass
class _EvalData:
    """The images every row is evaluated on (CPU tensors) and the settings all cells share."""

    labels: torch.Tensor                      # (n,)
    gray: dict[str, torch.Tensor]             # "clean" / attack name -> (n, C, H, W) gray-box images
    sweep_labels: torch.Tensor                # (n_subset,)
    sweep: dict[float, torch.Tensor]          # eps -> (n_subset, C, H, W) gray-box PGD images
    x_adv: torch.Tensor                       # (n_adaptive, C, H, W) white-box subset
    y_adv: torch.Tensor
    x_sq: torch.Tensor                        # (n_square, C, H, W) Square subset (of the white-box subset)
    y_sq: torch.Tensor
    sq_in_adv: torch.Tensor                   # positions of the Square images in the white-box subset
    common: dict                              # settings the keys of cells on the n images include
    common_subset: dict                       # the same for cells on the n_subset images (and subsets of them)


def _evaluate_row(row: _Row, cfg: DefenseEvalConfig, data: _EvalData, cells: _Cells, device: torch.device) -> dict:
    """Every column of one row (finished cells come from ``cells``)."""
    model, secs = row.model, {}

    def cell(column: str, key: list, fn: Callable[[], Any], on_subset: bool = True) -> Any:
        t0 = time.time()
        value = cells.get([row.fingerprint, column, data.common_subset if on_subset else data.common, *key], fn)
        secs[column] = round(time.time() - t0, 1)
        return value

    def acc_of(imgs: torch.Tensor, labels: torch.Tensor) -> Callable[[], float]:
        return lambda: accuracy(model, imgs, labels, cfg.batch_size, device)

    table: dict[str, float | None] = {}
    for name, imgs in data.gray.items():
        table[name] = cell(name, [make_attack(name, cfg.eps, cfg).params() if name != "clean" else None],
                           acc_of(imgs, data.labels), on_subset=False)
    same = data.common == data.common_subset
    sweep = {e: table["pgd"] if same and e == cfg.eps and "pgd" in table else
             cell(f"sweep {e:g}", [make_attack("pgd", e, cfg).params()], acc_of(imgs, data.sweep_labels))
             for e, imgs in data.sweep.items()}

    wb: dict[str, float | None] = {v: None for v in VARIANTS}
    worst = torch.ones(len(data.y_adv), dtype=torch.bool)
    for variant in variants_for(model, cfg.naive):
        def attack(variant: str = variant) -> list[bool]:
            atk = PGD(eps=cfg.eps, steps=cfg.adaptive_steps, alpha=cfg.adaptive_alpha, seed=cfg.seed)
            return whitebox_correct(model, data.x_adv, data.y_adv, variant, atk, eot_samples=cfg.eot_samples,
                                    batch_size=cfg.batch_size, device=device,
                                    desc=f"{row.name}: white-box {variant}").tolist()

        settings = [variant, cfg.adaptive_steps, cfg.adaptive_alpha, cfg.eot_samples, len(data.y_adv)]
        mask = torch.tensor(cell(f"white-box {variant}", settings, attack), dtype=torch.bool)
        wb[variant] = mask.float().mean().item()
        worst &= mask
    wb["adaptive"] = worst.float().mean().item()
    if wb["naive"] is None:
        wb["naive"] = wb["e2e"]  # the naive attack is the end-to-end one for a differentiable, deterministic model

    sq = cell("square", [cfg.square_queries, cfg.square_p_init, len(data.y_sq)],
              lambda: square_correct(model, data.x_sq, data.y_sq, cfg.eps, cfg.square_queries, cfg.square_p_init,
                                     cfg.seed, cfg.batch_size, device, f"{row.name}: Square"))
    adaptive_on_sq = worst[data.sq_in_adv].float().mean().item()
    table.update({"whitebox_naive": wb["naive"], "adaptive": wb["adaptive"], "square": sq["accuracy"]})
    square = {k: v for k, v in sq.items() if k != "correct"}
    square["adaptive_on_same_images"] = adaptive_on_sq
    info = {"description": model.describe(), "randomized": model.randomized, "differentiable": model.differentiable}
    return {"info": info, "table": table, "sweep": sweep, "whitebox": wb, "square": square, "seconds": secs,
            "notes": _flags(row.name, wb, sq["accuracy"], adaptive_on_sq)}


def plot_defenses(path: str | Path, results: dict) -> Path:
    """Gray-box PGD accuracy vs Linf eps per row (lines), adaptive white-box accuracy at ``eps`` (crosses).

    Like :func:`trn.plots.plot_accuracy_vs_eps`, with the legend outside the axes and 20 distinct colours, so a
    dozen rows stay readable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results["sweep"]
    eps_list = sorted(sweep, key=float)
    names = list(sweep[eps_list[0]]["pgd"])
    colours = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(9.5, 4.6))
    for k, name in enumerate(names):
        c = colours[k % len(colours)]
        ax.plot([float(e) for e in eps_list], [100 * sweep[e]["pgd"][name] for e in eps_list], marker="o", ms=4,
                color=c, label=name)
        for e, per in results.get("adaptive", {}).items():
            if per.get(name) is not None:
                ax.scatter([float(e)], [100 * per[name]], marker="x", s=60, color=c)
    ax.scatter([], [], marker="x", color="k", label="adaptive white-box (x)")
    ax.set_xlabel("Linf eps")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("gray-box PGD-40 (lines) and adaptive white-box (x)", fontsize=10)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _flags(name: str, wb: dict, square: float, adaptive_on_sq: float, margin: float = 0.05) -> list[str]:
    """Signatures of gradient masking (RobustBench / Athalye et al. style sanity checks)."""
    notes = []
    if wb["naive"] is not None and wb["naive"] - wb["adaptive"] > margin:
        notes.append(f"{name}: the naive white-box attack overstates robustness by "
                     f"{100 * (wb['naive'] - wb['adaptive']):.1f} points; its gradients are masked (BPDA/EOT needed)")
    if square < adaptive_on_sq - margin:
        notes.append(f"{name}: the gradient-free Square attack beats the best white-box attack on the same images "
                     f"({100 * square:.1f}% vs {100 * adaptive_on_sq:.1f}%): gradient masking suspected")
    return notes


def _images(results: dict) -> str:
    n = results["n"]
    return f"the full test set ({n} images)" if results["config"].get("n") is None else f"{n} seeded test images"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def render_defense_markdown(results: dict, cfg: DefenseEvalConfig) -> str:
    """The defence table, the white-box detail table, notes and skipped rows."""
    gray = ["clean", *cfg.gray_box]
    l2 = cfg.l2_per_linf * cfg.eps
    head = [ATTACK_LABELS.get(a, a) for a in gray]
    head += ["white-box (naive)", "adaptive white-box", f"Square ({cfg.square_queries} q)"]
    lines = [
        f"### Defences, Linf eps = {cfg.eps} (accuracy %)",
        "",
        (f"Clean and gray-box columns: {_images(results)}; gray-box attacks are crafted on the "
         f"undefended guard and transferred to every row (CW-L2 budget {l2:g}). White-box: PGD-{cfg.adaptive_steps} "
         f"through the whole defended model on {results['n_adaptive']} seeded test images (of the "
         f"{results.get('n_subset', results['n'])} of the eps sweep); adaptive = per-image worst case over "
         f"end-to-end (BPDA for shattered/zero gradients, EOT over {cfg.eot_samples} draws for random outputs), "
         f"end-to-end with the TRN's gradient map held constant or differentiated through a softplus guard (smooth "
         f"map), BPDA through the whole input side, and the naive "
         f"attack. Square: score-based black-box on "
         f"{results['n_square']} of the white-box images (median queries over the images it turned from right to "
         f"wrong)."),
        "",
        "| defence | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(head),
    ]
    cols = [*gray, "whitebox_naive", "adaptive", "square"]
    for name, t in results["table"].items():
        lines.append(f"| {name} | " + " | ".join(_pct(t.get(c)) for c in cols) + " |")
    lines += ["", f"#### White-box detail ({results['n_adaptive']} images) and Square queries", "",
              ("| defence | pipeline | naive | end-to-end | map held constant | smooth map | BPDA (input side) | adaptive | "
               "Square | Square median queries |"),
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, wb in results["whitebox"].items():
        sq = results["square"][name]
        mq = sq["median_queries_success"]
        lines.append(f"| {name} | {results['rows'][name]['description']} | {_pct(wb['naive'])} | {_pct(wb['e2e'])} | "
                     f"{_pct(wb.get('gconst'))} | {_pct(wb.get('smooth'))} | {_pct(wb['bpda'])} | {_pct(wb['adaptive'])} | {_pct(sq['accuracy'])} | "
                     f"{'n/a' if mq is None else f'{mq:.0f}'} |")
    if results["notes"]:
        lines += ["", "**Warnings**", ""] + [f"- {n}" for n in results["notes"]]
    if results["skipped"]:
        lines += ["", "**Skipped rows**", ""] + [f"- {n}: {why}" for n, why in results["skipped"].items()]
    lines += ["", f"Total time: {results.get('total_seconds', 0):.0f} s.", ""]
    return "\n".join(lines)
