"""Adversarially train a restorer in front of a FROZEN guard: ``trn train-robust --config configs/trn_fmnist_robust.yaml``.

The gray-box TRN (:mod:`trn.train_trn`) learns to undo attacks crafted on the guard alone, and an attacker who
differentiates the whole pipeline breaks it (~9 % under PGD-40). Here the training attacks are *adaptive*: each batch
is attacked through ``guard(restorer(x))`` itself, with one of these kinds drawn per batch (``kinds``: the first three
are the backward passes the evaluation attacks it with, see :mod:`trn.evaluate`):

* ``gconst``: the gradient map recomputed at every step but held constant in the backward pass (the strongest of the
  three against the gray-box net);
* ``e2e``: end to end, the map's estimation differentiated too (``create_graph=True``);
* ``bpda``: the restorer as the identity in the backward pass (Athalye et al. 2018);
* ``square``: no gradient at all: a short Square attack (``square_queries`` score queries, ``square_p_init``) on the
  pipeline's logits, i.e. what a score-based attacker finds with the few queries a similar-query detector allows
  (Square's opening random stripes, then a few greedy windows). Gradient-trained restorers stay weak there (random
  +-eps noise is far from PGD's worst case), and the query shield's fallback restorer meets exactly those images;
* ``guard``: not adaptive: PGD on the guard alone (gray-box, the attacker ignores the restorer), to keep a restorer's
  gray-box figure while it learns another kind (the fallback: gray-box attacks are noisy images too, and get routed).

The loss is TRADES (Zhang et al. 2019) on the frozen guard's logits, plus a small fidelity term::

    CE(guard(R(x)), y) + beta * KL(guard(R(x)) || guard(R(x_adv))) + fidelity * L1(R(x), x)

(``loss: pgd_at`` replaces the first two terms by Madry's CE on ``R(x_adv)`` plus ``clean_weight`` x CE on ``R(x)``).
Only the restorer's weights move; the guard is never updated, so any classifier trained for the guard's job can sit
behind the restorer. Resumable mid-epoch (``save_every`` steps); the per-``val_every`` check uses a validation split
carved from the training set, never the test set.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from trn.attacks import Attack, Square, create_attack
from trn.checkpoint import (
    checkpoint_digest,
    checkpoint_paths,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    training_state,
)
from trn.classifiers import load_classifier
from trn.config import to_dict
from trn.data import load_dataset
from trn.defenses.rnd import random_noise
from trn.errors import CheckpointError, ConfigError
from trn.gradients import GradientMapEstimator, map_channels
from trn.model import create_trn
from trn.restorer import Restorer
from trn.robustness import bpda, check_whitebox_vs_blackbox, worst_case
from trn.train_agnostic import split_indices
from trn.train_classifier import validation_indices
from trn.utils import batches, pick_device, seed_everything
from trn.widen import widen_trn

__all__ = ["ATTACK_KINDS", "RobustTrainConfig", "adaptive_pipeline", "robust_loss", "train_robust",
           "validate_robust_restorer", "validation_images"]
log = logging.getLogger(__name__)

ATTACK_KINDS = ("gconst", "e2e", "bpda", "square", "guard")


@dataclass(frozen=True)
class RobustTrainConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    guard: str = "checkpoints/fmnist_guard"    # the frozen classifier behind the restorer
    init_from: str | None = "checkpoints/trn_fmnist"  # start from this restorer (its guard must be `guard`); None: new
    arch: str = "trn_small_28"                 # used only when init_from is None
    two_stream: bool = True                    # used only when init_from is None
    estimator_mode: str = "hybrid"             # used only when init_from is None
    widen_to: int | None = None                # widen init_from's net to this base width, output unchanged (trn.widen)
    eps: float = 0.1                           # Linf budget of the training attack (= the evaluation's)
    attack_steps: int = 3                      # PGD steps per training attack (CPU: each step is a pipeline fwd+bwd)
    attack_alpha: float = 0.05                 # PGD step size
    kinds: dict[str, float] = field(default_factory=lambda: {"gconst": 0.6, "e2e": 0.2, "bpda": 0.2})  # draw weights
    square_queries: int = 8                    # kind "square": score queries per image (a detector allows ~this many)
    square_p_init: float = 0.3                 # kind "square": Square's starting window fraction
    loss: Literal["trades", "pgd_at"] = "trades"
    beta: float = 6.0                          # TRADES robustness weight
    clean_weight: float = 0.5                  # pgd_at: weight of the clean CE term
    fidelity: float = 0.1                      # weight of L1(R(x), x): clean images should come back as themselves
    epochs: int = 4
    batch_size: int = 128
    lr: float = 5e-4                           # AdamW, cosine decay to 0 over all epochs
    weight_decay: float = 1e-4
    limit_train: int | None = None             # seeded subset of the training images (quick runs, tests)
    val_size: int = 2000                       # held out from the TRAINING set for validation
    val_images: int = 500                      # of those, used by the periodic check (PGD-10 through the pipeline)
    val_every: int = 100                       # steps between validation checks (and at each epoch's end)
    val_square_queries: int = 0                # > 0: Square with this many queries on val_square_images of them too,
    val_square_images: int = 100               # and the per-image worst case with PGD-10 (the gradient-masking check
                                               # a white-box-only validation misses: docs/design.md, "Tried and
                                               # not shipped", the wider robust restorer)
    val_apgd_steps: int = 0                    # > 0 (with Square): APGD-CE and APGD-DLR with this many steps on the
                                               # same images; the worst case and the masking check then use every
                                               # white-box attack, as the test-set evaluation does
    save_every: int = 50                       # steps between resumable train-state saves
    max_steps: int | None = None               # stop after this many steps in this run (a stage that fits a session)
    seed: int = 0
    device: str = "auto"
    threads: int | None = None                 # torch CPU threads (None: torch's default)
    out: str = "checkpoints/trn_fmnist_robust"
    resume: bool = True
    # A checkpoint of trn.train_agnostic (its metadata names val_size and seed) whose validation split is kept out
    # of this run's training images too, so that a restorer pair (the query shield's primary and fallback) can be
    # chosen on images neither trained on.
    exclude_val_of: str | None = None
    # Validate on images the GUARD never trained on: the first ``val_size`` of the validation split its
    # ``trn train-classifier`` run held out (its metadata's val_size and seed). Needed when the guard was trained on
    # most of the training set and the comparison is the guard alone against restorer + guard (a stacked defence).
    val_from_guard: bool = False
    # Randomness (the "noise, evaluated with EOT"): fresh Gaussian noise of this std in front of the restorer,
    # in training (attack and loss; the L1 fidelity target stays the clean image) and in validation, whose gradient
    # attacks then average over ``val_eot_iter`` draws. At inference the same noise must go in front (the defence
    # stack's ``{name: rnd, std: ..., deterministic: false}``).
    noise_std: float = 0.0
    val_eot_iter: int = 1

    def __post_init__(self) -> None:
        bad = sorted(set(self.kinds) - set(ATTACK_KINDS))
        if bad or not self.kinds or any(w < 0 for w in self.kinds.values()) or sum(self.kinds.values()) <= 0:
            raise ConfigError(f"kinds must map a subset of {list(ATTACK_KINDS)} to non-negative weights, got {self.kinds}")
        if self.loss not in ("trades", "pgd_at"):
            raise ConfigError(f"loss must be 'trades' or 'pgd_at', got {self.loss!r}")
        if not 0 < self.eps <= 1 or self.attack_steps < 1 or self.attack_alpha <= 0:
            raise ConfigError("need 0 < eps <= 1, attack_steps >= 1 and attack_alpha > 0")
        if self.square_queries < 1 or not 0 < self.square_p_init <= 1:
            raise ConfigError("need square_queries >= 1 and 0 < square_p_init <= 1")
        if self.widen_to is not None and (self.init_from is None or self.widen_to < 4):
            raise ConfigError("widen_to needs init_from (the net to widen) and a width >= 4")
        if self.val_images > self.val_size:
            raise ConfigError(f"val_images ({self.val_images}) cannot exceed val_size ({self.val_size})")
        if self.val_square_queries < 0 or (self.val_square_queries and not 0 < self.val_square_images <= self.val_images):
            raise ConfigError("need val_square_queries >= 0 and, with Square, 0 < val_square_images <= val_images")
        if not 0 <= self.noise_std <= 1 or self.val_eot_iter < 1:
            raise ConfigError(f"need 0 <= noise_std <= 1 and val_eot_iter >= 1, got {self.noise_std} and "
                              f"{self.val_eot_iter}")
        if self.val_apgd_steps < 0 or (self.val_apgd_steps and not self.val_square_queries):
            raise ConfigError("val_apgd_steps needs val_square_queries (APGD runs on the Square images) and must be >= 0")


def _noised(model: Callable[[torch.Tensor], torch.Tensor], std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` behind fresh Gaussian noise of ``std`` (a new draw at every call); ``model`` itself when ``std`` is 0."""
    return model if std == 0 else lambda x: model(random_noise(x, std, deterministic=False))


def adaptive_pipeline(restorer: Restorer, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> guard(restorer(x))`` with the backward pass of ``kind`` (see the module docstring; ``square`` reads
    only the logits, so it gets the ``gconst`` view).

    Example:
        >>> model = adaptive_pipeline(r, "gconst")
        >>> x_adv = create_attack("pgd", eps=0.1, steps=10)(model, x, y)
    """
    guard = restorer.guard
    if kind in ("gconst", "square"):  # create_graph=False: the map recomputed but detached, constant backward
        return lambda x: guard(restorer(x))
    if kind == "e2e":
        return lambda x: guard(restorer(x, create_graph=True))
    if kind == "bpda":
        return lambda x: guard(bpda(restorer)(x))
    if kind == "guard":
        raise ConfigError("kind 'guard' attacks the guard alone: it has no pipeline view")
    raise ConfigError(f"unknown adaptive attack kind {kind!r}; choose from {list(ATTACK_KINDS)}")


def _training_attack(cfg: RobustTrainConfig, kind: str, seed: int) -> Attack:
    """The batch's training attack: PGD (through the ``kind`` view, or on the guard alone for ``guard``), or a short
    Square for ``kind == "square"``."""
    if kind == "square":
        return Square(eps=cfg.eps, queries=cfg.square_queries, p_init=cfg.square_p_init, seed=seed)
    return create_attack("pgd", eps=cfg.eps, steps=cfg.attack_steps, alpha=cfg.attack_alpha, seed=seed)


def robust_loss(restorer: Restorer, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                cfg: RobustTrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch and its parts (see the module docstring).

    Shape:
        x, x_adv: (B, C, H, W) in [0, 1]; y: (B,)
    """
    b = len(x)
    xx = random_noise(torch.cat([x, x_adv]), cfg.noise_std, deterministic=False)  # (2B, C, H, W): clean, attacked
    g = restorer.gradient_map(xx) if restorer.net.cfg.two_stream else None
    restored = restorer.net(xx, g)
    logits = restorer.guard(restored)
    z_clean, z_adv = logits[:b], logits[b:]
    fid = F.l1_loss(restored[:b], x)
    if cfg.loss == "trades":
        ce = F.cross_entropy(z_clean, y)
        rob = F.kl_div(F.log_softmax(z_adv, 1), F.log_softmax(z_clean, 1), log_target=True, reduction="batchmean")
        loss = ce + cfg.beta * rob + cfg.fidelity * fid
    else:
        ce = F.cross_entropy(z_clean, y)
        rob = F.cross_entropy(z_adv, y)
        loss = rob + cfg.clean_weight * ce + cfg.fidelity * fid
    parts = {"ce": ce.item(), "rob": rob.item(), "l1": fid.item(),
             "acc_adv": (z_adv.argmax(1) == y).float().mean().item()}
    return loss, parts


def _load_restorer(cfg: RobustTrainConfig, device: torch.device) -> tuple[Restorer, dict]:
    """The restorer to train: ``init_from``'s (checked against ``guard``) or a new net paired with ``guard``."""
    if cfg.init_from is None:
        est = GradientMapEstimator(cfg.estimator_mode)
        c = 1 if cfg.dataset == "fashion-mnist" else 3
        m = map_channels(cfg.estimator_mode, c)
        net = create_trn(cfg.arch, in_channels=c, two_stream=cfg.two_stream, grad_channels=0 if m == c else m)
        return Restorer.from_guard_checkpoint(cfg.guard, net, est, device), {}
    r = Restorer.load(cfg.init_from, device)
    guard, _ = load_classifier(cfg.guard, device)
    theirs, ours = r.guard.state_dict(), guard.state_dict()
    if theirs.keys() != ours.keys() or any(not torch.equal(theirs[k], ours[k]) for k in ours):
        raise CheckpointError(f"init_from {cfg.init_from}: its guard is not {cfg.guard}")
    r.guard._trn_meta = {**r.guard._trn_meta, "path": cfg.guard}
    if cfg.widen_to is not None:
        r.net = widen_trn(r.net, cfg.widen_to, seed=cfg.seed)
    prev = load_checkpoint(cfg.init_from, "cpu")[1]
    return r, {"init_from": {"path": cfg.init_from, "digest": checkpoint_digest(cfg.init_from),
                             "config": prev.get("config")}}


def _val_indices_of(checkpoint: str, n: int) -> torch.Tensor:
    """The training-set indices of ``checkpoint``'s validation split (``split_train_val`` with its config's seed)."""
    cfg = load_checkpoint(checkpoint, "cpu")[1].get("config") or {}
    if "val_size" not in cfg or "seed" not in cfg:
        raise CheckpointError(f"exclude_val_of {checkpoint}: its metadata names no val_size and seed")
    return split_indices(n, int(cfg["val_size"]), int(cfg["seed"]))[0]


def _state_path(out: str) -> Path:
    return Path(str(checkpoint_paths(out)[0].with_suffix("")) + "_train_state")


def _save_state(cfg: RobustTrainConfig, r: Restorer, opt: torch.optim.Optimizer, step: int, history: list) -> None:
    state = training_state(r.net, opt)
    meta = {"kind": "robust_train_state", "step": step, "config": to_dict(cfg), "history": history}
    save_checkpoint(_state_path(cfg.out), state, meta)


def _load_state(cfg: RobustTrainConfig, r: Restorer, opt: torch.optim.Optimizer) -> tuple[int, list]:
    path = _state_path(cfg.out)
    if not cfg.resume or not checkpoint_paths(path)[0].is_file():
        return 0, []
    state, meta = load_checkpoint(path, r.device)
    mine = {k: v for k, v in to_dict(cfg).items() if k not in ("max_steps", "threads", "device")}
    theirs = {k: v for k, v in meta.get("config", {}).items() if k not in ("max_steps", "threads", "device")}
    if mine != theirs:
        raise CheckpointError(f"{path}: saved with a different config; delete it or set resume: false")
    load_training_state(state, r.net, opt)
    log.info("resumed from %s at step %d", path, meta["step"])
    return int(meta["step"]), list(meta.get("history", []))


@torch.no_grad()
def _validate(r: Restorer, x: torch.Tensor, y: torch.Tensor, cfg: RobustTrainConfig) -> dict[str, float]:
    """Clean and adaptive (PGD-10, map held constant) accuracy of guard(restorer(.)) on validation images; with
    ``square`` among the training kinds, the accuracy under the training's short Square too, and with ``guard``, under
    PGD-10 crafted on the guard alone (gray-box). With ``val_square_queries``, Square (score queries only, the
    evaluation's ``p_init`` 0.3) on the first ``val_square_images`` and the per-image worst case of it and PGD-10
    there, and ``val_masking_flag`` (1.0 where Square lands more than 2 points under PGD-10 on the same images, the
    evaluation's white-box >= black-box check): a net that masks its gradients looks better under PGD than under
    Square. With ``val_apgd_steps`` too, APGD-CE and APGD-DLR on those images (``val_apgd{n}_on{m}``: correct under
    both), and the worst case and the flag use every white-box attack (``val_whitebox_on{m}``; PGD-10 alone without APGD):
    a short PGD can miss what APGD finds on a net that is merely hard to optimise against.

    With ``noise_std``, fresh Gaussian noise goes in front of the restorer at every call (a randomised defence), and
    every gradient attack averages its gradients over ``val_eot_iter`` draws (EOT, Athalye et al. 2018)."""
    r.eval()
    eot_iter = cfg.val_eot_iter
    pipe = _noised(adaptive_pipeline(r, "gconst"), cfg.noise_std)
    atk = create_attack("pgd", eps=cfg.eps, steps=10, seed=1, eot_iter=eot_iter)
    square = _training_attack(cfg, "square", 1) if "square" in cfg.kinds else None
    clean = sq = gray = 0
    pgd_ok = []  # (B,) bool per batch: correct under PGD-10
    for s in batches(len(x), 250):
        xb, yb = x[s], y[s]
        clean += (pipe(xb).argmax(1) == yb).sum().item()
        pgd_ok.append(pipe(atk(pipe, xb, yb)).argmax(1) == yb)
        if square is not None:
            sq += (pipe(square(pipe, xb, yb)).argmax(1) == yb).sum().item()
        if "guard" in cfg.kinds:
            gray += (pipe(atk(r.guard, xb, yb)).argmax(1) == yb).sum().item()
    pgd = torch.cat(pgd_ok)  # (N,)
    out = {"val_clean": clean / len(x), "val_pgd10_gconst": pgd.float().mean().item()}
    if square is not None:
        out[f"val_square{cfg.square_queries}"] = sq / len(x)
    if "guard" in cfg.kinds:
        out["val_pgd10_guard"] = gray / len(x)
    if cfg.val_square_queries:
        m, q = cfg.val_square_images, cfg.val_square_queries

        def correct_under(attack: Attack) -> torch.Tensor:  # (m,) bool on the CPU, the first m images
            return torch.cat([pipe(attack(pipe, x[s], y[s])).argmax(1) == y[s] for s in batches(m, 250)]).cpu()

        bb_ok = correct_under(Square(eps=cfg.eps, queries=q, p_init=0.3, seed=1))
        out[f"val_bb_square{q}"] = bb_ok.float().mean().item()
        out[f"val_pgd10_on{m}"] = pgd[:m].float().mean().item()
        whitebox = [pgd[:m]]  # correctness masks of every white-box attack run on the m images
        if cfg.val_apgd_steps:
            n = cfg.val_apgd_steps
            apgd_ok = worst_case([correct_under(create_attack("apgd", eps=cfg.eps, steps=n, loss=loss, seed=1,
                                                              eot_iter=eot_iter))
                                  for loss in ("ce", "dlr")])
            out[f"val_apgd{n}_on{m}"] = apgd_ok.float().mean().item()
            whitebox.append(apgd_ok)
        wb = worst_case(whitebox)
        out[f"val_whitebox_on{m}"] = wb.float().mean().item()
        out[f"val_worst{m}"] = worst_case([bb_ok, wb]).float().mean().item()
        # the evaluation's white-box >= black-box check (2-point tolerance); it logs a warning when it fails
        out["val_masking_flag"] = float(not check_whitebox_vs_blackbox(wb, bb_ok).passed)
    return out


def validation_images(cfg: RobustTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``val_images`` validation images (and labels) a run with ``cfg`` checks against: carved from the training
    set by ``seed`` and ``val_size`` (with ``val_from_guard``, out of the guard's own held-out images), never trained
    on."""
    full = load_dataset(cfg.dataset, cfg.data_dir, "train")
    val_idx = _split(cfg, len(full))[0][: cfg.val_images]
    return full.images[val_idx], full.labels[val_idx]


def _split(cfg: RobustTrainConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation indices, training indices) of a dataset of ``n`` images: a pure function of ``seed`` (or, with
    ``val_from_guard``, of the guard checkpoint's own split)."""
    if cfg.val_from_guard:
        gcfg = load_checkpoint(cfg.guard, "cpu")[1].get("config") or {}
        if not gcfg.get("val_size") or "seed" not in gcfg or gcfg.get("limit_train") is not None:
            raise CheckpointError(f"val_from_guard: {cfg.guard}'s metadata names no validation split of the whole "
                                  "training set (val_size, seed, no limit_train)")
        guard_val = validation_indices(n, float(gcfg["val_size"]), int(gcfg["seed"]))[0]
        if len(guard_val) < cfg.val_size:
            raise ConfigError(f"val_from_guard: {cfg.guard} held out {len(guard_val)} images, fewer than val_size "
                              f"({cfg.val_size})")
        val = guard_val[: cfg.val_size]
        rest = torch.ones(n, dtype=torch.bool)
        rest[val] = False
        return val, rest.nonzero().squeeze(1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 12345))
    return order[: cfg.val_size], order[cfg.val_size :]


def validate_robust_restorer(r: Restorer, cfg: RobustTrainConfig) -> dict[str, float]:
    """The training run's validation figures (:func:`_validate`) for any restorer, on ``cfg``'s validation split:
    compare a checkpoint with the one it started from, e.g. with ``val_square_queries`` set, or behind noise
    (``noise_std``, ``val_eot_iter``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    x, y = validation_images(cfg)
    return _validate(r, x.to(r.device), y.to(r.device), cfg)


# What a checkpoint's metadata says it was trained against, per training-attack kind.
_KIND_THREAT = {"gconst": ("adaptive white-box", "PGD through the whole pipeline"),
                "e2e": ("adaptive white-box", "PGD through the whole pipeline"),
                "bpda": ("adaptive white-box", "PGD through the whole pipeline"),
                "square": ("query black-box", "short Square attacks through the whole pipeline"),
                "guard": ("gray-box", "PGD on the guard alone")}


def _threat_model(cfg: RobustTrainConfig) -> str:
    """E.g. ``"query black-box and gray-box (trained on short Square attacks ... and PGD on the guard alone)"``."""
    parts = list(dict.fromkeys(_KIND_THREAT[k] for k in ATTACK_KINDS if cfg.kinds.get(k, 0) > 0))  # ordered, unique
    return " and ".join(t for t, _ in parts) + " (trained on " + " and ".join(h for _, h in parts) + ")"


def train_robust(cfg: RobustTrainConfig) -> Restorer:
    """Train per ``cfg``; save ``cfg.out`` as a restorer checkpoint (safetensors + JSON) and return it.

    With ``max_steps`` the run stops early; the train state and the restorer checkpoint are written at every stop
    (``complete: false`` in its metadata until the last step), and the next call with the same config resumes.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    full = load_dataset(cfg.dataset, cfg.data_dir, "train")
    val_idx, train_idx = _split(cfg, len(full))
    if cfg.exclude_val_of is not None:
        train_idx = train_idx[~torch.isin(train_idx, _val_indices_of(cfg.exclude_val_of, len(full)))]
    if cfg.limit_train is not None:
        train_idx = train_idx[: cfg.limit_train]
    x_val = full.images[val_idx[: cfg.val_images]].to(device)
    y_val = full.labels[val_idx[: cfg.val_images]].to(device)
    r, init = _load_restorer(cfg, device)
    opt = torch.optim.AdamW(r.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(train_idx) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    step, history = _load_state(cfg, r, opt)
    kinds, weights = list(cfg.kinds), list(cfg.kinds.values())
    t0, done_now = time.time(), 0
    bar = tqdm(total=total, initial=step, desc="robust trn")
    while step < total:
        if cfg.max_steps is not None and done_now >= cfg.max_steps:
            break
        epoch, i = divmod(step, steps_per_epoch)
        perm = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.seed + epoch))]
        s = slice(i * cfg.batch_size, (i + 1) * cfg.batch_size)
        x, y = full.images[perm[s]].to(device), full.labels[perm[s]].to(device)
        rng = random.Random(cfg.seed * 1_000_003 + step)  # a pure function of the step: resume-safe
        kind = rng.choices(kinds, weights)[0]
        r.net.train()
        target = r.guard if kind == "guard" else _noised(adaptive_pipeline(r, kind), cfg.noise_std)
        x_adv = _training_attack(cfg, kind, rng.randrange(2**31))(target, x, y)
        loss, parts = robust_loss(r, x, x_adv, y, cfg)
        for group in opt.param_groups:  # cosine decay to 0, a pure function of the step (resume-safe)
            group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / total))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        done_now += 1
        bar.update(1)
        bar.set_postfix(kind=kind, **{k: f"{v:.3f}" for k, v in parts.items()})
        if step % cfg.val_every == 0 or step % steps_per_epoch == 0 or step == total:
            val = _validate(r, x_val, y_val, cfg)
            history.append({"step": step, "epoch": step / steps_per_epoch, **val})
            log.info("step %d (epoch %.2f): %s", step, step / steps_per_epoch, val)
        if step % cfg.save_every == 0 or step == total:
            _save_state(cfg, r, opt, step, history)
    bar.close()
    _save_state(cfg, r, opt, step, history)
    if step < total:
        log.info("stopped at step %d of %d (max_steps); rerun the same config to resume", step, total)
    r.eval()
    # The restorer checkpoint is written at every stop, so that a stage can be evaluated and shipped; its metadata
    # says how far training got (complete: false for a stage before the last).
    path = r.save(cfg.out, config=to_dict(cfg), history=history, train_images=len(train_idx), **init,
                  step=step, total_steps=total, complete=step == total,
                  threat_model=_threat_model(cfg),
                  train_seconds_last_run=round(time.time() - t0, 1), dataset=cfg.dataset, torch=torch.__version__)
    log.info("saved %s (step %d of %d)", path, step, total)
    return r
