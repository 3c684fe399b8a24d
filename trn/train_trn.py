"""Train a TRN against a frozen guard: ``trn train --config configs/trn_fmnist.yaml``.

Each step splits the batch into chunks: one stays clean (it must pass through unharmed), the others are attacked on
the fly against the guard with an attack and a Linf budget drawn at random (FGSM, BIM, PGD, MIM, CW-L2). The loss is
``L1(restored, clean) + guard_weight * KL(guard(clean) || guard(restored))``: the first pulls pixels back, the second
makes sure what is left of the perturbation no longer moves the classifier.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from trn.attacks import create_attack
from trn.checkpoint import checkpoint_paths, load_checkpoint, load_training_state, save_checkpoint, training_state
from trn.config import to_dict
from trn.data import ImageDataset, load_dataset
from trn.errors import CheckpointError, ConfigError
from trn.gradients import GradientMapEstimator, map_channels
from trn.model import TRNConfig, create_trn
from trn.restorer import Restorer
from trn.utils import batches, pick_device, seed_everything

__all__ = [
    "TRNTrainConfig",
    "TrainingRun",
    "build_training",
    "cosine_lr",
    "make_adversarial_batch",
    "run_epochs",
    "save_restorer",
    "split_train_val",
    "train_step",
    "train_trn",
]
log = logging.getLogger(__name__)

_TRAIN_ATTACKS = ("fgsm", "bim", "pgd", "mim", "cw")


@dataclass(frozen=True)
class TRNTrainConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    guard: str = "checkpoints/fmnist_guard"   # frozen guard classifier checkpoint
    arch: str = "trn_small_28"                 # model.create_trn variant
    two_stream: bool = True                    # False trains the one-stream ablation the same way
    estimator_mode: str = "topk"               # gradients.estimate_gradient_map mode (argmax|topk|hybrid)
    estimator_k: int = 3
    estimator_scale: str = "std"
    estimator_confidence: float = 0.6          # hybrid: argmax map below this top-1 probability, topk above
    attacks: list[str] = field(default_factory=lambda: list(_TRAIN_ATTACKS))
    eps_min: float = 0.02                      # Linf budgets drawn uniformly from [eps_min, eps_max] per chunk
    eps_max: float = 0.22
    attack_steps: int = 7                      # BIM/PGD/MIM steps while training (eval uses 40)
    cw_steps: int = 20
    cw_lr: float = 0.02                        # CW's Adam step; 0.05 fools ~94% of training images in 20 steps, 0.02 ~72%
    chunks: int = 4                            # chunks per batch: 1 clean + (chunks - 1) attacked
    clean_chunks: int = 1
    epochs: int = 3
    limit_train: int | None = None             # train on a seeded subset (quick runs, tests)
    batch_size: int = 128
    lr: float = 2e-3                           # AdamW, cosine decay to 0
    weight_decay: float = 1e-4
    guard_weight: float = 0.5                  # weight of the KL term on the guard's output
    seed: int = 0
    device: str = "auto"
    out: str = "checkpoints/trn_fmnist"
    resume: bool = True                        # continue from OUT.train_state if present
    init_from: str | None = None               # start from this restorer checkpoint's net (a fine-tuning stage)
    val_size: int = 500                        # training images held out (seeded) for the check after each epoch

    def __post_init__(self) -> None:
        bad = [a for a in self.attacks if a not in _TRAIN_ATTACKS]
        if bad or not self.attacks:
            raise ConfigError(f"attacks must be a non-empty subset of {list(_TRAIN_ATTACKS)}, got {self.attacks}")
        if not 0 <= self.eps_min <= self.eps_max:
            raise ConfigError(f"need 0 <= eps_min <= eps_max, got {self.eps_min}, {self.eps_max}")
        if not 1 <= self.clean_chunks <= self.chunks:
            raise ConfigError(f"need 1 <= clean_chunks <= chunks, got {self.clean_chunks}, {self.chunks}")


def make_adversarial_batch(guard: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TRNTrainConfig,
                           rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    """Attack all but ``clean_chunks`` chunks of ``x`` with randomly drawn attacks/budgets; return (x_in, tags)."""
    x_in, tags = x.clone(), []
    for i, s in enumerate(batches(len(x), -(-len(x) // cfg.chunks))):
        if i < cfg.clean_chunks:
            tags.append("clean")
            continue
        name, eps = rng.choice(cfg.attacks), rng.uniform(cfg.eps_min, cfg.eps_max)
        if name == "cw":
            atk = create_attack("cw", steps=cfg.cw_steps, lr=cfg.cw_lr, c=rng.choice([0.5, 1.0, 5.0]), seed=rng.randrange(2**31))
        elif name == "fgsm":
            atk = create_attack("fgsm", eps=eps)
        else:
            atk = create_attack(name, eps=eps, steps=cfg.attack_steps, seed=rng.randrange(2**31))
        x_in[s] = atk(guard, x[s], y[s])
        tags.append(f"{name}@{eps:.3f}" if name != "cw" else "cw")
    return x_in, tags


def _train_state_path(out: str) -> Path:
    """Training state (net + optimizer + RNG) lives beside the checkpoint: OUT_train_state.safetensors/.json."""
    return Path(str(checkpoint_paths(out)[0].with_suffix("")) + "_train_state")


def _save_train_state(cfg: TRNTrainConfig, restorer: Restorer, opt: torch.optim.Optimizer, epoch: int,
                      history: list[dict]) -> None:
    state = training_state(restorer.net, opt)
    state["rng.torch"] = torch.get_rng_state()
    meta = {"kind": "train_state", "epoch": epoch, "config": to_dict(cfg), "history": history}
    save_checkpoint(_train_state_path(cfg.out), state, meta)


def _load_train_state(cfg: TRNTrainConfig, restorer: Restorer, opt: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    """Restore net/optimizer/RNG from OUT.train_state; return (finished epochs, their validation history)."""
    path = _train_state_path(cfg.out)
    if not cfg.resume or not checkpoint_paths(path)[0].is_file():
        return 0, []
    state, meta = load_checkpoint(path, restorer.device)
    if meta.get("config") != to_dict(cfg):
        raise CheckpointError(f"{path}: saved with a different config; delete it or set resume: false")
    load_training_state(state, restorer.net, opt)
    torch.set_rng_state(state["rng.torch"].cpu())
    log.info("resumed from %s after epoch %d", path, meta["epoch"])
    return int(meta["epoch"]), list(meta.get("history", []))


def _init_from(cfg: TRNTrainConfig, net: torch.nn.Module, device: torch.device) -> dict:
    """Load ``cfg.init_from``'s network weights into ``net``; return its provenance for the new metadata.

    The earlier stage must have the same architecture and guard: fine-tuning a net against another guard would
    silently mix two gradient-map distributions.
    """
    state, meta = load_checkpoint(cfg.init_from, device)
    if meta.get("kind") != "restorer":
        raise CheckpointError(f"init_from {cfg.init_from}: not a restorer checkpoint (kind={meta.get('kind')!r})")
    try:
        same = TRNConfig(**meta.get("trn", {})) == net.cfg  # fields added since take their defaults
    except TypeError:
        same = False
    if not same:
        raise CheckpointError(f"init_from {cfg.init_from}: network {meta.get('trn')} differs from {vars(net.cfg)}")
    prev_guard = (meta.get("guard") or {}).get("path")
    if prev_guard is not None and Path(prev_guard) != Path(cfg.guard):
        raise CheckpointError(f"init_from {cfg.init_from}: trained against guard {prev_guard}, not {cfg.guard}")
    net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    log.info("initialised from %s", cfg.init_from)
    stage = {k: meta.get(k) for k in ("config", "history", "train_seconds", "init_from")}
    return {"init_from": {"path": cfg.init_from, **stage}}


@torch.no_grad()
def _quick_val(restorer: Restorer, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Guard accuracy on clean and PGD-10 (eps 0.1, gray-box) images, before and after restoration."""
    guard = restorer.guard
    x_adv = create_attack("pgd", eps=0.1, steps=10, seed=1)(guard, x, y)
    acc = lambda z: (guard(z).argmax(1) == y).float().mean().item()
    return {"clean": acc(x), "clean_restored": acc(restorer(x)), "pgd": acc(x_adv), "pgd_restored": acc(restorer(x_adv))}


def split_train_val(train: ImageDataset, val_size: int, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Hold ``val_size`` seeded images of the TRAINING set out for the per-epoch check; train on the rest.

    The test split is never looked at while training (it is what ``trn eval`` reports on).

    Raises:
        ConfigError: ``val_size`` leaves no training images.
    """
    if val_size < 0 or val_size >= len(train):
        raise ConfigError(f"val_size must be in [0, {len(train)}) for {len(train)} training images, got {val_size}")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    val = ImageDataset(train.images[val_idx], train.labels[val_idx], train.class_names, f"{train.name}[val]")
    rest = ImageDataset(train.images[train_idx], train.labels[train_idx], train.class_names, train.name)
    return rest, val


@dataclass
class TrainingRun:
    """What one training process (or one DDP rank) holds: data, networks, optimiser, schedule."""

    cfg: TRNTrainConfig
    train: ImageDataset
    val: ImageDataset
    restorer: Restorer
    opt: torch.optim.Optimizer
    init: dict
    steps_per_epoch: int
    device: torch.device


def build_training(cfg: TRNTrainConfig, device: torch.device | None = None) -> TrainingRun:
    """Seed everything, load the data (training set minus the validation hold-out), build net, restorer, AdamW."""
    seed_everything(cfg.seed)
    device = device or pick_device(cfg.device)
    full = load_dataset(cfg.dataset, cfg.data_dir, "train")
    train, val = split_train_val(full, cfg.val_size, cfg.seed)
    train = train.subset(cfg.limit_train, cfg.seed)
    c = train.shape[0]
    estimator = GradientMapEstimator(cfg.estimator_mode, cfg.estimator_k, cfg.estimator_scale,
                                     cfg.estimator_confidence)
    m = map_channels(cfg.estimator_mode, c) if cfg.two_stream else c
    net = create_trn(cfg.arch, in_channels=c, two_stream=cfg.two_stream, grad_channels=0 if m == c else m)
    restorer = Restorer.from_guard_checkpoint(cfg.guard, net, estimator, device)
    init = _init_from(cfg, net, device) if cfg.init_from else {}
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return TrainingRun(cfg, train, val, restorer, opt, init, -(-len(train) // cfg.batch_size), device)


def train_step(net: torch.nn.Module, restorer: Restorer, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, cfg: TRNTrainConfig, rng: random.Random, lr: float) -> tuple[float, float]:
    """One optimisation step on a batch (the single-process loop and every DDP rank run exactly this).

    ``net`` is ``restorer.net`` or its DDP wrapper (which averages the gradients over ranks in ``backward``).

    Returns:
        (L1 pixel loss, KL guard loss) of this batch.

    Shape:
        x: (B, C, H, W) clean images in [0, 1]; y: (B,) labels.
    """
    guard = restorer.guard
    x_in, _ = make_adversarial_batch(guard, x, y, cfg, rng)
    with torch.no_grad():
        p_clean = F.log_softmax(guard(x), 1)
    g = restorer.gradient_map(x_in) if cfg.two_stream else None
    restored = net(x_in, g)
    pixel = F.l1_loss(restored, x)
    kl = F.kl_div(F.log_softmax(guard(restored), 1), p_clean, log_target=True, reduction="batchmean")
    loss = pixel + cfg.guard_weight * kl
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return pixel.item(), kl.item()


def cosine_lr(cfg: TRNTrainConfig, step: int, total_steps: int) -> float:
    """Cosine decay from ``cfg.lr`` to 0, a pure function of the step (resume-safe)."""
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * step / total_steps))


def run_epochs(run: TrainingRun, net: torch.nn.Module, start_epoch: int = 0, history: list[dict] | None = None,
               rank: int = 0, world: int = 1,
               on_epoch: Callable[[int, list[dict], list[float]], None] | None = None) -> list[dict]:
    """Train from ``start_epoch`` to ``cfg.epochs``; return the validation history (rank 0 validates).

    Every rank draws the same global batches (one seeded permutation per epoch) and trains on its share
    ``batch[rank::world]``, so with DDP averaging the gradients, ``world`` ranks take the steps one process would.

    Args:
        run: from :func:`build_training`.
        net: ``run.restorer.net`` or its DDP wrapper.
        on_epoch: called after each epoch with (epochs done, history, this epoch's per-step total losses).
    """
    cfg, train, device = run.cfg, run.train, run.device
    history = list(history or [])
    total_steps = cfg.epochs * run.steps_per_epoch
    step = start_epoch * run.steps_per_epoch
    rng = random.Random(cfg.seed + start_epoch + 7919 * rank)
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        losses: list[float] = []
        bar = tqdm(batches(len(train), cfg.batch_size), total=run.steps_per_epoch,
                   desc=f"trn epoch {epoch + 1}/{cfg.epochs}", disable=rank != 0)
        for s in bar:
            idx = perm[s][rank::world]
            x, y = train.images[idx].to(device), train.labels[idx].to(device)
            pixel, kl = train_step(net, run.restorer, run.opt, x, y, cfg, rng, cosine_lr(cfg, step, total_steps))
            losses.append(pixel + cfg.guard_weight * kl)
            step += 1
            bar.set_postfix(l1=f"{pixel:.4f}", kl=f"{kl:.3f}")
        net.eval()
        if rank == 0:
            val = _quick_val(run.restorer, run.val.images.to(device), run.val.labels.to(device))
            history.append({"epoch": epoch + 1, "loss": sum(losses) / max(1, len(losses)), **val})
            log.info("epoch %d val (%d training images held out): %s", epoch + 1, len(run.val),
                     {k: round(v, 4) for k, v in val.items()})
        if on_epoch is not None:
            on_epoch(epoch + 1, history, losses)
    run.restorer.eval()
    return history


def save_restorer(run: TrainingRun, history: list[dict], seconds: float, out: str | None = None, **extra: Any) -> Path:
    """Save the trained restorer as ``out`` (default ``cfg.out``): safetensors + JSON, the config and history."""
    cfg = run.cfg
    return run.restorer.save(out or cfg.out, config=to_dict(cfg), history=history, train_images=len(run.train),
                             val_images=len(run.val), **run.init, train_seconds=round(seconds, 1),
                             dataset=cfg.dataset, torch=torch.__version__, **extra)


def train_trn(cfg: TRNTrainConfig) -> Restorer:
    """Train per ``cfg`` in this process; save ``cfg.out`` as a restorer checkpoint (safetensors + JSON).

    ``trn train --workers N`` runs the same :func:`run_epochs` on N Ray Train workers (:mod:`trn_workers.train`).
    """
    run = build_training(cfg)
    start_epoch, history = _load_train_state(cfg, run.restorer, run.opt)  # history: earlier epochs' validation
    t0 = time.time()

    def checkpoint_epoch(epoch: int, hist: list[dict], losses: list[float]) -> None:
        _save_train_state(cfg, run.restorer, run.opt, epoch, hist)

    history = run_epochs(run, run.restorer.net, start_epoch, history, on_epoch=checkpoint_epoch)
    path = save_restorer(run, history, time.time() - t0)
    log.info("saved %s", path)
    return run.restorer
