"""Train a guard/downstream classifier: ``trn train-classifier --config configs/classifier_fmnist.yaml``.

Two robust-training options, both baselines for the defence table (``trn eval-defenses``):

* ``regularizer: gfa``: DeepDefense gradient-feature alignment (:mod:`trn.defenses.gfa`),
  ``loss = CE + gfa_lambda * sum_l (1 - cos(dL/dh_l, h_l))`` over ``gfa_layers`` (``first``: the input; ``deep``:
  the input and every conv block). A step costs about 4.5 plain steps for FIRST (double backward; measured on
  the 2-core CPU), ~7 for DEEP.
* ``adv_train: pgd``: Madry et al. (2018) adversarial training, ``min_theta E max_{||d||_inf <= adv_eps} CE``: each
  batch is replaced by its PGD-``adv_steps`` adversarial version (random start, model in eval mode while attacking)
  and the model is trained on those alone. Costs about ``adv_steps + 1`` plain steps.
* ``adv_train: trades``: TRADES (Zhang et al. 2019), ``CE(f(x), y) + trades_beta * KL(f(x) || f(x'))`` with ``x'``
  the PGD-``adv_steps`` maximiser of that KL term in the ``adv_eps`` Linf ball (started at ``x + 0.001 * N(0, 1)``,
  model in eval mode while attacking). Costs about ``adv_steps + 2`` plain steps.

GFA can be combined with ``pgd`` (the penalty is then taken at the adversarial images), not with ``trades``.

Model selection never looks at the test set: ``val_size`` training images (seeded) are held out, and after every
epoch the model is scored on them, by clean accuracy or, when adversarially training, by PGD-10 robust accuracy at
``adv_eps`` (``select_by``). The best epoch's weights are the ones saved; ``patience`` stops training after that many
epochs without a better score. The test split is read once, at the end, for the ``test_accuracy`` the checkpoint
records.

Resumable: after every epoch the whole training state (weights, optimizer, schedule, RNGs, validation history, best
weights) is written to ``OUT_train_state`` (safetensors + JSON); a rerun with the same config continues after the last
finished epoch, and the file is removed once ``OUT`` is saved.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from trn.attacks import PGD
from trn.checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from trn.classifiers import create_classifier, save_classifier
from trn.config import to_dict
from trn.data import ImageDataset, load_dataset
from trn.defenses.gfa import gfa_penalty
from trn.errors import CheckpointError, ConfigError
from trn.utils import accuracy, batches, eval_mode, pick_device, seed_everything

__all__ = [
    "ClassifierTrainConfig",
    "augment",
    "evaluate_classifier",
    "split_validation",
    "trades_adversary",
    "trades_loss",
    "train_classifier",
    "validation_indices",
]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierTrainConfig:
    dataset: str = "fashion-mnist"      # any name load_dataset knows
    data_dir: str | None = None         # None: the dataset's default location
    arch: str = "small_cnn"             # classifiers.create_classifier name
    arch_kwargs: dict = field(default_factory=dict)
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.05                    # peak learning rate of the one-cycle schedule
    optimizer: Literal["sgd", "adamw"] = "sgd"  # sgd: Nesterov momentum 0.9; adamw: for attention models (zoo_vit)
    weight_decay: float = 5e-4
    augment: bool = True                # random 2-pixel shifts + horizontal flips (both label-preserving here)
    seed: int = 0
    device: str = "auto"
    out: str = "checkpoints/fmnist_guard"
    regularizer: Literal["none", "gfa"] = "none"     # gfa: DeepDefense gradient-feature alignment
    gfa_layers: Literal["first", "deep"] = "first"   # FIRST: align at the input only; DEEP: also every conv block
    gfa_lambda: float = 1.0                           # weight of the alignment term (the paper's value is unknown)
    adv_train: Literal["none", "pgd", "trades"] = "none"  # pgd: Madry AT (PGD images only); trades: TRADES
    adv_eps: float = 0.1                              # Linf budget of the training attack (the eval's main eps)
    adv_steps: int = 7                                # PGD steps per batch (each costs about one training step)
    adv_alpha: float | None = None                    # PGD step size; None: 2.5 * adv_eps / adv_steps
    trades_beta: float = 6.0                          # TRADES weight of the KL (robustness) term; the paper's 6
    val_size: float = 0.1                             # held-out TRAINING images: < 1 a fraction, >= 1 a count, 0 none
    val_robust_steps: int = 10                        # PGD steps of the robust validation (adv_train only)
    val_robust_limit: int | None = 1000               # validation images attacked each epoch; None: all
    select_by: Literal["auto", "clean", "robust", "last"] = "auto"  # auto: robust when adv_train, else clean
    patience: int | None = None                       # stop after this many epochs without a better score; None: never
    resume: bool = True                               # continue from OUT_train_state (written after every epoch)
    limit_train: int | None = None                    # seeded training subset (quick runs, tests); None: all
    limit_test: int | None = None                     # seeded test subset for the final test accuracy; None: all

    def __post_init__(self) -> None:
        if self.gfa_lambda < 0:
            raise ConfigError(f"gfa_lambda must be >= 0, got {self.gfa_lambda}")
        if self.adv_eps < 0 or self.adv_steps < 1 or (self.adv_alpha is not None and self.adv_alpha <= 0):
            raise ConfigError(f"adversarial training needs adv_eps >= 0, adv_steps >= 1 and adv_alpha > 0, got "
                              f"{self.adv_eps}, {self.adv_steps}, {self.adv_alpha}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("limit_train", "limit_test", "val_robust_limit", "patience"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be a positive integer or null, got {v}")
        if self.val_size < 0 or (self.val_size >= 1 and self.val_size != int(self.val_size)):
            raise ConfigError(f"val_size must be 0, a fraction in (0, 1) or a whole number of images, got "
                              f"{self.val_size}")
        if self.trades_beta < 0 or self.val_robust_steps < 1:
            raise ConfigError(f"need trades_beta >= 0 and val_robust_steps >= 1, got {self.trades_beta}, "
                              f"{self.val_robust_steps}")
        if self.adv_train == "trades" and self.regularizer == "gfa":
            raise ConfigError("regularizer=gfa combines with adv_train=pgd or none, not with trades")
        if self.select_by == "robust" and self.adv_train == "none":
            raise ConfigError("select_by=robust needs adv_train (pgd or trades): its eps is adv_eps")
        if self.patience is not None and (self.select_by == "last" or self.val_size == 0):
            raise ConfigError("patience needs a validation score: set val_size > 0 and select_by != last")

    @property
    def selection(self) -> str:
        """The validation score that picks the saved epoch: ``clean``, ``robust`` or ``last`` (no selection)."""
        if self.val_size == 0:
            return "last"
        if self.select_by == "auto":
            return "robust" if self.adv_train != "none" else "clean"
        return self.select_by


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Batched random shift (reflect-padded crop) and horizontal flip."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()  # one shift per batch: cheap, enough
    x = xp[..., dy : dy + h, dx : dx + w]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)


def make_optimizer(cfg: ClassifierTrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (CNNs) or AdamW (transformers train poorly with plain SGD at these budgets)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)


def validation_indices(n: int, val_size: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (validation, rest) indices :func:`split_validation` picks from a training set of ``n`` images, sorted.

    Raises:
        ConfigError: the split would leave no training images.
    """
    k = 0 if val_size == 0 else max(1, round(val_size * n)) if val_size < 1 else int(val_size)
    if k >= n:
        raise ConfigError(f"val_size={val_size:g} holds out {k} of {n} training images: nothing left to train on")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    return perm[:k].sort().values, perm[k:].sort().values


def split_validation(train: ImageDataset, val_size: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Hold out a seeded validation split of the TRAINING set; return (rest, validation).

    Args:
        train: the training set.
        val_size: < 1: that fraction of ``train`` (rounded, at least 1 image); >= 1: that many images; 0: none.
        seed: the split's seed (the same seed, the same split).

    Raises:
        ConfigError: the split would leave no training images.
    """
    val_idx, train_idx = validation_indices(len(train), val_size, seed)
    val = ImageDataset(train.images[val_idx], train.labels[val_idx], train.class_names, f"{train.name}[val]")
    rest = ImageDataset(train.images[train_idx], train.labels[train_idx], train.class_names, train.name)
    return rest, val


def trades_adversary(model: torch.nn.Module, x: torch.Tensor, eps: float, steps: int, alpha: float,
                     gen: torch.Generator | None = None) -> torch.Tensor:
    """TRADES' inner maximisation: PGD on ``KL(f(x) || f(x'))`` in the Linf ``eps`` ball, from ``x + 0.001 N(0, 1)``.

    The model runs in eval mode (restored after); no parameter gradient is accumulated.

    Shape:
        x: (B, C, H, W) in [0, 1] -> (B, C, H, W) in [0, 1], ``||x' - x||_inf <= eps``.
    """
    with eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            p_clean = F.softmax(model(x), 1)
        noise = torch.randn(x.shape, generator=gen).to(x.device) if gen is not None else torch.randn_like(x)
        x_adv = (x + 0.001 * noise).clamp(0.0, 1.0).detach()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(x_adv), 1), p_clean, reduction="sum")
            (g,) = torch.autograd.grad(kl, x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv.detach()


def trades_loss(model: torch.nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                beta: float) -> torch.Tensor:
    """``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` (batch mean), in the model's current (training) mode."""
    logits = model(x)
    kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
    return F.cross_entropy(logits, y) + beta * kl


def evaluate_classifier(model: torch.nn.Module, ds: ImageDataset, robust_eps: float | None = None,
                        robust_steps: int = 10, robust_limit: int | None = None, seed: int = 0,
                        batch_size: int = 500) -> dict[str, float]:
    """Clean accuracy on ``ds`` and, with ``robust_eps``, PGD-``robust_steps`` (Linf, random start, seeded) accuracy
    on the first ``robust_limit`` images. Eval mode inside; the model's mode is restored after."""
    device = next(model.parameters()).device
    with eval_mode(model):
        out = {"clean": accuracy(model, ds.images, ds.labels)}  # batched on the model's device
        if robust_eps is not None:
            n = len(ds) if robust_limit is None else min(robust_limit, len(ds))
            attack = PGD(eps=robust_eps, steps=robust_steps, random_start=True, seed=seed)
            correct = 0
            for s in batches(n, batch_size):
                x, y = ds.images[s].to(device), ds.labels[s].to(device)
                with torch.no_grad():
                    correct += int((model(attack(model, x, y)).argmax(1) == y).sum())
            out["robust"] = correct / max(n, 1)
    return out


def _state_path(out: str) -> Path:
    return Path(str(checkpoint_paths(out)[0].with_suffix("")) + "_train_state")


def _save_state(cfg: ClassifierTrainConfig, epoch: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator, history: list, best: dict,
                stopped_early: bool) -> None:
    """Everything a rerun needs to continue after ``epoch`` (1-based, finished)."""
    opt_sd = opt.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"opt.{i}.{name}": t for i, st in opt_sd["state"].items() for name, t in st.items()
                    if isinstance(t, torch.Tensor)})
    if best["state"] is not None:
        tensors.update({f"best.{k}": v for k, v in best["state"].items()})
    tensors["rng.gen"], tensors["rng.torch"] = gen.get_state(), torch.get_rng_state()
    meta = {"kind": "classifier_train_state", "epoch": epoch, "config": to_dict(cfg), "history": history,
            "best_score": best["score"], "best_epoch": best["epoch"], "stopped_early": stopped_early,
            "param_groups": opt_sd["param_groups"], "scheduler": sched.state_dict()}
    save_checkpoint(_state_path(cfg.out), tensors, meta)


def _load_state(cfg: ClassifierTrainConfig, model: torch.nn.Module, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator) -> tuple[int, list, dict, bool]:
    """Restore a state written by :func:`_save_state`; (finished epochs, history, best, stopped early)."""
    state, meta = load_checkpoint(_state_path(cfg.out))
    if meta.get("kind") != "classifier_train_state":
        raise CheckpointError(f"{_state_path(cfg.out)} is not a classifier training state")
    now = to_dict(cfg)
    changed = sorted(k for k in set(meta["config"]) | set(now)
                     if k != "device" and meta["config"].get(k) != now.get(k))  # the device may change
    if changed:
        raise ConfigError(f"{_state_path(cfg.out)}.* was written with a different config ({', '.join(changed)}): "
                          f"delete it to start over, or set resume=false")
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    opt_state: dict = {}
    for k, v in state.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    gen.set_state(state["rng.gen"])
    torch.set_rng_state(state["rng.torch"])
    best_state = {k[5:]: v for k, v in state.items() if k.startswith("best.")} or None
    best = {"score": meta["best_score"], "epoch": meta["best_epoch"], "state": best_state}
    return meta["epoch"], meta["history"], best, meta["stopped_early"]


def train_classifier(cfg: ClassifierTrainConfig) -> dict:
    """Train per ``cfg``, save ``cfg.out`` (.safetensors + .json) and return the metadata.

    The metadata holds the per-epoch validation scores (``val_history``), the epoch whose weights were saved
    (``best_epoch``), whether training stopped early, and the saved model's accuracy on the test split.
    """
    gen = seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    full = load_dataset(cfg.dataset, cfg.data_dir, "train").subset(cfg.limit_train, cfg.seed)
    train, val = split_validation(full, cfg.val_size, cfg.seed)
    log.info("train %s | validation %d held-out training images", train.describe(), len(val))
    c, h, _ = train.shape
    arch_kwargs = {"in_channels": c, "num_classes": train.num_classes, **cfg.arch_kwargs}
    if cfg.arch == "small_cnn":
        arch_kwargs.setdefault("image_size", h)
    model = create_classifier(cfg.arch, **arch_kwargs).to(device)
    opt = make_optimizer(cfg, model)
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    attack = None
    adv_alpha = cfg.adv_alpha or 2.5 * cfg.adv_eps / cfg.adv_steps
    if cfg.adv_train == "pgd":
        # a fresh random start per batch: seed=None draws from the global RNG, which seed_everything seeded
        attack = PGD(eps=cfg.adv_eps, steps=cfg.adv_steps, alpha=cfg.adv_alpha, random_start=True, seed=None)
    log.info("regularizer=%s%s, adv_train=%s%s, selection=%s%s", cfg.regularizer,
             f" ({cfg.gfa_layers}, lambda={cfg.gfa_lambda:g})" if cfg.regularizer == "gfa" else "", cfg.adv_train,
             f" (PGD-{cfg.adv_steps}, eps={cfg.adv_eps:g})" if cfg.adv_train != "none" else "", cfg.selection,
             f", patience {cfg.patience}" if cfg.patience else "")
    robust_eps = cfg.adv_eps if cfg.adv_train != "none" else None
    t0, history, start = time.time(), [], 0
    best: dict = {"score": float("-inf"), "epoch": None, "state": None}
    stopped_early = False
    if cfg.resume and checkpoint_paths(_state_path(cfg.out))[0].is_file():
        start, history, best, stopped_early = _load_state(cfg, model, opt, sched, gen)
        log.info("resumed %s after epoch %d of %d", _state_path(cfg.out), start, cfg.epochs)
    epoch = start - 1
    for epoch in range(start, cfg.epochs if not stopped_early else start):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        bar = tqdm(batches(len(train), cfg.batch_size), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        for s in bar:
            idx = perm[s]
            x, y = train.images[idx].to(device), train.labels[idx].to(device)
            if cfg.augment:
                x = augment(x, gen)
            penalty = None
            if cfg.adv_train == "trades":
                x_adv = trades_adversary(model, x, cfg.adv_eps, cfg.adv_steps, adv_alpha)
                loss = trades_loss(model, x, x_adv, y, cfg.trades_beta)
            else:
                if attack is not None:
                    x = attack(model, x, y)  # eval mode inside, train mode restored after
                if cfg.regularizer == "gfa":
                    penalty, logits = gfa_penalty(model, x, y, cfg.gfa_layers, return_logits=True)
                    loss = F.cross_entropy(logits, y) + cfg.gfa_lambda * penalty
                else:
                    loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            postfix = {"loss": f"{loss.item():.3f}"}
            if penalty is not None:
                postfix["gfa"] = f"{penalty.item():.3f}"
            bar.set_postfix(postfix)
        if len(val):
            scores = evaluate_classifier(model, val, robust_eps, cfg.val_robust_steps, cfg.val_robust_limit, cfg.seed)
            history.append({"epoch": epoch + 1, **scores})
            log.info("epoch %d: validation %s", epoch + 1, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            if cfg.selection != "last" and scores[cfg.selection] > best["score"]:
                best = {"score": scores[cfg.selection], "epoch": epoch + 1,
                        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            elif cfg.patience is not None and epoch + 1 - best["epoch"] >= cfg.patience:
                log.info("early stop after epoch %d: no better %s validation accuracy than epoch %d's %.4f for %d "
                         "epochs", epoch + 1, cfg.selection, best["epoch"], best["score"], cfg.patience)
                stopped_early = True
        if cfg.resume:
            _save_state(cfg, epoch + 1, model, opt, sched, gen, history, best, stopped_early)
        if stopped_early:
            break
    epochs_run = epoch + 1
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    saved_epoch = best["epoch"] or epochs_run
    test = load_dataset(cfg.dataset, cfg.data_dir, "test").subset(cfg.limit_test, cfg.seed)
    model.eval()
    test_acc = accuracy(model, test.images, test.labels)
    meta = {
        "dataset": cfg.dataset, "image_shape": list(train.shape), "class_names": list(train.class_names),
        "test_accuracy": test_acc, "test_images": len(test), "train_images": len(train), "val_images": len(val),
        "val_history": history, "selection": cfg.selection, "best_epoch": saved_epoch, "epochs_run": epochs_run,
        "stopped_early": stopped_early, "train_seconds": round(time.time() - t0, 1), "config": to_dict(cfg),
        "torch": torch.__version__,
    }
    if best["epoch"] is not None:
        meta["best_val_accuracy"] = best["score"]
    path = save_classifier(cfg.out, model, cfg.arch, arch_kwargs, meta)
    for p in checkpoint_paths(_state_path(cfg.out)):
        p.unlink(missing_ok=True)  # finished: nothing to resume
    log.info("saved %s (epoch %d of %d; test accuracy %.4f)", path, saved_epoch, epochs_run, test_acc)
    return meta
