"""Dataset loaders. Every loader returns an :class:`ImageDataset`: float32 NCHW images in [0, 1] plus int64 labels.

Formats: Fashion-MNIST IDX gzip (Debian ``dataset-fashion-mnist``), ``.npz`` arrays, and (below) CIFAR-10 python
batches, SVHN ``.mat`` and class-per-folder image directories. Nothing is downloaded; nothing is unpickled unsafely.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from trn.errors import DataError

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_SUFFIXES",
    "SVHN_CLASSES",
    "ImageDataset",
    "fashion_mnist_dir",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "load_npz",
    "load_svhn",
    "save_npz",
    "to_float_images",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "TRN_FASHION_MNIST_DIR"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass
class ImageDataset:
    """An in-memory labelled image set. ``images``: (N, C, H, W) float32 in [0, 1]; ``labels``: (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    name: str = "dataset"

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"{self.name}: images must be (N, C, H, W), got {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.name}: {self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, n: int | None, seed: int = 0) -> ImageDataset:
        """A seeded random subset of ``n`` images (all of them, in order, when ``n`` is None or >= len)."""
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return ImageDataset(self.images[idx], self.labels[idx], self.class_names, f"{self.name}[{n}, seed={seed}]")

    def describe(self) -> str:
        c, h, w = self.shape
        return f"{self.name}: {len(self)} images, {c}x{h}x{w}, {self.num_classes} classes ({', '.join(self.class_names)})"


def to_float_images(arr: np.ndarray, name: str = "images") -> torch.Tensor:
    """Convert uint8 (0-255) or float ([0, 1]) arrays in NCHW, NHWC or NHW layout to float32 NCHW in [0, 1]."""
    a = np.asarray(arr)
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise DataError(f"{name}: expected (N, H, W), (N, C, H, W) or (N, H, W, C) array, got shape {a.shape}")
    if a.shape[1] not in (1, 3) and a.shape[-1] in (1, 3):
        a = a.transpose(0, 3, 1, 2)
    if a.dtype == np.uint8:
        t = torch.from_numpy(np.array(a, dtype=np.uint8, copy=True)).float().div_(255.0)
    elif np.issubdtype(a.dtype, np.floating):
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        if t.numel() and (not torch.isfinite(t).all() or float(t.min()) < 0 or float(t.max()) > 1):
            raise DataError(f"{name}: float images must be finite and lie in [0, 1]")
    else:
        raise DataError(f"{name}: unsupported dtype {a.dtype} (use uint8 0-255 or float 0-1)")
    return t


# --------------------------------------------------------------------------------------------- Fashion-MNIST
def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """Resolve the Fashion-MNIST directory: argument, then ``$TRN_FASHION_MNIST_DIR``, then the Debian default."""
    return Path(root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Parse one gzip IDX file (big-endian header: magic with dtype code and ndim, then the dims)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_ndim:
        raise DataError(f"{path}: not an unsigned-byte IDX file with {expected_ndim} dims")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} bytes (truncated or corrupt)")
    return data.reshape(dims)


def load_fashion_mnist(root: str | os.PathLike | None = None, split: str = "test") -> ImageDataset:
    """Load the Fashion-MNIST ``train`` (60k) or ``test`` (10k) split as 1x28x28 images.

    Raises:
        DataError: the files are missing (with the install command and the override) or corrupt.
    """
    if split not in ("train", "test"):
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    d = fashion_mnist_dir(root)
    prefix = "train" if split == "train" else "t10k"
    img_path, lbl_path = d / f"{prefix}-images-idx3-ubyte.gz", d / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [p for p in (img_path, lbl_path) if not p.is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found: missing {', '.join(map(str, missing))}. Install it with "
            f"'apt-get install dataset-fashion-mnist', or point --data-dir / ${FASHION_MNIST_ENV} at a folder "
            f"holding the four *-ubyte.gz files."
        )
    images, labels = _read_idx(img_path, 3), _read_idx(lbl_path, 1)
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"Fashion-MNIST {split}: label {labels.max()} out of range")
    return ImageDataset(
        to_float_images(images), torch.from_numpy(labels.astype(np.int64)), FASHION_MNIST_CLASSES,
        f"fashion-mnist/{split}",
    )


# --------------------------------------------------------------------------------------------- npz arrays
_IMAGE_KEYS = ("images", "x", "x_test", "data")
_LABEL_KEYS = ("labels", "y", "y_test", "targets")


def load_npz(path: str | os.PathLike) -> ImageDataset:
    """Load ``.npz`` with an image array (``images``/``x``) and optional labels (``labels``/``y``; -1 if absent).

    Class names come from a ``class_names`` string array when present. Loaded with ``allow_pickle=False``.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"npz file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # BadZipFile is none of the others
        raise DataError(f"cannot read npz file {p}: {e}") from e
    img_key = next((k for k in _IMAGE_KEYS if k in arrays), None)
    if img_key is None:
        raise DataError(f"{p}: no image array; expected one of {list(_IMAGE_KEYS)}, found {sorted(arrays)}")
    images = to_float_images(arrays[img_key], f"{p}:{img_key}")
    lbl_key = next((k for k in _LABEL_KEYS if k in arrays), None)
    if lbl_key is None:
        labels = torch.full((len(images),), -1, dtype=torch.int64)
    else:
        lab = np.asarray(arrays[lbl_key]).reshape(-1)
        if not np.issubdtype(lab.dtype, np.integer):
            raise DataError(f"{p}:{lbl_key}: labels must be integers, got {lab.dtype}")
        labels = torch.from_numpy(lab.astype(np.int64))
    if "class_names" in arrays:
        names = tuple(str(s) for s in arrays["class_names"].tolist())
    else:
        n = int(labels.max()) + 1 if len(labels) and int(labels.max()) >= 0 else 0
        names = tuple(str(i) for i in range(n))
    return ImageDataset(images, labels, names, p.stem)


def save_npz(path: str | os.PathLike, ds: ImageDataset, *, image_dtype: str = "uint8", **extra: np.ndarray) -> Path:
    """Write ``ds`` as ``.npz``: NCHW ``images``, int64 ``labels``, ``class_names`` and any ``extra`` arrays.

    Args:
        path: output file; parent folders are created. A name without ``.npz`` gets it appended (numpy's rule).
        ds: the dataset.
        image_dtype: ``uint8`` (0-255, rounded from [0, 1]: compact, but moves each pixel by up to 0.5/255) or
            ``float32`` (the [0, 1] values exactly: use it when a perturbation budget must hold to the last bit).
        extra: further arrays stored under their keyword names.

    Raises:
        DataError: unknown ``image_dtype``, or float images that are not finite values in [0, 1].
    """
    if image_dtype not in ("uint8", "float32"):
        raise DataError(f"save_npz: image_dtype must be 'uint8' or 'float32', got {image_dtype!r}")
    p = Path(path)
    if p.suffix != ".npz":
        p = p.with_name(p.name + ".npz")  # what numpy writes anyway; return the real path
    p.parent.mkdir(parents=True, exist_ok=True)
    if image_dtype == "uint8":
        images = (ds.images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    else:
        x = ds.images.detach().cpu().to(torch.float32)
        if x.numel() and (not torch.isfinite(x).all() or float(x.min()) < 0 or float(x.max()) > 1):
            raise DataError(f"save_npz: {ds.name} images must be finite and lie in [0, 1] to be saved as float32")
        images = x.numpy()
    np.savez_compressed(
        p, images=images, labels=ds.labels.numpy(), class_names=np.array(ds.class_names, dtype=str), **extra
    )
    return p


# --------------------------------------------------------------------------------------------- CIFAR-10
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_CIFAR_SPLITS = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


def _numpy_reconstruct() -> object:
    """numpy's array-reconstruction function (``numpy._core.multiarray._reconstruct`` on numpy 2, ``numpy.core...``
    on numpy 1), taken from ``ndarray.__reduce__`` so that no deprecated module is imported."""
    return np.empty(0).__reduce__()[0]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """A pickle reader that can rebuild dicts, lists, bytes and numpy arrays, and nothing else.

    Plain ``pickle.load`` runs any callable a file names (``os.system`` included). The CIFAR-10 python batches
    only need numpy's array reconstruction, so ``find_class`` allows exactly ``_reconstruct``, ``ndarray`` and
    ``dtype`` (under both the numpy 1 and numpy 2 module names) and refuses every other global.
    """

    _ALLOWED: ClassVar[dict[tuple[str, str], Callable[[], object]]] = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
    }

    def find_class(self, module: str, name: str) -> object:
        factory = self._ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': only numpy arrays are allowed in this file"
            )
        return factory()


def _restricted_unpickle(path: Path) -> object:
    """Read ``path`` with :class:`_NumpyOnlyUnpickler` (``encoding='bytes'``, as the files come from Python 2)."""
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: unsafe or corrupt pickle: {e}") from e
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        raise DataError(f"{path}: corrupt or truncated CIFAR-10 batch: {type(e).__name__}: {e}") from e


def _get(d: dict, key: str) -> object:
    """Look ``key`` up as bytes (files written by Python 2) or str (files re-written by Python 3)."""
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def _cifar_dir(root: str | os.PathLike) -> Path:
    """Accept either the ``cifar-10-batches-py`` folder itself or the folder that holds it."""
    d = Path(root)
    return d / "cifar-10-batches-py" if (d / "cifar-10-batches-py").is_dir() else d


def load_cifar10(root: str | os.PathLike, split: str = "test") -> ImageDataset:
    """Load CIFAR-10 from the standard python batches (``data_batch_1..5``, ``test_batch``, ``batches.meta``).

    Args:
        root: the ``cifar-10-batches-py`` folder, or the folder that holds it.
        split: ``train`` (50k images, five batches) or ``test`` (10k).

    Returns:
        3x32x32 images with labels 0-9 and the class names from ``batches.meta``.

    Raises:
        DataError: a file is missing (named, with the ``--data-dir`` hint), unsafe (the pickle names anything other
            than numpy's array reconstruction) or malformed.

    The batches are pickles; they are read with a restricted unpickler that only rebuilds numpy arrays.
    """
    if split not in _CIFAR_SPLITS:
        raise DataError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    d = _cifar_dir(root)
    paths = [d / n for n in _CIFAR_SPLITS[split]]
    meta_path = d / "batches.meta"
    missing = [p for p in (*paths, meta_path) if not p.is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 not found: missing {', '.join(map(str, missing))}. Point --data-dir at the "
            f"'cifar-10-batches-py' folder (from cifar-10-python.tar.gz) or the folder that holds it."
        )
    meta = _restricted_unpickle(meta_path)
    names = _get(meta, "label_names") if isinstance(meta, dict) else None
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"{meta_path}: expected a dict with a 'label_names' list")
    class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    images, labels = [], []
    for p in paths:
        batch = _restricted_unpickle(p)
        data = _get(batch, "data") if isinstance(batch, dict) else None
        lab = _get(batch, "labels") if isinstance(batch, dict) else None
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{p}: expected 'data' as a uint8 array of shape (N, 3072)")
        lab = np.asarray(lab if isinstance(lab, (list, tuple, np.ndarray)) else [], dtype=np.int64).reshape(-1)
        if len(lab) != len(data):
            raise DataError(f"{p}: {len(data)} images but {len(lab)} labels")
        if lab.size and (lab.min() < 0 or lab.max() >= len(class_names)):
            raise DataError(f"{p}: labels must lie in [0, {len(class_names) - 1}]")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are 1024 R, then G, then B values, row-major
        labels.append(lab)
    return ImageDataset(
        to_float_images(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), class_names,
        f"cifar10/{split}",
    )


# --------------------------------------------------------------------------------------------- SVHN
SVHN_CLASSES = tuple(str(i) for i in range(10))
_SVHN_SPLITS = ("train", "test", "extra")


def load_svhn(root: str | os.PathLike, split: str = "test") -> ImageDataset:
    """Load SVHN cropped digits (format 2: ``train_32x32.mat``, ``test_32x32.mat``, ``extra_32x32.mat``).

    The ``.mat`` files hold ``X`` as (32, 32, 3, N) uint8 and ``y`` as (N, 1) in 1..10, where 10 stands for the
    digit 0; labels are mapped to 0..9 so that label ``k`` is digit ``k``.

    Raises:
        DataError: the file is missing (named, with the ``--data-dir`` hint), not a MATLAB v5 file, or malformed.
    """
    import scipy.io  # only this loader needs scipy

    if split not in _SVHN_SPLITS:
        raise DataError(f"SVHN split must be one of {list(_SVHN_SPLITS)}, got {split!r}")
    p = Path(root) / f"{split}_32x32.mat"
    if not p.is_file():
        raise DataError(f"SVHN not found: missing {p}. Point --data-dir at the folder holding {p.name} (format 2).")
    try:
        mat = scipy.io.loadmat(str(p))
    except (scipy.io.matlab.MatReadError, OSError, ValueError, TypeError, NotImplementedError, EOFError,
            MemoryError) as e:
        raise DataError(f"{p}: cannot read as a MATLAB v5 .mat file: {type(e).__name__}: {e}") from e
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[2] not in (1, 3) or x.dtype != np.uint8:
        raise DataError(f"{p}: expected 'X' as a uint8 array of shape (H, W, C, N), got "
                        f"{getattr(x, 'shape', None)} {getattr(x, 'dtype', None)}")
    if not isinstance(y, np.ndarray) or y.size != x.shape[3]:
        raise DataError(f"{p}: expected 'y' with {x.shape[3]} labels, got {getattr(y, 'shape', None)}")
    y = y.reshape(-1)
    if y.size and (not np.all(np.isfinite(y)) or not np.all(y == np.round(y)) or y.min() < 1 or y.max() > 10):
        raise DataError(f"{p}: labels must be integers in 1..10 (10 = digit 0)")
    labels = torch.from_numpy(y.astype(np.int64) % 10)
    return ImageDataset(to_float_images(x.transpose(3, 2, 0, 1)), labels, SVHN_CLASSES, f"svhn/{split}")


# --------------------------------------------------------------------------------------------- image folders
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_image_folder(root: str | os.PathLike, mode: str = "auto") -> ImageDataset:
    """Load a class-per-folder image directory: ``root/<class>/<image>.png|.jpg|.jpeg``.

    Class names are the sorted subfolder names (hidden folders ignored); label ``k`` is the ``k``-th name. Files
    with other suffixes are skipped. Every image must have the same size.

    Args:
        root: the folder holding one subfolder per class.
        mode: ``"L"`` (grey, 1 channel) or ``"RGB"`` (3 channels) converts every image; ``"auto"`` keeps grey if
            every image is grey and otherwise converts all of them to RGB (grey replicated into R, G and B, which
            is lossless). Alpha channels are dropped.

    Raises:
        DataError: the folder is missing or holds no images, an image is corrupt (the file is named), or the
            sizes differ (the first odd file is named).
    """
    from trn.errors import InputError
    from trn.imageio import decode_image

    if mode not in ("auto", "L", "RGB"):
        raise DataError(f"image folder mode must be 'auto', 'L' or 'RGB', got {mode!r}")
    d = Path(root)
    if not d.is_dir():
        raise DataError(f"image folder not found: {d}. Point --data-dir at a folder with one subfolder per class.")
    class_dirs = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{d}: no class subfolders; expected {d}/<class name>/<image>.png")
    channels = {"auto": None, "L": 1, "RGB": 3}[mode]
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    files: list[Path] = []
    for k, cdir in enumerate(class_dirs):
        for f in sorted(cdir.iterdir()):
            if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES or f.name.startswith("."):
                continue
            try:
                arr = decode_image(f.read_bytes(), channels=channels)  # (C, H, W) float32 in [0, 1]
            except (InputError, OSError) as e:
                raise DataError(f"corrupt or unreadable image {f}: {e}") from e
            if arrays and arr.shape[1:] != arrays[0].shape[1:]:
                raise DataError(
                    f"{f}: image is {arr.shape[1]}x{arr.shape[2]} but {files[0]} is "
                    f"{arrays[0].shape[1]}x{arrays[0].shape[2]}; all images in a folder dataset must share a size"
                )
            arrays.append(np.rint(arr * 255.0).astype(np.uint8))
            labels.append(k)
            files.append(f)
    if not arrays:
        raise DataError(f"{d}: no {'/'.join(IMAGE_SUFFIXES)} images in its class subfolders")
    if len({a.shape[0] for a in arrays}) > 1:  # auto mode with grey and colour files: make them all RGB
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    return ImageDataset(
        to_float_images(np.stack(arrays)), torch.tensor(labels, dtype=torch.int64),
        tuple(c.name for c in class_dirs), d.name,
    )


# --------------------------------------------------------------------------------------------- dispatch
def load_dataset(name: str, root: str | os.PathLike | None = None, split: str = "test") -> ImageDataset:
    """Load a dataset by name (``fashion-mnist``, ``cifar10``, ``svhn``, ``folder``, ``npz``)."""
    key = name.lower().replace("_", "-")
    if key in ("fashion-mnist", "fmnist"):
        return load_fashion_mnist(root, split)
    if key == "npz":
        if root is None:
            raise DataError("the npz dataset needs a path (--data-dir FILE.npz)")
        return load_npz(root)
    loaders = {"cifar10": "load_cifar10", "cifar-10": "load_cifar10", "svhn": "load_svhn", "folder": "load_image_folder"}
    if key in loaders:
        fn = globals().get(loaders[key])
        if fn is None:
            raise DataError(f"the {name} loader is not available in this build")
        if root is None:
            raise DataError(f"the {name} dataset needs a location (--data-dir)")
        return fn(root, split) if key != "folder" else fn(root)
    raise DataError(f"unknown dataset {name!r}; choose from fashion-mnist, cifar10, svhn, folder, npz")
