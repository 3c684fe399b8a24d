"""Train a downstream-agnostic restorer against a zoo of classifiers (issue 10).

``trn train --config configs/trn_fmnist.yaml`` trains a TRN that protects one guard: its loss rewards whatever image
the guard classifies like the clean one, so it learns to redraw inputs as the guard's prototypes. Here the restorer
must give back the *clean image*, for classifiers it never saw:

* **zoo**: classifiers of different families (``zoo``: checkpoint / TorchScript / export files). Each attacked chunk
  of a batch is crafted against one member drawn at random (``attack_target: random``), against the zoo's mean
  logits (``ensemble``: the perturbations that transfer best, Liu et al. 2017), or either (``mixed``), with an
  attack and Linf budget drawn at random (FGSM, BIM, PGD, MIM, CW-L2; ``random_sign``: tiled +-eps sign noise that
  reads no model, what Square-like query attacks start from);
* **fidelity**: ``L1 + mse_weight * MSE`` to the clean image, with the clean chunks weighted ``clean_weight`` times
  (clean images must come back untouched, >= 32 dB);
* **consistency**: ``kl_weight * mean_m KL(m(clean) || m(restored))`` averaged over the zoo members ``m``: what is
  left of the perturbation must not move any of them;
* **gradient map**: from the restorer's own guard (``map_from: guard``), the one classifier that ships inside the
  checkpoint, so the map the network reads at inference comes from the same model as in training whatever the
  downstream classifier is; or from the member each chunk was attacked on (``attacked``: clean and ensemble chunks
  take a random member's), which teaches the network to read *any* classifier's map, for deployments where the
  downstream classifier runs in-process and the map can come from it (:meth:`Restorer.with_map_from`); or either
  per chunk (``mixed``), for a net that serves both. Validation scores the view(s) the net is trained for.

Model selection uses a validation split carved from the *training* set (``val_size`` images held out of training):
after each epoch the net is scored by the zoo members' mean accuracy on restored clean and restored PGD-10 images
(crafted on each member), epochs whose clean images come back below ``select_min_psnr`` dB ranking last, and the
best epoch is what ``out`` holds (``select: last`` keeps the last epoch instead: for ablations whose objective the
score does not measure, e.g. fidelity alone). Resumable after every epoch (``OUT_train_state``).

    trn train-agnostic --config configs/trn_fmnist_agnostic.yaml     (or python -m trn.train_agnostic CONFIG)
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from trn.attacks import create_attack
from trn.checkpoint import (
    checkpoint_paths,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    training_state,
)
from trn.config import load_config, to_dict
from trn.data import ImageDataset, load_dataset
from trn.downstream import load_downstream
from trn.errors import CheckpointError, ConfigError
from trn.fidelity import psnr_per_image
from trn.gradients import GradientMapEstimator, map_channels
from trn.model import create_trn
from trn.restorer import Restorer
from trn.utils import batches, pick_device, seed_everything
from trn.widen import widen_trn

__all__ = ["AgnosticTrainConfig", "Ensemble", "agnostic_loss", "split_train_val", "train_agnostic",
           "validate_restorer"]
log = logging.getLogger(__name__)

_DEFAULT_ATTACKS = ("fgsm", "bim", "pgd", "mim", "cw")
_TRAIN_ATTACKS = (*_DEFAULT_ATTACKS, "random_sign")  # random_sign only when a config asks for it


@dataclass(frozen=True)
class AgnosticTrainConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    zoo: list[str] = field(default_factory=lambda: [                 # classifiers the restorer trains against
        "checkpoints/fmnist_guard", "checkpoints/zoo_fmnist_mlp", "checkpoints/zoo_fmnist_cnn"])
    attack_target: Literal["random", "ensemble", "mixed"] = "random"  # per chunk: one member, the zoo's mean logits,
                                                                      # or either (each option equally likely)
    map_from: Literal["guard", "attacked", "mixed"] = "guard"        # whose gradient map each chunk's restoration
                                                                      # reads: the restorer's guard, the member the
                                                                      # chunk was attacked on, or either (per chunk)
    guard: str = "checkpoints/fmnist_guard"   # used only without init_from (init_from brings its own guard)
    arch: str = "trn_small_28"
    estimator_mode: str = "hybrid"
    estimator_k: int = 3
    estimator_scale: str = "std"
    estimator_confidence: float = 0.6
    init_from: str | None = "checkpoints/trn_fmnist"  # restorer checkpoint: its net, guard and map settings
    widen_to: int | None = None                # widen init_from's net to this base width, output unchanged (trn.widen)
    attacks: list[str] = field(default_factory=lambda: list(_DEFAULT_ATTACKS))  # random_sign: tiled +-eps noise
    eps_min: float = 0.02
    eps_max: float = 0.16
    attack_steps: int = 7
    cw_steps: int = 20
    cw_lr: float = 0.03
    chunks: int = 4                            # chunks per batch: clean_chunks clean, the rest attacked
    clean_chunks: int = 1
    mse_weight: float = 20.0                   # fidelity: L1 + mse_weight * MSE (MSE is what PSNR reads)
    clean_weight: float = 3.0                  # clean chunks' fidelity counts this many times
    kl_weight: float = 0.5                     # consistency: KL averaged over the zoo members
    feature_weight: float = 0.0                # HGD-style consistency (Liao et al. 2018): relative L1 distance of
                                               # each member's penultimate features (forward_features), restored vs
                                               # clean, averaged over the zoo; 0: off
    epochs: int = 2
    epoch_images: int | None = None            # training images per epoch (fresh random draw); None: all of them
    batch_size: int = 128
    lr: float = 5e-4                           # AdamW, cosine decay to 0 over all epochs
    weight_decay: float = 1e-4
    val_size: int = 1000                       # held out of the TRAINING split for model selection
    val_attack_steps: int = 10
    val_noise: bool = False                    # selection also scores restored random-sign noise (eps 0.1, the
                                               # first queries of Square-like attacks): score = clean + PGD + noise
    select_min_psnr: float = 32.0              # selection: epochs whose clean images come back below this rank last
    select: Literal["score", "last"] = "score"  # out holds the best-scoring epoch, or the last one (ablations)
    seed: int = 0
    device: str = "auto"
    out: str = "checkpoints/trn_fmnist_agnostic"
    resume: bool = True

    def __post_init__(self) -> None:
        bad = [a for a in self.attacks if a not in _TRAIN_ATTACKS]
        if bad or not self.attacks:
            raise ConfigError(f"attacks must be a non-empty subset of {list(_TRAIN_ATTACKS)}, got {self.attacks}")
        if not self.zoo:
            raise ConfigError("zoo needs at least one classifier")
        if self.widen_to is not None and (not self.init_from or self.widen_to < 4):
            raise ConfigError("widen_to needs init_from (the net to widen) and a width >= 4")
        if not 0 <= self.eps_min <= self.eps_max:
            raise ConfigError(f"need 0 <= eps_min <= eps_max, got {self.eps_min}, {self.eps_max}")
        if not 0 <= self.clean_chunks <= self.chunks or self.chunks < 1:
            raise ConfigError(f"need 0 <= clean_chunks <= chunks and chunks >= 1, got {self.clean_chunks}, "
                              f"{self.chunks}")
        for name in ("epochs", "batch_size", "val_size", "val_attack_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epoch_images is not None and self.epoch_images < 1:
            raise ConfigError(f"epoch_images must be >= 1 or null, got {self.epoch_images}")
        if self.select not in ("score", "last"):
            raise ConfigError(f"select must be 'score' or 'last', got {self.select!r}")
        for name in ("mse_weight", "clean_weight", "kl_weight", "feature_weight", "lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


class Ensemble(nn.Module):
    """Mean logits of several classifiers ([0, 1] images in); the ``ensemble`` attack target."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted (validation, training) indices of :func:`split_train_val` for a dataset of ``n`` images."""
    if val_size >= n:
        raise ConfigError(f"val_size {val_size} leaves no training images out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    return perm[:val_size].sort().values, perm[val_size:].sort().values


def split_train_val(ds: ImageDataset, val_size: int, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Carve a seeded validation split of ``val_size`` images out of ``ds`` (what model selection reads)."""
    val_idx, tr_idx = split_indices(len(ds), val_size, seed)
    return (ImageDataset(ds.images[tr_idx], ds.labels[tr_idx], ds.class_names, f"{ds.name}[train]"),
            ImageDataset(ds.images[val_idx], ds.labels[val_idx], ds.class_names, f"{ds.name}[val]"))


def _attack(name: str, eps: float, cfg: AgnosticTrainConfig, rng: random.Random):
    if name == "cw":
        return create_attack("cw", steps=cfg.cw_steps, lr=cfg.cw_lr, c=rng.choice([0.5, 1.0, 5.0]),
                             seed=rng.randrange(2**31))
    if name == "fgsm":
        return create_attack("fgsm", eps=eps)
    if name == "random_sign":
        return create_attack("random_sign", eps=eps, seed=rng.randrange(2**31))
    return create_attack(name, eps=eps, steps=cfg.attack_steps, seed=rng.randrange(2**31))


def _chunks(n: int, cfg: AgnosticTrainConfig) -> list[slice]:
    return list(batches(n, -(-n // cfg.chunks)))


def make_zoo_batch(zoo: list[nn.Module], x: torch.Tensor, y: torch.Tensor, cfg: AgnosticTrainConfig,
                   rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, list[str], list[int]]:
    """Attack all but ``clean_chunks`` chunks of ``x``, each against a drawn zoo member (or the ensemble).

    Returns:
        (x_in, is_clean, tags, sources): the batch to restore, a (B,) bool mask of untouched images, a tag per chunk,
        and per chunk the index of the member it was attacked on (``len(zoo)``: the ensemble; -1: clean).
    """
    x_in, is_clean, tags = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device), []
    sources: list[int] = []
    for i, s in enumerate(_chunks(len(x), cfg)):
        if i < cfg.clean_chunks:
            is_clean[s] = True
            tags.append("clean")
            sources.append(-1)
            continue
        if cfg.attack_target == "ensemble":
            j = len(zoo)  # index len(zoo) stands for the ensemble
        else:
            j = rng.randrange(len(zoo) + (cfg.attack_target == "mixed"))
        target, who = (zoo[j], f"m{j}") if j < len(zoo) else (Ensemble(zoo), "ens")
        name, eps = rng.choice(cfg.attacks), rng.uniform(cfg.eps_min, cfg.eps_max)
        x_in[s] = _attack(name, eps, cfg, rng)(target, x[s], y[s])
        tags.append(f"{name}@{eps:.3f}/{who}")
        sources.append(j)
    return x_in, is_clean, tags, sources


def restore_zoo_batch(restorer: Restorer, zoo: list[nn.Module], x_in: torch.Tensor, sources: list[int],
                      cfg: AgnosticTrainConfig, rng: random.Random) -> torch.Tensor:
    """Restore ``x_in`` chunk by chunk, each with the gradient map ``cfg.map_from`` picks (see the module doc).

    Shape:
        x_in: (B, C, H, W), cut into the chunks of :func:`make_zoo_batch` -> (B, C, H, W)
    """
    if cfg.map_from == "guard" or not restorer.net.cfg.two_stream:
        return restorer(x_in)
    out = []
    for s, j in zip(_chunks(len(x_in), cfg), sources, strict=True):
        if cfg.map_from == "mixed" and rng.random() < 0.5:
            source = restorer.guard
        else:
            source = zoo[j] if 0 <= j < len(zoo) else zoo[rng.randrange(len(zoo))]  # clean / ensemble: any member
        out.append(restorer.net(x_in[s], restorer.estimator(x_in[s], source)))
    return torch.cat(out)  # (B, C, H, W), chunks in order


def agnostic_loss(restored: torch.Tensor, clean: torch.Tensor, is_clean: torch.Tensor, zoo: list[nn.Module],
                  clean_logp: list[torch.Tensor], cfg: AgnosticTrainConfig,
                  clean_feats: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Fidelity (L1 + MSE, clean images weighted ``clean_weight``) + KL consistency averaged over the zoo, + with
    ``clean_feats`` (``feature_weight > 0``) the members' penultimate features' relative L1 distance (HGD).

    Shape:
        restored, clean: (B, C, H, W); is_clean: (B,) bool; clean_logp: one (B, K) log-softmax per zoo member;
        clean_feats: one (B, ...) ``forward_features`` output per member.
    """
    w = torch.where(is_clean, cfg.clean_weight, 1.0).to(restored.dtype)
    w = w / w.mean()
    diff = restored - clean
    l1 = (diff.abs().flatten(1).mean(1) * w).mean()
    mse = (diff.pow(2).flatten(1).mean(1) * w).mean()
    kls, feats = [], []
    for i, (m, lp) in enumerate(zip(zoo, clean_logp, strict=True)):
        if clean_feats is None:
            logits = m(restored)
        else:
            f = m.forward_features(restored)
            logits = m.forward_head(f)
            fc = clean_feats[i]
            feats.append((f - fc).abs().flatten(1).mean(1).div(fc.abs().flatten(1).mean(1).clamp_min(1e-6)).mean())
        kls.append(F.kl_div(F.log_softmax(logits, 1), lp, log_target=True, reduction="batchmean"))
    kl = torch.stack(kls).mean()
    loss = l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
    parts = {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}
    if feats:
        feat = torch.stack(feats).mean()
        loss = loss + cfg.feature_weight * feat
        parts["feat"] = feat.item()
    return loss, parts


@torch.no_grad()
def _hits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    return (torch.cat([model(x[s]).argmax(1) for s in batches(len(x), batch_size)]) == y).float().mean().item()


@torch.no_grad()
def validate_restorer(restorer: Restorer, zoo: list[nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int = 10,
                      eps: float = 0.1, batch_size: int = 500, map_from: str = "guard",
                      noise: bool = False) -> dict[str, float]:
    """Mean over ``zoo`` of accuracy on restored clean / restored PGD images (crafted on each member) + PSNR.

    ``map_from="downstream"`` restores each member's images with the map estimated from that member. ``noise``: also
    score restored random-sign noise (:class:`trn.attacks.RandomSign`, ``eps``, one seeded draw).

    Returns:
        ``clean_restored``, ``pgd_restored``, ``pgd`` (undefended), ``psnr_clean`` and ``psnr_pgd_restored`` /
        ``psnr_pgd`` (restored / attacked vs clean), with ``noise``: ``noise_restored``, and ``score`` =
        clean_restored + pgd_restored (+ noise_restored) (what selects).
    """
    acc = {k: [] for k in ("clean_restored", "pgd", "pgd_restored") + ("noise_restored",) * noise}
    ps_adv, ps_rest, ps_clean = [], [], []
    atk = create_attack("pgd", eps=eps, steps=steps, seed=1)
    x_noise = create_attack("random_sign", eps=eps, seed=2)(zoo[0], x, y) if noise else None
    x_rest = r_noise = None
    for m in zoo:
        r = restorer.with_map_from(m) if map_from == "downstream" else restorer
        if x_rest is None or map_from == "downstream":
            x_rest = torch.cat([r(x[s]) for s in batches(len(x), batch_size)])
            ps_clean.append(psnr_per_image(x_rest, x).mean().item())
        x_adv = torch.cat([atk(m, x[s], y[s]) for s in batches(len(x), batch_size)])
        r_adv = torch.cat([r(x_adv[s]) for s in batches(len(x), batch_size)])
        acc["clean_restored"].append(_hits(m, x_rest, y, batch_size))
        acc["pgd"].append(_hits(m, x_adv, y, batch_size))
        acc["pgd_restored"].append(_hits(m, r_adv, y, batch_size))
        if x_noise is not None:
            if r_noise is None or map_from == "downstream":
                r_noise = torch.cat([r(x_noise[s]) for s in batches(len(x), batch_size)])
            acc["noise_restored"].append(_hits(m, r_noise, y, batch_size))
        ps_adv.append(psnr_per_image(x_adv, x).mean().item())
        ps_rest.append(psnr_per_image(r_adv, x).mean().item())
    out = {k: sum(v) / len(v) for k, v in acc.items()}
    out.update(psnr_clean=sum(ps_clean) / len(ps_clean), psnr_pgd=sum(ps_adv) / len(ps_adv), psnr_pgd_restored=sum(ps_rest) / len(ps_rest))
    out["score"] = out["clean_restored"] + out["pgd_restored"] + out.get("noise_restored", 0.0)
    return out


def _validate(restorer: Restorer, zoo: list[nn.Module], val: ImageDataset, cfg: AgnosticTrainConfig,
              device: torch.device) -> dict[str, float]:
    """:func:`validate_restorer` in the view(s) ``cfg.map_from`` trains for; ``mixed`` scores the mean of both views
    (the downstream-map view's figures under ``*_dsmap`` keys) and keeps the lower clean PSNR."""
    x, y = val.images.to(device), val.labels.to(device)
    if cfg.map_from == "guard" or not restorer.net.cfg.two_stream:
        return validate_restorer(restorer, zoo, x, y, cfg.val_attack_steps, noise=cfg.val_noise)
    ds = validate_restorer(restorer, zoo, x, y, cfg.val_attack_steps, map_from="downstream", noise=cfg.val_noise)
    if cfg.map_from == "attacked":
        return ds
    g = validate_restorer(restorer, zoo, x, y, cfg.val_attack_steps, noise=cfg.val_noise)
    return {**g, **{f"{k}_dsmap": v for k, v in ds.items()}, "score": (g["score"] + ds["score"]) / 2,
            "psnr_clean": min(g["psnr_clean"], ds["psnr_clean"])}


def _build_restorer(cfg: AgnosticTrainConfig, c: int, device: torch.device) -> tuple[Restorer, dict]:
    """The starting restorer: ``init_from``'s (net + guard + map settings), or a fresh net on ``guard``."""
    if cfg.init_from:
        r = Restorer.load(cfg.init_from, device)
        log.info("initialised from %s (its guard and %s maps; guard/arch/estimator options are not used)",
                 cfg.init_from, r.estimator.mode)
        prev = {k: r.metadata.get(k) for k in ("config", "history", "train_seconds")}
        r.metadata = {"image_shape": list(r.image_shape)}  # provenance of the old run goes under init_from
        if cfg.widen_to is not None:
            r.net = widen_trn(r.net, cfg.widen_to, seed=cfg.seed)
        return r, {"init_from": {"path": cfg.init_from, **prev}}
    est = GradientMapEstimator(cfg.estimator_mode, cfg.estimator_k, cfg.estimator_scale, cfg.estimator_confidence)
    m = map_channels(cfg.estimator_mode, c)
    net = create_trn(cfg.arch, in_channels=c, grad_channels=0 if m == c else m)
    return Restorer.from_guard_checkpoint(cfg.guard, net, est, device), {}


def _state_path(out: str) -> Path:
    return Path(str(checkpoint_paths(out)[0].with_suffix("")) + "_train_state")


def _update_history(out: str, history: list) -> None:
    """Write the full validation history into the saved (best-epoch) checkpoint's JSON."""
    meta_path = checkpoint_paths(out)[1]
    meta = json.loads(meta_path.read_text())
    meta["history"] = history
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(meta_path)


def _save_state(cfg: AgnosticTrainConfig, net: nn.Module, opt: torch.optim.Optimizer, epoch: int,
                history: list) -> None:
    state = training_state(net, opt)
    state["rng.torch"] = torch.get_rng_state()
    meta = {"kind": "train_state", "epoch": epoch, "config": to_dict(cfg), "history": history}
    save_checkpoint(_state_path(cfg.out), state, meta)


def _load_state(cfg: AgnosticTrainConfig, net: nn.Module, opt: torch.optim.Optimizer,
                device: torch.device) -> tuple[int, list]:
    path = _state_path(cfg.out)
    if not cfg.resume or not checkpoint_paths(path)[0].is_file():
        return 0, []
    state, meta = load_checkpoint(path, device)
    if meta.get("config") != to_dict(cfg):
        raise CheckpointError(f"{path}: saved with a different config; delete it or set resume: false")
    load_training_state(state, net, opt)
    torch.set_rng_state(state["rng.torch"].cpu())
    log.info("resumed from %s after epoch %d", path, meta["epoch"])
    return int(meta["epoch"]), list(meta.get("history", []))


def train_agnostic(cfg: AgnosticTrainConfig, data: ImageDataset | None = None,
                   zoo: list[nn.Module] | None = None) -> Restorer:
    """Train per ``cfg``; save the best epoch (validation score) at ``cfg.out`` and return it.

    Args:
        cfg: the settings.
        data: training images to use instead of ``cfg.dataset`` (the fit fast path passes a user's data).
        zoo: loaded classifiers to use instead of loading ``cfg.zoo`` (tests, the fit fast path).
    """
    gen = seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    full = data if data is not None else load_dataset(cfg.dataset, cfg.data_dir, "train")
    train, val = split_train_val(full, cfg.val_size, cfg.seed)
    restorer, init = _build_restorer(cfg, train.shape[0], device)
    net = restorer.net
    if zoo is None:
        zoo = [load_downstream(p, train.shape, train.num_classes, device) for p in cfg.zoo]
    zoo = [m.to(device).eval() for m in zoo]
    if cfg.feature_weight > 0 and not all(callable(getattr(m, n, None)) for m in zoo
                                          for n in ("forward_features", "forward_head")):
        raise ConfigError("feature_weight > 0 needs zoo members with forward_features / forward_head (this project's "
                          "checkpoints have them; TorchScript / export files do not)")
    for m in zoo:
        for prm in m.parameters():
            prm.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = min(cfg.epoch_images or len(train), len(train))
    steps_per_epoch = -(-per_epoch // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    start, history = _load_state(cfg, net, opt, device)
    if start == 0:  # score the starting point too: an epoch must beat it to be kept
        net.eval()
        v0 = _validate(restorer, zoo, val, cfg, device)
        history.append({"epoch": 0, **v0})
        log.info("epoch 0 (start) val: %s", {k: round(v, 4) for k, v in v0.items()})
        restorer.save(cfg.out, config=to_dict(cfg), history=history, selected_epoch=0, **init,
                      val_images=len(val), dataset=cfg.dataset, torch=torch.__version__)
    for _ in range(start):  # replay the data permutations so a resumed run sees the same images
        torch.randperm(len(train), generator=gen)
    rng = random.Random(cfg.seed + 1000 * start)
    step, t0 = start * steps_per_epoch, time.time()
    for epoch in range(start, cfg.epochs):
        net.train()
        perm = torch.randperm(len(train), generator=gen)[:per_epoch]
        bar = tqdm(batches(per_epoch, cfg.batch_size), total=steps_per_epoch, desc=f"agnostic {epoch + 1}/{cfg.epochs}")
        for s in bar:
            x, y = train.images[perm[s]].to(device), train.labels[perm[s]].to(device)
            x_in, is_clean, _, sources = make_zoo_batch(zoo, x, y, cfg, rng)
            with torch.no_grad():
                if cfg.feature_weight > 0:
                    clean_feats = [m.forward_features(x) for m in zoo]
                    clean_logp = [F.log_softmax(m.forward_head(f), 1) for m, f in zip(zoo, clean_feats, strict=True)]
                else:
                    clean_feats, clean_logp = None, [F.log_softmax(m(x), 1) for m in zoo]
            restored = restore_zoo_batch(restorer, zoo, x_in, sources, cfg, rng)
            loss, parts = agnostic_loss(restored, x, is_clean, zoo, clean_logp, cfg, clean_feats)
            for group in opt.param_groups:  # cosine decay, a pure function of the step (resume-safe)
                group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / total))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()})
        net.eval()
        v = _validate(restorer, zoo, val, cfg, device)
        history.append({"epoch": epoch + 1, **v})
        log.info("epoch %d val (%d images): %s", epoch + 1, len(val), {k: round(x, 4) for k, x in v.items()})
        best = (history[-1] if cfg.select == "last" else
                max(history, key=lambda h: (h["psnr_clean"] >= cfg.select_min_psnr, h["score"])))
        if best["epoch"] == epoch + 1:
            restorer.save(cfg.out, config=to_dict(cfg), history=history, selected_epoch=epoch + 1, **init,
                          val_images=len(val), train_seconds=round(time.time() - t0, 1), dataset=cfg.dataset,
                          torch=torch.__version__)
            log.info("epoch %d is %s (score %.4f): saved %s", epoch + 1,
                     "the last" if cfg.select == "last" else "the best so far", v["score"], cfg.out)
        else:
            _update_history(cfg.out, history)
        _save_state(cfg, net, opt, epoch + 1, history)
    return Restorer.load(cfg.out, device)


def main(argv: list[str] | None = None) -> int:
    """``python -m trn.train_agnostic CONFIG [key=value ...]``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m trn.train_agnostic CONFIG.yaml [key=value ...]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(AgnosticTrainConfig, argv[0], argv[1:])
    train_agnostic(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
