"""Fixtures shared by the test files: a tiny classifier, a local Ray, and a restorer that changes images.

* ``make_tiny_classifier(**kw)`` / ``tiny_classifier``: a seconds-free conv classifier (:class:`TinyClassifier`)
  with BatchNorm and Dropout (so train/eval mode leaks show) and the ``forward_features``/``forward_head`` split.
* ``ray_local``: one local Ray per test module: explicit ``num_cpus`` (the module's ``RAY_NUM_CPUS``, default 2), no
  dashboard, the start retried (on a busy machine the raylet can miss Ray's fixed 30 s start-up deadline), shut down
  after the module. Ray is imported only by the modules that use it.
* ``changing_checkpoint`` / ``changing_restorer``: a tiny untrained :class:`~trn.restorer.Restorer` whose network is
  nudged away from the identity (a fresh TRN's zero head returns its input exactly, so a service or job that echoed
  its input would pass a test built on it), saved once per session; ``changing_restorer`` is a fresh copy per test.

Slow tests carry ``@pytest.mark.slow``: ``scripts/test.sh`` leaves them out, ``scripts/test.sh --all`` runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from trn.restorer import Restorer


class TinyClassifier(nn.Module):
    """conv(3x3, ``width``) -> BatchNorm -> act [-> 2x2 max-pool] -> Dropout -> flatten [-> hidden + ReLU] -> fc.

    Args:
        in_channels, size, num_classes: input (C, size, size) and classes.
        width: conv channels.
        act: activation class (``nn.Softplus`` for smooth second derivatives).
        batchnorm, dropout: False / 0 leave them out.
        pool: 2x2 max-pool after the conv.
        hidden: width of an extra linear layer before ``fc`` (0: none).

    ``forward_features`` returns the input of ``fc`` (B, F); ``forward_head`` applies ``fc``.
    """

    def __init__(self, in_channels: int = 1, size: int = 8, num_classes: int = 3, width: int = 4,
                 act: type[nn.Module] = nn.ReLU, batchnorm: bool = True, dropout: float = 0.5, pool: bool = False,
                 hidden: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width) if batchnorm else nn.Identity()
        self.act = act()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.drop = nn.Dropout(dropout)
        flat = width * (size // 2 if pool else size) ** 2
        self.hidden = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU()) if hidden else nn.Identity()
        self.fc = nn.Linear(hidden or flat, num_classes)
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.drop(self.pool(self.act(self.bn(self.conv(x)))).flatten(1)))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


BAND_CLASSES = 3  # the synthetic band task: classes, and (1, 8, 8) images


def band_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthetic band task: class k = a bright horizontal band in third k of the image, plus noise.

    Shape: (n, 1, 8, 8) images in [0, 1], (n,) labels in [0, 3).
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, BAND_CLASSES, (n,), generator=g)
    x = 0.25 * torch.rand(n, 1, 8, 8, generator=g)
    for k in range(BAND_CLASSES):
        x[y == k, :, k * 8 // BAND_CLASSES:(k + 1) * 8 // BAND_CLASSES + 1] += 0.6
    return x.clamp(0, 1), y


def fit_on_bands(net: nn.Module, steps: int = 60, lr: float = 0.02) -> nn.Module:
    """Train ``net`` on 256 band images (~100 % in about a second) and return it frozen, in eval mode.

    Seed before building ``net`` for a reproducible start; the training itself is deterministic.
    """
    x, y = band_images(256, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.zero_grad(set_to_none=True)
    return net.eval().requires_grad_(False)


@pytest.fixture
def make_tiny_classifier() -> Callable[..., TinyClassifier]:
    """``make(seed=0, **TinyClassifier kwargs)``: a seeded :class:`TinyClassifier` in eval mode."""

    def make(seed: int = 0, **kwargs: Any) -> TinyClassifier:
        torch.manual_seed(seed)
        return TinyClassifier(**kwargs).eval()

    return make


@pytest.fixture
def tiny_classifier(make_tiny_classifier: Callable[..., TinyClassifier]) -> TinyClassifier:
    """The default :class:`TinyClassifier`: (1, 8, 8) images, 3 classes, seed 0, eval mode."""
    return make_tiny_classifier()


def start_ray(num_cpus: int = 2, attempts: int = 3, **kwargs: Any):
    """``ray.init`` for tests (explicit CPUs, no dashboard, no driver logs), retried; returns the ``ray`` module."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    # address="local": always a new instance, never a cluster some other process left running on the machine
    kwargs = {"address": "local", "include_dashboard": False, "log_to_driver": False, **kwargs}
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=num_cpus, **kwargs)
            return ray
        except Exception:  # Ray raises plain Exception/RuntimeError/TimeoutError on a missed start
            ray.shutdown()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def ray_local(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A local Ray for the module (``RAY_NUM_CPUS`` / ``RAY_INIT_KWARGS`` module globals adjust it); shut down after."""
    num_cpus = getattr(request.module, "RAY_NUM_CPUS", 2)
    kwargs = getattr(request.module, "RAY_INIT_KWARGS", {})
    ray = start_ray(num_cpus, **kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


def nudge(restorer: Restorer, scale: float = 0.05, seed: int = 1) -> Restorer:
    """Add seeded noise to every weight of ``restorer.net`` (in place), so that restoring changes the pixels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in restorer.net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return restorer


@pytest.fixture(scope="session")
def changing_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny restorer (``Restorer.build(seed=0)``: 1x28x28, 10 classes, ``trn_tiny``) that changes images.

    Returns the checkpoint path without suffix. The fixture checks the change itself: a restore of random images
    moves them by more than 1e-3 (the untrained zero-head TRN would move them by exactly 0).
    """
    r = nudge(Restorer.build(seed=0))
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert (r.restore(x) - x).abs().max() > 1e-3, "the nudged restorer must change images"
    path = tmp_path_factory.mktemp("changing_ckpt") / "changing"
    r.save(path)
    return path


@pytest.fixture
def changing_restorer(changing_checkpoint: Path) -> Restorer:
    """A fresh in-memory copy of ``changing_checkpoint`` (what a service or job loading it computes)."""
    return Restorer.load(changing_checkpoint)
