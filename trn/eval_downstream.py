"""Which classifiers does a restorer protect? ``trn eval-downstream --config configs/eval_downstream_fmnist.yaml``.

The matrix of issue 10: rows are restorer variants (``none``, the guard-specific TRN, the agnostic TRN, fitted ones),
columns are downstream classifiers (trn checkpoints, TorchScript or ``torch.export`` files), some of which no
restorer saw in training or selection (``held_out``). Attacks are gray-box: crafted on each downstream classifier
alone (FGSM, PGD-40, CW-L2 at the evaluation's settings, :func:`trn.evaluate.make_attack`), then restored, then
classified by that same classifier. A transfer table crafts PGD-40 on one classifier (``transfer_source``) and judges
the restored images with every other one. Fidelity (PSNR/SSIM of restored vs clean, :mod:`trn.fidelity`) sits next to
accuracy, on clean and attacked inputs, with the attacked inputs' own PSNR for comparison. A row's gradient map comes
from the restorer's own guard, or (``map_from: {row: downstream}``) from each column's classifier, as when the
downstream classifier runs in the same process as the restorer.

Writes ``OUT_DIR/downstream.md``, ``downstream.json`` and ``downstream_heatmap.png``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from trn.config import to_dict
from trn.data import load_dataset
from trn.downstream import load_downstream
from trn.errors import ConfigError
from trn.evaluate import ATTACK_LABELS, EvalConfig, make_attack
from trn.fidelity import psnr_per_image, ssim_per_image
from trn.restorer import Restorer
from trn.utils import batches, pick_device

__all__ = ["DownstreamEvalConfig", "DownstreamReport", "render_markdown", "run_downstream_evaluation"]
log = logging.getLogger(__name__)

_ATTACKS = ("fgsm", "pgd", "cw")
NONE_ROW = "none (undefended)"


@dataclass(frozen=True)
class DownstreamEvalConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    n: int = 1000                                   # seeded test subset
    seed: int = 0
    restorers: dict[str, str] = field(default_factory=lambda: {   # row name -> restorer checkpoint
        "guard-specific (trn_fmnist)": "checkpoints/trn_fmnist",
        "agnostic (trn_fmnist_agnostic)": "checkpoints/trn_fmnist_agnostic",
    })
    map_from: dict[str, str] = field(default_factory=dict)  # row name -> "guard" (default) or "downstream": the
                                                            # gradient map from the column's own classifier
    classifiers: dict[str, str] = field(default_factory=lambda: {  # column name -> classifier file
        "guard": "checkpoints/fmnist_guard", "mlp": "checkpoints/zoo_fmnist_mlp", "cnn": "checkpoints/zoo_fmnist_cnn",
        "bncnn": "checkpoints/zoo_fmnist_bncnn", "resnet": "checkpoints/zoo_fmnist_resnet",
        "vit": "checkpoints/zoo_fmnist_vit",
    })
    held_out: list[str] = field(default_factory=lambda: ["bncnn", "resnet", "vit"])  # columns no restorer saw
    attacks: list[str] = field(default_factory=lambda: list(_ATTACKS))
    eps: float = 0.1                                # Linf budget (CW-L2: 15 x eps in L2, as trn eval)
    transfer_source: str | None = "resnet"          # PGD-40 crafted on this column, judged by the others
    batch_size: int = 250
    device: str = "auto"
    out_dir: str = "runs/eval_downstream_fmnist"

    def __post_init__(self) -> None:
        bad = [a for a in self.attacks if a not in _ATTACKS]
        if bad:
            raise ConfigError(f"attacks must be a subset of {list(_ATTACKS)}, got {self.attacks}")
        if not self.classifiers:
            raise ConfigError("classifiers: name at least one downstream classifier")
        unknown = [c for c in self.held_out if c not in self.classifiers]
        if unknown:
            raise ConfigError(f"held_out names {unknown} are not columns of classifiers {sorted(self.classifiers)}")
        if self.transfer_source is not None and self.transfer_source not in self.classifiers:
            raise ConfigError(f"transfer_source {self.transfer_source!r} is not one of {sorted(self.classifiers)}")
        bad_map = {k: v for k, v in self.map_from.items()
                   if k not in self.restorers or v not in ("guard", "downstream")}
        if bad_map:
            raise ConfigError(f"map_from maps restorer rows {sorted(self.restorers)} to 'guard' or 'downstream', got "
                              f"{bad_map}")
        if NONE_ROW in self.restorers:
            raise ConfigError(f"{NONE_ROW!r} is the undefended row's name; pick another")
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")


@dataclass
class DownstreamReport:
    results: dict
    markdown: str


@torch.no_grad()
def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int, device: torch.device) -> float:
    hit = sum((model(x[s].to(device)).argmax(1).cpu() == y[s]).sum().item() for s in batches(len(x), bs))
    return hit / max(len(x), 1)


def _restore(r: Restorer | None, x: torch.Tensor, bs: int, map_model: nn.Module | None = None) -> torch.Tensor:
    """``x`` restored by ``r`` (the input itself for the undefended row), the map from ``map_model`` if given."""
    if r is None:
        return x
    return (r if map_model is None else r.with_map_from(map_model)).restore(x, batch_size=bs)


def run_downstream_evaluation(cfg: DownstreamEvalConfig) -> DownstreamReport:
    """Build the matrix per ``cfg``; write Markdown, JSON and a heat map under ``cfg.out_dir``."""
    t0 = time.time()
    device = pick_device(cfg.device)
    test = load_dataset(cfg.dataset, cfg.data_dir, "test").subset(cfg.n, cfg.seed)
    x, y = test.images, test.labels
    clfs = {name: load_downstream(p, test.shape, test.num_classes, device) for name, p in cfg.classifiers.items()}
    rows: dict[str, Restorer | None] = {NONE_ROW: None}
    rows.update({name: Restorer.load(p, device) for name, p in cfg.restorers.items()})
    for name, r in rows.items():
        if r is not None and tuple(r.image_shape) != tuple(test.shape):
            raise ConfigError(f"restorer {name!r} takes {tuple(r.image_shape)} images, the data has {test.shape}")
    ecfg = EvalConfig(seed=cfg.seed)
    adv: dict[str, dict[str, torch.Tensor]] = {}
    for cname, clf in clfs.items():
        adv[cname] = {"clean": x}
        for a in cfg.attacks:
            atk = make_attack(a, cfg.eps, ecfg)
            out = [atk(clf, x[s].to(device), y[s].to(device)).cpu()
                   for s in tqdm(list(batches(len(x), cfg.batch_size)), desc=f"{ATTACK_LABELS[a]} on {cname}")]
            adv[cname][a] = torch.cat(out)
    kinds = ["clean", *cfg.attacks]
    acc: dict[str, dict[str, dict[str, float]]] = {}
    fid: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    transfer: dict[str, dict[str, float]] = {}
    for rname, r in rows.items():
        acc[rname], fid[rname] = {}, {}
        from_downstream = cfg.map_from.get(rname, "guard") == "downstream"
        restored_clean = None if from_downstream else _restore(r, x, cfg.batch_size)  # the same for every column
        for cname, clf in clfs.items():
            acc[rname][cname], fid[rname][cname] = {}, {}
            map_model = clf if from_downstream else None
            for k in kinds:
                if k == "clean":
                    xr = restored_clean if restored_clean is not None else _restore(r, x, cfg.batch_size, map_model)
                else:
                    xr = _restore(r, adv[cname][k], cfg.batch_size, map_model)
                acc[rname][cname][k] = _acc(clf, xr, y, cfg.batch_size, device)
                fid[rname][cname][k] = {"psnr": psnr_per_image(xr, x).mean().item(),
                                        "ssim": ssim_per_image(xr, x).mean().item()}
        if cfg.transfer_source is not None and "pgd" in cfg.attacks:
            src = adv[cfg.transfer_source]["pgd"]
            transfer[rname] = {c: _acc(clf, _restore(r, src, cfg.batch_size, clf if from_downstream else None), y,
                                       cfg.batch_size, device)
                               for c, clf in clfs.items() if c != cfg.transfer_source}
        log.info("row %s done", rname)
    results = {"config": to_dict(cfg), "n": len(x), "accuracy": acc, "fidelity": fid, "transfer": transfer,
               "fidelity_mean": _mean_fidelity(fid, kinds), "seconds": round(time.time() - t0, 1),
               "torch": torch.__version__}
    md = render_markdown(results, cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "downstream.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / "downstream.md").write_text(md)
    plot_heatmap(out / "downstream_heatmap.png", results, cfg)
    log.info("wrote %s (downstream.md, downstream.json, downstream_heatmap.png)", out)
    return DownstreamReport(results, md)


def _mean_fidelity(fid: dict, kinds: list[str]) -> dict:
    """Per row and input kind: PSNR/SSIM averaged over the classifiers' attacked images."""
    out = {}
    for rname, cols in fid.items():
        out[rname] = {k: {m: sum(c[k][m] for c in cols.values()) / len(cols) for m in ("psnr", "ssim")}
                      for k in kinds}
    return out


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def render_markdown(results: dict, cfg: DownstreamEvalConfig) -> str:
    """The matrix as Markdown: one accuracy table per input kind, a fidelity table and the transfer table."""
    cols = list(cfg.classifiers)
    head = [f"{c}{' (held out)' if c in cfg.held_out else ''}" for c in cols]
    kinds = ["clean", *cfg.attacks]
    lines = [(f"# Downstream matrix ({cfg.dataset}, n={results['n']}, Linf eps={cfg.eps:g}, gray-box: each attack "
             f"crafted on the column's classifier alone)"), "",
             ("Accuracy (%) of each downstream classifier (column) on images restored by each restorer (row). Held-out "
             "columns: families no restorer saw in training or model selection."), ""]
    for k in kinds:
        label = ATTACK_LABELS.get(k, k)
        lines += [f"## {label}", "", "| restorer | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
        for rname, row in results["accuracy"].items():
            lines.append(f"| {rname} | " + " | ".join(_pct(row[c][k]) for c in cols) + " |")
        lines.append("")
    lines += ["## Fidelity to the clean image (PSNR dB / SSIM, mean over the columns' images)", "",
              "| restorer | " + " | ".join(ATTACK_LABELS.get(k, k) for k in kinds) + " |",
              "|---" * (len(kinds) + 1) + "|"]
    for rname, row in results["fidelity_mean"].items():
        lines.append(f"| {rname} | " + " | ".join(f"{row[k]['psnr']:.1f} / {row[k]['ssim']:.3f}" for k in kinds)
                     + " |")
    lines += ["", f"(`{NONE_ROW}` is the input itself: its attacked columns are the attacked images' own distance.)", ""]
    if results["transfer"]:
        others = [c for c in cols if c != cfg.transfer_source]
        lines += [f"## Transfer: PGD-40 crafted on {cfg.transfer_source}, judged by the others after restoration", "",
                  "| restorer | " + " | ".join(others) + " |", "|---" * (len(others) + 1) + "|"]
        for rname, row in results["transfer"].items():
            lines.append(f"| {rname} | " + " | ".join(_pct(row[c]) for c in others) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_heatmap(path: str | Path, results: dict, cfg: DownstreamEvalConfig) -> Path:
    """One heat-map panel per input kind: rows = restorers, columns = classifiers, cells = accuracy (%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["clean", *cfg.attacks]
    rows, cols = list(results["accuracy"]), list(cfg.classifiers)
    fig, axes = plt.subplots(1, len(kinds), figsize=(2.2 + 1.0 * len(cols) * len(kinds), 0.6 * len(rows) + 2.0),
                             squeeze=False)
    for ax, k in zip(axes[0], kinds, strict=True):
        m = torch.tensor([[100 * results["accuracy"][r][c][k] for c in cols] for r in rows])
        ax.imshow(m.numpy(), vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_title(ATTACK_LABELS.get(k, k))
        ax.set_xticks(range(len(cols)), [c + ("*" if c in cfg.held_out else "") for c in cols], rotation=45,
                      ha="right")
        ax.set_yticks(range(len(rows)), rows if k == "clean" else [""] * len(rows))
        for i in range(len(rows)):
            for j in range(len(cols)):
                v = m[i, j].item()
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=8)
    fig.suptitle(f"Downstream accuracy (%) after restoration, n={results['n']} (* held out)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
