"""``trn train --workers N``: the TRN training of :mod:`trn.train_trn` on Ray Train (``TorchTrainer``, DDP).

Each of the N workers builds the same run (:func:`trn.train_trn.build_training`: same seed, so the same initial
weights), wraps the network in DistributedDataParallel (gloo on CPU, NCCL on GPU, chosen by Ray Train) and runs
:func:`trn.train_trn.run_epochs` with its rank: every rank draws the same global batch and trains on its share, DDP
averages the gradients, so N workers take the steps one process would with the same ``batch_size``. Rank 0
validates after each epoch (on the training hold-out) and reports the restorer, saved as ``NAME.safetensors`` +
``NAME.json`` exactly as the single-process path saves it, as a Ray Train checkpoint; the driver copies it to
``cfg.out``. On a multi-node cluster the dataset and guard paths must exist on every node, and Ray Train's storage
(``RunConfig.storage_path``, the ``storage`` argument) must be shared. A distributed run starts from epoch 0 (the
single-process ``train_state`` resume is not used).

    >>> train_distributed(cfg, workers=2)                       # local Ray, 2 CPU workers
    >>> train_distributed(cfg, address="auto", workers=4, gpus_per_worker=1)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from trn.checkpoint import checkpoint_paths
from trn.config import from_dict, to_dict
from trn.errors import ConfigError
from trn.train_trn import TRNTrainConfig
from trn_workers.resources import RayStartError, connect_ray

__all__ = ["train_distributed", "train_loop_per_worker"]
log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: build the run, wrap the net in DDP, train, rank 0 reports the checkpoint."""
    import ray.train
    import ray.train.torch
    import torch

    from trn.train_trn import build_training, run_epochs, save_restorer

    os.chdir(config["cwd"])  # relative dataset / guard paths mean what they mean on the driver
    torch.set_num_threads(max(1, int(config["threads"])))
    cfg = from_dict(TRNTrainConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run = build_training(cfg, ray.train.torch.get_device())
    # DDP (gloo on CPU, NCCL on GPU); the last level's cross-stream projections feed nothing: unused parameters
    ddp = ray.train.torch.prepare_model(run.restorer.net, move_to_device=True,
                                        parallel_strategy_kwargs={"find_unused_parameters": True})
    t0 = time.time()

    def report(epoch: int, history: list[dict], losses: list[float]) -> None:
        metrics = {"epoch": epoch, "loss": sum(losses) / max(1, len(losses)), "rank": rank}
        if rank == 0 and epoch == cfg.epochs:
            with tempfile.TemporaryDirectory(prefix="trn-ray-train-") as d:
                save_restorer(run, history, time.time() - t0, out=str(Path(d) / "restorer"),
                              distributed={"workers": world, "backend": "nccl" if torch.cuda.is_available()
                                           and run.device.type == "cuda" else "gloo"})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)

    run_epochs(run, ddp, rank=rank, world=world, on_epoch=report)


def train_distributed(cfg: TRNTrainConfig, address: str | None = None, workers: int = 2,
                      gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0, storage: str | None = None) -> Path:
    """Train ``cfg`` on ``workers`` Ray Train workers; write ``cfg.out`` (safetensors + JSON); return its path.

    Args:
        cfg: the same config as the single-process path; ``batch_size`` is the global batch (split over workers).
        address: Ray cluster to join; None: ``$RAY_ADDRESS`` if set, else a fresh local Ray.
        workers: DDP ranks.
        gpus_per_worker: 0 trains on CPU (gloo); 1 gives each rank a GPU (NCCL).
        cpus_per_worker: logical CPUs (and torch threads) per rank.
        storage: Ray Train's ``storage_path`` (shared storage on a multi-node cluster); None: Ray's default
            (``~/ray_results``).

    Raises:
        ConfigError: fewer than 1 worker, a batch that does not split over the workers, or a negative GPU count.
        RayStartError: Ray could not be started or reached, or the training failed (one line).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")
    if cfg.batch_size % workers:
        raise ConfigError(f"batch_size {cfg.batch_size} does not split over {workers} workers; use a multiple")
    started = connect_ray(address, workers * max(1, int(cpus_per_worker)) + 1)
    out = checkpoint_paths(cfg.out)[0].with_suffix("").absolute()
    try:
        resources: dict[str, float] = {"CPU": cpus_per_worker}
        if gpus_per_worker > 0:
            resources["GPU"] = gpus_per_worker
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": to_dict(cfg), "cwd": os.getcwd(), "threads": cpus_per_worker},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=f"trn_{out.name}_{time.strftime('%Y%m%d-%H%M%S')}", storage_path=storage),
        )
        try:
            result = trainer.fit()
        except Exception as e:  # noqa: BLE001 - Ray Train wraps worker errors; say it in one line
            text = " ".join(str(e).split())[:400]
            raise RayStartError(f"distributed training failed: {type(e).__name__}: {text}") from None
        if result.checkpoint is None:
            raise RayStartError("distributed training finished without a checkpoint from rank 0")
        with result.checkpoint.as_directory() as d:
            src_t, src_m = checkpoint_paths(Path(d) / "restorer")
            dst_t, dst_m = checkpoint_paths(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            for src, dst in ((src_t, dst_t), (src_m, dst_m)):
                tmp = dst.with_name(f".{dst.name}.tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
        log.info("saved %s (%d Ray Train workers)", dst_t, workers)
        return dst_t
    finally:
        if started:
            ray.shutdown()
