"""Fit a shipped restorer to a user's classifier and data: ``trn fit --classifier my.pt --data DIR``.

The fast path of issue 10: start from a shipped restorer (by default the downstream-agnostic one) and fine-tune its
network for a few thousand images against *your* classifier, with the agnostic recipe (:mod:`trn.train_agnostic`):
attacks crafted on your classifier, KL consistency on its outputs, fidelity to the clean image. The gradient map
comes from the restorer's own guard (``map_from: guard``), or from your classifier (``map_from: downstream``: then
deploy it as ``{name: trn, checkpoint: OUT, map_from: YOUR_CLASSIFIER}``); either way your classifier is not copied
into the checkpoint. Minutes on a CPU for Fashion-MNIST-sized data.

Data: an image folder (one sub-folder per class), an ``.npz`` file (``images`` + ``labels``) or a built-in dataset
name (``fashion-mnist``: its training split). A validation split is carved from it for the before/after check.

    >>> r = fit(FitConfig(classifier="my.pt2", data="train.npz", out="runs/fit/my_trn"))
    >>> r.restore(x_adv)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trn.checkpoint import checkpoint_paths
from trn.data import ImageDataset, load_dataset
from trn.downstream import load_downstream
from trn.errors import ConfigError, DataError, ShapeError
from trn.restorer import CHECKPOINT_DIR, Restorer
from trn.train_agnostic import AgnosticTrainConfig, train_agnostic
from trn.utils import pick_device

__all__ = ["FitConfig", "fit", "load_fit_data"]
log = logging.getLogger(__name__)

_DEFAULT_START = "checkpoints/trn_fmnist_agnostic"


@dataclass(frozen=True)
class FitConfig:
    classifier: str                              # your classifier: trn checkpoint, TorchScript or torch.export .pt2
    data: str = "fashion-mnist"                  # image folder, .npz, or a built-in dataset name (training split)
    restorer: str = _DEFAULT_START               # the restorer checkpoint to start from
    out: str = "runs/fit/trn_fitted"
    images: int = 16384                          # training images seen (one pass); 256 steps at batch 64
    batch_size: int = 64
    lr: float = 1e-3                             # images / lr / kl_weight / mse_weight chosen on validation for the
    kl_weight: float = 3.0                       # ViT and the ResNet (docs/design.md, "Fitting to your classifier")
    mse_weight: float = 5.0
    clean_weight: float = 3.0
    eps_min: float = 0.02                        # each training chunk's attack: drawn from `attacks` (None: the
    eps_max: float = 0.16                        # agnostic mix, FGSM / BIM / PGD / MIM / CW-L2) at an eps drawn
    attacks: list[str] | None = None             # uniformly from [eps_min, eps_max], with attack_steps steps
    attack_steps: int = 7
    map_from: Literal["guard", "downstream"] = "guard"  # whose gradient map the fitted net reads: the restorer's
                                                 # guard, or your classifier (serve it with {name: trn, map_from: ...})
    widen_to: int | None = None                  # widen the restorer to this base width first (output unchanged,
                                                 # trn.widen): more capacity for one classifier, ~4x the time at 32
    val_size: int = 500                          # carved from the data: the before/after check
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("images", "batch_size", "val_size", "attack_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def load_fit_data(spec: str) -> ImageDataset:
    """An image folder, an ``.npz`` file, or a built-in dataset's training split, by what ``spec`` is."""
    p = Path(spec)
    if p.is_dir():
        return load_dataset("folder", p)
    if p.suffix == ".npz":
        if not p.is_file():
            raise DataError(f"data file not found: {p}")
        return load_dataset("npz", p)
    if p.exists():
        raise DataError(f"{p}: expected an image folder or an .npz file")
    return load_dataset(spec, None, "train")


def _start_path(spec: str) -> str:
    if checkpoint_paths(spec)[0].is_file():
        return spec
    shipped = CHECKPOINT_DIR / Path(spec).name
    if checkpoint_paths(shipped)[0].is_file():
        return str(shipped)
    raise ConfigError(f"restorer checkpoint not found: {spec} (train it or pass --restorer)")


def fit(cfg: FitConfig) -> Restorer:
    """Fine-tune ``cfg.restorer`` to ``cfg.classifier`` on ``cfg.data``; save ``cfg.out`` and return it.

    Raises:
        ShapeError: the data's images do not match the restorer, or the classifier does not fit the data.
        CheckpointError / DataError / ConfigError: missing or bad files.
    """
    start = _start_path(cfg.restorer)
    device = pick_device(cfg.device)
    # The training config first: a bad option (an unknown attack, an eps range) fails before the data is loaded.
    tcfg = AgnosticTrainConfig(
        dataset=cfg.data, zoo=[cfg.classifier], init_from=start, epochs=1, epoch_images=cfg.images,
        batch_size=cfg.batch_size, lr=cfg.lr, kl_weight=cfg.kl_weight, mse_weight=cfg.mse_weight,
        clean_weight=cfg.clean_weight, eps_min=cfg.eps_min, eps_max=cfg.eps_max, attack_steps=cfg.attack_steps,
        **({"attacks": list(cfg.attacks)} if cfg.attacks is not None else {}), val_size=cfg.val_size, seed=cfg.seed,
        device=str(device), out=cfg.out, resume=False, select_min_psnr=0.0, widen_to=cfg.widen_to,
        map_from="attacked" if cfg.map_from == "downstream" else "guard",
    )
    data = load_fit_data(cfg.data)
    base = Restorer.load(start, "cpu")
    if tuple(data.shape) != tuple(base.image_shape):
        raise ShapeError(f"the data's images are {tuple(data.shape)} but the restorer {start} takes "
                         f"{tuple(base.image_shape)}")
    if len(data) <= cfg.val_size:
        raise DataError(f"{len(data)} images are too few for a {cfg.val_size}-image validation split (set val_size)")
    clf = load_downstream(cfg.classifier, data.shape, data.num_classes, device)
    log.info("fitting %s to %s on %s (%d images)", start, cfg.classifier, data.describe(), cfg.images)
    r = train_agnostic(tcfg, data=data, zoo=[clf])
    hist = r.metadata.get("history", [])
    if hist:
        b, a = hist[0], hist[-1]
        log.info("validation (%d images, PGD-%d crafted on your classifier): robust %.4f -> %.4f, clean %.4f -> %.4f",
                 cfg.val_size, tcfg.val_attack_steps, b["pgd_restored"], a["pgd_restored"], b["clean_restored"],
                 a["clean_restored"])
    return r
