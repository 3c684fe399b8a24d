"""``trn attack``: adversarial copies of a dataset as exact float32 npz or 8-bit PNG folders, with metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trn.attack_dataset import (
    attack_dataset,
    class_folder_names,
    metadata_path,
    random_targets,
    write_adversarial_dataset,
)
from trn.attacks import create_attack
from trn.classifiers import create_classifier, save_classifier
from trn.cli import main
from trn.data import ImageDataset, load_image_folder, load_npz, save_npz
from trn.errors import ConfigError, DataError, InputError

N, C, S, K = 24, 1, 8, 3  # images, channels, size, classes of the tiny problem
EPS = 0.1
NAMES = ("T-shirt/top", "Trouser", "Ankle boot")  # a "/" that must not become a sub-folder
GUARD_KW = {"in_channels": C, "num_classes": K, "image_size": S, "width": 4}


@pytest.fixture(scope="module")
def guard() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_classifier("small_cnn", **GUARD_KW).eval()


@pytest.fixture(scope="module")
def ds(guard: torch.nn.Module) -> ImageDataset:
    """Images on the 8-bit grid (like real datasets); labels = the guard's own predictions (clean accuracy 1)."""
    x = torch.randint(0, 256, (N, C, S, S), generator=torch.Generator().manual_seed(1)).float() / 255
    with torch.no_grad():
        y = guard(x).argmax(1)
    return ImageDataset(x, y, NAMES, "tiny")


def _pgd() -> object:
    return create_attack("pgd", eps=EPS, steps=5, seed=3)


# --------------------------------------------------------------------------------------------- npz
def test_npz_output_is_exact_and_budget_holds(tmp_path: Path, ds: ImageDataset, guard: torch.nn.Module) -> None:
    out = tmp_path / "adv" / "pgd.npz"
    meta = write_adversarial_dataset(out, ds, guard, _pgd(), batch_size=10, metadata={"dataset": "tiny"},
                                     progress=False)
    assert out.is_file() and metadata_path(out) == tmp_path / "adv" / "pgd.json"
    with np.load(out, allow_pickle=False) as z:
        images, labels = z["images"], z["labels"]
        clean_pred, adv_pred = z["clean_predictions"], z["adversarial_predictions"]
        assert z["class_names"].tolist() == list(NAMES)
        assert "targets" not in z.files
    assert images.dtype == np.float32 and images.shape == (N, C, S, S)
    delta = torch.from_numpy(images) - ds.images
    assert float(delta.abs().max()) <= EPS + 1e-6  # exact float32: the Linf budget holds
    assert float(delta.abs().max()) > EPS - 1e-3  # and PGD used it
    assert images.min() >= 0 and images.max() <= 1
    assert labels.tolist() == ds.labels.tolist()
    with torch.no_grad():
        assert clean_pred.tolist() == guard(ds.images).argmax(1).tolist()
        assert adv_pred.tolist() == guard(torch.from_numpy(images)).argmax(1).tolist()

    back = load_npz(out)  # the library reads it back bit for bit
    assert torch.equal(back.images, torch.from_numpy(images)) and back.class_names == NAMES

    on_disk = json.loads(metadata_path(out).read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert on_disk["attack"] == "pgd" and on_disk["eps"] == EPS and on_disk["steps"] == 5 and on_disk["seed"] == 3
    assert on_disk["norm"] == "linf" and on_disk["targeted"] is False and on_disk["n"] == N
    assert on_disk["dataset"] == "tiny" and on_disk["format"] == "npz" and on_disk["image_dtype"] == "float32"
    assert on_disk["clean_accuracy"] == 1.0
    assert on_disk["adversarial_accuracy"] == pytest.approx(float((adv_pred == labels).mean()))
    assert on_disk["adversarial_accuracy"] < on_disk["clean_accuracy"]
    assert on_disk["max_linf"] <= EPS + 1e-6
    assert on_disk["attack_params"]["steps"] == 5 and on_disk["image_shape"] == [C, S, S]


def test_targeted_npz_records_targets(tmp_path: Path, ds: ImageDataset, guard: torch.nn.Module) -> None:
    targets = random_targets(ds.labels, K, seed=0)
    assert (targets != ds.labels).all() and torch.equal(targets, random_targets(ds.labels, K, seed=0))
    atk = create_attack("pgd", eps=0.3, steps=10, seed=0, targeted=True)
    meta = write_adversarial_dataset(tmp_path / "t.npz", ds, guard, atk, targets=targets, progress=False)
    with np.load(tmp_path / "t.npz") as z:
        assert z["targets"].tolist() == targets.tolist()
        hit = float((z["adversarial_predictions"] == z["targets"]).mean())
    assert meta["targeted"] is True and meta["target_success_rate"] == pytest.approx(hit)
    assert hit > 0.3  # a random tiny net is easy to steer at eps 0.3


# --------------------------------------------------------------------------------------------- folder
def test_folder_output_pngs_and_metadata(tmp_path: Path, ds: ImageDataset, guard: torch.nn.Module) -> None:
    out = tmp_path / "adv_folder"
    meta = write_adversarial_dataset(out, ds, guard, _pgd(), batch_size=7, progress=False)
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["0_T-shirt_top", "1_Trouser", "2_Ankle boot"]  # every class, even one without images
    assert (out / "metadata.json").is_file() and metadata_path(out) == out / "metadata.json"
    assert len(list(out.rglob("*.png"))) == N

    back = load_image_folder(out)  # same labels, folders in label order, files sorted by index within each
    assert back.class_names == tuple(folders)
    files = [f for d in folders for f in sorted((out / d).glob("*.png"))]
    index = torch.tensor([int(f.stem) for f in files])
    assert torch.equal(back.labels, ds.labels[index])
    images = torch.empty_like(back.images)
    images[index] = back.images

    # PNG = 8 bits: the budget holds up to half a grey level, and the metadata says so with measured figures
    delta = (images - ds.images).abs().max().item()
    assert delta <= EPS + 0.5 / 255 + 1e-6
    on_disk = json.loads((out / "metadata.json").read_text())
    assert on_disk["format"] == "folder" and on_disk["image_dtype"].startswith("uint8")
    assert on_disk["class_folders"] == ["0_T-shirt_top", "1_Trouser", "2_Ankle boot"]
    assert "8 bits" in on_disk["png"]["note"]
    assert on_disk["png"]["max_linf"] == pytest.approx(delta, abs=1e-6)
    with torch.no_grad():
        png_acc = (guard(images).argmax(1) == ds.labels).float().mean().item()
    assert on_disk["png"]["adversarial_accuracy"] == pytest.approx(png_acc)
    assert meta["max_linf"] <= EPS + 1e-6  # before rounding, exact


def test_folder_must_be_new_or_empty(tmp_path: Path, ds: ImageDataset, guard: torch.nn.Module) -> None:
    (tmp_path / "empty").mkdir()
    write_adversarial_dataset(tmp_path / "empty", ds.subset(2), guard, create_attack("fgsm", eps=EPS), progress=False)
    with pytest.raises(DataError, match="already exists and is not empty"):
        write_adversarial_dataset(tmp_path / "empty", ds.subset(2), guard, create_attack("fgsm", eps=EPS),
                                  progress=False)


def test_class_folder_names() -> None:
    assert class_folder_names(("a/b", "c:d", "..", "ok name")) == ["0_a_b", "1_c_d", "2_class", "3_ok name"]
    names = class_folder_names(tuple("abcdefghijkl"))  # 12 classes: zero-padded so sorting keeps label order
    assert names[0] == "00_a" and names[11] == "11_l" and sorted(names) == names
    assert class_folder_names(("x",), num_classes=3) == ["0_x", "1_1", "2_2"]


# --------------------------------------------------------------------------------------------- errors
def test_bad_inputs(ds: ImageDataset, guard: torch.nn.Module) -> None:
    unlabeled = ImageDataset(ds.images, torch.full((N,), -1), (), "unlabeled")
    with pytest.raises(InputError, match="without labels"):
        attack_dataset(unlabeled, guard, _pgd(), progress=False)
    wrong = ImageDataset(ds.images, torch.full((N,), K), NAMES, "wrong")
    with pytest.raises(InputError, match=r"labels must lie in \[0, 2\]"):
        attack_dataset(wrong, guard, _pgd(), progress=False)
    nan = ds.images.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        attack_dataset(ImageDataset(nan, ds.labels, NAMES), guard, _pgd(), progress=False)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        attack_dataset(ImageDataset(ds.images * 255, ds.labels, NAMES), guard, _pgd(), progress=False)
    with pytest.raises(InputError, match="empty batch"):
        attack_dataset(ImageDataset(ds.images[:0], ds.labels[:0], NAMES), guard, _pgd(), progress=False)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        attack_dataset(ds, guard, _pgd(), batch_size=0, progress=False)
    with pytest.raises(ConfigError, match="needs targets"):
        attack_dataset(ds, guard, create_attack("pgd", targeted=True), progress=False)
    with pytest.raises(ConfigError, match="untargeted"):
        attack_dataset(ds, guard, _pgd(), targets=ds.labels, progress=False)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        random_targets(ds.labels, 1)


# --------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def files(tmp_path: Path, ds: ImageDataset, guard: torch.nn.Module) -> tuple[Path, Path]:
    data = save_npz(tmp_path / "data.npz", ds)  # uint8 on disk; ds is on the 8-bit grid, so exact
    gpath = tmp_path / "guard"
    save_classifier(gpath, guard, "small_cnn", GUARD_KW, {"image_shape": [C, S, S], "test_accuracy": 0.5})
    return data, gpath


def test_cli_attack_npz(tmp_path: Path, files: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    data, gpath = files
    out = tmp_path / "out" / "adv.npz"
    rc = main(["attack", "--dataset", "npz", "--data-dir", str(data), "--guard", str(gpath), "--attack", "bim",
               "--eps", "0.05", "--steps", "3", "--limit", "10", "--seed", "4", "--batch-size", "4",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith("bim eps=0.05 on 10 ") and "1.0000 clean ->" in line
    meta = json.loads((tmp_path / "out" / "adv.json").read_text())
    assert meta["n"] == 10 and meta["limit"] == 10 and meta["subset_seed"] == 4 and meta["seed"] == 4
    assert meta["attack"] == "bim" and meta["eps"] == 0.05 and meta["steps"] == 3 and meta["split"] == "test"
    assert meta["guard"] == str(gpath) and len(meta["guard_sha256"]) == 64 and meta["guard_test_accuracy"] == 0.5
    assert meta["dataset"] == "npz" and meta["data_dir"] == str(data) and meta["device"] == "cpu"
    adv = load_npz(out)
    clean = load_npz(data).subset(10, seed=4)
    assert float((adv.images - clean.images).abs().max()) <= 0.05 + 1e-6
    assert adv.labels.tolist() == clean.labels.tolist()


def test_cli_attack_folder_targeted(tmp_path: Path, files: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    data, gpath = files
    rc = main(["attack", "--dataset", "npz", "--data-dir", str(data), "--guard", str(gpath), "--attack", "fgsm",
               "--targeted", "--device", "cpu", "--out", str(tmp_path / "folder")])
    assert rc == 0
    assert capsys.readouterr().out.startswith("fgsm eps=0.1 on 24 ")
    meta = json.loads((tmp_path / "folder" / "metadata.json").read_text())
    assert meta["targeted"] is True and "target_success_rate" in meta["png"]
    assert len(list((tmp_path / "folder").rglob("*.png"))) == N


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attack", "autoattack"], "unknown attack 'autoattack'"),
        (["--attack", "fgsm", "--steps", "10"], "fgsm is a single step"),
        (["--attack", "pgd", "--eps", "-1"], "eps must be >= 0"),
        (["--attack", "deepfool", "--targeted"], "untargeted only"),
        (["--limit", "0"], "--limit must be a positive"),
        (["--batch-size", "0"], "--batch-size must be positive"),
    ],
)
def test_cli_errors(tmp_path: Path, files: tuple[Path, Path], capsys: pytest.CaptureFixture, extra: list[str],
                    message: str) -> None:
    data, gpath = files
    rc = main(["attack", "--dataset", "npz", "--data-dir", str(data), "--guard", str(gpath), "--device", "cpu",
               "--out", str(tmp_path / "x.npz"), *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "x.npz").exists()


def test_cli_missing_files_and_shape_mismatch(tmp_path: Path, files: tuple[Path, Path],
                                              capsys: pytest.CaptureFixture) -> None:
    data, gpath = files
    base = ["attack", "--device", "cpu", "--out", str(tmp_path / "x.npz")]
    assert main([*base, "--dataset", "npz", "--data-dir", str(tmp_path / "nope.npz"), "--guard", str(gpath)]) == 2
    assert "npz file not found" in capsys.readouterr().err
    assert main([*base, "--dataset", "npz", "--data-dir", str(data), "--guard", str(tmp_path / "noguard")]) == 2
    assert "checkpoint file not found" in capsys.readouterr().err
    rgb = ImageDataset(torch.rand(4, 3, S, S), torch.zeros(4, dtype=torch.long), NAMES, "rgb")
    rgb_path = save_npz(tmp_path / "rgb.npz", rgb)
    assert main([*base, "--dataset", "npz", "--data-dir", str(rgb_path), "--guard", str(gpath)]) == 2
    assert "images are 3x8x8 but the guard" in capsys.readouterr().err
