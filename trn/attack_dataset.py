"""Write an adversarial copy of a dataset: ``trn attack --attack pgd --eps 0.1 --steps 40 --out runs/fmnist_pgd.npz``.

The output format follows ``out``:

* ``OUT.npz``: float32 NCHW ``images`` in [0, 1], stored exactly as the attack made them, so the Linf/L2 budget holds
  (up to float32 rounding of ``x + delta``, ~1e-7; 8-bit storage would move pixels by up to 0.5/255),
  true ``labels``, the guard's ``clean_predictions`` and ``adversarial_predictions``, ``class_names`` and, for
  targeted attacks, ``targets``. Metadata beside it in ``OUT.json``. Read it back with :func:`trn.data.load_npz`.
* anything else: an image folder ``OUT/<k>_<class name>/<i>.png`` that :func:`trn.data.load_image_folder` reads back
  with the same labels (every class gets a folder, even an empty one, and the zero-padded index ``k`` sorts them in
  label order; characters that cannot appear in a folder name, such as the ``/`` of ``T-shirt/top``, become ``_``).
  Metadata in ``OUT/metadata.json``.
  **PNG stores 8 bits per channel**: every pixel is rounded to the nearest multiple of 1/255, so the perturbation can
  exceed the budget by up to 0.5/255 and the attack can lose a little strength. The metadata therefore also records
  the distance and the guard's accuracy measured on the rounded images, i.e. on the files as written.

    >>> guard, _ = load_classifier("checkpoints/fmnist_guard")
    >>> ds = load_fashion_mnist(split="test").subset(1000, seed=0)
    >>> meta = write_adversarial_dataset("runs/pgd.npz", ds, guard, create_attack("pgd", eps=0.1, steps=40))
    >>> meta["clean_accuracy"], meta["adversarial_accuracy"]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from trn.attacks import Attack, create_attack
from trn.checkpoint import checkpoint_paths
from trn.classifiers import load_classifier
from trn.data import ImageDataset, load_dataset, save_npz
from trn.errors import ConfigError, DataError, InputError, ShapeError
from trn.imageio import encode_png
from trn.utils import batches, eval_mode, pick_device
from trn.validation import check_images, check_labels

__all__ = [
    "AttackResult",
    "attack_dataset",
    "class_folder_names",
    "metadata_path",
    "random_targets",
    "run_attack_command",
    "write_adversarial_dataset",
]
log = logging.getLogger(__name__)


@dataclass
class AttackResult:
    """What :func:`attack_dataset` returns; every tensor is on the CPU."""

    adversarial: torch.Tensor              # (N, C, H, W) float32 in [0, 1]
    clean_predictions: torch.Tensor        # (N,) int64, the guard's argmax on the clean images
    adversarial_predictions: torch.Tensor  # (N,) int64, the guard's argmax on the adversarial images
    targets: torch.Tensor | None = None    # (N,) int64 target classes of a targeted attack


def random_targets(labels: torch.Tensor, num_classes: int, seed: int = 0) -> torch.Tensor:
    """A seeded, uniformly drawn wrong class for every label: ``(y + U{1, ..., K - 1}) mod K``.

    Raises:
        ConfigError: fewer than two classes (no wrong class to aim at).
    """
    if num_classes < 2:
        raise ConfigError(f"targeted attacks need at least 2 classes, got {num_classes}")
    shift = torch.randint(1, num_classes, labels.shape, generator=torch.Generator().manual_seed(seed))
    return (labels.to(torch.int64) + shift) % num_classes


def _num_classes(guard: nn.Module, x: torch.Tensor, device: torch.device) -> int:
    """The guard's output width, from one image (works for any module, not only ours)."""
    with torch.no_grad(), eval_mode(guard):
        return int(guard(x[:1].to(device)).shape[1])


def _module_device(guard: nn.Module) -> torch.device:
    p = next(guard.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def attack_dataset(
    ds: ImageDataset,
    guard: nn.Module,
    attack: Attack,
    *,
    targets: torch.Tensor | None = None,
    batch_size: int = 500,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> AttackResult:
    """Attack every image of ``ds`` against ``guard`` in batches, with a progress bar.

    Args:
        ds: the images to attack and their true labels.
        guard: [0, 1] images -> logits; left in the mode it was in.
        attack: a configured attack (:func:`trn.attacks.create_attack`).
        targets: target classes, required when ``attack.targeted`` (see :func:`random_targets`), refused otherwise.
        batch_size: images per attack call.
        device: where to run; default: the guard's device. The guard must already be there.
        progress: show a tqdm bar (on stderr).

    Raises:
        InputError / ShapeError: images that are not a valid [0, 1] batch, missing (-1) or out-of-range labels.
        ConfigError: bad ``batch_size``, or ``targets`` given/missing against ``attack.targeted``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_images(ds.images, name=f"{ds.name} images")
    n = len(ds)
    if (ds.labels < 0).any():
        raise InputError(f"{ds.name} has images without labels (-1); attacking needs the true label of every image")
    device = torch.device(device) if device is not None else _module_device(guard)
    num_classes = _num_classes(guard, ds.images, device)
    check_labels(ds.labels, n, num_classes, name=f"{ds.name} labels")
    if attack.targeted and targets is None:
        raise ConfigError(f"the targeted {attack.name} attack needs targets (see random_targets)")
    if not attack.targeted and targets is not None:
        raise ConfigError(f"targets given but the {attack.name} attack is untargeted (create it with targeted=True)")
    if targets is not None:
        check_labels(targets, n, num_classes, name="targets")
    wanted = targets if targets is not None else ds.labels  # what the attack moves away from / towards

    adv, clean_pred, adv_pred = [], [], []
    desc = f"{attack.name} eps={attack.eps:g}"
    with eval_mode(guard):
        for s in tqdm(list(batches(n, batch_size)), desc=desc, disable=not progress, unit="batch"):
            xb, yb = ds.images[s].to(device), wanted[s].to(device)
            with torch.no_grad():
                clean_pred.append(guard(xb).argmax(1).cpu())
            xa = attack(guard, xb, yb)
            with torch.no_grad():
                adv_pred.append(guard(xa).argmax(1).cpu())
            adv.append(xa.to("cpu", torch.float32))
    return AttackResult(torch.cat(adv), torch.cat(clean_pred), torch.cat(adv_pred),
                        None if targets is None else targets.to(torch.int64).cpu())


def metadata_path(out: str | os.PathLike) -> Path:
    """Where :func:`write_adversarial_dataset` puts the metadata: ``OUT.json`` for ``OUT.npz``, else
    ``OUT/metadata.json``."""
    p = Path(out)
    return p.with_suffix(".json") if p.suffix == ".npz" else p / "metadata.json"


def class_folder_names(class_names: tuple[str, ...] | list[str], num_classes: int | None = None) -> list[str]:
    """Folder names ``<k>_<name>`` that sort in label order and are safe on every file system.

    ``k`` is zero-padded to the width of the largest index; classes beyond ``class_names`` are named by their index.
    """
    names = list(class_names) + [str(i) for i in range(len(class_names), num_classes or 0)]
    width = len(str(max(len(names) - 1, 0)))
    out = []
    for k, name in enumerate(names):
        safe = re.sub(r"[^\w.\- ]+", "_", str(name)).strip(" .") or "class"
        out.append(f"{k:0{width}d}_{safe}")
    return out


def _write_folder(out: Path, images: torch.Tensor, labels: torch.Tensor, folders: list[str]) -> None:
    """One PNG per image, ``out/<folder of its label>/<index>.png`` (index zero-padded: files sort in order).

    Every class gets its folder, even one with no image, so that label ``k`` reads back as label ``k``.
    """
    width = len(str(max(len(images) - 1, 0)))
    for name in folders:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i, (img, k) in enumerate(zip(images, labels.tolist())):
        (out / folders[k] / f"{i:0{width}d}.png").write_bytes(encode_png(img))


def _quantise(x: torch.Tensor) -> torch.Tensor:
    """The values a PNG holds: rounded to the 8-bit grid (same rounding as :func:`trn.imageio.encode_png`)."""
    return torch.from_numpy((np.clip(x.numpy(), 0, 1) * 255.0).round().astype(np.float32) / 255.0)


def _fraction(hits: torch.Tensor) -> float:
    """Share of True entries, as an exact Python fraction (0.22, not float32's 0.2199999988)."""
    return int(hits.sum()) / max(hits.numel(), 1)


def _distances(x_adv: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    d = (x_adv - x).flatten(1)
    return {"max_linf": float(d.abs().amax()), "max_l2": float(d.norm(dim=1).amax())}


def write_adversarial_dataset(
    out: str | os.PathLike,
    ds: ImageDataset,
    guard: nn.Module,
    attack: Attack,
    *,
    targets: torch.Tensor | None = None,
    batch_size: int = 500,
    device: torch.device | str | None = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Attack ``ds`` against ``guard`` and write the adversarial copy plus a metadata JSON (see the module docstring).

    Args:
        out: ``OUT.npz`` (exact float32 images) or a folder (8-bit PNGs, one subfolder per class). An existing folder
            must be empty: files of an earlier run would otherwise mix with this one.
        ds, guard, attack, targets, batch_size, device, progress: as in :func:`attack_dataset`.
        metadata: extra provenance to record (guard path, dataset name, split...); our keys win on a clash.

    Returns:
        The metadata as written: attack settings, ``n``, ``clean_accuracy``, ``adversarial_accuracy``, measured
        ``max_linf`` / ``max_l2`` distances, ``format``, ``output`` and ``metadata_file`` (plus, for targeted
        attacks, ``target_success_rate``; for folders, the same figures measured on the 8-bit files under ``png``).

    Raises:
        DataError: the output folder exists and is not empty.
        (and whatever :func:`attack_dataset` raises on bad input)
    """
    out = Path(out)
    fmt = "npz" if out.suffix == ".npz" else "folder"
    if fmt == "folder" and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"output folder {out} already exists and is not empty; remove it or choose another --out")
    t0 = time.time()
    res = attack_dataset(ds, guard, attack, targets=targets, batch_size=batch_size, device=device, progress=progress)
    y = ds.labels
    meta: dict[str, Any] = {
        **(metadata or {}),
        "kind": "adversarial_dataset",
        "attack": attack.name,
        "attack_params": attack.params(),
        "eps": attack.eps,
        "norm": attack.norm,
        "steps": getattr(attack, "steps", None),
        "targeted": attack.targeted,
        "seed": attack.seed,
        "n": len(ds),
        "image_shape": list(ds.shape),
        "class_names": list(ds.class_names),
        "clean_accuracy": _fraction(res.clean_predictions == y),
        "adversarial_accuracy": _fraction(res.adversarial_predictions == y),
        **_distances(res.adversarial, ds.images),
        "format": fmt,
        "output": str(out),
        "metadata_file": str(metadata_path(out)),
        "torch": torch.__version__,
    }
    if res.targets is not None:
        meta["target_success_rate"] = _fraction(res.adversarial_predictions == res.targets)

    if fmt == "npz":
        extra = {"clean_predictions": res.clean_predictions.numpy(),
                 "adversarial_predictions": res.adversarial_predictions.numpy()}
        if res.targets is not None:
            extra["targets"] = res.targets.numpy()
        adv_ds = ImageDataset(res.adversarial, y, ds.class_names, f"{ds.name} ({attack.name})")
        save_npz(out, adv_ds, image_dtype="float32", **extra)
        meta["image_dtype"] = "float32"
    else:
        folders = class_folder_names(ds.class_names, int(y.max()) + 1)
        _write_folder(out, res.adversarial, y, folders)
        q = _quantise(res.adversarial)
        dev = torch.device(device) if device is not None else _module_device(guard)
        with torch.no_grad(), eval_mode(guard):
            q_pred = torch.cat([guard(q[s].to(dev)).argmax(1).cpu() for s in batches(len(q), batch_size)])
        meta["image_dtype"] = "uint8 (PNG)"
        meta["class_folders"] = folders
        meta["png"] = {
            "note": "PNG rounds each pixel to 8 bits: these figures are measured on the images as written",
            "adversarial_accuracy": _fraction(q_pred == y),
            **_distances(q, ds.images),
        }
        if res.targets is not None:
            meta["png"]["target_success_rate"] = _fraction(q_pred == res.targets)
    meta["seconds"] = round(time.time() - t0, 2)
    mpath = metadata_path(out)
    mpath.parent.mkdir(parents=True, exist_ok=True)
    mpath.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    log.info("wrote %s (%s, %d images) and %s", out, fmt, len(ds), mpath)
    return meta


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def run_attack_command(args: argparse.Namespace) -> int:
    """``trn attack``: load the dataset and guard, attack, write the copy, print a one-line summary.

    Reads ``args.dataset``, ``data_dir``, ``split``, ``limit``, ``guard``, ``attack``, ``eps``, ``steps``,
    ``targeted``, ``seed``, ``batch_size``, ``device`` and ``out`` (see ``trn attack --help``). For ``cw``,
    ``deepfool`` and ``pgd_l2``, ``--eps`` is an L2 budget (0 = unbounded for ``cw`` and ``deepfool``).
    """
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be a positive number of images, got {args.limit}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    kwargs: dict[str, Any] = {"eps": args.eps, "seed": args.seed, "targeted": args.targeted}
    if args.steps is not None:
        if args.attack.lower() == "fgsm" and args.steps != 1:
            raise ConfigError("fgsm is a single step; drop --steps (or use bim/pgd for an iterative attack)")
        kwargs["steps"] = args.steps
    attack = create_attack(args.attack, **kwargs)  # before the slow loading: bad settings fail fast

    device = pick_device(args.device)
    ds = load_dataset(args.dataset, args.data_dir, args.split).subset(args.limit, args.seed)
    guard, gmeta = load_classifier(args.guard, device)
    want = gmeta.get("image_shape")
    if want is not None and tuple(want) != tuple(ds.shape):
        raise ShapeError(f"{ds.name} images are {'x'.join(map(str, ds.shape))} but the guard {args.guard} expects "
                         f"{'x'.join(map(str, want))}")
    targets = None
    if args.targeted:
        targets = random_targets(ds.labels, _num_classes(guard, ds.images, device), args.seed)
    provenance = {
        "dataset": args.dataset, "data_dir": args.data_dir, "split": args.split, "limit": args.limit,
        "subset_seed": args.seed, "guard": str(args.guard),
        "guard_sha256": _sha256(checkpoint_paths(args.guard)[0]),
        "guard_test_accuracy": gmeta.get("test_accuracy"), "device": str(device),
    }
    meta = write_adversarial_dataset(args.out, ds, guard, attack, targets=targets, batch_size=args.batch_size,
                                     device=device, metadata=provenance)
    adv = meta["png"]["adversarial_accuracy"] if meta["format"] == "folder" else meta["adversarial_accuracy"]
    print(f"{attack.name} eps={attack.eps:g} on {meta['n']} {ds.name} images: guard accuracy "
          f"{meta['clean_accuracy']:.4f} clean -> {adv:.4f} adversarial; wrote {meta['output']} "
          f"(+ {meta['metadata_file']})")
    return 0
