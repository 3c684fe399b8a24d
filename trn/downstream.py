"""Load a user's downstream classifier from a file, whatever its format, and check it before use.

Three formats are accepted; the format is read from the file's contents, not its name:

* our checkpoints: ``NAME.safetensors`` + ``NAME.json`` (:func:`trn.classifiers.save_classifier`);
* TorchScript: ``torch.jit.script(model).save("my.pt")`` (or ``torch.jit.trace``), loaded by ``torch.jit.load``;
* a ``torch.export`` program: ``torch.export.save(torch.export.export(model, (x,), dynamic_shapes=...), "my.pt2")``,
  loaded by ``torch.export.load``. Export it with a dynamic batch dimension
  (``dynamic_shapes={"x": {0: torch.export.Dim("batch")}}``, ``x`` being the name of forward's argument).

The model must take images in [0, 1] laid out (N, C, H, W) (normalisation inside) and return logits (N, classes).
Anything else written by ``torch.save`` (a pickled module or state dict) and plain pickles are refused: loading them
would run arbitrary code. Nothing here ever unpickles: TorchScript archives are read by ``torch.jit.load`` (which
rebuilds only TorchScript objects); ``torch.export.load`` *does* unpickle parts of an archive (its example inputs,
tensors flagged ``use_pickle``, opaque constants), so an export archive is first checked and copied in memory
without those parts (:func:`_safe_export_archive`), and refused where a needed part is pickled.

    >>> clf = load_downstream("my.pt", image_shape=(1, 28, 28), num_classes=10)
    >>> logits = clf(x)                  # an nn.Module; attacks and the restorer's training treat it like any other
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from trn.checkpoint import checkpoint_paths
from trn.classifiers import load_classifier
from trn.errors import CheckpointError, ShapeError

__all__ = ["FORMATS", "ExternalClassifier", "detect_format", "load_downstream", "validate_classifier"]
log = logging.getLogger(__name__)

FORMATS = ("checkpoint", "torchscript", "export")
_PICKLE_HINT = ("refused: loading it would unpickle arbitrary Python objects. Save the model as TorchScript "
                "(torch.jit.script(model).save(path)), as a torch.export program (torch.export.save) or as a trn "
                "checkpoint (trn.classifiers.save_classifier)")


def detect_format(path: str | os.PathLike) -> str:
    """Which loader ``path`` needs: ``checkpoint``, ``torchscript`` or ``export``.

    Raises:
        CheckpointError: the file is missing, a pickle / ``torch.save`` file (unsafe, refused) or not a model.
    """
    p = Path(path)
    tensors, meta = checkpoint_paths(p)
    if p.suffix in ("", ".safetensors", ".json") and (tensors.is_file() or meta.is_file()):
        return "checkpoint"
    if not p.is_file():
        raise CheckpointError(f"classifier file not found: {p}")
    with p.open("rb") as f:
        head = f.read(8)
    if not zipfile.is_zipfile(p):
        if head[:1] == b"\x80" or p.suffix in (".pkl", ".pickle"):
            raise CheckpointError(f"{p} is a pickle file: {_PICKLE_HINT}")
        raise CheckpointError(f"{p} is not a classifier file (expected a trn checkpoint, TorchScript or a "
                              f"torch.export .pt2 archive)")
    try:
        names = zipfile.ZipFile(p).namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{p}: unreadable archive: {e}") from e
    parts = [n.split("/", 1)[1] if "/" in n else n for n in names]
    if any(n.startswith("code/") for n in parts):
        return "torchscript"
    if any(n.startswith("models/") and n.endswith(".json") for n in parts) or "archive_format" in parts:
        return "export"
    if "data.pkl" in parts:
        raise CheckpointError(f"{p} was written by torch.save (a pickle): {_PICKLE_HINT}")
    raise CheckpointError(f"{p} is a zip archive but neither TorchScript nor a torch.export program")


class ExternalClassifier(nn.Module):
    """An ``nn.Module`` around a loaded TorchScript module or exported program.

    The wrapped model is kept out of ``modules()``: exported programs refuse ``train()`` / ``eval()`` (they are
    frozen in the mode they were exported in), and attacks and gradient-map estimation toggle the mode of every
    submodule. ``.to(device)`` still moves it. Its parameters are frozen (only input gradients are ever needed).

    Args:
        model: the loaded module (``torch.jit.ScriptModule`` or ``ExportedProgram.module()``).
        fmt: ``torchscript`` or ``export``.
        num_classes: classes of the logits (set by :func:`validate_classifier`).
        source: the file it was read from (for messages and metadata).
    """

    def __init__(self, model: nn.Module, fmt: str, num_classes: int | None = None, source: str = "") -> None:
        super().__init__()
        self._inner = (model,)  # a tuple: not registered as a submodule (see class docstring)
        self.format, self.source = fmt, source
        self.num_classes = num_classes
        # attacks and helpers read ``next(model.parameters()).device``: an empty, frozen anchor says where it lives
        self._anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        for prm in model.parameters():
            prm.requires_grad_(False)

    @property
    def model(self) -> nn.Module:
        return self._inner[0]

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .float(): move the hidden model too
        super()._apply(fn, recurse)
        self._inner = (self._inner[0]._apply(fn),)
        return self

    def train(self, mode: bool = True) -> ExternalClassifier:
        self.training = mode
        if self.format == "torchscript":
            self.model.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def extra_repr(self) -> str:
        return f"format={self.format!r}, source={self.source!r}, num_classes={self.num_classes}"


def _safe_export_archive(path: Path) -> io.BytesIO:
    """An in-memory copy of a ``torch.export`` archive with everything the loader would unpickle checked or removed.

    ``torch.export.load`` falls back to ``torch.load(weights_only=False)`` (arbitrary code) for the saved example
    inputs, for weights or constants flagged ``use_pickle`` and for the legacy layout, and ``pickle.loads`` for
    opaque constants. We refuse archives that need any of those (and AOTInductor packages, which hold compiled
    code), and blank the example inputs, which running the program does not need.
    """
    from torch.export.pt2_archive import constants as pt2

    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        root = infos[0].filename.split("/", 1)[0] + "/" if infos and "/" in infos[0].filename else ""
        rel = {i.filename[len(root):]: i for i in infos if i.filename.startswith(root)}
        if pt2.ARCHIVE_FORMAT_PATH not in rel:
            raise CheckpointError(f"{path}: a legacy torch.export archive (its loader unpickles); re-save it with "
                                  f"torch.export.save from a recent torch")
        if any(n.startswith("data/aotinductor/") for n in rel):
            raise CheckpointError(f"{path}: an AOTInductor package (compiled code) is refused; save the program "
                                  f"with torch.export.save")
        prefix, suffix = pt2.MODELS_FILENAME_FORMAT.split("{}")
        models = [n[len(prefix):-len(suffix)] for n in rel if n.startswith(prefix) and n.endswith(suffix)]
        if not models:
            raise CheckpointError(f"{path}: no exported program in the archive")
        blank = set()
        for m in models:
            for fmt_name, kind in ((pt2.WEIGHTS_CONFIG_FILENAME_FORMAT, "weight"),
                                   (pt2.CONSTANTS_CONFIG_FILENAME_FORMAT, "constant")):
                cfg_name = fmt_name.format(m)
                if cfg_name not in rel:
                    raise CheckpointError(f"{path}: {cfg_name} missing (legacy layout, which unpickles); re-save it")
                try:
                    entries = json.loads(z.read(rel[cfg_name])).get("config", {})
                except (ValueError, AttributeError) as e:
                    raise CheckpointError(f"{path}: unreadable {cfg_name}: {e}") from e
                for fqn, meta in entries.items():
                    name = str(meta.get("path_name", ""))
                    if meta.get("use_pickle") or (kind == "constant"
                                                  and not name.startswith(pt2.TENSOR_CONSTANT_FILENAME_PREFIX)):
                        raise CheckpointError(f"{path}: {kind} {fqn!r} is stored as a pickled object; refused "
                                              f"(only plain tensors can be loaded without unpickling)")
            blank.add(pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(m))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
            for name, info in rel.items():
                out.writestr(info, b"" if name in blank else z.read(info))
    buf.seek(0)
    return buf


def _load_raw(path: Path, fmt: str, device: torch.device) -> nn.Module:
    if fmt == "export":
        archive = _safe_export_archive(path)
    try:
        if fmt == "torchscript":
            return torch.jit.load(str(path), map_location=device)
        return torch.export.load(archive).module().to(device)
    except Exception as e:  # both loaders raise many types for a damaged archive
        raise CheckpointError(f"{path}: could not load the {fmt} archive: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _accepts(model: nn.Module, x: torch.Tensor) -> bool:
    try:
        model(x)
    except Exception:  # noqa: BLE001 - any failure means no
        return False
    return True


def validate_classifier(model: nn.Module, image_shape: tuple[int, int, int], num_classes: int | None = None,
                        name: str = "classifier") -> int:
    """Run a probe batch through ``model`` and check that it maps (N, C, H, W) images in [0, 1] to (N, K) logits.

    Args:
        model: the classifier.
        image_shape: (C, H, W) of the images it will see.
        num_classes: the number of classes the logits must have (None: any K >= 2).
        name: what to call it in messages (a path, usually).

    Returns:
        K, the number of classes.

    Raises:
        ShapeError: it does not accept a batch of such images (wrong input channels or size, a batch dimension
            frozen at export), returns something other than a (N, K) float tensor, or K differs from ``num_classes``.

    Warns:
        UserWarning: the outputs look like probabilities (rows in [0, 1] summing to 1), not logits.
    """
    c, h, w = image_shape
    device = next((t.device for t in (*model.parameters(), *model.buffers()) if t.numel()), torch.device("cpu"))
    probe = torch.rand(2, c, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                out = model(probe)
            except Exception as e:  # user models raise anything on a bad input
                detail = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
                hint = " (a batch of 1 works: export it with a dynamic batch dimension)" if _accepts(model, probe[:1]) \
                    else ""
                raise ShapeError(f"{name} does not accept a (2, {c}, {h}, {w}) batch of images in [0, 1]{hint}: "
                                 f"{detail}") from e
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ShapeError(f"{name} must return a logits tensor, got {type(out).__name__}")
    if out.ndim != 2 or out.shape[0] != 2 or out.shape[1] < 2:
        raise ShapeError(f"{name} returns shape {tuple(out.shape)} for a (2, {c}, {h}, {w}) batch; expected "
                         f"(2, num_classes) logits")
    if not out.is_floating_point() or not torch.isfinite(out).all():
        raise ShapeError(f"{name} must return finite float logits, got {out.dtype}")
    k = int(out.shape[1])
    if num_classes is not None and k != num_classes:
        raise ShapeError(f"{name} predicts {k} classes but the data has {num_classes}")
    if bool(((out >= 0) & (out <= 1)).all()) and torch.allclose(out.sum(1), torch.ones(2, device=out.device),
                                                                 atol=1e-3):
        warnings.warn(f"{name} seems to return probabilities, not logits: attacks and the restorer's training "
                      f"assume logits", stacklevel=2)
    return k


def load_downstream(path: str | os.PathLike, image_shape: tuple[int, int, int] = (1, 28, 28),
                    num_classes: int | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load and validate a downstream classifier from a trn checkpoint, TorchScript file or ``torch.export`` program.

    Args:
        path: the file (a checkpoint may be given as NAME, NAME.safetensors or NAME.json).
        image_shape: (C, H, W) of the images it classifies.
        num_classes: required number of classes (None: whatever it predicts).
        device: where to put it.

    Returns:
        The classifier in eval mode, parameters frozen, with a ``num_classes`` attribute; TorchScript and export
        models come wrapped in :class:`ExternalClassifier`.

    Raises:
        CheckpointError: missing, unsafe (pickle / ``torch.save``) or unreadable file.
        ShapeError: see :func:`validate_classifier`.

    Example:
        >>> clf = load_downstream("checkpoints/zoo_fmnist_mlp")
        >>> clf(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """
    device = torch.device(device)
    fmt = detect_format(path)
    if fmt == "checkpoint":
        model, meta = load_classifier(path, device)
        shape = tuple(meta.get("image_shape") or image_shape)
        if shape != tuple(image_shape):
            raise ShapeError(f"{path} was trained on {shape} images, not {tuple(image_shape)}")
        for prm in model.parameters():
            prm.requires_grad_(False)
    else:
        model = ExternalClassifier(_load_raw(Path(path), fmt, device), fmt, source=str(path))
    k = validate_classifier(model, tuple(image_shape), num_classes, name=str(path))
    if getattr(model, "num_classes", None) is None:
        model.num_classes = k
    log.info("loaded %s classifier %s (%d classes)", fmt, path, k)
    return model.eval()
