"""Small shared helpers: seeding, device choice, batched evaluation."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

__all__ = ["accuracy", "batches", "eval_mode", "pick_device", "predict", "seed_everything"]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a torch.Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(device: str | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in chunks of ``batch_size``."""
    for i in range(0, n, batch_size):
        yield slice(i, min(i + batch_size, n))


class eval_mode:
    """Context manager: put a module in eval mode and restore its previous mode on exit."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.was_training = module, module.training

    def __enter__(self) -> nn.Module:
        self.module.eval()
        return self.module

    def __exit__(self, *exc) -> None:
        self.module.train(self.was_training)


@torch.no_grad()
def predict(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 1000,
            device: torch.device | str | None = None) -> torch.Tensor:
    """Argmax predictions of ``model`` on ``x`` (on CPU), computed in batches on ``device``."""
    device = device or (next(model.parameters()).device if isinstance(model, nn.Module) else "cpu")
    out = [model(x[s].to(device)).argmax(1).cpu() for s in batches(len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1000) -> float:
    """Top-1 accuracy (0-1) of ``model`` on ``(x, y)``."""
    if len(x) == 0:
        return float("nan")
    return (predict(model, x, batch_size) == y).float().mean().item()
