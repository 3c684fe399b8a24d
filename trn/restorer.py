"""The public restoration API: a guard classifier + gradient-map estimator + TRN, loaded from one checkpoint.

    >>> r = Restorer.pretrained("fashion-mnist")      # shipped checkpoint
    >>> x_clean = r(x_adv)                           # (N, C, H, W) in [0, 1], any device r is on
    >>> r.guard(x_clean).argmax(1)                   # the guard classifier is an ordinary nn.Module

The restorer never sees labels: the ``oracle`` estimation mode is refused here (ablations build it by hand).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from trn.checkpoint import load_checkpoint, save_checkpoint
from trn.classifiers import create_classifier, load_classifier
from trn.errors import CheckpointError, ConfigError, InputError
from trn.gradients import GradientMapEstimator, map_channels
from trn.model import TRN, TRNConfig, create_trn
from trn.validation import check_images
from trn.weights import resolve_checkpoint

__all__ = ["CHECKPOINT_DIR", "PRETRAINED", "Restorer"]

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"  # the source checkout's; see trn.weights
# name -> shipped checkpoint. fashion-mnist: the downstream-agnostic net (protects classifiers it never saw, issue 10);
# fashion-mnist-guard: the guard-specific gray-box net (best for the shipped guard itself); -robust: adaptive attackers;
# -fallback: the query shield's fallback for noisy images (the `trn` stage's `fallback`; short Square attacks, gray-box).
PRETRAINED = {"fashion-mnist": "trn_fmnist_agnostic", "fashion-mnist-guard": "trn_fmnist",
              "fashion-mnist-robust": "trn_fmnist_robust_pgd20", "fashion-mnist-fallback": "trn_fmnist_fallback"}


class Restorer(nn.Module):
    """Restore (possibly adversarial) images: ``net(x, estimator(x, guard))``.

    Args:
        net: the :class:`~trn.model.TRN`.
        guard: classifier whose input gradient feeds the gradient stream ([0, 1] in, logits out).
        estimator: gradient-map settings (default: top-3, RMS-scaled).
        class_names: names of the guard's classes.
        metadata: free-form provenance (training config, guard path, metrics), saved with the checkpoint.
    """

    def __init__(self, net: TRN, guard: nn.Module, estimator: GradientMapEstimator | None = None,
                 class_names: tuple[str, ...] | None = None, metadata: dict[str, Any] | None = None) -> None:
        super().__init__()
        estimator = estimator or GradientMapEstimator()
        if estimator.mode == "oracle":
            raise ConfigError("the 'oracle' gradient map needs true labels and is for ablations only")
        if net.cfg.two_stream and map_channels(estimator.mode, net.cfg.in_channels) != net.map_channels:
            raise ConfigError(f"the {estimator.mode!r} estimator gives {map_channels(estimator.mode, net.cfg.in_channels)}"
                              f"-channel maps but the network's gradient stream reads {net.map_channels}")
        self.net, self.guard, self.estimator = net, guard.eval(), estimator
        for p in self.guard.parameters():
            p.requires_grad_(False)
        self.class_names = tuple(class_names) if class_names else tuple(str(i) for i in range(_num_classes(guard)))
        self.metadata = dict(metadata or {})
        self.image_shape: tuple[int, int, int] = tuple(self.metadata.get("image_shape", (net.cfg.in_channels, 28, 28)))
        self.eval()

    # ------------------------------------------------------------------ core
    def gradient_map(self, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """The estimated gradient map the network reads (see :mod:`trn.gradients`)."""
        return self.estimator(x, self.guard, create_graph=create_graph)

    def with_map_from(self, classifier: nn.Module) -> Restorer:
        """This restorer (same network, same weights) with its gradient map estimated from ``classifier``.

        For a downstream classifier that runs in the same process (``trn eval-downstream``, ``trn sanitize`` with a
        local downstream): the map then shows how *that* classifier's loss moves, the direction a gray-box
        attacker on it followed. ``classifier`` is put in eval mode with its parameters frozen. Nothing is copied;
        do not :meth:`save` the result (it would bundle ``classifier`` as the guard).

        Example:
            >>> r = Restorer.pretrained("fashion-mnist").with_map_from(my_classifier)
        """
        training = self.net.training
        r = Restorer(self.net, classifier, self.estimator, self.class_names, {**self.metadata, "map_from": "downstream"})
        self.net.train(training)  # the shared network keeps its mode
        return r

    def forward(self, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """Restore a batch. ``create_graph=True`` keeps the whole pipeline differentiable (adaptive attacks).

        Shape:
            x: (N, C, H, W) in [0, 1] -> (N, C, H, W) in [0, 1]
        """
        check_images(x, channels=self.net.cfg.in_channels, allow_empty=True)
        if x.shape[0] == 0:
            return x.clone()
        g = self.gradient_map(x, create_graph=create_graph) if self.net.cfg.two_stream else None
        return self.net(x, g)

    @torch.no_grad()
    def restore(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Restore a batch of any size in chunks, without building a graph over the network."""
        check_images(x, channels=self.net.cfg.in_channels, allow_empty=True)
        device = self.device
        out = [self(x[i : i + batch_size].to(device)).to(x.device) for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else x.clone()

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    # ------------------------------------------------------------------ numpy / PIL helpers
    def restore_numpy(self, images: np.ndarray) -> np.ndarray:
        """Restore uint8 (0-255) or float ([0, 1]) images laid out (H, W), (H, W, C), (N, H, W) or (N, H, W, C).

        Returns the same layout and dtype (uint8 in -> uint8 out, rounded).
        """
        a = np.asarray(images)
        if a.dtype == np.uint8:
            f = a.astype(np.float32) / 255.0
        elif np.issubdtype(a.dtype, np.floating):
            f = a.astype(np.float32)
        else:
            raise InputError(f"images must be uint8 or float, got dtype {a.dtype}")
        c = self.net.cfg.in_channels
        single = a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3) and c == a.shape[-1] and a.shape[0] != 1)
        batch = f[None] if single else f
        if batch.ndim == 3:
            batch = batch[..., None]
        if batch.ndim != 4 or batch.shape[-1] != c:
            raise InputError(f"expected (N, H, W[, {c}]) or (H, W[, {c}]) images, got shape {a.shape}")
        x = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
        y = self.restore(x).numpy().transpose(0, 2, 3, 1)
        y = y.reshape(batch.shape)[0] if single else y.reshape(batch.shape)
        y = y.reshape(a.shape)
        return (y * 255.0).round().astype(np.uint8) if a.dtype == np.uint8 else y.astype(a.dtype)

    def restore_pil(self, image: Image.Image) -> Image.Image:
        """Restore one PIL image (converted to the network's channel count)."""
        mode = "L" if self.net.cfg.in_channels == 1 else "RGB"
        a = np.asarray(image.convert(mode), dtype=np.uint8)
        return Image.fromarray(self.restore_numpy(a), mode)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, guard_path: str | None = None, **metadata: Any) -> Path:
        """Save network weights + guard weights (prefixed) as safetensors, settings as JSON."""
        state = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        state.update({f"guard.{k}": v for k, v in self.guard.state_dict().items()})
        guard_meta = getattr(self.guard, "_trn_meta", None) or self.metadata.get("guard")
        if guard_meta is None:
            raise CheckpointError("cannot save: the guard's architecture is unknown (build it with Restorer.build "
                                  "or load it with load_classifier)")
        meta = {**self.metadata, **metadata, "kind": "restorer", "trn": vars(self.net.cfg).copy(),
                "estimator": self.estimator.settings(), "class_names": list(self.class_names),
                "image_shape": list(self.image_shape), "guard": guard_meta}
        if guard_path:
            meta["guard"]["path"] = guard_path
        return save_checkpoint(path, state, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Restorer:
        """Load a checkpoint written by :meth:`save` (safetensors + JSON; nothing is unpickled)."""
        state, meta = load_checkpoint(path, device)
        if meta.get("kind") != "restorer":
            raise CheckpointError(f"{path} is not a restorer checkpoint (kind={meta.get('kind')!r})")
        try:
            net = TRN(TRNConfig(**meta["trn"]))
            g = meta["guard"]
            guard = create_classifier(g["arch"], **g.get("arch_kwargs", {}))
            net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
            guard.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("guard.")})
            estimator = GradientMapEstimator(**meta.get("estimator", {}))
        except (KeyError, TypeError, RuntimeError, ConfigError) as e:
            raise CheckpointError(f"{path}: checkpoint does not match the code: {e}") from e
        guard._trn_meta = {k: g[k] for k in ("arch", "arch_kwargs") if k in g}
        r = cls(net, guard, estimator, tuple(meta.get("class_names", ())) or None, meta)
        return r.to(device)

    @classmethod
    def pretrained(cls, name: str = "fashion-mnist", device: str | torch.device = "cpu") -> Restorer:
        """The restorer shipped for dataset ``name`` (``PRETRAINED`` maps it to a checkpoint name).

        Found by :func:`trn.weights.resolve_checkpoint`: ``$TRN_WEIGHTS_DIR``, then the wheel's package data, then
        the source checkout's ``checkpoints/``.

        Raises:
            ConfigError: no restorer is shipped for ``name``.
            CheckpointError: the weights are not found (the message lists where it looked).
        """
        if name not in PRETRAINED:
            raise ConfigError(f"no pretrained restorer {name!r}; available: {sorted(PRETRAINED)}")
        return cls.load(resolve_checkpoint(PRETRAINED[name]), device)

    @classmethod
    def build(cls, image_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10, arch: str = "trn_tiny",
              guard_arch: str = "small_cnn", seed: int = 0, two_stream: bool = True, **estimator: Any) -> Restorer:
        """A freshly initialised (untrained) restorer: for tests and as the starting point of training."""
        torch.manual_seed(seed)
        c, h, _ = image_shape
        gkw = {"in_channels": c, "num_classes": num_classes}
        if guard_arch == "small_cnn":
            gkw["image_size"] = h
        guard = create_classifier(guard_arch, **gkw)
        guard._trn_meta = {"arch": guard_arch, "arch_kwargs": gkw}
        est = GradientMapEstimator(**estimator)
        m = map_channels(est.mode, c)
        net = create_trn(arch, in_channels=c, two_stream=two_stream, grad_channels=0 if m == c else m)
        return cls(net, guard, est, metadata={"image_shape": list(image_shape)})

    @classmethod
    def from_guard_checkpoint(cls, guard_path: str | os.PathLike, net: TRN, estimator: GradientMapEstimator,
                              device: str | torch.device = "cpu") -> Restorer:
        """Pair a new network with a trained guard checkpoint (used by training)."""
        guard, gmeta = load_classifier(guard_path, device)
        guard._trn_meta = {"arch": gmeta["arch"], "arch_kwargs": gmeta.get("arch_kwargs", {}), "path": str(guard_path),
                           "test_accuracy": gmeta.get("test_accuracy")}
        meta = {"image_shape": gmeta.get("image_shape", [net.cfg.in_channels, 28, 28])}
        return cls(net, guard, estimator, tuple(gmeta.get("class_names", ())) or None, meta).to(device)


def _num_classes(guard: nn.Module) -> int:
    n = getattr(guard, "num_classes", None)
    if n is None:
        raise ConfigError("pass class_names: the guard does not say how many classes it has")
    return int(n)
