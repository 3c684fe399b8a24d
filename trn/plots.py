"""PNG figures: sample grids (clean / adversarial / gradient map / restored), accuracy-vs-eps curves, adaptive bars
and the fidelity-against-robustness scatter of restorer variants."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["plot_accuracy_vs_eps", "plot_adaptive", "plot_fidelity_tradeoff", "save_sample_grid"]


def _save(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` as PNG (its folder made if missing) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def save_sample_grid(path: str | Path, clean: torch.Tensor, adv: torch.Tensor, restorer, device=None) -> Path:
    """Four rows: clean, adversarial, estimated gradient map of the adversarial image, restored. Columns: images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = device or restorer.device
    with torch.no_grad():
        a = adv.to(device)
        g = restorer.gradient_map(a).cpu()
        r = restorer(a).cpu()
        preds = [restorer.guard(t.to(device)).argmax(1).cpu() for t in (clean, adv, r)]
    rows = [("clean", clean, preds[0]), ("adversarial", adv, preds[1]), ("gradient map", g, None),
            ("restored", r, preds[2])]
    n = clean.shape[0]
    fig, axes = plt.subplots(4, n, figsize=(1.4 * n, 6.2), squeeze=False)
    for i, (title, imgs, p) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            img = imgs[j].permute(1, 2, 0).squeeze(-1).numpy()
            if title == "gradient map":
                lim = max(abs(img.min()), abs(img.max()), 1e-8)
                ax.imshow(img if img.ndim == 2 else img.mean(-1), cmap="coolwarm", vmin=-lim, vmax=lim)
            else:
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if p is not None:
                name = restorer.class_names[int(p[j])]
                ax.set_title(name[:10], fontsize=7)
            if j == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def plot_accuracy_vs_eps(path: str | Path, results: dict, attack: str = "pgd") -> Path:
    """Gray-box accuracy vs Linf eps per defence under ``attack``, with the adaptive worst case where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results["sweep"]
    eps_list = sorted(sweep, key=float)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    names = list(next(iter(sweep.values()))[attack])
    for k, name in enumerate(names):
        ys = [100 * sweep[e][attack][name] for e in eps_list]
        ax.plot([float(e) for e in eps_list], ys, marker="o", label=f"{name} (gray-box)", color=f"C{k}")
        pts = [(float(e), v[name]["worst"]) for e, v in results.get("adaptive", {}).items()
               if isinstance(v.get(name), dict)]
        if pts:
            ax.scatter([p[0] for p in pts], [100 * p[1] for p in pts], marker="x", s=70, color=f"C{k}",
                       label=f"{name} (adaptive, worst case)")
    ax.set_xlabel("Linf eps")
    ax.set_ylabel(f"accuracy under {attack.upper()} (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="center right")  # the adaptive points sit low at the middle eps
    fig.tight_layout()
    return _save(fig, path)


def plot_adaptive(path: str | Path, results: dict) -> Path:
    """Bars per row of the strong adaptive evaluation: clean, transfer, gradient worst case, Square, worst case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    cols = [("clean", lambda r: r["clean"]), ("transfer PGD", lambda r: r["transfer_pgd"]),
            ("gradient worst case", lambda r: r["gradient_worst"]), ("Square", lambda r: r["square"]["accuracy"]),
            ("worst case", lambda r: r["worst"])]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(rows) + 2), 4.2))
    width = 0.8 / len(cols)
    for k, (label, get) in enumerate(cols):
        xs = [i + (k - (len(cols) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [100 * get(r) for r in rows.values()], width, label=label, color=f"C{k}")
    ax.set_xticks(range(len(rows)), [n if len(n) <= 22 else n[:20] + "..." for n in rows], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 102)
    ax.set_title(f"adaptive evaluation, Linf eps {results['eps']} ({results['n']} images)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return _save(fig, path)


def plot_fidelity_tradeoff(path: str | Path, results: dict, strip: str = "trn_fmnist_") -> Path:
    """Restorer variants as points: accuracy after restoration under attack against PSNR to the clean image.

    ``results`` is what ``benchmarks/zoo_validation.py --json`` writes: ``rows`` of ``{"restorer", "attacked",
    "psnr_clean", "psnr_attacked", "psnr_restored"}`` (accuracies in %, PSNR in dB), the first row being the
    undefended one (``restorer: "none"``, no restored PSNR). Left panel: attacked images, their restoration's PSNR on
    x (the attacked input's PSNR and that + 5 dB, issue 10's target, as dashed lines); right panel: clean images'
    PSNR after restoration on x (32 dB dashed). Both share the y axis: mean accuracy after restoration under attack,
    the undefended accuracy dotted. Names lose the ``strip`` prefix.

    Example:
        >>> plot_fidelity_tradeoff("docs/img/fidelity_tradeoff.png", json.loads(Path("zoo.json").read_text()))
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("psnr_restored") is not None]
    if not rows:
        raise ValueError("plot_fidelity_tradeoff needs at least one restorer row (with psnr_restored)")
    none = next((r for r in results["rows"] if r["restorer"] == "none"), None)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    for ax, key, xlabel in ((axes[0], "psnr_restored", "PSNR of the restored attacked image to the clean one (dB)"),
                            (axes[1], "psnr_clean", "PSNR of the restored clean image to itself (dB)")):
        for k, r in enumerate(rows):  # numbered points, named once in the figure's legend below (names collide)
            name = r["restorer"].removeprefix(strip)
            ax.scatter(r[key], r["attacked"], color=f"C{k % 10}", s=40, zorder=3, label=f"{k + 1}: {name}")
            ax.annotate(str(k + 1), (r[key], r["attacked"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if none is not None:
            ax.axhline(none["attacked"], color="grey", ls=":", lw=1, label="undefended")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    base = rows[0]["psnr_attacked"]
    axes[0].axvline(base, color="k", ls="--", lw=1, label=f"attacked input ({base:.1f} dB)")
    axes[0].axvline(base + 5, color="C3", ls="--", lw=1, label="target: +5 dB")
    axes[1].axvline(32, color="C3", ls="--", lw=1, label="target: 32 dB")
    axes[0].set_ylabel(f"mean accuracy after restoration under {results.get('attack', 'attack').upper()} (%)",
                       fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    n = len(rows)
    fig.legend(handles[:n], labels[:n], fontsize=7, loc="lower center", ncol=min(n, 4), frameon=False)
    for ax in axes:  # each panel's own reference lines; the points are named once, in the figure's legend
        h, lab = ax.get_legend_handles_labels()
        ax.legend(h[n:], lab[n:], fontsize=7, loc="lower right")
    fig.suptitle(f"fidelity against robustness: {results.get('images', '?')} validation images, "
                 f"{len(rows[0].get('members', {})) or '?'} classifiers, eps {results.get('eps', '?')}", fontsize=9)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * ((n + 3) // 4), 1, 1))  # room for the restorers' legend
    return _save(fig, path)
