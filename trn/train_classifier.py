"""Train a guard/downstream classifier: ``trn train-classifier --config configs/classifier_fmnist.yaml``.

Two robust-training options, both baselines for the defence table (``trn eval-defenses``):

* ``regularizer: gfa``: DeepDefense gradient-feature alignment (:mod:`trn.defenses.gfa`),
  ``loss = CE + gfa_lambda * sum_l (1 - cos(dL/dh_l, h_l))`` over ``gfa_layers`` (``first``: the input; ``deep``:
  the input and every conv block). A step costs about 4.5 plain steps for FIRST (double backward; measured on
  the 2-core CPU), ~7 for DEEP.
* ``adv_train: pgd``: Madry et al. (2018) adversarial training, ``min_theta E max_{||d||_inf <= adv_eps} CE``: each
  batch is replaced by its PGD-``adv_steps`` adversarial version (random start, model in eval mode while attacking)
  and the model is trained on those alone. Costs about ``adv_steps + 1`` plain steps.

Both can be combined (the GFA penalty is then taken at the adversarial images).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from trn.attacks import PGD
from trn.classifiers import create_classifier, save_classifier
from trn.config import to_dict
from trn.data import load_dataset
from trn.defenses.gfa import gfa_penalty
from trn.errors import ConfigError
from trn.utils import accuracy, batches, eval_mode, pick_device, seed_everything

__all__ = ["ClassifierTrainConfig", "augment", "train_classifier"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierTrainConfig:
    dataset: str = "fashion-mnist"      # any name load_dataset knows
    data_dir: str | None = None         # None: the dataset's default location
    arch: str = "small_cnn"             # classifiers.create_classifier name
    arch_kwargs: dict = field(default_factory=dict)
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.05                    # SGD + Nesterov momentum, one-cycle schedule
    weight_decay: float = 5e-4
    augment: bool = True                # random 2-pixel shifts + horizontal flips (both label-preserving here)
    seed: int = 0
    device: str = "auto"
    out: str = "checkpoints/fmnist_guard"
    regularizer: Literal["none", "gfa"] = "none"     # gfa: DeepDefense gradient-feature alignment
    gfa_layers: Literal["first", "deep"] = "first"   # FIRST: align at the input only; DEEP: also every conv block
    gfa_lambda: float = 1.0                           # weight of the alignment term (the paper's value is unknown)
    adv_train: Literal["none", "pgd"] = "none"       # pgd: Madry adversarial training (train on PGD images only)
    adv_eps: float = 0.1                              # Linf budget of the training attack (the eval's main eps)
    adv_steps: int = 7                                # PGD steps per batch (each costs about one training step)
    adv_alpha: float | None = None                    # PGD step size; None: 2.5 * adv_eps / adv_steps
    limit_train: int | None = None                    # seeded training subset (quick runs, tests); None: all
    limit_test: int | None = None                     # seeded test subset for the per-epoch accuracy; None: all

    def __post_init__(self) -> None:
        if self.gfa_lambda < 0:
            raise ConfigError(f"gfa_lambda must be >= 0, got {self.gfa_lambda}")
        if self.adv_eps < 0 or self.adv_steps < 1 or (self.adv_alpha is not None and self.adv_alpha <= 0):
            raise ConfigError(f"adversarial training needs adv_eps >= 0, adv_steps >= 1 and adv_alpha > 0, got "
                              f"{self.adv_eps}, {self.adv_steps}, {self.adv_alpha}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("limit_train", "limit_test"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be a positive integer or null, got {v}")


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Batched random shift (reflect-padded crop) and horizontal flip."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()  # one shift per batch: cheap, enough
    x = xp[..., dy : dy + h, dx : dx + w]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)


def train_classifier(cfg: ClassifierTrainConfig) -> dict:
    """Train per ``cfg``, save ``cfg.out`` (.safetensors + .json) and return the metadata (incl. test accuracy)."""
    gen = seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    train = load_dataset(cfg.dataset, cfg.data_dir, "train").subset(cfg.limit_train, cfg.seed)
    test = load_dataset(cfg.dataset, cfg.data_dir, "test").subset(cfg.limit_test, cfg.seed)
    log.info("train %s | test %s", train.describe(), test.describe())
    c, h, _ = train.shape
    arch_kwargs = {"in_channels": c, "num_classes": train.num_classes, **cfg.arch_kwargs}
    if cfg.arch == "small_cnn":
        arch_kwargs.setdefault("image_size", h)
    model = create_classifier(cfg.arch, **arch_kwargs).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    attack = None
    if cfg.adv_train == "pgd":
        # a fresh random start per batch: seed=None draws from the global RNG, which seed_everything seeded
        attack = PGD(eps=cfg.adv_eps, steps=cfg.adv_steps, alpha=cfg.adv_alpha, random_start=True, seed=None)
    log.info("regularizer=%s%s, adv_train=%s%s", cfg.regularizer,
             f" ({cfg.gfa_layers}, lambda={cfg.gfa_lambda:g})" if cfg.regularizer == "gfa" else "", cfg.adv_train,
             f" (PGD-{cfg.adv_steps}, eps={cfg.adv_eps:g})" if attack is not None else "")
    t0, history = time.time(), []
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        bar = tqdm(batches(len(train), cfg.batch_size), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        for s in bar:
            idx = perm[s]
            x, y = train.images[idx].to(device), train.labels[idx].to(device)
            if cfg.augment:
                x = augment(x, gen)
            if attack is not None:
                x = attack(model, x, y)  # eval mode inside, train mode restored after
            if cfg.regularizer == "gfa":
                penalty, logits = gfa_penalty(model, x, y, cfg.gfa_layers, return_logits=True)
                loss = F.cross_entropy(logits, y) + cfg.gfa_lambda * penalty
            else:
                penalty, loss = None, F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            postfix = {"loss": f"{loss.item():.3f}"}
            if penalty is not None:
                postfix["gfa"] = f"{penalty.item():.3f}"
            bar.set_postfix(postfix)
        with eval_mode(model):
            acc = accuracy(model, test.images, test.labels)
        history.append(acc)
        log.info("epoch %d: test accuracy %.4f", epoch + 1, acc)
    meta = {
        "dataset": cfg.dataset, "image_shape": list(train.shape), "class_names": list(train.class_names),
        "test_accuracy": history[-1], "test_images": len(test), "accuracy_history": history,
        "train_seconds": round(time.time() - t0, 1), "config": to_dict(cfg), "torch": torch.__version__,
    }
    model.eval()
    path = save_classifier(cfg.out, model, cfg.arch, arch_kwargs, meta)
    log.info("saved %s (test accuracy %.4f)", path, history[-1])
    return meta


