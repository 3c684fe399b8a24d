"""Throughput and latency of the TRN Serve application on loopback, with and without dynamic batching.

    python benchmarks/bench_serve.py                          # shipped checkpoints/trn_fmnist
    python benchmarks/bench_serve.py --checkpoint runs/my_trn # another restorer checkpoint
    python benchmarks/bench_serve.py --tiny --duration 3      # an untrained tiny restorer: checks the script works

One Serve replica (``--replica-cpus``), ``POST /v1/restore`` with a 28x28 PNG from N concurrent HTTP clients (one
asyncio load generator in this process, so client and server share the machine - the same for both modes).
"without batching" is the same application redeployed with ``max_batch_size=1`` and the same
``max_ongoing_requests`` (with the service's default for it, 2 * max_batch_size = 2 at the time, Serve's router kept
backing off and the unbatched figure collapsed to ~9 req/s at 32 clients: a comparison of limits, not of batching).
"http-only" is ``GET /healthz`` on the batched app: the same proxy, router and replica path without the model, i.e.
the ceiling any model could reach on this machine. "batch-endpoint" is the batched app's ``POST /v1/restore/batch``
with ``--images-per-request`` images in one .npz per request (issue 13's target: >= 4x the images/s of one-image
requests at 32 clients). Prints requests/s, p50/p99 latency and the mean batch size the
replica ran per client count, then the ratios. Targets on the 2-core development machine: batched/unbatched >= 4 at
32 clients, p99 < 250 ms at 16 clients (batched).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def _png(seed: int, shape: tuple[int, int, int]) -> bytes:
    c, h, w = shape
    a = np.random.default_rng(seed).integers(0, 256, (h, w) if c == 1 else (h, w, c), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _npz(seed: int, shape: tuple[int, int, int], n: int) -> bytes:
    """An .npz of n random uint8 images (N, C, H, W): one batch-endpoint request."""
    a = np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, images=a)
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, bodies: list[bytes] | None, clients: int, duration: float,
                ctype: str = "image/png") -> dict:
    """``clients`` closed-loop clients POSTing ``bodies`` (GET when None) for ``duration`` seconds; latency of every
    completed request."""
    import httpx

    latencies: list[float] = []
    batches: list[int] = []
    errors = 0
    stop = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                if bodies is None:
                    r = await client.get(url)
                else:
                    r = await client.post(url, content=bodies[i % len(bodies)], headers={"Content-Type": ctype})
                dt = time.perf_counter() - t0
                i += clients
                if r.status_code != 200:
                    errors += 1
                    continue
                latencies.append(dt)
                batches.append(int(r.headers.get("x-trn-batch-size", 1)))

        t_start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        elapsed = time.perf_counter() - t_start
    lat = np.asarray(latencies) * 1000.0
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "mean_batch": statistics.fmean(batches) if batches else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "trn_fmnist"), help="restorer checkpoint")
    p.add_argument("--tiny", action="store_true", help="benchmark an untrained trn_tiny restorer (smoke run)")
    p.add_argument("--clients", default="1,16,32", help="comma-separated concurrent client counts")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per (mode, client count)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each mode's measurements")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait", type=float, default=0.01, help="batch_wait_timeout_s of the batched mode")
    p.add_argument("--ray-cpus", type=int, default=2, help="logical CPUs of the local Ray")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="num_cpus (and torch threads) of the replica")
    p.add_argument("--images-per-request", type=int, default=32, help="images per request of the batch-endpoint mode")
    p.add_argument("--modes", default="batched,unbatched,http-only",
                   help="http-only: GET /healthz on the batched app, the same HTTP path without the model")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    a = p.parse_args(argv)

    import ray
    from ray import serve

    from trn.restorer import Restorer
    from trn_workers.serve import build_app

    tmp = None
    ckpt = a.checkpoint
    if a.tiny:
        tmp = tempfile.TemporaryDirectory()
        ckpt = str(Path(tmp.name) / "trn_tiny")
        Restorer.build((1, 28, 28)).save(ckpt)
    shape = tuple(json.loads(Path(ckpt + ".json").read_text()).get("image_shape", (1, 28, 28)))
    bodies = [_png(i, shape) for i in range(64)]
    clients = [int(c) for c in a.clients.split(",")]

    ray.init(address="local", num_cpus=a.ray_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = _free_port()
    results: dict[str, list[dict]] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/v1/restore"
        for mode in a.modes.split(","):
            if mode not in ("batched", "unbatched", "http-only", "batch-endpoint"):
                raise SystemExit(f"unknown mode {mode!r}")
            # batching is the one change between the modes (same request limits, so the router treats them alike)
            mbs = 1 if mode == "unbatched" else a.max_batch_size
            app = build_app({"restorer": ckpt, "max_batch_size": mbs, "batch_wait_timeout_s": a.batch_wait,
                             "num_cpus": a.replica_cpus, "downstream": {"kind": "none"},
                             "max_queued_requests": -1, "max_ongoing_requests": 2 * a.max_batch_size})
            serve.run(app, name="bench", route_prefix="/")
            target, payload = (url.replace("/v1/restore", "/healthz"), None) if mode == "http-only" else (url, bodies)
            ctype, per_request = "image/png", 1
            if mode == "batch-endpoint":
                target, ctype, per_request = url + "/batch", "application/x-npz", a.images_per_request
                payload = [_npz(k, shape, per_request) for k in range(4)]
            asyncio.run(_load(target, payload, max(clients), a.warmup, ctype))
            results[mode] = []
            for n in clients:
                r = asyncio.run(_load(target, payload, n, a.duration, ctype))
                r["images_per_s"] = r["rps"] * per_request
                results[mode].append(r)
                print(f"{mode:>9} clients={n:3d}  {r['rps']:8.1f} req/s  {r['images_per_s']:8.1f} img/s  p50 {r['p50_ms']:7.1f} ms  "
                      f"p99 {r['p99_ms']:7.1f} ms  mean batch {r['mean_batch']:5.1f}  errors {r['errors']}",
                      flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()

    print(f"\ncheckpoint: {'trn_tiny (untrained)' if a.tiny else ckpt}; max_batch_size={a.max_batch_size}, "
          f"batch_wait_timeout_s={a.batch_wait}, replica num_cpus={a.replica_cpus}")
    ok = True
    if "batched" in results and "unbatched" in results:
        for rb, ru in zip(results["batched"], results["unbatched"]):
            print(f"clients={rb['clients']:3d}: batched / unbatched throughput = {rb['rps'] / ru['rps']:.2f}x")
        by_n = {r["clients"]: r for r in results["batched"]}
        un_n = {r["clients"]: r for r in results["unbatched"]}
        if 32 in by_n:
            ratio = by_n[32]["rps"] / un_n[32]["rps"]
            ok &= ratio >= 4
            print(f"target: ratio >= 4x at 32 clients: {ratio:.2f}x -> {'met' if ratio >= 4 else 'NOT met'}")
        if "http-only" in results:
            for rb, rh in zip(results["batched"], results["http-only"]):
                print(f"clients={rb['clients']:3d}: batched restore runs at {rb['rps'] / rh['rps']:.0%} of the "
                      f"HTTP path's own ceiling ({rh['rps']:.0f} req/s for GET /healthz)")
        if 16 in by_n:
            p99 = by_n[16]["p99_ms"]
            ok &= p99 < 250
            print(f"target: p99 < 250 ms at 16 clients (batched): {p99:.1f} ms -> {'met' if p99 < 250 else 'NOT met'}")
    if "batch-endpoint" in results and "batched" in results:
        one = {r["clients"]: r for r in results["batched"]}
        for rb in results["batch-endpoint"]:
            if rb["clients"] in one:
                ratio = rb["images_per_s"] / one[rb["clients"]]["images_per_s"]
                print(f"clients={rb['clients']:3d}: batch endpoint ({a.images_per_request} images/request) / one image "
                      f"per request = {ratio:.2f}x images/s" + ("  (target >= 4x)" if rb["clients"] == 32 else ""))
    if a.out:
        Path(a.out).write_text(json.dumps({"checkpoint": ckpt, "args": vars(a), "results": results}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
