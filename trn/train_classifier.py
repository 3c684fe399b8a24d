"""Train a guard/downstream classifier: ``trn train-classifier --config configs/classifier_fmnist.yaml``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from trn.classifiers import create_classifier, save_classifier
from trn.config import to_dict
from trn.data import load_dataset
from trn.utils import accuracy, batches, eval_mode, pick_device, seed_everything

__all__ = ["ClassifierTrainConfig", "train_classifier", "augment"]
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
    train, test = load_dataset(cfg.dataset, cfg.data_dir, "train"), load_dataset(cfg.dataset, cfg.data_dir, "test")
    log.info("train %s | test %s", train.describe(), test.describe())
    c, h, _ = train.shape
    arch_kwargs = {"in_channels": c, "num_classes": train.num_classes, **cfg.arch_kwargs}
    if cfg.arch == "small_cnn":
        arch_kwargs.setdefault("image_size", h)
    model = create_classifier(cfg.arch, **arch_kwargs).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
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
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
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


