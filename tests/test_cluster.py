"""``sanitize`` against an existing Ray cluster: a two-node ``ray.cluster_utils.Cluster`` on loopback.

Each node has one CPU and each actor takes one, so a pool of two must use both nodes; the manifest records the node
and worker pid of every row. Checked here:

* the job spreads over both nodes, the driver receives only manifest columns (measured: bytes per row, against the
  bytes of one image), and after one actor's process is SIGKILLed mid-job (as a crash or OOM kill would) Ray
  restarts it and retries its batches, so every input still gets exactly one ok row;
* ``--address HOST:PORT`` and ``RAY_ADDRESS`` (what ``ray job submit`` sets) join that cluster (no resources are
  passed: Ray refuses them when connecting);
* with neither, ``trn sanitize`` starts a fresh local Ray and never joins the running cluster, although Ray has it
  recorded as the machine's current cluster.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from trn.cli import main
from trn.data import ImageDataset, load_npz, save_npz
from trn.restorer import Restorer
from trn.sanitize_io import MANIFEST_NAME, read_manifest
from trn_workers.sanitize import SanitizeConfig, sanitize

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a multi-node cluster per test: ~40 s each on 2 cores
N = 96


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
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = _start(Cluster)
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, changing_checkpoint: Path) -> tuple[Path, Path]:
    """A float32 npz of N random images and a restorer that changes images (an echo would fail the tests)."""
    tmp = tmp_path_factory.mktemp("job")
    g = torch.Generator().manual_seed(0)
    ds = ImageDataset(torch.rand(N, 1, 28, 28, generator=g), torch.randint(0, 10, (N,), generator=g),
                      tuple(str(i) for i in range(10)))
    return save_npz(tmp / "x.npz", ds, image_dtype="float32"), changing_checkpoint


def _node_ids(cluster) -> set[str]:
    return {n.node_id for n in cluster.list_all_nodes()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_job_spreads_over_both_nodes_and_survives_a_killed_actor(cluster, job, tmp_path: Path) -> None:
    import ray

    npz, checkpoint = job
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        assert len({n["NodeID"] for n in ray.nodes() if n["Alive"]}) == 2
        killed: list[int] = []
        driver_rows: list[dict] = []

        def kill_one_actor(rows: list[dict]) -> None:
            driver_rows.extend(rows)
            if not killed:  # after the first batch reaches the driver, crash the actor that produced it
                os.kill(rows[0]["worker"], signal.SIGKILL)
                killed.append(rows[0]["worker"])

        report = sanitize(SanitizeConfig(npz, tmp_path / "out", checkpoint=checkpoint, workers=2, batch_size=8,
                                         max_restarts=3, max_task_retries=3), on_batch=kill_one_actor)
    finally:
        ray.shutdown()
    assert killed and not _alive(killed[0])
    assert (report.total, report.ok, report.errors, report.processed) == (N, N, 0, N)
    rows = read_manifest(tmp_path / "out" / MANIFEST_NAME)
    assert len(rows) == N and all(r["status"] == "ok" for r in rows.values())
    assert len((tmp_path / "out" / MANIFEST_NAME).read_text().splitlines()) == N  # one line per input
    assert {r["node"] for r in rows.values()} == _node_ids(cluster) == set(report.nodes)  # both nodes did work
    # the driver received manifest columns only: far less than one image (28 x 28 float32 = 3,136 bytes) per row
    image_bytes = 28 * 28 * 4
    assert 0 < report.driver_bytes / N < image_bytes / 10, report.driver_bytes
    assert all(set(r) <= {"id", "status", "message", "label", "pred_before", "pred_after", "linf", "l2", "output",
                          "node", "worker"} for r in driver_rows)
    out = load_npz(tmp_path / "out" / "x.npz")
    assert len(out) == N
    inputs = load_npz(npz).images
    expected = Restorer.load(checkpoint).restore(inputs)
    assert torch.allclose(out.images, expected, atol=1e-5)
    assert (out.images - inputs).abs().amax() > 1e-3  # the restorer's change arrived (not an echo of the input)


def test_address_and_ray_address_join_the_cluster(cluster, job, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    npz, checkpoint = job
    assert not ray.is_initialized()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = ["--checkpoint", str(checkpoint), "--workers", "2", "--batch-size", "48"]
    assert main(["sanitize", str(npz), str(tmp_path / "a"), "--address", cluster.address, *args]) == 0
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)  # as under `ray job submit`
    assert main(["sanitize", str(npz), str(tmp_path / "b"), *args]) == 0
    capsys.readouterr()
    for out in ("a", "b"):
        rows = read_manifest(tmp_path / out / MANIFEST_NAME)
        assert len(rows) == N and {r["node"] for r in rows.values()} <= _node_ids(cluster)
    assert not ray.is_initialized()  # the CLI disconnected; the cluster is still there for others
    assert all(n.remaining_processes_alive() for n in cluster.list_all_nodes())


def test_without_an_address_a_fresh_local_ray_is_used(cluster, job, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    npz, checkpoint = job
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["sanitize", str(npz), str(tmp_path / "c"), "--checkpoint", str(checkpoint), "--workers", "1",
                 "--batch-size", "96"]) == 0
    capsys.readouterr()
    rows = read_manifest(tmp_path / "c" / MANIFEST_NAME)
    nodes = {r["node"] for r in rows.values()}
    assert len(rows) == N and len(nodes) == 1 and not nodes & _node_ids(cluster)
    assert json.loads((tmp_path / "c" / "sanitize.json").read_text())["kind"] == "npz"
