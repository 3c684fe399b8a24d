"""Resource arguments of Ray Data's ``map_batches`` for an actor pool, kept in one place.

The way an actor pool is sized moved between Ray versions: Ray 2.9-2.50 take ``concurrency=n``; Ray 2.51 deprecated
``concurrency`` for callable classes in favour of ``compute=ActorPoolStrategy(size=n)``. Restart and retry limits
go in as Ray remote arguments (``**ray_remote_args``), which Ray 2.60 deprecates for removal in 2.64 without a named
replacement for ``max_restarts`` / ``max_task_retries``; from 2.64 on they are left to Ray Data's defaults (restart
and retry without limit) and a warning says so. Everything that decides where and how often an actor runs is
assembled here, so that :mod:`trn_workers.sanitize` and the benchmarks pass one dict and never name a version-specific
keyword.

    >>> pool = ActorPool(workers=2, num_gpus=gpus_per_actor(None, 2, cluster_gpus()))
    >>> ds.map_batches(Worker, batch_size=256, **map_batches_resource_kwargs(pool))
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

from trn.errors import ConfigError, TRNError, one_line

__all__ = [
    "ActorPool",
    "RayStartError",
    "cluster_gpus",
    "connect_ray",
    "gpus_per_actor",
    "local_num_cpus",
    "map_batches_resource_kwargs",
    "ray_version",
]

class RayStartError(TRNError, RuntimeError):
    """Ray could not be started or reached, or a Ray job failed (always a one-line message)."""


_COMPUTE_SINCE = (2, 51)  # first Ray release where ``concurrency=`` is deprecated for callable classes
_REMOTE_ARGS_UNTIL = (2, 64)  # Ray 2.60 announces the removal of ``**ray_remote_args`` from map_batches in 2.64


@dataclass(frozen=True)
class ActorPool:
    """How many actors run a ``map_batches`` callable class, what each one holds, and how failures are retried.

    Attributes:
        workers: actors in the pool (a fixed size: the model is loaded once per actor).
        num_cpus: logical CPUs reserved per actor; the actor also sizes torch's thread pool from it.
        num_gpus: GPUs per actor (fractions share a GPU); 0 runs on CPU.
        max_restarts: how often Ray restarts a dead actor (process killed, node lost).
        max_task_retries: how often a batch in flight on a dead actor is retried on its restarted self.
    """

    workers: int = 2
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_restarts: int = 3
    max_task_retries: int = 3

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.num_cpus <= 0:
            raise ConfigError(f"num_cpus per worker must be > 0, got {self.num_cpus}")
        if self.num_gpus < 0:
            raise ConfigError(f"num_gpus per worker must be >= 0, got {self.num_gpus}")
        if self.max_restarts < -1 or self.max_task_retries < -1:
            raise ConfigError("max_restarts and max_task_retries must be >= 0, or -1 for 'forever'")


def ray_version() -> tuple[int, int]:
    """(major, minor) of the installed Ray."""
    import ray

    major, minor = (int("".join(ch for ch in part if ch.isdigit()) or 0) for part in ray.__version__.split(".")[:2])
    return major, minor


def map_batches_resource_kwargs(pool: ActorPool) -> dict[str, Any]:
    """Keyword arguments for ``Dataset.map_batches`` that run a callable class on ``pool``, for the installed Ray.

    Returns:
        ``num_cpus``, ``num_gpus`` (only when > 0), the pool size as ``compute=ActorPoolStrategy(size=...)`` (Ray >=
        2.51) or ``concurrency=...`` (older), and ``max_restarts`` / ``max_task_retries`` as Ray remote arguments
        (Ray < 2.64; Ray 2.60-2.63 warn that these are deprecated).
    """
    version = ray_version()
    kwargs: dict[str, Any] = {"num_cpus": pool.num_cpus}
    if pool.num_gpus > 0:
        kwargs["num_gpus"] = pool.num_gpus
    if version >= _COMPUTE_SINCE:
        from ray.data import ActorPoolStrategy

        kwargs["compute"] = ActorPoolStrategy(size=pool.workers)
    else:
        kwargs["concurrency"] = pool.workers
    if version < _REMOTE_ARGS_UNTIL:
        kwargs["max_restarts"] = pool.max_restarts
        kwargs["max_task_retries"] = pool.max_task_retries
    else:
        warnings.warn(f"Ray {version[0]}.{version[1]} takes no max_restarts/max_task_retries in map_batches; "
                      "Ray Data's defaults apply (restart and retry without limit)", stacklevel=2)
    return kwargs


def cluster_gpus() -> float:
    """GPUs in the Ray cluster this process is connected to (0 when Ray is not initialised)."""
    import ray

    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def gpus_per_actor(requested: float | None, workers: int, available: float) -> float:
    """GPUs to give each of ``workers`` actors.

    Args:
        requested: an explicit choice (``--num-gpus``); used as is when not None.
        workers: actors in the pool.
        available: GPUs in the cluster (:func:`cluster_gpus`).

    Returns:
        ``requested`` if given; otherwise 1 per actor when there are at least as many GPUs as actors, an equal share
        of the GPUs when there are fewer (so the pool still fits), and 0 without GPUs.

    Raises:
        ConfigError: ``requested`` is negative, or the pool asks for more GPUs than the cluster has.
    """
    if requested is not None:
        if requested < 0:
            raise ConfigError(f"--num-gpus must be >= 0, got {requested}")
        if requested * workers > available + 1e-9:
            raise ConfigError(f"{workers} workers x {requested} GPU(s) each need {requested * workers:g} GPUs, "
                              f"but the cluster has {available:g}; lower --workers or --num-gpus")
        return float(requested)
    if available <= 0:
        return 0.0
    return 1.0 if available >= workers else available / workers


def local_num_cpus(workers: int, cpus_per_worker: float = 1.0) -> int:
    """Logical CPUs for a local ``ray.init``: the machine's cores, and at least one per actor plus one spare.

    Ray's CPUs are scheduling slots, not pinned cores: the spare slot keeps Ray Data's own small tasks from waiting
    behind the actor pool when the pool is as large as the machine.
    """
    return max(os.cpu_count() or 1, math.ceil(workers * cpus_per_worker) + 1)


def connect_ray(address: str | None, num_cpus: int) -> bool:
    """Join ``address`` (or ``$RAY_ADDRESS``) or start a fresh local Ray; True when this call connected.

    Joining an existing cluster passes no resources (Ray refuses them there); a local start never falls back to
    the cluster Ray last recorded as current on this machine.

    Raises:
        RayStartError: Ray could not be started or reached (one line, with Ray's reason).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    except Exception as e:  # noqa: BLE001 - Ray raises plain Exception for a start-up timeout
        ray.shutdown()  # a half-started Ray leaves nothing behind
        where = f"connect to the Ray cluster at {address!r}" if address else "start a local Ray"
        raise RayStartError(f"could not {where}: {one_line(e)}") from None
    return True
