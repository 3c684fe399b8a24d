"""UniG ("Unifying Gradients to Improve Real-world Robustness for Deep Networks", arXiv 2208.06228).

A defence against score-based query attacks (Square, NES, ...). A Hadamard weight ``P`` (one row per sample) sits
between the penultimate features ``f`` and the linear head: ``logits = head(f * P)``. On every call ``P`` is drawn
afresh and optimised for a few SGD steps so that the feature gradients of all samples in the batch look alike,
which makes the scores an attacker queries less informative. The backbone is frozen; nothing is trained.

Per call (papers.md, "UniG"):

1. ``f = forward_features(x)``; pseudo-labels ``y~ = argmax head(f)`` (the undefended prediction).
2. ``P ~ N(1, 0.5)`` per sample and feature, clamped to ``[1 - delta, 1 + delta]``.
3. ``steps`` times: ``g = d CE(head(f * P), y~) / d f`` (``create_graph=True``); min-max normalise ``g`` with the
   min and max of the first step (detached); ``loss = sum_j ||g_j - g_{j+1}||_2`` over consecutive samples; one SGD
   step on ``P`` (momentum, weight decay); clamp ``P`` to ``[1 - delta, 1 + delta]``.
4. Output ``head(f * P)``.

Our choices where the summary is silent: the min-max normalisation uses one scalar min and max over the whole batch;
``P`` is clamped at initialisation too, so it lies in the box at every step; a batch of at most ``num_reference``
images is padded with stored reference (training) images, whose outputs are dropped; gradients that an attacker
takes through the output treat ``P`` as a constant (they flow through ``f`` only).

**By default outputs are random and depend on the rest of the batch** (the paper's setting). With ``seed=None`` the
global torch RNG draws ``P``; with ``seed=k`` a private generator seeded once at construction does, so a fresh
instance replays the same sequence of outputs (two calls on one instance still differ). Evaluate with EOT and with
white-box / transfer attacks too.

**Serving mode** (``per_sample=True, deterministic=True``; what the service uses): each image is unified with the
stored reference images only - never with the other images of its batch, which in a service belong to other clients -
and its ``P`` is drawn from a generator seeded with a hash of the image's bytes. The answer for an image then depends
on that image alone (the same alone or inside any batch, up to float rounding) and re-sending it returns the same
answer, so averaging repeated queries reveals nothing. ``per_sample`` needs ``reference_images``.

    >>> defended = UniGClassifier(classifier, reference_images=train_images[:4], seed=0)
    >>> logits = defended(x)                  # (N, num_classes); works under torch.no_grad / inference_mode
    >>> eot = defended.expected_logits(x, 8)  # mean over 8 draws of P: what an EOT attacker differentiates
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from trn.defenses.base import has_feature_split
from trn.defenses.rnd import image_seed
from trn.errors import ConfigError, ShapeError
from trn.validation import check_images

__all__ = ["UniGClassifier", "unig_loss"]


def unig_loss(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``sum_j ||gn_j - gn_{j+1}||_2`` with ``gn = (g - lo) / (hi - lo)``: how much consecutive samples' feature
    gradients differ. ``g``: (B, D); ``lo`` / ``hi``: scalars. A batch of one gives 0."""
    gn = (g - lo) / (hi - lo).clamp_min(1e-12)
    return (gn[:-1] - gn[1:]).flatten(1).norm(dim=1).sum()


def _number(v: object, name: str, lo: float = 0.0, hi: float = math.inf, hi_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or v > hi or (
            hi_open and v >= hi):
        bound = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise ConfigError(f"UniG: {name} must be a number in {bound}, got {v!r}")
    return float(v)


def _integer(v: object, name: str, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"UniG: {name} must be an integer >= {lo}, got {v!r}")
    return v


class UniGClassifier(nn.Module):
    """Wrap a classifier with UniG. Training-free; the wrapped classifier's weights are never changed.

    Args:
        classifier: a model with ``forward_features`` (penultimate features, (B, D)) and ``forward_head``.
        delta: ``P`` is clamped to ``[1 - delta, 1 + delta]`` (paper: 0.5 CIFAR-10, 0.1 ImageNet).
        steps: SGD steps on ``P`` per call (paper: 1).
        lr: SGD learning rate (paper: 10 CIFAR-10, 1 ImageNet).
        momentum: SGD momentum (0.9).
        weight_decay: SGD weight decay on ``P`` (5e-4).
        reference_images: (R, C, H, W) training images in [0, 1]; the first ``num_reference`` are kept and appended
            to batches of at most ``num_reference`` images so that a single image still has partners.
        num_reference: how many reference images to keep and the batch size up to which they are appended.
        seed: seed of a private generator for ``P`` (None: the global torch RNG); with ``deterministic``, a salt.
        per_sample: unify each image with the reference images only (its answer depends on it alone); needs
            ``reference_images``.
        deterministic: draw each image's ``P`` from a generator seeded with a hash of the image (needs
            ``per_sample``): the same image always gets the same answer.

    Raises:
        ConfigError: the classifier has no features/head split, or a setting is out of range.

    Shape:
        (N, C, H, W) in [0, 1] -> (N, num_classes) logits.
    """

    has_feature_split = False  # head(f * P) with a per-call P is not a fixed features/head split
    randomized = True  # outputs are random: evaluate with EOT (see expected_logits)

    def __init__(self, classifier: nn.Module, delta: float = 0.5, steps: int = 1, lr: float = 10.0,
                 momentum: float = 0.9, weight_decay: float = 5e-4, reference_images: torch.Tensor | None = None,
                 num_reference: int = 4, seed: int | None = None, per_sample: bool = False,
                 deterministic: bool = False) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Module) or not has_feature_split(classifier):
            raise ConfigError(
                f"UniG needs a classifier with forward_features (penultimate features) and forward_head (linear "
                f"head); {type(classifier).__name__} has no such split (wrap_classifier(model, features=, head=))"
            )
        self.classifier = classifier
        self.delta = _number(delta, "delta")
        self.steps = _integer(steps, "steps")
        self.lr = _number(lr, "lr")
        self.momentum = _number(momentum, "momentum", 0.0, 1.0, hi_open=True)
        self.weight_decay = _number(weight_decay, "weight_decay")
        self.num_reference = _integer(num_reference, "num_reference")
        if seed is not None:
            _integer(seed, "seed")
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed) if seed is not None else None
        if reference_images is not None:
            check_images(reference_images, name="reference_images")
            reference_images = reference_images[: self.num_reference].detach().clone()
        self.register_buffer("reference_images", reference_images, persistent=False)
        for name, flag in (("per_sample", per_sample), ("deterministic", deterministic)):
            if not isinstance(flag, bool):
                raise ConfigError(f"UniG: {name} must be true or false, got {flag!r}")
        if per_sample and (reference_images is None or not len(reference_images)):
            raise ConfigError("UniG: per_sample needs reference images (reference_images, or reference_dataset in a "
                              "defence spec, e.g. {name: unig, reference_dataset: fashion-mnist})")
        if deterministic and not per_sample:
            raise ConfigError("UniG: deterministic needs per_sample: true (a batch-wide P cannot be seeded per image)")
        self.per_sample, self.deterministic = per_sample, deterministic
        if deterministic:
            self.randomized = False  # instance attribute: the same image, the same answer
        if hasattr(classifier, "num_classes"):
            self.num_classes = classifier.num_classes

    def extra_repr(self) -> str:
        n = 0 if self.reference_images is None else len(self.reference_images)
        return (f"delta={self.delta}, steps={self.steps}, lr={self.lr}, momentum={self.momentum}, "
                f"weight_decay={self.weight_decay}, references={n}, seed={self.seed}, per_sample={self.per_sample}, "
                f"deterministic={self.deterministic}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.defend(x)[0]

    def defend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Defended logits and the final Hadamard weights.

        Returns:
            ``(logits, P)``: (N, num_classes) and (N, D), ``P`` detached and within ``[1 - delta, 1 + delta]``.
        """
        return self._run(x, 1)

    def expected_logits(self, x: torch.Tensor, samples: int = 8) -> torch.Tensor:
        """Mean logits over ``samples`` independent draws of ``P`` (EOT, Athalye et al. 2018), for attacks.

        The backbone runs once; only the cheap ``P`` optimisation and the head are repeated. Gradients w.r.t. ``x``
        flow through the features, with each ``P`` held constant.

        Shape:
            (N, C, H, W) -> (N, num_classes)
        """
        return self._run(x, _integer(samples, "samples", 1))[0]

    def _run(self, x: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        check_images(x, allow_empty=True, name="x")
        clf = self.classifier
        was_training = clf.training
        clf.eval()
        try:
            if torch.is_inference_mode_enabled():
                with torch.inference_mode(False):
                    return self._defend(x.clone(), samples)
            return self._defend(x, samples)
        finally:
            clf.train(was_training)

    def _defend(self, x: torch.Tensor, samples: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        clf, n = self.classifier, len(x)
        feats = clf.forward_features(x)  # (N, D); keeps the graph to x when the caller differentiates
        if n == 0:
            return clf.forward_head(feats), feats.detach()
        if self.per_sample:
            return self._defend_per_sample(x, feats, samples)
        f = feats.detach()
        refs = self.reference_images
        if refs is not None and len(refs) and n <= self.num_reference:
            if refs.shape[1:] != x.shape[1:]:
                raise ShapeError(f"UniG reference images are {tuple(refs.shape[1:])}, inputs {tuple(x.shape[1:])}")
            with torch.no_grad():
                f = torch.cat([f, clf.forward_features(refs.to(device=x.device, dtype=x.dtype))])  # (N + R, D)
        elif n == 1:
            warnings.warn("UniG on a single image without reference_images: there is no pair to unify, so the "
                          "output is the head on randomly scaled features", stacklevel=3)
        logits = 0.0
        for _ in range(samples):
            p = self._optimise_p(f)
            logits = logits + clf.forward_head(feats * p[:n])
        return logits / samples, p[:n]

    def _optimise_p(self, f: torch.Tensor, init: torch.Tensor | None = None) -> torch.Tensor:
        """The UniG inner loop on detached features ``f``: (M, D) one group, or (G, M, D) independent groups (each
        with its own min-max normalisation). ``init``: standard normal draws for ``P`` (else drawn here). Returns the
        detached, clamped ``P``, shaped like ``f``."""
        clf, lo_p, hi_p = self.classifier, 1.0 - self.delta, 1.0 + self.delta
        if init is None:
            init = torch.randn(f.shape, generator=self._gen, dtype=f.dtype)
        p = init.to(f.dtype).mul(0.5).add_(1.0)  # N(1, 0.5)
        p = p.to(f.device).clamp_(lo_p, hi_p).requires_grad_(True)
        if self.steps == 0:
            return p.detach()
        opt = torch.optim.SGD([p], lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        f = f.detach().requires_grad_(True)
        with torch.enable_grad():
            grouped = f.ndim == 3
            with torch.no_grad():
                pseudo = clf.forward_head(f.reshape(-1, f.shape[-1])).argmax(1)  # undefended prediction
            lo = hi = None
            for _ in range(self.steps):
                z = clf.forward_head((f * p).reshape(-1, f.shape[-1]))
                ce = F.cross_entropy(z, pseudo, reduction="sum")
                (g,) = torch.autograd.grad(ce, f, create_graph=True)  # like f, a function of P
                if not grouped:
                    if lo is None:
                        lo, hi = g.min().detach(), g.max().detach()
                    loss = unig_loss(g, lo, hi)
                else:  # per group: its own normalisation, the sum of the groups' losses (independent gradients)
                    if lo is None:
                        lo, hi = g.amin((1, 2), keepdim=True).detach(), g.amax((1, 2), keepdim=True).detach()
                    gn = (g - lo) / (hi - lo).clamp_min(1e-12)
                    loss = (gn[:, :-1] - gn[:, 1:]).norm(dim=2).sum()
                (grad_p,) = torch.autograd.grad(loss, p, allow_unused=True)
                p.grad = torch.zeros_like(p) if grad_p is None else grad_p
                opt.step()
                with torch.no_grad():
                    p.clamp_(lo_p, hi_p)
        return p.detach()

    def _defend_per_sample(self, x: torch.Tensor, feats: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Serving mode: image i is unified with the reference images only; groups are optimised side by side."""
        clf, refs, n = self.classifier, self.reference_images, len(x)
        if refs.shape[1:] != x.shape[1:]:
            raise ShapeError(f"UniG reference images are {tuple(refs.shape[1:])}, inputs {tuple(x.shape[1:])}")
        with torch.no_grad():
            fr = clf.forward_features(refs.to(device=x.device, dtype=x.dtype)).detach()  # (R, D)
        f = torch.cat([feats.detach()[:, None], fr[None].expand(n, -1, -1)], 1)  # (N, 1 + R, D)
        logits = 0.0
        for s in range(samples):
            init = None
            if self.deterministic:
                salt = (self.seed or 0) + s
                init = torch.stack([torch.randn(f.shape[1:], generator=torch.Generator().manual_seed(
                    image_seed(x[i], salt)), dtype=f.dtype) for i in range(n)])
            p = self._optimise_p(f, init)  # (N, 1 + R, D)
            logits = logits + clf.forward_head(feats * p[:, 0])
        return logits / samples, p[:, 0]
