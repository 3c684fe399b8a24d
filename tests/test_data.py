"""Dataset loaders: real Fashion-MNIST files, and tiny seeded CIFAR-10 / SVHN / folder / npz / IDX files in tmp_path."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trn.data import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    SVHN_CLASSES,
    ImageDataset,
    _NumpyOnlyUnpickler,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    load_npz,
    load_svhn,
    save_npz,
    to_float_images,
)
from trn.errors import DataError


def _check_dataset(ds: ImageDataset, n: int, shape: tuple[int, int, int], num_classes: int) -> None:
    assert len(ds) == n
    assert ds.images.shape == (n, *shape)
    assert ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.int64
    assert ds.labels.shape == (n,)
    if n:
        assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0
        assert int(ds.labels.min()) >= 0 and int(ds.labels.max()) < num_classes
    assert ds.num_classes == num_classes


# --------------------------------------------------------------------------------------------- Fashion-MNIST
@pytest.fixture(scope="module")
def fmnist_test() -> ImageDataset:
    return load_fashion_mnist(FASHION_MNIST_DIR, "test")


def test_fashion_mnist_real_test_split(fmnist_test: ImageDataset) -> None:
    _check_dataset(fmnist_test, 10000, (1, 28, 28), 10)
    assert fmnist_test.class_names == FASHION_MNIST_CLASSES
    assert fmnist_test.class_names[0] == "T-shirt/top" and fmnist_test.class_names[9] == "Ankle boot"
    # the test split is balanced: 1000 images per class, and the pixels use the whole 8-bit range
    assert torch.bincount(fmnist_test.labels, minlength=10).tolist() == [1000] * 10
    assert float(fmnist_test.images.min()) == 0.0 and float(fmnist_test.images.max()) == 1.0
    assert torch.equal(fmnist_test.images * 255, (fmnist_test.images * 255).round())  # on the 8-bit grid


def test_fashion_mnist_real_train_split() -> None:
    ds = load_fashion_mnist(FASHION_MNIST_DIR, "train")
    _check_dataset(ds, 60000, (1, 28, 28), 10)
    assert torch.bincount(ds.labels, minlength=10).tolist() == [6000] * 10


def test_fashion_mnist_via_dispatcher_and_env(monkeypatch: pytest.MonkeyPatch, fmnist_test: ImageDataset) -> None:
    monkeypatch.setenv("TRN_FASHION_MNIST_DIR", FASHION_MNIST_DIR)
    ds = load_dataset("fmnist", None, "test")
    assert torch.equal(ds.labels, fmnist_test.labels)
    assert load_dataset("Fashion_MNIST", FASHION_MNIST_DIR).name == "fashion-mnist/test"


def test_fashion_mnist_bad_split() -> None:
    with pytest.raises(DataError, match="'train' or 'test'"):
        load_fashion_mnist(FASHION_MNIST_DIR, "val")


def test_fashion_mnist_missing_dir_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRN_FASHION_MNIST_DIR", raising=False)
    with pytest.raises(DataError) as exc:
        load_fashion_mnist(tmp_path / "nowhere", "test")
    msg = str(exc.value)
    assert "dataset-fashion-mnist" in msg
    assert "--data-dir" in msg and "TRN_FASHION_MNIST_DIR" in msg
    assert "t10k-images-idx3-ubyte.gz" in msg


def _write_idx(path: Path, arr: np.ndarray, *, magic: tuple[int, int] = (0, 0x08), truncate: int = 0) -> None:
    header = struct.pack(">HBB", magic[0], magic[1], arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(raw[: len(raw) - truncate] if truncate else raw)


def _fake_fmnist(root: Path, n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    _write_idx(root / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", labels)
    return images, labels


def test_fashion_mnist_tiny_idx_round_trip(tmp_path: Path) -> None:
    images, labels = _fake_fmnist(tmp_path)
    ds = load_fashion_mnist(tmp_path, "test")
    _check_dataset(ds, 6, (1, 28, 28), 10)
    assert torch.equal((ds.images[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(images))
    assert ds.labels.tolist() == labels.tolist()


def test_fashion_mnist_missing_labels_file(tmp_path: Path) -> None:
    _fake_fmnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist(tmp_path, "test")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "truncated or corrupt"),
        ("bad_magic", "not an unsigned-byte IDX file"),
        ("short_header", "truncated IDX header"),
        ("not_gzip", "cannot read IDX file"),
        ("cut_gzip", "cannot read IDX file"),
    ],
)
def test_fashion_mnist_corrupt_idx(tmp_path: Path, kind: str, message: str) -> None:
    _, _labels = _fake_fmnist(tmp_path)
    img_path = tmp_path / "t10k-images-idx3-ubyte.gz"
    images = np.zeros((6, 28, 28), np.uint8)
    if kind == "truncated":
        _write_idx(img_path, images, truncate=100)
    elif kind == "bad_magic":
        _write_idx(img_path, images, magic=(0, 0x0D))  # float data code
    elif kind == "short_header":
        with gzip.open(img_path, "wb") as f:
            f.write(b"\x00\x00")
    elif kind == "not_gzip":
        img_path.write_bytes(b"this is not gzip data at all")
    else:  # a gzip stream cut in the middle
        data = img_path.read_bytes()
        img_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=message) as exc:
        load_fashion_mnist(tmp_path, "test")
    assert str(img_path) in str(exc.value)


def test_fashion_mnist_count_mismatch_and_label_range(tmp_path: Path) -> None:
    _fake_fmnist(tmp_path, n=6)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="6 images but 5 labels"):
        load_fashion_mnist(tmp_path, "test")
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(6, 12, np.uint8))
    with pytest.raises(DataError, match="out of range"):
        load_fashion_mnist(tmp_path, "test")


# --------------------------------------------------------------------------------------------- CIFAR-10
def _py2_pickle(obj: object) -> bytes:
    """Pickle ``obj`` the way the official CIFAR-10 files were written (Python 2 cPickle, numpy 1.x).

    Protocol 3 plus three byte edits: numpy 1's module name ``numpy.core.multiarray`` and Python 2 ``str``
    opcodes (SHORT_BINSTRING) for the dtype strings; the dict keys are already bytes.
    """
    data = pickle.dumps(obj, protocol=3)
    data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    data = data.replace(b"X\x02\x00\x00\x00u1", b"U\x02u1").replace(b"X\x01\x00\x00\x00|", b"U\x01|")
    assert b"numpy._core" not in data and b"X\x02\x00\x00\x00u1" not in data
    return data


def _fake_cifar(root: Path, per_batch: int = 3, seed: int = 0, py2: bool = True) -> dict[str, np.ndarray]:
    """Write a tiny cifar-10-batches-py folder; return the raw (N, 3072) uint8 arrays per batch name."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    dump = _py2_pickle if py2 else (lambda o: pickle.dumps(o, protocol=4))
    raw = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img{i}.png".encode() for i in range(per_batch)]}
        (d / name).write_bytes(dump(batch))
        raw[name] = (data, labels)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CIFAR10_CLASSES],
            b"num_vis": 3072}
    (d / "batches.meta").write_bytes(dump(meta))
    return raw


@pytest.mark.parametrize("py2", [True, False], ids=["python2-numpy1-file", "python3-numpy2-file"])
def test_cifar10_loads_tiny_batches(tmp_path: Path, py2: bool) -> None:
    raw = _fake_cifar(tmp_path, py2=py2)
    test = load_cifar10(tmp_path, "test")
    _check_dataset(test, 3, (3, 32, 32), 10)
    assert test.class_names == CIFAR10_CLASSES
    data, labels = raw["test_batch"]
    # the channel-major row layout: first 1024 bytes are the red plane, row-major
    assert torch.equal((test.images * 255).round().to(torch.uint8).reshape(3, -1), torch.from_numpy(data))
    assert test.images[0, 0, 0, 1].item() == pytest.approx(data[0, 1] / 255)
    assert test.images[0, 1, 0, 0].item() == pytest.approx(data[0, 1024] / 255)
    assert test.images[0, 0, 1, 0].item() == pytest.approx(data[0, 32] / 255)
    assert test.labels.tolist() == labels
    train = load_cifar10(tmp_path / "cifar-10-batches-py", "train")  # the batches folder itself works too
    _check_dataset(train, 15, (3, 32, 32), 10)
    assert train.labels.tolist() == [lab for i in range(1, 6) for lab in raw[f"data_batch_{i}"][1]]
    assert load_dataset("cifar10", tmp_path, "test").name == "cifar10/test"


def test_cifar10_missing_files_message(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        load_cifar10(tmp_path, "test")
    msg = str(exc.value)
    assert "test_batch" in msg and "batches.meta" in msg and "--data-dir" in msg
    _fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        load_cifar10(tmp_path, "train")
    with pytest.raises(DataError, match="'train' or 'test'"):
        load_cifar10(tmp_path, "validation")
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10", None)


class _Exploit:
    """A pickle payload that would run ``os.system`` on plain ``pickle.load``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_refuses_malicious_pickle(tmp_path: Path) -> None:
    _fake_cifar(tmp_path)
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Exploit(marker), b"labels": [0]}, protocol=3)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(payload)
    with pytest.raises(DataError) as exc:
        load_cifar10(tmp_path, "test")
    assert "system" in str(exc.value) and "test_batch" in str(exc.value)
    assert not marker.exists()  # the payload never ran


@pytest.mark.parametrize(
    ("module", "name"),
    [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("subprocess", "Popen"),
     ("numpy", "load"), ("numpy.lib.npyio", "load"), ("builtins", "getattr")],
)
def test_restricted_unpickler_refuses_every_other_global(module: str, name: str) -> None:
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"."  # PROTO 2, GLOBAL, STOP
    with pytest.raises(pickle.UnpicklingError, match=f"{module}.{name}"):
        _NumpyOnlyUnpickler(io.BytesIO(payload), encoding="bytes").load()


def test_cifar10_corrupt_and_malformed_batches(tmp_path: Path) -> None:
    _fake_cifar(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    good = (d / "test_batch").read_bytes()
    (d / "test_batch").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10(tmp_path, "test")
    (d / "test_batch").write_bytes(b"garbage, not a pickle")
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10(tmp_path, "test")
    (d / "test_batch").write_bytes(_py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"\(N, 3072\)"):
        load_cifar10(tmp_path, "test")
    (d / "test_batch").write_bytes(_py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(DataError, match="2 images but 1 labels"):
        load_cifar10(tmp_path, "test")
    (d / "test_batch").write_bytes(_py2_pickle({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}))
    with pytest.raises(DataError, match="labels must lie in"):
        load_cifar10(tmp_path, "test")
    (d / "batches.meta").write_bytes(_py2_pickle({b"nothing": 1}))
    with pytest.raises(DataError, match="label_names"):
        load_cifar10(tmp_path, "test")


# --------------------------------------------------------------------------------------------- SVHN
def _fake_svhn(root: Path, split: str = "test", n: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = np.array([[10], [1], [2], [9], [10]][:n], dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": y})
    return x, y


def test_svhn_loads_format2(tmp_path: Path) -> None:
    x, _ = _fake_svhn(tmp_path, "train")
    ds = load_svhn(tmp_path, "train")
    _check_dataset(ds, 5, (3, 32, 32), 10)
    assert ds.class_names == SVHN_CLASSES
    assert ds.labels.tolist() == [0, 1, 2, 9, 0]  # 10 means the digit 0
    # X is (H, W, C, N): image n, channel c, row h, column w is X[h, w, c, n]
    assert ds.images[3, 2, 5, 7].item() == pytest.approx(x[5, 7, 2, 3] / 255)
    assert torch.equal((ds.images * 255).round().to(torch.uint8), torch.from_numpy(x.transpose(3, 2, 0, 1)))
    assert load_dataset("svhn", tmp_path, "train").name == "svhn/train"


def test_svhn_errors(tmp_path: Path) -> None:
    import scipy.io

    with pytest.raises(DataError) as exc:
        load_svhn(tmp_path, "test")
    assert "test_32x32.mat" in str(exc.value) and "--data-dir" in str(exc.value)
    with pytest.raises(DataError, match="split"):
        load_svhn(tmp_path, "valid")
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB garbage")
    with pytest.raises(DataError, match="test_32x32.mat"):
        load_svhn(tmp_path, "test")
    scipy.io.savemat(str(tmp_path / "test_32x32.mat"), {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": [[0], [3]]})
    with pytest.raises(DataError, match="1..10"):
        load_svhn(tmp_path, "test")
    scipy.io.savemat(str(tmp_path / "test_32x32.mat"), {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": [[1]]})
    with pytest.raises(DataError, match="2 labels"):
        load_svhn(tmp_path, "test")
    scipy.io.savemat(str(tmp_path / "test_32x32.mat"), {"X": np.zeros((32, 32), np.float64), "y": [[1]]})
    with pytest.raises(DataError, match="'X'"):
        load_svhn(tmp_path, "test")


# --------------------------------------------------------------------------------------------- image folders
def _write_folder(root: Path, mode: str = "L", size: tuple[int, int] = (8, 6), per_class: int = 2,
                  classes: tuple[str, ...] = ("cat", "ant", "bee"), seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {}
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        out[c] = []
        for i in range(per_class):
            shape = (size[0], size[1]) if mode == "L" else (size[0], size[1], 3)
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(a, mode).save(root / c / f"{i}.png")
            out[c].append(a)
    return out


def test_image_folder_grey(tmp_path: Path) -> None:
    arrays = _write_folder(tmp_path, "L")
    (tmp_path / "bee" / "notes.txt").write_text("not an image, skipped")
    (tmp_path / "metadata.json").write_text("{}")  # files next to the class folders are ignored
    ds = load_image_folder(tmp_path)
    _check_dataset(ds, 6, (1, 8, 6), 3)
    assert ds.class_names == ("ant", "bee", "cat")  # sorted folder names
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal((ds.images[4, 0] * 255).round().to(torch.uint8), torch.from_numpy(arrays["cat"][0]))
    assert load_dataset("folder", tmp_path).class_names == ("ant", "bee", "cat")


def test_image_folder_rgb_and_jpeg(tmp_path: Path) -> None:
    arrays = _write_folder(tmp_path, "RGB", classes=("a", "b"))
    smooth = np.broadcast_to(np.linspace(0, 255, 6, dtype=np.uint8)[None, :, None], (8, 6, 3)).copy()
    Image.fromarray(smooth, "RGB").save(tmp_path / "b" / "extra.JPEG", quality=95)
    ds = load_image_folder(tmp_path)
    _check_dataset(ds, 5, (3, 8, 6), 2)
    assert torch.equal((ds.images[0] * 255).round().to(torch.uint8), torch.from_numpy(arrays["a"][0]).permute(2, 0, 1))
    # the JPEG (upper-case suffix accepted) is lossy but close to its source
    assert (ds.images[4] - torch.from_numpy(smooth).permute(2, 0, 1) / 255).abs().max().item() < 0.05


def test_image_folder_mixed_modes_are_converted_consistently(tmp_path: Path) -> None:
    grey = _write_folder(tmp_path, "L", classes=("a",))
    _write_folder(tmp_path, "RGB", classes=("b",))
    ds = load_image_folder(tmp_path)  # auto: any colour image makes the whole set RGB
    assert ds.shape == (3, 8, 6)
    g = torch.from_numpy(grey["a"][0]).float() / 255
    assert torch.allclose(ds.images[0], g.expand(3, -1, -1))  # grey replicated into R, G, B
    assert load_image_folder(tmp_path, mode="L").shape == (1, 8, 6)
    assert load_image_folder(tmp_path, mode="RGB").shape == (3, 8, 6)
    with pytest.raises(DataError, match="mode"):
        load_image_folder(tmp_path, mode="CMYK")


def test_image_folder_size_mismatch_names_the_file(tmp_path: Path) -> None:
    _write_folder(tmp_path, "L")
    Image.fromarray(np.zeros((9, 9), np.uint8), "L").save(tmp_path / "cat" / "big.png")
    with pytest.raises(DataError, match="big.png.*9x9.*share a size"):
        load_image_folder(tmp_path)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_image_folder_corrupt_file_names_the_file(tmp_path: Path, kind: str) -> None:
    _write_folder(tmp_path, "L")
    bad = tmp_path / "bee" / "broken.png"
    if kind == "garbage":
        bad.write_bytes(b"\x89PNG not really")
    else:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 6), dtype=np.uint8), "L").save(buf, "PNG")
        bad.write_bytes(buf.getvalue()[:40])
    with pytest.raises(DataError) as exc:
        load_image_folder(tmp_path)
    assert str(bad) in str(exc.value)


def test_image_folder_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found.*--data-dir"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="no class subfolders"):
        load_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no .png"):
        load_image_folder(tmp_path)


# --------------------------------------------------------------------------------------------- npz
def test_npz_round_trip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 5, 7), generator=g).float() / 255  # on the 8-bit grid: exact round trip
    ds = ImageDataset(images, torch.tensor([0, 2, 1, 2]), ("x", "y", "z"), "tiny")
    path = save_npz(tmp_path / "sub" / "tiny.npz", ds, extra=np.arange(3))
    back = load_npz(path)
    _check_dataset(back, 4, (3, 5, 7), 3)
    assert torch.equal(back.images, images)
    assert back.labels.tolist() == [0, 2, 1, 2]
    assert back.class_names == ("x", "y", "z")
    assert back.name == "tiny"
    with np.load(path, allow_pickle=False) as z:
        assert z["images"].dtype == np.uint8 and z["extra"].tolist() == [0, 1, 2]
    assert load_dataset("npz", path).class_names == ("x", "y", "z")


def test_npz_float32_images_are_exact(tmp_path: Path) -> None:
    images = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))  # off the 8-bit grid
    ds = ImageDataset(images, torch.tensor([0, 1, 0]), ("a", "b"), "f")
    path = save_npz(tmp_path / "f", ds, image_dtype="float32")  # numpy appends .npz; the real path is returned
    assert path == tmp_path / "f.npz" and path.is_file()
    with np.load(path, allow_pickle=False) as z:
        assert z["images"].dtype == np.float32
    assert torch.equal(load_npz(path).images, images)
    assert not torch.equal(load_npz(save_npz(tmp_path / "u.npz", ds)).images, images)  # uint8 rounds
    with pytest.raises(DataError, match="image_dtype must be 'uint8' or 'float32', got 'float16'"):
        save_npz(tmp_path / "h.npz", ds, image_dtype="float16")
    bad = ImageDataset(images * 2, ds.labels, ds.class_names, "bad")
    with pytest.raises(DataError, match=r"finite and lie in \[0, 1\]"):
        save_npz(tmp_path / "bad.npz", bad, image_dtype="float32")


def test_npz_layouts_and_missing_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "nhwc.npz", x=rng.random((3, 4, 4, 3)).astype(np.float32))
    ds = load_npz(tmp_path / "nhwc.npz")
    assert ds.shape == (3, 4, 4) and ds.labels.tolist() == [-1, -1, -1] and ds.class_names == ()
    np.savez(tmp_path / "nhw.npz", images=rng.integers(0, 256, (2, 4, 4), dtype=np.uint8), y=np.array([3, 1]))
    ds = load_npz(tmp_path / "nhw.npz")
    assert ds.shape == (1, 4, 4) and ds.class_names == ("0", "1", "2", "3")


def test_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "nokey.npz", foo=np.zeros(3))
    with pytest.raises(DataError, match="no image array"):
        load_npz(tmp_path / "nokey.npz")
    np.savez(tmp_path / "range.npz", images=np.full((1, 1, 2, 2), 2.0, np.float32))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        load_npz(tmp_path / "range.npz")
    np.savez(tmp_path / "flabels.npz", images=np.zeros((2, 1, 2, 2), np.uint8), labels=np.array([0.5, 1.0]))
    with pytest.raises(DataError, match="labels must be integers"):
        load_npz(tmp_path / "flabels.npz")
    np.savez(tmp_path / "objects.npz", images=np.array([object()], dtype=object))
    with pytest.raises(DataError, match="cannot read npz"):
        load_npz(tmp_path / "objects.npz")  # object arrays need pickle, which is refused
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 but truncated")
    with pytest.raises(DataError, match="garbage.npz"):
        load_npz(tmp_path / "garbage.npz")
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("npz", None)


# --------------------------------------------------------------------------------------------- helpers
def test_to_float_images_and_dataset_checks() -> None:
    assert to_float_images(np.full((2, 3, 3), 255, np.uint8)).shape == (2, 1, 3, 3)
    with pytest.raises(DataError, match="unsupported dtype"):
        to_float_images(np.zeros((1, 1, 2, 2), np.int32))
    with pytest.raises(DataError, match="expected"):
        to_float_images(np.zeros((2, 2), np.uint8))
    with pytest.raises(DataError, match="finite"):
        to_float_images(np.full((1, 1, 2, 2), np.nan, np.float32))
    with pytest.raises(DataError, match="labels of shape"):
        ImageDataset(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.long), ("a",))
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        ImageDataset(torch.zeros(3, 2, 2), torch.zeros(3, dtype=torch.long), ("a",))
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")


def test_subset_is_seeded_and_sorted(fmnist_test: ImageDataset) -> None:
    a, b = fmnist_test.subset(50, seed=3), fmnist_test.subset(50, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, fmnist_test.subset(50, seed=4).labels)
    assert fmnist_test.subset(None) is fmnist_test and fmnist_test.subset(10**6) is fmnist_test
