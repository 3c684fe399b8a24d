"""``trn train --workers 2``: TRN training on Ray Train (TorchTrainer, DDP over gloo) with 2 CPU workers.

The run starts from a restorer whose head is nudged away from the identity, on clean batches only (``chunks: 1``,
so no random attack draws differ between ranks): DDP averages the two ranks' half-batch gradients, which is the
full batch's gradient, so the two-worker run must take the same steps as the single-process run. The test checks
that (weights and per-epoch losses), that training reduced the loss, and that the checkpoint is the usual
safetensors + JSON restorer.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from trn.classifiers import create_classifier, save_classifier
from trn.cli import main
from trn.data import ImageDataset, save_npz
from trn.errors import ConfigError
from trn.restorer import Restorer
from trn.train_trn import TRNTrainConfig, build_training, train_trn

pytestmark = pytest.mark.ray
N, S, K = 40, 8, 5  # K > the estimator's k (3): with k = K the top-k map is exactly zero, i.e. scaled float noise,
                    # which is not the same for a half batch as for the whole one on every BLAS build


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> TRNTrainConfig:
    tmp = tmp_path_factory.mktemp("ddp")
    kw = {"in_channels": 1, "num_classes": K, "image_size": S, "width": 4}
    torch.manual_seed(0)
    guard = create_classifier("small_cnn", **kw).eval()
    x = torch.rand(N, 1, S, S, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = guard(x).argmax(1)
    names = tuple("abcde")
    data = save_npz(tmp / "data.npz", ImageDataset(x, y, names, "tiny"), image_dtype="float32")
    save_classifier(tmp / "guard", guard, "small_cnn", kw,
                    {"image_shape": [1, S, S], "class_names": list(names), "test_accuracy": 1.0})
    base = TRNTrainConfig(dataset="npz", data_dir=str(data), guard=str(tmp / "guard"), arch="trn_tiny",
                          attacks=["fgsm"], chunks=1, clean_chunks=1, epochs=3, batch_size=8, val_size=8,
                          lr=5e-3, device="cpu", out=str(tmp / "unused"), resume=False)
    run = build_training(base)  # the same net the runs build, nudged so that restoring clean images costs a loss
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in run.restorer.net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    run.restorer.save(tmp / "start", guard_path=base.guard)
    return replace(base, init_from=str(tmp / "start"))


@pytest.fixture(scope="module")
def ray_off():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    yield
    assert not ray.is_initialized()  # train_distributed started its own local Ray and shut it down


@pytest.mark.slow  # two Ray Train workers: ~50 s on 2 cores
def test_two_cpu_workers_take_the_single_process_steps(cfg: TRNTrainConfig, tmp_path: Path, ray_off) -> None:
    from trn_workers.train import train_distributed

    single = train_trn(replace(cfg, out=str(tmp_path / "single")))
    path = train_distributed(replace(cfg, out=str(tmp_path / "ddp")), workers=2, storage=str(tmp_path / "ray_train"))
    assert path == (tmp_path / "ddp.safetensors").absolute() and path.is_file()
    ddp = Restorer.load(tmp_path / "ddp")  # the usual restorer checkpoint: safetensors + JSON
    meta_s = json.loads((tmp_path / "single.json").read_text())
    meta_d = json.loads((tmp_path / "ddp.json").read_text())
    assert meta_d["kind"] == "restorer" and meta_d["distributed"] == {"workers": 2, "backend": "gloo"}
    assert meta_d["train_images"] == meta_s["train_images"] == N - 8
    loss_s = [h["loss"] for h in meta_s["history"]]
    loss_d = [h["loss"] for h in meta_d["history"]]
    assert len(loss_d) == cfg.epochs and loss_d[-1] < loss_d[0] and loss_s[-1] < loss_s[0]  # both trained
    moved = max((a - b).abs().max().item() for a, b in zip(single.net.state_dict().values(),
                                                          Restorer.load(cfg.init_from).net.state_dict().values()))
    diff = max((a - b).abs().max().item() for a, b in zip(single.net.state_dict().values(),
                                                         ddp.net.state_dict().values()))
    assert moved > 1e-2 and diff < 1e-3 * max(1.0, moved * 10), (moved, diff)
    x = torch.rand(4, 1, S, S)
    with torch.no_grad():
        torch.testing.assert_close(ddp(x), single(x), atol=1e-3, rtol=0)


def test_cli_flags_reach_ray_train(cfg: TRNTrainConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}
    monkeypatch.setattr("trn_workers.train.train_distributed", lambda c, **kw: seen.update(cfg=c, **kw))
    config = tmp_path / "c.yaml"
    config.write_text(f"dataset: npz\ndata_dir: {cfg.data_dir}\nguard: {cfg.guard}\nout: {tmp_path / 'x'}\n")
    assert main(["train", "--config", str(config), "--address", "auto", "--workers", "4",
                 "--gpus-per-worker", "1"]) == 0
    assert seen["address"] == "auto" and seen["workers"] == 4 and seen["gpus_per_worker"] == 1.0
    assert seen["cfg"].guard == cfg.guard


def test_batch_must_split_over_the_workers(cfg: TRNTrainConfig) -> None:
    from trn_workers.train import train_distributed

    with pytest.raises(ConfigError, match="does not split over 3 workers"):
        train_distributed(cfg, workers=3)
    with pytest.raises(ConfigError, match="--workers must be >= 1"):
        train_distributed(cfg, workers=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run benchmarks/gpu_check.sh there)")
def test_one_gpu_worker_trains_over_nccl(cfg: TRNTrainConfig, tmp_path: Path, ray_off) -> None:
    from trn_workers.train import train_distributed

    train_distributed(replace(cfg, out=str(tmp_path / "gpu"), device="auto"), workers=1, gpus_per_worker=1,
                      storage=str(tmp_path / "ray_train"))
    meta = json.loads((tmp_path / "gpu.json").read_text())
    assert meta["distributed"] == {"workers": 1, "backend": "nccl"}
    Restorer.load(tmp_path / "gpu")
