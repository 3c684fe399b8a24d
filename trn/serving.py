"""What the classification service does that is not Ray: decoding tensors sent over HTTP, loading the downstream model.

The Ray Serve layer (``workers/serve.py``) only schedules: it calls these functions from its deployments.

* :func:`decode_npy` / :func:`decode_npz_batch`: float or uint8 tensors from untrusted bytes (``allow_pickle=False``,
  header checked before the data is read);
* :func:`load_downstream_model`: a downstream classifier by kind (our checkpoint, TorchScript, ``torch.export``);
* :func:`build_service_defenses` / :func:`wrap_classifier`: the defence stack split as the service runs it (input
  side in the restorer replica, classifier wrappers around the downstream model);
* :func:`read_checkpoint_meta`: a checkpoint's JSON side, for build-time checks; :func:`service_info` and
  :func:`check_service_defenses`: the checks an app builder runs before anything starts;
* :func:`output_class_names`: the class names an answer of ``n`` probabilities is labelled with.

Probabilities from a model's output and the answer's format are in :mod:`trn.output_policy`.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trn.checkpoint import checkpoint_paths
from trn.defenses.spec import canonical_defenses, split_defenses, uses_default_restorer
from trn.defenses.stack import build_defense_stack, build_preprocessor
from trn.errors import CheckpointError, ConfigError, InputError, RequestError, ShapeError

if TYPE_CHECKING:
    from trn.serve_config import AppArgs

__all__ = ["build_service_defenses", "check_service_defenses", "decode_npy", "decode_npz_batch",
           "load_downstream_model", "output_class_names", "read_checkpoint_meta", "service_info", "wrap_classifier"]


def _to_unit_float(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise InputError("tensor contains NaN or infinity")
    if a.size and (a.min() < 0.0 or a.max() > 1.0):
        raise InputError(f"float tensor values must lie in [0, 1], got [{a.min():.4g}, {a.max():.4g}]")
    return a


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.hasobject or not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
        raise InputError(f"tensor dtype must be uint8 or float, got {dtype}")


def decode_npy(data: bytes, channels: int, size: tuple[int, int]) -> np.ndarray:
    """A (C, H, W) float32 array in [0, 1] from .npy bytes; the header is checked before the data is read.

    Accepted shapes: (C, H, W), (1, C, H, W), and (H, W) for one channel. Tensors are never resized.

    Raises:
        InputError: not an .npy file, truncated, bad dtype, NaN / infinite or out-of-range values.
        ShapeError: another shape.
    """
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            raise InputError(f"unsupported .npy version {version}")
    except InputError:
        raise
    except (ValueError, OSError, SyntaxError) as e:
        raise InputError(f"not a valid .npy file: {e}") from e
    want = (channels, *size)
    if not (shape == want or shape == (1, *want) or (channels == 1 and shape == size)):
        raise ShapeError(f"tensor has shape {tuple(shape)}, expected {want}, (1, {channels}, ...) "
                         f"{'or ' + str(tuple(size)) if channels == 1 else ''} (tensors are never resized)")
    _check_dtype(dtype)
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"truncated or corrupt .npy file: {e}") from e
    return _to_unit_float(a.reshape(want))


def decode_npz_batch(data: bytes, channels: int, size: tuple[int, int], max_images: int) -> np.ndarray:
    """(N, C, H, W) float32 images in [0, 1] from an .npz holding one array (or one named ``images``).

    The array may be (N, C, H, W), or (N, H, W) for one channel; uint8 or float in [0, 1]. Loaded with
    ``allow_pickle=False``; the member's header (shape, dtype) is checked before its data is read.

    Raises:
        InputError: not an npz, no / several arrays without ``images``, bad dtype or values, more than
            ``max_images`` images, or none.
        ShapeError: another image shape.
    """
    try:
        z = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"not a valid .npz file: {e}") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise InputError("expected an .npz archive (np.savez), got a single .npy array")
    with z:
        keys = list(z.files)
        key = "images" if "images" in keys else (keys[0] if len(keys) == 1 else None)
        if key is None:
            raise InputError(f"the .npz holds {len(keys)} arrays {keys[:5]}; name the images array 'images'")
        try:
            with z.zip.open(f"{key}.npy") as member:
                version = np.lib.format.read_magic(member)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _fortran, dtype = read(member)
            _check_dtype(dtype)  # before the shape: an object (pickled) array is refused as such
            want = (channels, *size)
            if not (len(shape) == 4 and tuple(shape[1:]) == want) and not (
                    channels == 1 and len(shape) == 3 and tuple(shape[1:]) == size):
                raise ShapeError(f"npz array {key!r} has shape {tuple(shape)}, expected (N, {', '.join(map(str, want))})"
                                 f"{' or (N, ' + ', '.join(map(str, size)) + ')' if channels == 1 else ''} "
                                 "(tensors are never resized)")
            if shape[0] == 0:
                raise InputError("the .npz holds no images")
            if shape[0] > max_images:
                raise InputError(f"the .npz holds {shape[0]} images, over the limit of {max_images} per request")
            a = z[key]
        except (InputError, ShapeError):
            raise
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise InputError(f"truncated or corrupt .npz file: {e}") from e
    return _to_unit_float(a.reshape(len(a), channels, *size))


def load_downstream_model(kind: str, path: str | None, device: str | torch.device = "cpu") -> tuple[torch.nn.Module,
                                                                                                  dict[str, Any]]:
    """Load the service's downstream classifier (kind ``checkpoint`` / ``torchscript`` / ``export``) for inference.

    TorchScript and ``torch.export`` files are programs: loading one runs code the operator chose. Load only files
    you trust (our own checkpoints are safetensors + JSON and unpickle nothing). Unlike
    :func:`trn.downstream.load_downstream`, no probe batch is run: an export with a fixed batch size of 1 is accepted
    (the service then runs it one image at a time).

    Returns:
        (model taking [0, 1] (N, C, H, W) and returning logits or probabilities, metadata dict)

    Raises:
        CheckpointError: a file that cannot be loaded as that kind.
        ConfigError: a kind that is not a loadable model.
    """
    from trn.classifiers import load_classifier

    device = torch.device(device)
    if kind == "checkpoint":
        return load_classifier(path, device)
    p = Path(path or "")
    if not p.is_file():
        raise CheckpointError(f"downstream.path: file not found: {p}")
    try:
        if kind == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated but still loads
                model = torch.jit.load(str(p), map_location=device)
            model.eval()
        elif kind == "export":
            model = torch.export.load(str(p)).module().to(device)
        else:
            raise ConfigError(f"downstream.kind {kind!r} is not a loadable model")
    except ConfigError:
        raise
    except Exception as e:  # torch raises many types (RuntimeError, BadZipFile, ...) on a bad file
        raise CheckpointError(f"cannot load {kind} program {p}: {e}") from e
    return model, {"kind": kind, "path": str(p)}


def read_checkpoint_meta(path: str, kind: str) -> dict:
    """The JSON side of a safetensors checkpoint, without loading weights (build-time checks)."""
    meta_path = checkpoint_paths(path)[1]
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint metadata {meta_path}: {e}") from e
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} is not a {kind} checkpoint (kind={meta.get('kind')!r})")
    return meta


def wrap_classifier(model: torch.nn.Module, spec: list[dict[str, Any]] | None, what: str) -> torch.nn.Module:
    """``model`` inside the classifier wrappers (gcm, unig) of a canonical defence stack, the first listed closest
    to it (as :func:`~trn.defenses.stack.build_defense_stack` does); the input-side entries are skipped.

    Raises:
        ConfigError: a wrapper that does not fit ``what`` (UniG needs ``forward_features`` / ``forward_head``, which a
            TorchScript or ``torch.export`` program usually lacks) or a bad wrapper setting, named by its index in
            the whole stack.
    """
    inputs, wrappers = split_defenses(canonical_defenses(spec, "defenses") if spec else [])
    for i, entry in enumerate(wrappers, start=len(inputs)):  # the wrappers come after every input-side entry
        try:
            model = build_defense_stack([entry], model).classifier
        except ConfigError as e:
            msg = str(e).removeprefix(f"defence #0 ({entry['name']}): ")
            raise ConfigError(f"defenses: defence #{i} ({entry['name']}) around {what}: {msg}") from e
    return model


def build_service_defenses(spec: list[dict[str, Any]], restorer: torch.nn.Module, kind: str,
                    device: torch.device | str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(input side, classifier for ``/v1/classify`` when ``kind`` is guard) of a canonical defence stack.

    With ``downstream.kind: guard`` the classifier wrappers wrap ``restorer.guard``; with any other kind they are left
    to the ``DownstreamClassifier`` deployment (and refused by :class:`AppArgs` for ``http`` / ``none``), and the
    returned classifier is the plain guard (unused).

    Raises:
        ConfigError: a bad value (``bits: 99``) or a wrapper that does not fit the guard, named with the option.
    """
    default = restorer if uses_default_restorer(spec) else None
    try:
        if kind == "guard":
            stack = build_defense_stack(spec, restorer.guard, restorer=default)
            return stack.preprocessor, stack.classifier
        return build_preprocessor(split_defenses(spec)[0], restorer=default, device=device), restorer.guard
    except ConfigError as e:
        raise ConfigError(f"defenses: {e}") from e


def check_service_defenses(args: AppArgs, meta: dict) -> None:
    """Build ``args.defenses`` once on the CPU, as the replicas will, so that every value is checked before anything
    starts: parameter values, ``trn`` checkpoints (which must restore the restorer's image size, ``meta``'s
    ``image_shape``) and, with a deployed downstream, whether the wrappers fit its model (UniG needs
    ``forward_features`` / ``forward_head``).

    Raises:
        ConfigError / CheckpointError: what the replicas would otherwise fail with at start-up.
    """
    from trn.restorer import Restorer

    spec = args.defenses or []
    shape = meta.get("image_shape")
    for i, entry in enumerate(spec):
        if entry["name"] == "trn" and entry.get("checkpoint"):
            other = read_checkpoint_meta(entry["checkpoint"], "restorer").get("image_shape")
            if other != shape:
                raise ConfigError(f"defenses: defence #{i} (trn) restores {other} images but the service decodes "
                                  f"images for `restorer`, {shape}")
    build_service_defenses(spec, Restorer.load(args.restorer), args.downstream.kind, "cpu")
    ds = args.downstream
    if split_defenses(spec)[1] and ds.deployed:
        wrap_classifier(load_downstream_model(ds.kind, ds.path, "cpu")[0], spec, f"the {ds.kind} downstream {ds.path}")


def service_info(args: AppArgs) -> dict[str, Any]:
    """What the service's replicas are told, from the checkpoints' metadata, with every build-time check done first.

    Returns:
        ``image_shape`` (the restorer's) and ``downstream_class_names`` (``downstream.class_names``, else a
        ``checkpoint`` downstream's own names, else the restorer's when their count fits; None: not known).

    Raises:
        ConfigError: class names that do not fit the classifier, or a defence stack that cannot be built
            (:func:`check_service_defenses`).
        CheckpointError: a checkpoint whose metadata is unreadable or of the wrong kind.
    """
    meta = read_checkpoint_meta(args.restorer, "restorer")
    ds = args.downstream
    info: dict[str, Any] = {"image_shape": meta.get("image_shape"), "downstream_class_names": ds.class_names}
    restorer_names = meta.get("class_names") or []
    if ds.kind == "checkpoint":
        dmeta = read_checkpoint_meta(ds.path, "classifier")
        n = dmeta.get("arch_kwargs", {}).get("num_classes")
        names = ds.class_names or dmeta.get("class_names")
        if names is None and n is not None and len(restorer_names) == n:
            names = restorer_names
        if names is not None and n is not None and len(names) != n:
            raise ConfigError(f"downstream.class_names has {len(names)} names but {ds.path} has {n} classes")
        info["downstream_class_names"] = names
    elif ds.kind == "guard" and ds.class_names and len(ds.class_names) != len(restorer_names):
        raise ConfigError(f"downstream.class_names has {len(ds.class_names)} names but the guard has "
                          f"{len(restorer_names)} classes")
    if ds.kind == "guard" and ds.class_names:
        info["downstream_class_names"] = ds.class_names
    if args.defenses is not None:
        check_service_defenses(args, meta)
    return info


def output_class_names(n: int, configured: Sequence[str] | None, restorer_names: Sequence[str], kind: str
                       ) -> list[str]:
    """Names of the ``n`` classes a downstream of ``kind`` answered: ``configured`` (:func:`service_info`'s
    ``downstream_class_names``), else the guard's ``restorer_names`` (kind ``guard``, or any kind when there are
    ``n`` of them), else ``"0"`` .. ``"n-1"``.

    Raises:
        RequestError: 500 (``ConfigError``) when the names found are not ``n``.
    """
    names = configured or (restorer_names if kind == "guard" else None)
    if names is None and len(restorer_names) == n:
        names = restorer_names
    if names is None:
        return [str(i) for i in range(n)]
    if len(names) != n:
        raise RequestError(500, "ConfigError", f"downstream returned {n} classes but {len(names)} class names "
                                               "are configured (downstream.class_names)")
    return list(names)
