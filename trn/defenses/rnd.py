"""RND: random noise on each query's input (Qin et al., "Random Noise Defense Against Query-Based Black-Box
Attacks", NeurIPS 2021).

A score-based attacker compares the scores of ``x + d`` and ``x + d'`` whose difference is tiny; adding Gaussian noise
``nu * N(0, I)`` to every query with ``nu`` comparable to that step size drowns the comparison, while a classifier that
is robust to small Gaussian noise keeps its clean accuracy.

Two modes:

* ``deterministic: true`` (the default, and what the service uses): the noise for an image is drawn from a generator
  seeded with a hash of the image (at 8-bit precision, after decoding). Re-sending the *same* image returns the same
  answer, so averaging repeated queries reveals nothing; any changed pixel draws fresh noise. The adaptive (EOT)
  attacker therefore averages over *nearby* images (the candidate plus tiny jitters), which costs it a factor of
  the number of samples in queries and leaves it with an estimate of the smoothed classifier - report that figure.
* ``deterministic: false``: fresh noise from the global torch RNG on every call (the paper's setting); then plain
  repeated queries average it away.

    >>> rnd = RandomNoise(std=0.02)
    >>> bool(torch.equal(rnd(x), rnd(x)))     # deterministic per image
    True
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from trn.defenses.base import InputTransform
from trn.errors import ConfigError

__all__ = ["RandomNoise", "image_seed", "random_noise"]


def image_seed(image: torch.Tensor, salt: int = 0) -> int:
    """A 63-bit seed from one image and ``salt``: the same image, the same seed.

    The image is hashed at 8-bit precision (``round(255 * x)``), so that float rounding differences (e.g. a restorer
    run in batches of different sizes) do not change the seed; images that differ by less than half a grey level in
    every pixel share their noise.

    Args:
        image: (C, H, W) tensor in [0, 1] (any device / float dtype).
        salt: mixed into the hash (different defences / deployments draw different noise).
    """
    a = np.ascontiguousarray(np.round(image.detach().to("cpu", torch.float32).numpy() * 255.0).astype(np.int16))
    h = hashlib.blake2b(a.tobytes(), digest_size=8, person=b"trn-rnd")
    h.update(int(salt).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") >> 1


def random_noise(x: torch.Tensor, std: float = 0.02, deterministic: bool = True, salt: int = 0) -> torch.Tensor:
    """``clamp(x + std * N(0, I), 0, 1)``, the noise seeded per image when ``deterministic``.

    Shape:
        (N, C, H, W) -> (N, C, H, W)
    """
    if std == 0 or x.numel() == 0:
        return x
    if not deterministic:
        return (x + std * torch.randn_like(x)).clamp(0.0, 1.0)
    noise = torch.empty(x.shape, dtype=torch.float32)
    for i in range(len(x)):
        g = torch.Generator().manual_seed(image_seed(x[i], salt))
        noise[i] = torch.randn(x.shape[1:], generator=g)
    return (x + std * noise.to(device=x.device, dtype=x.dtype)).clamp(0.0, 1.0)


class RandomNoise(InputTransform):
    """Input-side RND stage: ``clamp(x + std * N(0, I), 0, 1)``.

    Args:
        std: noise standard deviation ``nu`` (images in [0, 1]; the paper uses 0.01-0.05).
        deterministic: seed the noise with a hash of each image (same image, same answer); False: fresh noise per call.
        salt: mixed into the per-image seed.
        bpda: identity backward pass (the noise is additive, so autograd's gradient is already the identity).

    Shape:
        (N, C, H, W) -> (N, C, H, W)
    """

    differentiable = True  # additive noise: d out / d x is the identity (inside the clamp)

    def __init__(self, std: float = 0.02, deterministic: bool = True, salt: int = 0, bpda: bool = False) -> None:
        super().__init__(bpda)
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or not 0 <= std <= 1:
            raise ConfigError(f"RND: std must be a number in [0, 1], got {std!r}")
        if not isinstance(deterministic, bool):
            raise ConfigError(f"RND: deterministic must be true or false, got {deterministic!r}")
        if isinstance(salt, bool) or not isinstance(salt, int):
            raise ConfigError(f"RND: salt must be an integer, got {salt!r}")
        self.std, self.deterministic, self.salt = float(std), deterministic, salt

    @property
    def randomized(self) -> bool:
        """Random outputs only in the non-deterministic mode (then attack with EOT)."""
        return not self.deterministic and self.std > 0

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return random_noise(x, self.std, self.deterministic, self.salt)

    def extra_repr(self) -> str:
        return f"std={self.std}, deterministic={self.deterministic}, bpda={self.bpda}"
