"""``trn sanitize`` on Ray Data: folder / Parquet / npz inputs, per-row errors, manifest accounting, resume, CLI.

A tiny untrained restorer (``Restorer.build``, its network nudged away from the identity so that restoring changes
the pixels) is saved to a temporary checkpoint; the outputs are checked against the same restorer run in-process.
Ray tests share one local Ray instance per module (2 CPUs, no dashboard).
"""

from __future__ import annotations

import io
import json
import os
from argparse import Namespace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from trn.cli import main
from trn.data import ImageDataset, load_npz, save_npz
from trn.defenses.stack import build_defense_stack
from trn.errors import ConfigError, InputError
from trn.imageio import decode_image
from trn.restorer import Restorer
from trn.sanitize_io import (
    MANIFEST_NAME,
    SPEC_NAME,
    BatchRestorer,
    JobPlan,
    SanitizeError,
    check_spec,
    detect_input,
    error_row,
    make_report,
    png_names,
    read_manifest,
    read_npz_for_job,
    read_npz_rows,
)
from trn_workers.resources import ActorPool, gpus_per_actor, local_num_cpus, map_batches_resource_kwargs
from trn_workers.sanitize import SanitizeConfig, run_sanitize_command, sanitize

N_NPZ = 40


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = Restorer.build(seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in r.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    r.save(path)
    return path


@pytest.fixture(scope="module")
def restorer(checkpoint: Path) -> Restorer:
    return Restorer.load(checkpoint)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    for attempt in range(3):  # Ray gives its raylet a fixed 30 s to register: a busy machine can miss that
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _grey(rng: np.random.Generator, h: int = 28, w: int = 28) -> np.ndarray:
    return rng.integers(0, 256, (h, w), dtype=np.uint8)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """8 good images (nested folders, one JPEG), one corrupt PNG, one 30x30 PNG."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for rel in ("a/0.png", "a/1.png", "a/b/2.png", "a/b/3.png", "c/4.png", "c/d/e/5.png", "6.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png(_grey(rng)))
    Image.fromarray(_grey(rng)).save(root / "c" / "7.jpg", quality=95)
    (root / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    (root / "c" / "big.png").write_bytes(_png(_grey(rng, 30, 30)))
    (root / "notes.txt").write_text("ignored")
    return root


@pytest.fixture
def labelled_npz(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(2)
    ds = ImageDataset(torch.rand(N_NPZ, 1, 28, 28, generator=g), torch.randint(0, 10, (N_NPZ,), generator=g),
                      tuple(str(i) for i in range(10)), "adv")
    return save_npz(tmp_path / "adv.npz", ds, image_dtype="float32")


def _lines(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------- no Ray
def test_detect_input(tmp_path: Path, image_folder: Path, labelled_npz: Path) -> None:
    assert detect_input(image_folder) == "folder"
    assert detect_input(labelled_npz) == "npz"
    pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "t.parquet")
    assert detect_input(tmp_path / "t.parquet") == "parquet"
    with pytest.raises(InputError, match="input not found"):
        detect_input(tmp_path / "missing")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(InputError, match="unsupported input file"):
        detect_input(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        detect_input(tmp_path / "empty")


def test_cli_missing_input_is_a_clear_error(tmp_path: Path, checkpoint: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["sanitize", str(tmp_path / "nope.npz"), str(tmp_path / "out"), "--checkpoint", str(checkpoint)])
    assert rc == 2
    assert "input not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written, no Ray started for a job that cannot run


def test_cli_bad_checkpoint_is_a_clear_error(labelled_npz: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["sanitize", str(labelled_npz), str(tmp_path / "out"), "--checkpoint", str(tmp_path / "none")])
    assert rc == 2
    assert "checkpoint file not found" in capsys.readouterr().err


def test_cli_bad_defence_spec_is_a_clear_error_before_ray(labelled_npz: Path, tmp_path: Path, checkpoint: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    def no_ray(*args, **kwargs):
        raise AssertionError("the job reached Ray with a bad defence spec")

    monkeypatch.setattr("trn_workers.sanitize.connect_ray", no_ray)
    stack_file = tmp_path / "stack.yaml"
    stack_file.write_text("- {name: trn, checkpoint: no/such/ckpt}\n")
    cases = {
        "[{name: jpg}]": "unknown defence 'jpg'",
        "[gcm, trn]": "comes after the classifier wrapper 'gcm'",
        "[{name: bit_depth, bitz: 4}]": "unknown parameter(s) ['bitz']",
        "[{name: bit_depth, bits: 99}]": "bits must be an integer in [1, 16], got 99",  # a value: caught by building
        "[{name: jpeg, quality: 50}": "not valid YAML",
        "stack.yml": "neither an existing file nor an inline list",
        str(stack_file): "checkpoint file not found",
    }
    for spec, message in cases.items():
        out = tmp_path / "out"
        rc = main(["sanitize", str(labelled_npz), str(out), "--checkpoint", str(checkpoint), "--defenses", spec])
        err = capsys.readouterr().err
        assert rc == 2, spec
        assert "--defenses" in err and message in err, (spec, err)
        assert not out.exists()  # nothing written
    with pytest.raises(ConfigError, match="plain data"):  # a tensor would be pickled to the actors: refused
        SanitizeConfig("in", "out", defenses=[{"name": "unig", "reference_images": torch.zeros(1, 1, 28, 28)}])


def test_resume_check_includes_the_defence_stack(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    job = {"input": "/data/x.npz", "kind": "npz", "checkpoint": "/c.safetensors"}
    (out / SPEC_NAME).write_text(json.dumps(job))  # written before --defenses existed: the stack was [trn]
    implied = {"defenses": [{"name": "trn"}]}
    check_spec(out, {**job, "defenses": [{"name": "trn"}]}, implied)
    with pytest.raises(SanitizeError, match=r"different sanitize job \(defenses differ.*bit_depth"):
        check_spec(out, {**job, "defenses": [{"name": "bit_depth", "bits": 4}, {"name": "trn"}]}, implied)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        SanitizeConfig("in", "out", batch_size=0)
    with pytest.raises(ConfigError, match="workers"):
        SanitizeConfig("in", "out", workers=0)
    with pytest.raises(ConfigError, match="resize"):
        SanitizeConfig("in", "out", resize="stretch")  # type: ignore[arg-type]


def test_resources_helpers() -> None:
    assert gpus_per_actor(None, 2, 0) == 0
    assert gpus_per_actor(None, 2, 4) == 1
    assert gpus_per_actor(None, 4, 2) == 0.5  # fewer GPUs than actors: share them so the pool still fits
    assert gpus_per_actor(0.25, 2, 1) == 0.25
    with pytest.raises(ConfigError, match="cluster has 0"):
        gpus_per_actor(1, 2, 0)
    assert local_num_cpus(8) >= 9
    kw = map_batches_resource_kwargs(ActorPool(workers=3, num_gpus=0.5, max_restarts=2, max_task_retries=5))
    assert kw["num_cpus"] == 1.0 and kw["num_gpus"] == 0.5
    size = (kw["compute"].min_size, kw["compute"].max_size) if "compute" in kw else (kw["concurrency"],) * 2
    assert size == (3, 3)
    from trn_workers.resources import _REMOTE_ARGS_UNTIL, ray_version

    if ray_version() < _REMOTE_ARGS_UNTIL:  # the pool's retry settings reach Ray
        assert (kw["max_restarts"], kw["max_task_retries"]) == (2, 5)
    else:  # newer Ray takes none: said out loud, not dropped silently
        assert "max_restarts" not in kw and "max_task_retries" not in kw
    assert "num_gpus" not in map_batches_resource_kwargs(ActorPool(workers=1))


def test_png_names_keep_paths_and_avoid_collisions() -> None:
    names = png_names(["a/b.jpg", "a/c.png", "d.JPEG", "e.png", "e.jpg"])
    assert names == {"a/b.jpg": "a/b.png", "a/c.png": "a/c.png", "d.JPEG": "d.png", "e.png": "e.png",
                     "e.jpg": "e.jpg.png"}


def test_manifest_reader_tolerates_a_truncated_last_line(tmp_path: Path) -> None:
    m = tmp_path / MANIFEST_NAME
    m.write_text('{"id": "a", "status": "ok"}\n{"id": "b", "status": "error"}\n{"id": "a", "status": "error"}\n'
                 '{"id": "c", "sta')
    rows = read_manifest(m)
    assert set(rows) == {"a", "b"} and rows["a"]["status"] == "error"  # the last line for an id wins
    m.write_text('{"id": "a", "status": "ok"}\ngarbage\n{"id": "b", "status": "ok"}\n')
    with pytest.raises(SanitizeError, match="line 2"):
        read_manifest(m)


def test_report_raises_when_an_input_has_no_row(tmp_path: Path) -> None:
    plan = JobPlan("npz", tmp_path / "x.npz", ["0", "1", "2"])
    ok = {"status": "ok", "pred_before": 1, "pred_after": 1, "label": None}
    rows = {"0": {"id": "0", **ok}, "1": {"id": "1", **error_row("1", "bad")}, "2": {"id": "2", **ok},
            "9": {"id": "9", **ok}}
    report = make_report(plan, rows, tmp_path, 0, 3, 1.0, "trn -> guard")
    assert (report.total, report.ok, report.errors) == (3, 2, 1)  # a row for an input no longer there is not counted
    del rows["1"]
    with pytest.raises(SanitizeError, match="1 of 3 inputs have no row"):
        make_report(plan, rows, tmp_path, 0, 3, 1.0, "trn -> guard")


def test_an_npz_is_read_by_the_worker_and_checked_against_the_plan(tmp_path: Path, labelled_npz: Path,
                                                                     checkpoint: Path) -> None:
    """npz batches carry row numbers; the worker reads the file itself and refuses one that changed since planning."""
    planned = read_npz_rows(labelled_npz)
    restorer = Restorer.load(checkpoint)
    with pytest.raises(ConfigError, match="needs the npz rows"):
        BatchRestorer(restorer, restorer.net, restorer.guard, "npz", tmp_path / "out", "1")
    job = BatchRestorer(restorer, torch.nn.Identity(), restorer.guard, "npz", tmp_path / "out", "1",
                        npz=read_npz_for_job(labelled_npz, planned.digest()))
    (tmp_path / "out").mkdir()
    cols = job({"id": np.array(["3", "0"], dtype=object), "index": np.array([3, 0]), "label": planned.labels[[3, 0]]})
    with torch.no_grad():
        want = restorer.guard(torch.from_numpy(planned.images[[3, 0]])).argmax(1).numpy()
    assert list(cols["status"]) == ["ok", "ok"] and np.array_equal(cols["pred_after"], want)  # rows 3 and 0, in order
    changed = load_npz(labelled_npz)
    changed.images[5] = 1.0 - changed.images[5]
    save_npz(labelled_npz, changed, image_dtype="float32")
    with pytest.raises(SanitizeError, match="changed after the job was planned"):
        read_npz_for_job(labelled_npz, planned.digest())


def test_output_of_another_job_is_refused(tmp_path: Path, labelled_npz: Path, checkpoint: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / SPEC_NAME).write_text(json.dumps({"input": "/elsewhere.npz", "kind": "npz"}))
    with pytest.raises(SanitizeError, match="different sanitize job"):
        sanitize(SanitizeConfig(labelled_npz, out, checkpoint=checkpoint))


# --------------------------------------------------------------------------------------------- Ray jobs
@pytest.mark.ray
def test_folder_job_mirrors_layout_and_records_errors(ray_local, image_folder: Path, tmp_path: Path,
                                                      checkpoint: Path, restorer: Restorer) -> None:
    out = tmp_path / "clean"
    batches: list[int] = []
    report = sanitize(SanitizeConfig(image_folder, out, checkpoint=checkpoint, workers=2, batch_size=3),
                      on_batch=lambda rows: batches.append(len(rows)))
    assert (report.total, report.ok, report.errors, report.processed, report.skipped) == (10, 8, 2, 10, 0)
    assert sum(batches) == 10
    rows = {r["id"]: r for r in _lines(out / MANIFEST_NAME)}
    assert len(rows) == 10 and len(_lines(out / MANIFEST_NAME)) == 10
    assert sum(r["status"] == "ok" for r in rows.values()) + sum(r["status"] == "error" for r in rows.values()) == 10
    corrupt = rows["a/corrupt.png"]
    assert corrupt["status"] == "error" and ("decodable" in corrupt["message"] or "corrupt" in corrupt["message"])
    assert rows["c/big.png"]["status"] == "error" and "30x30" in rows["c/big.png"]["message"]
    assert not (out / "a" / "corrupt.png").exists() and not (out / "c" / "big.png").exists()
    for rid in ("a/0.png", "a/b/3.png", "c/d/e/5.png", "6.png", "c/7.jpg"):
        r = rows[rid]
        assert r["status"] == "ok" and r["message"] == ""
        assert 0 <= r["pred_before"] < 10 and 0 <= r["pred_after"] < 10
        assert r["linf"] > 0 and r["l2"] >= r["linf"]
        assert r["node"] and r["worker"] > 0
        cleaned = out / r["output"]
        assert cleaned.suffix == ".png" and cleaned.is_file()
        x = decode_image((image_folder / rid).read_bytes(), channels=1)
        y = decode_image(cleaned.read_bytes(), channels=1)
        expected = restorer.restore(torch.from_numpy(x)[None])[0].numpy()
        assert np.abs(y - expected).max() <= 0.5 / 255 + 1e-5  # the PNG holds the restored image, 8-bit rounded
        assert r["linf"] == pytest.approx(float(np.abs(y - x).max()), abs=1e-5)  # measured on what was written
    assert (out / "c" / "7.png").is_file()  # JPEG in, PNG out, same relative path


@pytest.mark.ray
@pytest.mark.slow  # three jobs: ~40 s on 2 cores
def test_folder_resume_redoes_only_what_the_manifest_lacks(ray_local, image_folder: Path, tmp_path: Path,
                                                           checkpoint: Path) -> None:
    out = tmp_path / "clean"
    cfg = SanitizeConfig(image_folder, out, checkpoint=checkpoint, workers=1, batch_size=4)
    first = sanitize(cfg)
    assert (first.ok, first.errors) == (8, 2)
    # simulate a job killed part-way: keep 5 manifest lines and a half-written 6th; also lose one written image
    lines = (out / MANIFEST_NAME).read_text().splitlines(keepends=True)
    kept = [json.loads(line) for line in lines[:5]]
    (out / MANIFEST_NAME).write_text("".join(lines[:5]) + lines[5][:10])
    lost = next(r for r in kept if r["status"] == "ok")
    (out / lost["output"]).unlink()
    second = sanitize(cfg)
    assert (second.total, second.ok, second.errors) == (10, 8, 2)
    assert second.skipped == 4 and second.processed == 6  # 5 kept lines, one of which lost its image
    assert (out / lost["output"]).is_file()
    assert len(read_manifest(out / MANIFEST_NAME)) == 10
    third = sanitize(cfg)  # all done: nothing to process, no actors started
    assert (third.processed, third.skipped, third.ok) == (0, 10, 8)
    # the corrupt file is repaired: errors count as done unless the rerun asks to retry them
    (image_folder / "a" / "corrupt.png").write_bytes(_png(_grey(np.random.default_rng(9))))
    assert sanitize(cfg).errors == 2
    fourth = sanitize(SanitizeConfig(image_folder, out, checkpoint=checkpoint, workers=1, batch_size=4,
                                     retry_errors=True))
    assert (fourth.processed, fourth.ok, fourth.errors) == (2, 9, 1)  # big.png is still refused (resize: reject)
    rows = read_manifest(out / MANIFEST_NAME)  # the retried row supersedes the earlier error row
    assert len(rows) == 10 and rows["a/corrupt.png"]["status"] == "ok" and (out / "a" / "corrupt.png").is_file()
    assert rows["c/big.png"]["status"] == "error"
    assert len(_lines(out / MANIFEST_NAME)) == 10  # retried rows replaced, not appended beside the old ones


@pytest.mark.ray
def test_parquet_job_keeps_columns_and_rows_in_order(ray_local, tmp_path: Path, checkpoint: Path,
                                                     restorer: Restorer) -> None:
    rng = np.random.default_rng(3)
    src = tmp_path / "pq"
    (src / "part").mkdir(parents=True)
    good = [_png(_grey(rng)) for _ in range(7)]
    t1 = pa.table({"key": [f"k{i}" for i in range(5)], "label": list(range(5)),
                   "image": [good[0], b"junk", good[1], None, _png(_grey(rng, 32, 32))]})
    pq.write_table(t1, src / "a.parquet", row_group_size=2)
    t2 = pa.table({"image": [{"bytes": good[i], "path": f"{i}.png"} for i in range(2, 7)], "label": [7] * 5})
    pq.write_table(t2, src / "part" / "b.parquet")
    out = tmp_path / "clean"
    report = sanitize(SanitizeConfig(src, out, checkpoint=checkpoint, workers=2, batch_size=2, resize="resize"))
    assert (report.kind, report.total, report.ok, report.errors) == ("parquet", 10, 8, 2)
    rows = read_manifest(out / MANIFEST_NAME)
    assert rows["a.parquet:1"]["status"] == "error" and rows["a.parquet:3"]["status"] == "error"
    assert "null" in rows["a.parquet:3"]["message"]
    assert rows["a.parquet:4"]["status"] == "ok"  # 32x32 resized under resize="resize"
    a = pq.read_table(out / "a.parquet")
    assert a.column_names == ["key", "label", "image"]
    assert a.column("key").to_pylist() == ["k0", "k2", "k4"]  # error rows left out, order kept
    x = decode_image(good[1], channels=1)
    y = decode_image(a.column("image")[1].as_py(), channels=1)
    expected = restorer.restore(torch.from_numpy(x)[None])[0].numpy()
    assert np.abs(y - expected).max() <= 0.5 / 255 + 1e-5
    b = pq.read_table(out / "part" / "b.parquet")
    assert b.num_rows == 5 and b.column("label").to_pylist() == [7] * 5


@pytest.mark.ray
@pytest.mark.slow  # two jobs and a resume: ~45 s on 2 cores
def test_npz_job_reports_accuracy_and_resumes(ray_local, labelled_npz: Path, tmp_path: Path, checkpoint: Path,
                                              restorer: Restorer, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "clean"
    args = Namespace(input=str(labelled_npz), output=str(out), checkpoint=str(checkpoint), workers=2, batch_size=8,
                     num_gpus=None, image_column="image", resize="reject", address=None)
    assert run_sanitize_command(args) == 0
    printed = capsys.readouterr().out
    assert f"| {N_NPZ} | {N_NPZ} | 0 | 0 | {N_NPZ} |" in printed
    assert f"guard accuracy on {N_NPZ} labelled images: before" in printed
    src = load_npz(labelled_npz)
    res = load_npz(out / "adv.npz")
    with np.load(out / "adv.npz") as z:
        assert z["images"].dtype == np.float32
        assert z["index"].tolist() == list(range(N_NPZ))
    expected = restorer.restore(src.images)
    assert torch.allclose(res.images, expected, atol=1e-5)
    assert torch.equal(res.labels, src.labels)
    rows = read_manifest(out / MANIFEST_NAME)
    with torch.no_grad():
        before = restorer.guard(src.images).argmax(1)
        after = restorer.guard(expected).argmax(1)
    assert [rows[str(i)]["pred_before"] for i in range(N_NPZ)] == before.tolist()
    assert [rows[str(i)]["pred_after"] for i in range(N_NPZ)] == after.tolist()
    assert [rows[str(i)]["label"] for i in range(N_NPZ)] == src.labels.tolist()
    expected_acc = (after == src.labels).float().mean().item()
    assert f"after {expected_acc:.2%}" in printed

    # a partial manifest (first 13 rows) is finished by a rerun, and the assembled npz is the same
    lines = (out / MANIFEST_NAME).read_text().splitlines(keepends=True)
    (out / MANIFEST_NAME).write_text("".join(lines[:13]))
    report = sanitize(SanitizeConfig(labelled_npz, out, checkpoint=checkpoint, workers=1, batch_size=8))
    assert (report.skipped, report.processed, report.ok, report.errors) == (13, N_NPZ - 13, N_NPZ, 0)
    assert report.accuracy_after == pytest.approx(expected_acc)
    assert torch.allclose(load_npz(out / "adv.npz").images, expected, atol=1e-5)
    assert len(read_manifest(out / MANIFEST_NAME)) == N_NPZ


@pytest.mark.ray
def test_npz_job_with_a_defence_stack(ray_local, labelled_npz: Path, tmp_path: Path, checkpoint: Path,
                                      restorer: Restorer) -> None:
    """bit depth -> TRN -> GCM: the images are the library's preprocessor output, pred_after the wrapped guard's;
    the stack is recorded and part of what a rerun must match."""
    spec = [{"name": "bit_depth", "bits": 4}, {"name": "trn"}, {"name": "gcm", "w": 30.0, "eps": 0.3}]
    stack_file = tmp_path / "stack.yaml"
    stack_file.write_text("defenses:\n  - {name: bit_depth, bits: 4}\n  - trn\n  - {name: gcm, w: 30.0, eps: 0.3}\n")
    out = tmp_path / "clean"
    report = sanitize(SanitizeConfig(labelled_npz, out, checkpoint=checkpoint, workers=1, batch_size=16,
                                     defenses=str(stack_file)))
    assert (report.ok, report.errors, report.processed) == (N_NPZ, 0, N_NPZ)
    assert report.defenses == "bit_depth(bits=4) -> trn -> gcm(w=30.0, eps=0.3) -> guard"
    assert f"defences: {report.defenses}" in report.summary()
    assert json.loads((out / SPEC_NAME).read_text())["defenses"] == spec

    src = load_npz(labelled_npz)
    stack = build_defense_stack(spec, restorer.guard, restorer=restorer)
    with torch.no_grad():
        expected = stack.preprocessor(src.images)
        wrapped = stack.classifier(expected).argmax(1)
        plain_after = restorer.guard(expected).argmax(1)
    assert (expected - restorer.restore(src.images)).abs().max() > 1e-2  # the stack is not the restorer alone
    assert (wrapped != plain_after).any()  # and GCM changes some predictions: pred_after can tell them apart
    assert torch.allclose(load_npz(out / "adv.npz").images, expected, atol=1e-5)
    rows = read_manifest(out / MANIFEST_NAME)
    assert [rows[str(i)]["pred_after"] for i in range(N_NPZ)] == wrapped.tolist()
    with torch.no_grad():
        assert [rows[str(i)]["pred_before"] for i in range(N_NPZ)] == restorer.guard(src.images).argmax(1).tolist()

    # the same stack spelled differently (aliases, inline) is the same job: nothing to redo, no actors started
    same = sanitize(SanitizeConfig(labelled_npz, out, checkpoint=checkpoint, workers=1,
                                   defenses="[{name: bitdepth, bits: 4}, restorer, {name: gcm, w: 30.0, eps: 0.3}]"))
    assert (same.processed, same.skipped, same.ok) == (0, N_NPZ, N_NPZ)
    # another stack, or none (= [trn]), is another job: refused before Ray is used, nothing changed
    before = (out / MANIFEST_NAME).read_bytes()
    for other in ("[{name: bit_depth, bits: 5}, trn, {name: gcm, w: 30.0, eps: 0.3}]", None):
        with pytest.raises(SanitizeError, match="defenses differ"):
            sanitize(SanitizeConfig(labelled_npz, out, checkpoint=checkpoint, workers=1, defenses=other))
    assert (out / MANIFEST_NAME).read_bytes() == before


# --------------------------------------------------------------------------------------------- faults
def test_output_that_is_a_file_or_unwritable_is_a_one_line_error(labelled_npz: Path, tmp_path: Path,
                                                                  checkpoint: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "out.txt"
    a_file.write_text("not a folder")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    # root writes through permission bits: then a folder that cannot be created stands in for an unwritable one
    unwritable = readonly / "out" if not os.access(readonly, os.W_OK) else Path("/proc/trn-sanitize-test-out")
    cases = {a_file: "exists and is not a folder", a_file / "sub": "cannot write to OUTPUT",
             unwritable: "cannot write to OUTPUT"}
    for out, message in cases.items():
        rc = main(["sanitize", str(labelled_npz), str(out), "--checkpoint", str(checkpoint)])
        err = capsys.readouterr().err
        assert rc == 2, out
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err
    assert a_file.read_text() == "not a folder"


def test_ray_start_failure_is_a_one_line_error(labelled_npz: Path, tmp_path: Path, checkpoint: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    def timeout(*args, **kwargs):  # what Ray raises when its raylet misses the start-up deadline
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "  # noqa: TRY002
                        "failed to startup or the GCS has become overloaded.\n  more detail on a second line")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", timeout)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = main(["sanitize", str(labelled_npz), str(tmp_path / "out"), "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "could not start a local Ray" in err and "timed out" in err


def test_without_an_address_a_fresh_local_ray_is_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """No address: ``address="local"`` (never Ray's recorded current cluster); an address or ``RAY_ADDRESS``:
    join it without resources (Ray refuses num_cpus when connecting)."""
    import ray

    from trn_workers.resources import connect_ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert connect_ray(None, 3)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    connect_ray(None, 3)
    connect_ray("auto", 3)
    assert calls == [{"address": "local", "num_cpus": 3, "include_dashboard": False}, {"address": "127.0.0.1:6379"},
                     {"address": "auto"}]


def test_default_checkpoint_is_found_outside_the_repository(labelled_npz: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    def stop(*args, **kwargs):
        raise SanitizeError("stopped before Ray")

    monkeypatch.setattr("trn_workers.sanitize.connect_ray", stop)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc = main(["sanitize", str(labelled_npz), str(tmp_path / "out")])  # the default --checkpoint
    assert rc == 2 and "stopped before Ray" in capsys.readouterr().err  # got past loading the checkpoint
    recorded = Path(json.loads((tmp_path / "out" / SPEC_NAME).read_text())["checkpoint"])
    assert recorded.name == "trn_fmnist_agnostic.safetensors" and recorded.is_file()


@pytest.fixture
def awkward_folder(tmp_path: Path) -> tuple[Path, Path]:
    """Good images plus a symlink loop, a file symlink loop, a FIFO named x.png, a broken link, hidden entries and
    a symlinked folder of two images outside the tree."""
    rng = np.random.default_rng(5)
    root = tmp_path / "awkward"
    for rel in ("a/0.png", "a/1.png", "b/2.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png(_grey(rng)))
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("o1.png", "o2.png"):
        (outside / name).write_bytes(_png(_grey(rng)))
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # a/loop/a/loop/... forever
    (root / "l1.png").symlink_to(root / "l2.png")
    (root / "l2.png").symlink_to(root / "l1.png")
    os.mkfifo(root / "x.png")
    (root / "gone.png").symlink_to(tmp_path / "missing.png")
    (root / ".hidden.png").write_bytes(_png(_grey(rng)))
    (root / ".cache").mkdir()
    (root / ".cache" / "y.png").write_bytes(_png(_grey(rng)))
    return root, outside


def test_folder_policy_without_ray(awkward_folder: tuple[Path, Path], tmp_path: Path) -> None:
    from trn.sanitize_io import plan_job

    root, _ = awkward_folder
    assert detect_input(root) == "folder"
    plan = plan_job("folder", root, tmp_path / "out")
    assert set(plan.paths) == {"a/0.png", "a/1.png", "b/2.png", "linked/o1.png", "linked/o2.png"}
    assert set(plan.errors) == {"a/loop", "l1.png", "l2.png", "x.png", "gone.png"}
    assert set(plan.ids) == set(plan.paths) | set(plan.errors)
    assert "symlink loop" in plan.errors["a/loop"] and "symlink loop" in plan.errors["l1.png"]
    assert "FIFO" in plan.errors["x.png"] and "broken symlink" in plan.errors["gone.png"]
    assert (plan.hidden, plan.linked_folders) == (2, 1)


@pytest.mark.ray
def test_folder_faults_get_rows_and_the_rest_is_processed(ray_local, awkward_folder: tuple[Path, Path],
                                                          tmp_path: Path, checkpoint: Path) -> None:
    root, _ = awkward_folder
    out = tmp_path / "clean"
    report = sanitize(SanitizeConfig(root, out, checkpoint=checkpoint, workers=2, batch_size=2))
    assert (report.total, report.ok, report.errors) == (10, 5, 5)
    assert (report.hidden, report.linked_folders) == (2, 1)
    assert "hidden entries skipped: 2; symlinked folders followed: 1" in report.summary()
    rows = read_manifest(out / MANIFEST_NAME)
    assert len(_lines(out / MANIFEST_NAME)) == 10
    assert {i for i, r in rows.items() if r["status"] == "error"} == {"a/loop", "l1.png", "l2.png", "x.png",
                                                                    "gone.png"}
    assert (out / "linked" / "o1.png").is_file() and rows["linked/o2.png"]["status"] == "ok"
    assert not (out / "x.png").exists()


@pytest.mark.ray
def test_one_nan_image_in_an_npz_costs_only_its_row(ray_local, tmp_path: Path, checkpoint: Path,
                                                    restorer: Restorer) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.rand(12, 1, 28, 28, generator=g).numpy()
    x[3, 0, 5, 5] = np.nan
    x[7, 0, 0, 0] = 1.5
    labels = np.arange(12) % 10
    np.savez(tmp_path / "bad.npz", images=x, labels=labels)
    out = tmp_path / "clean"
    report = sanitize(SanitizeConfig(tmp_path / "bad.npz", out, checkpoint=checkpoint, workers=1, batch_size=4))
    assert (report.total, report.ok, report.errors) == (12, 10, 2)
    rows = read_manifest(out / MANIFEST_NAME)
    assert "finite" in rows["3"]["message"] and "[0, 1]" in rows["7"]["message"]
    assert rows["3"]["label"] == 3
    with np.load(out / "bad.npz") as z:
        keep = [i for i in range(12) if i not in (3, 7)]
        assert z["index"].tolist() == keep
        expected = restorer.restore(torch.from_numpy(x[keep])).numpy()
        assert np.allclose(z["images"], expected, atol=1e-5) and z["labels"].tolist() == labels[keep].tolist()


@pytest.mark.cuda
@pytest.mark.ray
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run benchmarks/gpu_check.sh there)")
def test_gpu_actors_write_what_the_cpu_restorer_gives(ray_local, labelled_npz: Path, tmp_path: Path,
                                                      checkpoint: Path, restorer: Restorer) -> None:
    import ray

    assert ray.cluster_resources().get("GPU", 0) >= 1
    report = sanitize(SanitizeConfig(labelled_npz, tmp_path / "gpu", checkpoint=checkpoint, workers=1,
                                     num_gpus=1, batch_size=16))
    assert (report.ok, report.errors) == (N_NPZ, 0)
    expected = restorer.restore(load_npz(labelled_npz).images)
    assert torch.allclose(load_npz(tmp_path / "gpu" / "adv.npz").images, expected, atol=1e-4)
