"""Guard / downstream classifiers. Inputs are images in [0, 1]; normalisation lives inside the model.

Every classifier here exposes ``forward_features`` (penultimate features) and ``forward_head`` (linear head), the
split UniG needs; ``create_classifier(name)`` builds one by name, and :func:`wrap_classifier` adapts a user module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trn.checkpoint import load_checkpoint, save_checkpoint
from trn.errors import CheckpointError, ConfigError
from trn.registry import Registry
from trn.zoo import ZOO_FAMILIES

__all__ = [
    "CLASSIFIERS",
    "Normalize",
    "ResNet18",
    "SmallCNN",
    "WrappedClassifier",
    "create_classifier",
    "list_classifiers",
    "load_classifier",
    "save_classifier",
    "wrap_classifier",
]


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``, so that classifiers take raw [0, 1] pixels."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """Two conv blocks and an MLP head for 28x28 grey images (~0.4M parameters, ~4M MACs).

    Kept small on purpose: attacks, gradient-map estimation and TRN training all call it many times per image,
    and on a 2-core CPU its cost sets the pace of everything. Reaches ~92% on Fashion-MNIST.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 32,
                 mean: Sequence[float] = (0.2860,), std: Sequence[float] = (0.3530,), dropout: float = 0.3) -> None:
        super().__init__()
        if image_size % 4:
            raise ConfigError(f"SmallCNN needs an image size divisible by 4, got {image_size}")
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * width * (image_size // 4) ** 2, 128), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(128, num_classes)
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))  # (B, 128)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ResNet18(nn.Module):
    """torchvision ResNet-18 adapted to 32x32 inputs (3x3 stem, no max-pool), CIFAR-style."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10,
                 mean: Sequence[float] = (0.4914, 0.4822, 0.4465), std: Sequence[float] = (0.2470, 0.2435, 0.2616)):
        super().__init__()
        import torchvision  # lazy: importing torchvision pulls in torch._dynamo, seconds on every worker start

        net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
        self.normalize = Normalize(mean, std)
        self.head = net.fc
        net.fc = nn.Identity()
        self.body = net
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))  # (B, 512)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class WrappedClassifier(nn.Module):
    """Adapt any user ``nn.Module`` to our convention: [0, 1] inputs, normalisation inside, logits out.

    If the user gives ``features`` and ``head`` sub-modules (``model = head(features(x))``), the split is exposed for
    UniG; otherwise ``forward_features`` raises a clear error.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 features: nn.Module | None = None, head: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.normalize = Normalize(mean, std) if mean is not None and std is not None else nn.Identity()
        self.features_module, self.head_module = features, head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.features_module is None:
            raise ConfigError("this wrapped classifier has no features/head split; pass features= and head=")
        return self.features_module(self.normalize(x))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        if self.head_module is None:
            raise ConfigError("this wrapped classifier has no features/head split; pass features= and head=")
        return self.head_module(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.features_module is not None and self.head_module is not None:
            return self.forward_head(self.forward_features(x))
        return self.model(self.normalize(x))


def wrap_classifier(model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    features: nn.Module | None = None, head: nn.Module | None = None) -> WrappedClassifier:
    """Wrap a user model that expects normalised inputs so it takes [0, 1] pixels (see :class:`WrappedClassifier`)."""
    return WrappedClassifier(model, mean, std, features, head)


CLASSIFIERS: Registry[nn.Module] = Registry("classifier")
CLASSIFIERS.add("small_cnn", SmallCNN)
CLASSIFIERS.add("resnet18", ResNet18)
_REGISTRY = CLASSIFIERS  # the old name (a dict until issue 14): update() still works on it
_REGISTRY.update(ZOO_FAMILIES)  # zoo_mlp, zoo_cnn, zoo_bncnn, zoo_resnet, zoo_vit, zoo_mixer, zoo_dwcnn (issue 10)


def list_classifiers() -> list[str]:
    """Names :func:`create_classifier` accepts (the :data:`CLASSIFIERS` registry)."""
    return CLASSIFIERS.list()


def create_classifier(name: str, **kwargs) -> nn.Module:
    """Build a registered classifier by name; unknown names and bad arguments raise :class:`ConfigError`."""
    return CLASSIFIERS.create(name, **kwargs)


def save_classifier(path, model: nn.Module, arch: str, arch_kwargs: dict, metadata: dict | None = None):
    """Save a registered classifier as safetensors + JSON (``arch`` and ``arch_kwargs`` rebuild it)."""
    meta = {"kind": "classifier", "arch": arch, "arch_kwargs": arch_kwargs, **(metadata or {})}
    return save_checkpoint(path, model.state_dict(), meta)


def load_classifier(path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild and load a classifier saved by :func:`save_classifier`; returned in eval mode."""
    state, meta = load_checkpoint(path, device)
    if meta.get("kind") != "classifier":
        raise CheckpointError(f"{path} is not a classifier checkpoint (kind={meta.get('kind')!r})")
    model = create_classifier(meta["arch"], **meta.get("arch_kwargs", {}))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match architecture {meta['arch']!r}: {e}") from e
    return model.to(device).eval(), meta
