"""A zoo of small classifier families for 28x28 (or 32x32) images, to train and test downstream-agnostic restorers.

Issue 10: a restorer trained against one guard protects that guard and little else. The zoo gives it (and the
evaluation matrix) classifiers that look at images differently:

==================  ==========================================================  ===============================
name                family                                                      role in the shipped experiments
==================  ==========================================================  ===============================
``zoo_mlp``         MLP, 784-256-256-C, no convolution                           seen by the agnostic restorer
``zoo_cnn``         plain CNN, two conv blocks, no normalisation layers          seen by the agnostic restorer
``zoo_bncnn``       three conv blocks with BatchNorm (the guard is also a BN-CNN)  held out (seen family)
``zoo_resnet``      small residual net (3 stages of basic blocks, BatchNorm)     held out (unseen family)
``zoo_vit``         patch embedding + transformer encoder (ViT-like)            held out (unseen family)
``zoo_mixer``       patch tokens mixed by MLPs across tokens and channels        ablation zoo (a 5-member zoo)
``zoo_dwcnn``       depthwise-separable 7x7 convs, GroupNorm, GELU, no shortcut  ablation zoo (a 5-member zoo)
==================  ==========================================================  ===============================

Like every classifier in :mod:`trn.classifiers`, each takes [0, 1] pixels (normalisation inside), returns logits and
exposes ``forward_features`` / ``forward_head``. They are registered in :mod:`trn.classifiers`' registry, so
``trn train-classifier --config configs/zoo_mlp.yaml`` trains one and :func:`trn.classifiers.load_classifier` loads it.

Example:
    >>> from trn.zoo import create_zoo_model
    >>> m = create_zoo_model("zoo_vit", in_channels=1, num_classes=10, image_size=28)
    >>> m(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from trn.errors import ConfigError

__all__ = ["ZOO_FAMILIES", "ZooBNCNN", "ZooCNN", "ZooDWCNN", "ZooMLP", "ZooMixer", "ZooResNet", "ZooViT",
           "create_zoo_model"]

_FMNIST_MEAN, _FMNIST_STD = (0.2860,), (0.3530,)


class _Standardize(nn.Module):
    """``(x - mean) / std`` per channel (kept here so this module does not import :mod:`trn.classifiers`)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _stats(in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> tuple[tuple, tuple]:
    if mean is None or std is None:
        return (_FMNIST_MEAN * in_channels, _FMNIST_STD * in_channels) if in_channels == 1 else ((0.5,) * in_channels,
                                                                                              (0.25,) * in_channels)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ConfigError(f"mean/std need {in_channels} values, got {list(mean)} / {list(std)}")
    return tuple(mean), tuple(std)


class _ZooBase(nn.Module):
    """Shared plumbing: normalisation, ``forward = forward_head(forward_features(x))``."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, mean, std) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2 or image_size < 4:
            raise ConfigError(f"bad classifier shape: in_channels={in_channels}, num_classes={num_classes}, "
                              f"image_size={image_size}")
        self.normalize = _Standardize(*_stats(in_channels, mean, std))
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ZooMLP(_ZooBase):
    """Multi-layer perceptron on flattened pixels (784-256-256-C for Fashion-MNIST).

    Shape:
        (B, C, H, W) in [0, 1] -> (B, num_classes) logits
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, hidden: int = 256,
                 depth: int = 2, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__(in_channels, num_classes, image_size, mean, std)
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_channels * image_size * image_size
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU(inplace=True)]
            d = hidden
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(d, num_classes)


class ZooCNN(_ZooBase):
    """Plain CNN without normalisation layers: conv-relu-pool x2, then a 128-unit hidden layer."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 24,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__(in_channels, num_classes, image_size, mean, std)
        if image_size % 4:
            raise ConfigError(f"zoo_cnn needs an image size divisible by 4, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * (image_size // 4) ** 2, 128), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(128, num_classes)


class ZooBNCNN(_ZooBase):
    """Three conv blocks with BatchNorm, global average pooling, linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 32,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__(in_channels, num_classes, image_size, mean, std)

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


class ZooResNet(_ZooBase):
    """Small residual net: 3x3 stem, three stages of one basic block (widths w, 2w, 4w; strides 1, 2, 2), GAP."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 16,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__(in_channels, num_classes, image_size, mean, std)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            _BasicBlock(width, width, 1), _BasicBlock(width, 2 * width, 2), _BasicBlock(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)


class _PatchEncoder(nn.Module):
    """Patchify (strided conv), add a learned position embedding, run a pre-norm transformer, mean-pool tokens."""

    def __init__(self, in_channels: int, image_size: int, patch: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        if image_size % patch:
            raise ConfigError(f"zoo_vit: image size {image_size} is not divisible by the patch size {patch}")
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, tokens, dim)
        return self.norm(self.encoder(t)).mean(1)  # (B, dim)


class ZooViT(_ZooBase):
    """ViT-like patch/attention model: 4x4 patches (49 tokens on 28x28), 2 pre-norm encoder layers, dim 64."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, patch: int = 4,
                 dim: int = 64, depth: int = 2, heads: int = 4, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__(in_channels, num_classes, image_size, mean, std)
        self.features = _PatchEncoder(in_channels, image_size, patch, dim, depth, heads)
        self.head = nn.Linear(dim, num_classes)


class _MixerBlock(nn.Module):
    """MLP-Mixer block (Tolstikhin et al. 2021): a token-mixing MLP across tokens, then a channel MLP, pre-norm."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tokens = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.channels = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B, tokens, dim)
        t = t + self.tokens(self.norm1(t).transpose(1, 2)).transpose(1, 2)  # mix along tokens
        return t + self.channels(self.norm2(t))


class ZooMixer(_ZooBase):
    """MLP-Mixer: 4x4 patches (49 tokens on 28x28), dim 64, 2 mixer blocks, mean-pooled tokens. No attention and no
    convolution after the patch embedding."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, patch: int = 4,
                 dim: int = 64, depth: int = 2, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__(in_channels, num_classes, image_size, mean, std)
        if image_size % patch:
            raise ConfigError(f"zoo_mixer: image size {image_size} is not divisible by the patch size {patch}")
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.blocks = nn.Sequential(*[_MixerBlock((image_size // patch) ** 2, dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(self.normalize(x)).flatten(2).transpose(1, 2)  # (B, tokens, dim)
        return self.norm(self.blocks(t)).mean(1)  # (B, dim)


class ZooDWCNN(_ZooBase):
    """Depthwise-separable CNN: a stride-2 3x3 stem, then three stages of a 7x7 depthwise conv and a 1x1 pointwise
    conv, GroupNorm and GELU (no BatchNorm, no ReLU, no shortcut), stride-2 downsampling, global average pooling."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 32,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__(in_channels, num_classes, image_size, mean, std)

        def stage(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cin, 7, stride, 3, groups=cin), nn.Conv2d(cin, cout, 1), nn.GroupNorm(4, cout),
                    nn.GELU()]

        self.features = nn.Sequential(  # a stride-2 stem: 7x7 depthwise convs are slow on a CPU at full resolution
            nn.Conv2d(in_channels, width, 3, 2, 1), nn.GELU(),
            *stage(width, width, 1), *stage(width, 2 * width, 2), *stage(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)


ZOO_FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "zoo_mlp": ZooMLP,
    "zoo_cnn": ZooCNN,
    "zoo_bncnn": ZooBNCNN,
    "zoo_resnet": ZooResNet,
    "zoo_vit": ZooViT,
    "zoo_mixer": ZooMixer,
    "zoo_dwcnn": ZooDWCNN,
}


def create_zoo_model(name: str, **kwargs) -> nn.Module:
    """Build a zoo classifier by name; unknown names and bad arguments raise :class:`ConfigError`."""
    if name not in ZOO_FAMILIES:
        raise ConfigError(f"unknown zoo classifier {name!r}; available: {sorted(ZOO_FAMILIES)}")
    try:
        return ZOO_FAMILIES[name](**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad arguments for zoo classifier {name!r}: {e}") from e
