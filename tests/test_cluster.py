"""``sanitize`` on a two-node Ray cluster (``ray.cluster_utils.Cluster``, both nodes on this machine).

Each node has one CPU and each actor takes one, so a pool of two must use both nodes; the manifest records the node
and worker pid of every row. Mid-job, the driver kills one actor's process (SIGKILL, as a crash or OOM kill would):
Ray restarts the actor and retries its batches (``max_restarts`` / ``max_task_retries``), and every input still
gets exactly one ok row.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from trn.data import ImageDataset, load_npz, save_npz
from trn.restorer import Restorer
from workers.sanitize import MANIFEST_NAME, SanitizeConfig, read_manifest, sanitize

pytestmark = [pytest.mark.ray, pytest.mark.slow]
N = 192


def _start(cluster_cls, attempts: int = 3):
    """A head (1 CPU) plus one worker node (1 CPU); retried because Ray gives a raylet a fixed 30 s to register."""
    for attempt in range(attempts):
        cluster = None
        try:
            cluster = cluster_cls(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            return cluster
        except Exception:
            if cluster is not None:
                cluster.shutdown()
            if attempt == attempts - 1:
                raise


@pytest.fixture(scope="module")
def two_nodes():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = _start(Cluster)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def job(tmp_path: Path) -> tuple[Path, Path]:
    r = Restorer.build(seed=0)
    r.save(tmp_path / "tiny")
    g = torch.Generator().manual_seed(0)
    ds = ImageDataset(torch.rand(N, 1, 28, 28, generator=g), torch.randint(0, 10, (N,), generator=g),
                      tuple(str(i) for i in range(10)))
    return save_npz(tmp_path / "x.npz", ds, image_dtype="float32"), tmp_path / "tiny"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_job_spreads_over_both_nodes_and_survives_a_killed_actor(two_nodes, job, tmp_path: Path) -> None:
    import ray

    npz, checkpoint = job
    node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(node_ids) == 2
    killed: list[int] = []

    def kill_one_actor(rows: list[dict]) -> None:
        if not killed:  # after the first batch reaches the driver, crash the actor that produced it
            pid = rows[0]["worker"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    report = sanitize(SanitizeConfig(npz, tmp_path / "out", checkpoint=checkpoint, workers=2, batch_size=4,
                                     max_restarts=3, max_task_retries=3), on_batch=kill_one_actor)
    assert killed and not _alive(killed[0])
    assert (report.total, report.ok, report.errors, report.processed) == (N, N, 0, N)
    rows = read_manifest(tmp_path / "out" / MANIFEST_NAME)
    assert len(rows) == N and all(r["status"] == "ok" for r in rows.values())
    assert {r["node"] for r in rows.values()} == node_ids  # both nodes did work
    assert set(report.nodes) == node_ids
    out = load_npz(tmp_path / "out" / "x.npz")
    assert len(out) == N
    expected = Restorer.load(checkpoint).restore(load_npz(npz).images)
    assert torch.allclose(out.images, expected, atol=1e-5)
