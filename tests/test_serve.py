"""The Ray Serve application, over real HTTP on loopback: restore, classify (guard / composed deployment / external
HTTP endpoint), a defence stack (``defenses``), output policies, the batch endpoints, the per-client query budget,
UniG + AAA in their serving mode, healthz, OpenAPI, every bad-input case (multipart included), config errors, and
``trn serve`` (fresh local Ray unless an address is given; start-up failures as one line).

One Ray instance and one Serve instance for the module (tiny untrained checkpoints built in tmp_path); the whole file
runs in well under three minutes on two shared cores.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from trn.classifiers import create_classifier, save_classifier
from trn.defenses import GCMClassifier, build_defense_stack, build_preprocessor
from trn.defenses.spec import canonical_defenses, serving_defenses
from trn.errors import CheckpointError, ConfigError, InputError, RequestError, ShapeError
from trn.http_api import body_format, classify_http, decode_images
from trn.imageio import decode_image
from trn.restorer import Restorer

httpx = pytest.importorskip("httpx")
serve = pytest.importorskip("ray.serve")

from trn.serve_config import DownstreamArgs, app_args_from_mapping, load_serve_config
from trn.serving import build_service_defenses, output_class_names
from trn_workers.serve import DownstreamClassifier, build_app, load_downstream_model, run_serve_command

REPO = Path(__file__).resolve().parent.parent
NAMES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
SMALL = {"num_cpus": 0.25, "health_check_period_s": 2.0}  # four apps share a 4-logical-CPU test Ray
# The /u app: UniG in its serving mode (reference images from the training set) under AAA, around the guard.
UNIG_AAA = ["trn", {"name": "unig", "reference_dataset": "fashion-mnist", "num_reference": 2}, {"name": "aaa"}]
# The /c app's defence stack: input side bit depth -> TRN, then GCM (strong enough to move the probabilities) around
# its downstream classifier deployment.
STACK = [{"name": "bit_depth", "bits": 4}, "trn", {"name": "gcm", "w": 30.0, "eps": 0.3}]
STACK_DESCRIBED = "bit_depth(bits=4) -> trn -> gcm(w=30.0, eps=0.3) -> classifier"


# ---------------------------------------------------------------------------------------------------- helpers
def _png(a: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _image(seed: int = 0, size: int = 28, rgb: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size, 3) if rgb else (size, size), dtype=np.uint8)


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG header claiming width x height pixels (no pixel data): must be refused before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_restore(restorer: Restorer, png: bytes) -> np.ndarray:
    x = torch.from_numpy(decode_image(png, channels=1, size=(28, 28)))[None]
    return restorer.restore(x)[0].numpy()


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["status"] == status and err["message"]
    return err


class _Downstream(BaseHTTPRequestHandler):
    """A tiny external classifier: remembers the PNG it got, answers named probabilities."""

    received: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(body)
        if self.headers.get("Content-Type") != "image/png":
            self.send_response(415)
            self.end_headers()
            return
        probs = {n: (0.91 if n == "bag" else 0.01) for n in NAMES}
        out = json.dumps({"probabilities": probs}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args) -> None:
        pass


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("serve_ckpts")
    r = Restorer.build((1, 28, 28), num_classes=10, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # Restorer.build's zero-init head is the identity: nudge it so that restoring changes images
        for p in r.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    r.class_names = tuple(NAMES)
    r.save(d / "trn_tiny")
    torch.manual_seed(1)
    clf = create_classifier("small_cnn", in_channels=1, num_classes=10, image_size=28).eval()
    save_classifier(d / "clf", clf, "small_cnn", {"in_channels": 1, "num_classes": 10, "image_size": 28},
                    {"class_names": NAMES})
    return {"restorer": str(d / "trn_tiny"), "classifier": str(d / "clf"), "dir": d, "clf": clf,
            "model": Restorer.load(d / "trn_tiny")}


@pytest.fixture(scope="module")
def http_downstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Downstream)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/predict"
    server.shutdown()
    server.server_close()


def _start_ray(ray, attempts: int = 3) -> None:
    """ray.init for tests; retried because on a saturated machine the raylet can miss Ray's fixed 30 s start-up
    deadline ("The current node timed out during startup")."""
    for attempt in range(attempts):
        try:
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
            return
        except Exception as e:
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == attempts - 1:
                raise


@pytest.fixture(scope="module")
def service(ckpts, http_downstream):
    """Serve on 127.0.0.1:<free port> with three apps: /g (guard), /c (composed classifier deployment, behind the
    defence stack STACK), and /h (external HTTP classifier, resize + convert policies) deployed through ``trn serve``'s
    code path."""
    import ray
    from ray.serve.api import RunTarget

    _start_ray(ray)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = {"restorer": ckpts["restorer"], "max_batch_size": 8, "batch_wait_timeout_s": 0.05, **SMALL}
        guard = build_app({**base, "max_body_bytes": 64 * 1024, "max_pixels": 512 * 512, "max_batch_images": 8,
                           "output": {"policy": "full"}})
        composed = build_app({**base, "defenses": STACK, "output": {"policy": "rounded", "decimals": 3},
                              "query_budget": {"rate": 0.001, "burst": 12},
                              "downstream": {"kind": "checkpoint", "path": ckpts["classifier"], "num_cpus": 0.25,
                                             "max_batch_size": 4}})
        unig = build_app({**base, "defenses": UNIG_AAA, "output": {"policy": "full"}})
        # Replica start-up (importing torch) dominates this file's runtime: start the apps at once (the CLI's next).
        serve.run_many([RunTarget(guard, "guard", "/g"), RunTarget(composed, "composed", "/c"),
                        RunTarget(unig, "unig", "/u")], wait_for_applications_running=False)
        cli_args = argparse.Namespace(
            config=str(REPO / "configs" / "serve.yaml"),
            set=[f"app.restorer={ckpts['restorer']}", f"port={port}", "host=127.0.0.1", "route_prefix=/h",
                 "app_name=external", "app.num_cpus=0.25", "app.resize=resize", "app.channel_policy=convert",
                 "app.downstream.kind=http", f"app.downstream.url={http_downstream}", "app.downstream.timeout_s=10",
                 "app.output.policy=full"],
            address=None, blocking=False,
        )
        cli_rc = run_serve_command(cli_args)  # returns once /h is running
        deadline = time.monotonic() + 600
        while (states := {serve.status().applications[a].status for a in ("guard", "composed", "unig")}) != {"RUNNING"}:
            assert time.monotonic() < deadline and not states & {"DEPLOY_FAILED", "UNHEALTHY"}, serve.status()
            time.sleep(0.5)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield {"client": client, "port": port, "cli_rc": cli_rc, **ckpts}
    finally:
        serve.shutdown()
        ray.shutdown()


# ---------------------------------------------------------------------------------------------------- HTTP tests
@pytest.mark.ray
def test_healthz_and_openapi(service) -> None:
    c = service["client"]
    r = c.get("/g/healthz")
    assert r.status_code == 200, r.text
    h = r.json()
    assert h["status"] == "ok" and h["image_shape"] == [1, 28, 28] and h["downstream"] == "guard"
    assert h["max_batch_size"] == 8 and h["device"] == "cpu"
    assert h["defenses"] == "trn -> classifier"  # no `defenses`: the restorer alone
    spec = c.get("/g/openapi.json").json()
    assert {"/v1/restore", "/v1/classify", "/healthz"} <= set(spec["paths"])
    content = spec["paths"]["/v1/restore"]["post"]["requestBody"]["content"]
    assert {"image/png", "multipart/form-data", "application/x-npy"} <= set(content)
    assert "413" in spec["paths"]["/v1/restore"]["post"]["responses"]
    assert c.get("/g/docs").status_code == 200


@pytest.mark.ray
def test_restore_png(service) -> None:
    c, model = service["client"], service["model"]
    png = _png(_image(0))
    r = c.post("/g/v1/restore", content=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and "x-trn-resized-from" not in r.headers
    out = Image.open(io.BytesIO(r.content))
    out.load()
    assert out.size == (28, 28) and out.mode == "L"
    expected = _local_restore(model, png)[0]
    got = np.asarray(out, dtype=np.float32) / 255.0
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-6  # same network, 8-bit rounding only
    sent = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32) / 255.0
    assert np.abs(got - sent).mean() > 0.01  # the restorer changed the image, and the change arrived
    # multipart upload of the same file: the same answer
    r2 = c.post("/g/v1/restore", files={"file": ("x.png", png, "image/png")})
    assert r2.status_code == 200, r2.text
    assert r2.content == r.content


@pytest.mark.ray
def test_restore_tensor_formats(service) -> None:
    c, model = service["client"], service["model"]
    png = _png(_image(1))
    expected = _local_restore(model, png)
    r = c.post("/g/v1/restore?format=npy", content=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
    a = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert a.shape == (1, 28, 28) and a.dtype == np.float32
    np.testing.assert_allclose(a, expected, atol=1e-5)
    r = c.post("/g/v1/restore?format=json", content=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 200
    j = r.json()
    assert j["shape"] == [1, 28, 28] and j["dtype"] == "float32"
    np.testing.assert_allclose(np.asarray(j["data"], dtype=np.float32), expected, atol=1e-5)
    # a float tensor in (.npy), a tensor out
    x = np.asarray(decode_image(png, channels=1), dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, x)
    r = c.post("/g/v1/restore?format=npy", content=buf.getvalue(), headers={"Content-Type": "application/x-npy"})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), expected, atol=1e-5)


@pytest.mark.ray
def test_dynamic_batching(service) -> None:
    png = _png(_image(2))

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service['port']}", timeout=60) as ac:
            return await asyncio.gather(*(ac.post("/g/v1/restore", content=png,
                                                  headers={"Content-Type": "image/png"}) for _ in range(16)))

    rs = asyncio.run(burst())
    assert all(r.status_code == 200 for r in rs)
    assert len({r.content for r in rs}) == 1  # batching changes nothing in the answer
    sizes = [int(r.headers["x-trn-batch-size"]) for r in rs]
    assert max(sizes) > 1 and max(sizes) <= 8, sizes


@pytest.mark.ray
def test_classify_guard(service) -> None:
    c, model = service["client"], service["model"]
    png = _png(_image(3))
    r = c.post("/g/v1/classify", content=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["classifier"] == "guard" and list(j["probabilities"]) == NAMES
    assert abs(sum(j["probabilities"].values()) - 1) < 1e-4
    with torch.no_grad():
        p = torch.softmax(model.guard(torch.from_numpy(_local_restore(model, png))[None]), 1)[0]
    assert j["index"] == int(p.argmax()) and j["label"] == NAMES[j["index"]]
    np.testing.assert_allclose([j["probabilities"][n] for n in NAMES], p.numpy(), atol=1e-4)


@pytest.mark.ray
def test_classify_composed_deployment_behind_a_defence_stack(service) -> None:
    """/c: bit depth -> TRN in the restorer replica, GCM around the classifier in the DownstreamClassifier replica."""
    c, model, clf = service["client"], service["model"], service["clf"]
    png = _png(_image(4))
    r = c.post("/c/v1/classify", content=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["classifier"] == "checkpoint" and list(j["probabilities"]) == NAMES
    x = torch.from_numpy(decode_image(png, channels=1))[None]
    with torch.no_grad():
        y = build_preprocessor(STACK, restorer=model)(x)
        p = torch.softmax(GCMClassifier(clf, w=30.0, eps=0.3)(y), 1)[0]
        plain = torch.softmax(clf(torch.from_numpy(_local_restore(model, png))[None]), 1)[0]
        unwrapped = torch.softmax(clf(y), 1)[0]
    assert (p - plain).abs().max() > 1e-3  # the stack answers differently from the restorer + plain classifier,
    assert (p - unwrapped).abs().max() > 1e-3  # and GCM around the classifier makes a difference of its own
    np.testing.assert_allclose([j["probabilities"][n] for n in NAMES], p.numpy(), atol=6e-4)  # 3 decimals (app)
    assert j["label"] == NAMES[int(p.argmax())] and j["output"] == "rounded"
    h = service["client"].get("/c/healthz").json()
    assert h["downstream"] == "checkpoint" and h["defenses"] == STACK_DESCRIBED


@pytest.mark.ray
def test_restore_behind_a_defence_stack(service) -> None:
    """/v1/restore of an app with `defenses` answers what the library's preprocessor gives for the same image."""
    c, model = service["client"], service["model"]
    png = _png(_image(9))
    r = c.post("/c/v1/restore?format=npy", content=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    got = np.load(io.BytesIO(r.content), allow_pickle=False)
    x = torch.from_numpy(decode_image(png, channels=1))[None]
    with torch.no_grad():
        expected = build_preprocessor(STACK, restorer=model)(x)[0].numpy()
    assert np.abs(expected - _local_restore(model, png)).max() > 1e-2  # bit depth -> TRN is not TRN alone
    np.testing.assert_allclose(got, expected, atol=1e-5)
    r = c.post("/c/v1/restore", content=png, headers={"Content-Type": "image/png"})  # PNG: the same, 8-bit rounded
    assert r.status_code == 200
    got_png = np.asarray(Image.open(io.BytesIO(r.content)), dtype=np.float32) / 255.0
    assert np.abs(got_png - expected[0]).max() <= 1 / 255 + 1e-6


@pytest.mark.ray
def test_classify_external_http_with_resize(service) -> None:
    c = service["client"]
    _Downstream.received.clear()
    png = _png(_image(5, size=56, rgb=True))  # off-size RGB: this app converts and resizes, and says so
    r = c.post("/h/v1/classify", content=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["classifier"] == "http" and j["label"] == "bag" and j["resized_from"] == [56, 56]
    assert abs(j["probabilities"]["bag"] - 0.91) < 1e-6
    assert len(_Downstream.received) == 1
    sent = Image.open(io.BytesIO(_Downstream.received[0]))
    assert sent.format == "PNG" and sent.size == (28, 28)  # the endpoint got the cleaned image
    r = c.post("/h/v1/restore", content=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.headers["x-trn-resized-from"] == "56x56"
    assert Image.open(io.BytesIO(r.content)).size == (28, 28)


@pytest.mark.ray
def test_bad_inputs_then_service_stays_up(service) -> None:
    c = service["client"]
    png = _png(_image(6))

    def post(body, ctype: str = "image/png", path: str = "/g/v1/restore") -> httpx.Response:
        return c.post(path, content=body, headers={"Content-Type": ctype})

    assert "not a decodable image" in _error(post(b"this is not an image at all"), 400)["message"]
    _error(post(png[: len(png) // 2]), 400)  # truncated
    assert "empty" in _error(post(b""), 400)["message"]
    assert "pixels" in _error(post(_bomb_png()), 400)["message"]  # refused from the header
    big = _png(np.zeros((600, 600), np.uint8))  # small file, too many pixels for this app (512*512)
    assert len(big) < 64 * 1024
    _error(post(big), 400)
    err = _error(post(_png(_image(7, rgb=True))), 422)  # wrong channel count, channel_policy: reject
    assert err["type"] == "ShapeError" and "channel" in err["message"]
    assert "resize" in _error(post(_png(_image(8, size=32))), 422)["message"]  # off-size, resize: reject
    # oversized bodies: a declared Content-Length, and a chunked body with none
    err = _error(post(b"\0" * (64 * 1024 + 1)), 413)
    assert err["type"] == "BodyTooLarge"

    def chunks():
        for _ in range(80):
            yield b"\0" * 1024

    _error(c.post("/g/v1/restore", content=chunks(), headers={"Content-Type": "image/png"}), 413)
    _error(post(b'{"x": 1}', "application/json"), 415)
    _error(post(b"\x93NUMPY garbage", "application/x-npy"), 400)
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 28, 28), np.float32))
    _error(post(buf.getvalue(), "application/x-npy"), 422)
    buf = io.BytesIO()
    np.save(buf, np.full((1, 28, 28), 2.0, np.float32))
    _error(post(buf.getvalue(), "application/x-npy"), 400)
    _error(post(png, path="/g/v1/restore?format=bmp"), 422)
    _error(c.post("/g/v1/restore", files={"other": ("", b"x")}, data={"a": "b"}), 400)
    _error(c.get("/g/v1/nothing"), 404)
    # the same replica still answers good requests
    r = post(png)
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (28, 28)
    assert c.get("/g/healthz").json()["status"] == "ok"


@pytest.mark.ray
def test_trn_serve_command(service) -> None:
    """/h was deployed by ``run_serve_command`` (``trn serve --no-blocking``) from configs/serve.yaml + --set."""
    assert service["cli_rc"] == 0
    h = service["client"].get("/h/healthz").json()
    assert h["downstream"] == "http" and h["max_batch_size"] == 32  # the YAML's value, not overridden


def _npz(images: np.ndarray, **extra: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, images=images, **extra)
    return buf.getvalue()


@pytest.mark.ray
def test_output_policies(service) -> None:
    """Each output policy's response shape; a request may ask for less than its app allows, never more."""
    c = service["client"]
    png = _png(_image(10))

    def classify(path: str = "/g", **params) -> httpx.Response:
        return c.post(f"{path}/v1/classify", params=params, content=png, headers={"Content-Type": "image/png"})

    full = classify().json()
    assert full["output"] == "full" and list(full["probabilities"]) == NAMES
    probs = np.array([full["probabilities"][n] for n in NAMES])
    order = [NAMES[i] for i in np.argsort(-probs, kind="stable")]
    top = classify(output="top_k", k=3).json()
    assert top["output"] == "top_k" and list(top["probabilities"]) == order[:3] and top["label"] == full["label"]
    assert [top["probabilities"][n] for n in order[:3]] == [full["probabilities"][n] for n in order[:3]]
    rounded = classify(output="rounded", decimals=1).json()
    assert list(rounded["probabilities"]) == NAMES and rounded["output"] == "rounded"
    assert all(v == round(v, 1) for v in rounded["probabilities"].values())
    label = classify(output="label").json()
    assert label["probabilities"] is None and label["label"] == full["label"] and label["index"] == full["index"]
    # /c allows rounded(decimals=3): less is fine (decimals inherited), more is 403
    r = classify("/c", output="top_k", k=2)
    assert r.status_code == 200 and len(r.json()["probabilities"]) == 2
    assert all(v == round(v, 3) for v in r.json()["probabilities"].values())
    assert "shows more" in _error(classify("/c", output="full"), 403)["message"]
    assert "shows more" in _error(classify("/c", output="rounded", decimals=5), 403)["message"]
    _error(classify(output="logits"), 422)
    assert c.get("/g/healthz").json()["output"] == "full(decimals=6)"


@pytest.mark.ray
def test_batch_endpoints(service) -> None:
    """Many images per request (multipart files or an npz) answer what one-image requests answer, in order."""
    c = service["client"]
    imgs = [_image(20 + i) for i in range(3)]
    pngs = [_png(a) for a in imgs]
    singles = [c.post("/g/v1/classify", content=b, headers={"Content-Type": "image/png"}).json() for b in pngs]
    r = c.post("/g/v1/classify/batch", files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)])
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert [g["label"] for g in got] == [s["label"] for s in singles]
    for g, one in zip(got, singles):
        np.testing.assert_allclose([g["probabilities"][n] for n in NAMES], [one["probabilities"][n] for n in NAMES],
                                   atol=2e-6)
    r = c.post("/g/v1/classify/batch", content=_npz(np.stack(imgs)), headers={"Content-Type": "application/x-npz"})
    assert r.status_code == 200, r.text
    assert [g["label"] for g in r.json()["results"]] == [s["label"] for s in singles]
    r = c.post("/g/v1/restore/batch", content=_npz(np.stack(imgs)), headers={"Content-Type": "application/x-npz"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
    restored = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert restored.shape == (3, 1, 28, 28)
    for a, b in zip(restored, pngs):
        np.testing.assert_allclose(a, _local_restore(service["model"], b), atol=1e-5)
    # refusals: too many images, an ambiguous npz, a pickled object array, a wrong shape, a single image's type
    _error(c.post("/g/v1/classify/batch", content=_npz(np.zeros((9, 28, 28), np.uint8)),
                  headers={"Content-Type": "application/x-npz"}), 400)
    many = [("files", (f"{i}.png", pngs[0], "image/png")) for i in range(9)]
    assert _error(c.post("/g/v1/classify/batch", files=many), 413)["type"] == "TooManyImages"
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros((1, 28, 28), np.uint8), b=np.zeros((1, 28, 28), np.uint8))
    assert "images" in _error(c.post("/g/v1/classify/batch", content=buf.getvalue(),
                                     headers={"Content-Type": "application/x-npz"}), 400)["message"]
    buf = io.BytesIO()
    np.savez(buf, images=np.array([{"x": 1}], dtype=object))
    _error(c.post("/g/v1/classify/batch", content=buf.getvalue(), headers={"Content-Type": "application/x-npz"}), 400)
    _error(c.post("/g/v1/classify/batch", content=_npz(np.zeros((2, 3, 28, 28), np.float32)),
                  headers={"Content-Type": "application/x-npz"}), 422)
    _error(c.post("/g/v1/classify/batch", content=b"PK\x03\x04junk", headers={"Content-Type": "application/x-npz"}),
           400)
    _error(c.post("/g/v1/classify/batch", content=pngs[0], headers={"Content-Type": "image/png"}), 415)


@pytest.mark.ray
def test_malformed_multipart(service) -> None:
    """Multipart bodies are parsed by Starlette: malformed ones are a 400 with a message, never a 500."""
    c = service["client"]
    png = _png(_image(11))
    for body, ctype in [
        (b"--xyz\r\nContent-Disposition: form-data; name=file; filename=a.png\r\n\r\n" + png, "boundary=xyz"),
        (b"garbage without any boundary", "boundary=xyz"),
        (png, ""),  # no boundary parameter
    ]:
        r = c.post("/g/v1/restore", content=body, headers={"Content-Type": f"multipart/form-data; {ctype}".strip("; ")})
        assert r.status_code == 400, (r.status_code, r.text)
    ok = (b"--xyz\r\nContent-Disposition: form-data; name=file; filename=a.png\r\nContent-Type: image/png\r\n\r\n"
          + png + b"\r\n--xyz--\r\n")
    r = c.post("/g/v1/restore", content=ok, headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 200, r.text
    assert c.get("/g/healthz").json()["status"] == "ok"


@pytest.mark.ray
def test_query_budget_answers_429(service) -> None:
    """/c: 12 queries per client, refilled at 0.001/s; a batch costs one query per image; clients are keyed by API
    key (else address), so another key still gets answers."""
    c = service["client"]
    imgs = np.stack([_image(30 + i) for i in range(12)])
    hdr = {"Content-Type": "application/x-npz", "x-api-key": "attacker"}
    r = c.post("/c/v1/classify/batch", content=_npz(imgs), headers=hdr)
    assert r.status_code == 200 and len(r.json()["results"]) == 12
    r = c.post("/c/v1/classify", content=_png(_image(50)), headers={"Content-Type": "image/png",
                                                                    "x-api-key": "attacker"})
    err = _error(r, 429)
    assert err["type"] == "QueryBudgetExceeded" and int(r.headers["retry-after"]) >= 1
    r = c.post("/c/v1/classify", content=_png(_image(50)), headers={"Content-Type": "image/png",
                                                                    "x-api-key": "someone-else"})
    assert r.status_code == 200, r.text
    r = c.post("/c/v1/classify/batch", content=_npz(np.concatenate([imgs, imgs[:1]])),
               headers={**hdr, "x-api-key": "big"})
    assert _error(r, 429)["type"] == "QueryBudgetExceeded"  # 13 images: more than the burst, ever


@pytest.mark.ray
def test_unig_and_aaa_in_the_service(service) -> None:
    """/u: TRN -> UniG (serving mode) -> AAA around the guard. An image's answer does not depend on the other images
    of its batch, re-sending it gives the same answer, and it is what the library's stack gives for it alone; AAA
    keeps UniG's label."""
    c, model = service["client"], service["model"]
    target = _image(40)
    others = np.stack([_image(41 + i) for i in range(4)])
    alone = c.post("/u/v1/classify", content=_png(target), headers={"Content-Type": "image/png"}).json()
    again = c.post("/u/v1/classify", content=_png(target), headers={"Content-Type": "image/png"}).json()
    r = c.post("/u/v1/classify/batch", content=_npz(np.concatenate([others[:2], target[None], others[2:]])),
               headers={"Content-Type": "application/x-npz"})
    assert r.status_code == 200, r.text
    in_batch = r.json()["results"][2]
    assert alone == again
    assert in_batch["label"] == alone["label"]
    np.testing.assert_allclose([in_batch["probabilities"][n] for n in NAMES],
                               [alone["probabilities"][n] for n in NAMES], atol=2e-6)
    spec = serving_defenses(canonical_defenses(UNIG_AAA))
    x = torch.from_numpy(target.astype(np.float32) / 255.0)[None, None]
    stack = build_defense_stack(spec, model.guard, restorer=model)
    unig_only = build_defense_stack(spec[:2], model.guard, restorer=model)
    with torch.no_grad():
        p = torch.softmax(stack(x), 1)[0].numpy()
        p_unig = torch.softmax(unig_only(x), 1)[0].numpy()
    np.testing.assert_allclose([alone["probabilities"][n] for n in NAMES], p, atol=1e-4)
    assert alone["index"] == int(p.argmax()) == int(p_unig.argmax())
    assert abs(float(p.max()) - float(p_unig.max())) < 1e-5  # AAA keeps the top-1 confidence


def test_trn_serve_starts_a_fresh_local_ray_or_joins_only_when_asked(ckpts, monkeypatch) -> None:
    """No address: ray.init(address="local") (never a cluster recorded on the machine); --address or RAY_ADDRESS:
    that cluster. A start-up failure is one ConfigError line, not a traceback."""
    import ray

    calls: list[dict] = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("The current node timed out during startup.\nlong details")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ns = argparse.Namespace(config=None, set=[f"app.restorer={ckpts['restorer']}"], address=None, blocking=False)
    with pytest.raises(ConfigError, match=r"^could not start a local Ray: RuntimeError: The current node timed out "
                                          r"during startup\.$"):
        run_serve_command(ns)
    assert calls[-1]["address"] == "local"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(ConfigError, match="could not join the Ray cluster at '127.0.0.1:1'"):
        run_serve_command(ns)
    assert calls[-1] == {"address": "127.0.0.1:1"}
    ns.address = "ray://head:10001"
    with pytest.raises(ConfigError, match="ray://head:10001"):
        run_serve_command(ns)
    assert calls[-1] == {"address": "ray://head:10001"}


# ---------------------------------------------------------------------------------------------------- config (no Ray)
def test_builder_args_and_config_errors(ckpts, tmp_path) -> None:
    r = ckpts["restorer"]
    # serve run passes strings: read as YAML, dotted keys reach sections
    a = app_args_from_mapping({"restorer": r, "max_batch_size": "8", "downstream.kind": "none", "resize": "resize"})
    assert a.max_batch_size == 8 and a.downstream.kind == "none" and a.resize == "resize"
    assert a.restorer_max_ongoing_requests == 32  # a floor: a tiny limit makes Serve's router back off
    assert app_args_from_mapping({"restorer": r, "max_batch_size": 64}).restorer_max_ongoing_requests == 128
    assert build_app({"restorer": r, "downstream.kind": "none"}) is not None
    with pytest.raises(ConfigError, match="unknown option"):
        app_args_from_mapping({"restorer": r, "max_batchsize": 8})
    with pytest.raises(ConfigError, match="max_batch_size"):
        app_args_from_mapping({"restorer": r, "max_batch_size": 0})
    with pytest.raises(ConfigError, match="batches could never fill"):
        app_args_from_mapping({"restorer": r, "max_batch_size": 16, "max_ongoing_requests": 4})
    with pytest.raises(ConfigError, match="resize"):
        app_args_from_mapping({"restorer": r, "resize": "stretch"})
    with pytest.raises(ConfigError, match="downstream.url is required"):
        app_args_from_mapping({"restorer": r, "downstream": {"kind": "http"}})
    with pytest.raises(ConfigError, match="downstream.path is required"):
        app_args_from_mapping({"restorer": r, "downstream": {"kind": "export"}})
    with pytest.raises(ConfigError, match="min_replicas"):
        app_args_from_mapping({"restorer": r, "autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ConfigError, match="file not found"):
        build_app({"restorer": str(tmp_path / "missing")})
    with pytest.raises(CheckpointError, match="not a restorer"):
        build_app({"restorer": ckpts["classifier"]})
    with pytest.raises(ConfigError, match="class"):
        build_app({"restorer": r, "downstream": {"kind": "checkpoint", "path": ckpts["classifier"],
                                                 "class_names": ["a", "b"]}})
    with pytest.raises(ConfigError, match="port"):
        load_serve_config(None, ["port=70000"])
    (tmp_path / "empty.yaml").write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="holds no options"):
        load_serve_config(tmp_path / "empty.yaml")
    with pytest.raises(ConfigError, match="unknown option"):
        run_serve_command(argparse.Namespace(config=None, set=["app.nope=1"], address=None, blocking=False))


def test_defence_stack_config(ckpts, tmp_path) -> None:
    """`defenses`: checked when read (names, order, wrappers without a torch classifier) and when the app is built
    (values, trn checkpoints); canonical plain data travels to the replicas."""
    r = ckpts["restorer"]
    a = app_args_from_mapping({"restorer": r, "defenses": "[{name: bitdepth, bits: 4}, restorer, gcm]"})
    assert a.with_resolved_paths().defenses == [{"name": "bit_depth", "bits": 4}, {"name": "trn"}, {"name": "gcm"}]
    assert app_args_from_mapping({"restorer": r}).defenses is None
    for kind, extra in (("http", {"url": "http://127.0.0.1:9/x"}), ("none", {})):
        with pytest.raises(ConfigError, match=rf"defenses: .*\['gcm'\] wrap the downstream classifier, but "
                                              rf"downstream.kind is '{kind}'"):
            app_args_from_mapping({"restorer": r, "defenses": ["trn", "gcm"], "downstream": {"kind": kind, **extra}})
    app_args_from_mapping({"restorer": r, "defenses": [{"name": "jpeg", "quality": 75}, "trn"],  # input side: fine
                           "downstream": {"kind": "http", "url": "http://127.0.0.1:9/x"}})
    with pytest.raises(ConfigError, match=r"defenses: defence #0: unknown defence 'jpg'"):
        app_args_from_mapping({"restorer": r, "defenses": [{"name": "jpg"}]})
    with pytest.raises(ConfigError, match=r"defenses: defence #1 \(trn\) is an input-side stage but comes after"):
        app_args_from_mapping({"restorer": r, "defenses": ["gcm", "trn"]})
    with pytest.raises(ConfigError, match="app.defenses: expected a list"):
        app_args_from_mapping({"restorer": r, "defenses": {"name": "trn"}})
    with pytest.raises(ConfigError, match=r"defenses: defence #0 \(bit_depth\): .*bits must be an integer"):
        build_app({"restorer": r, "defenses": [{"name": "bit_depth", "bits": 99}, "trn"]})  # a value: built to check
    other = Restorer.build((1, 32, 32), num_classes=10, seed=0)
    other.save(tmp_path / "trn32")
    with pytest.raises(ConfigError, match=r"defence #0 \(trn\) restores \[1, 32, 32\] images"):
        build_app({"restorer": r, "defenses": [{"name": "trn", "checkpoint": str(tmp_path / "trn32")}]})
    with pytest.raises(ConfigError, match="file not found"):
        build_app({"restorer": r, "defenses": [{"name": "trn", "checkpoint": str(tmp_path / "missing")}]})
    assert build_app({"restorer": r, "defenses": STACK}) is not None  # guard downstream: GCM wraps the guard


def test_defence_stack_around_the_guard(ckpts) -> None:
    """downstream.kind guard: the replica's /v1/classify model is the guard inside the stack's wrappers."""
    model = ckpts["model"]
    spec = app_args_from_mapping({"restorer": ckpts["restorer"], "defenses": STACK}).with_resolved_paths().defenses
    pre, classifier = build_service_defenses(spec, model, "guard", "cpu")
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    reference = build_defense_stack(STACK, model.guard, restorer=model)
    with torch.no_grad():
        y = pre(x)
        torch.testing.assert_close(y, reference.preprocessor(x))
        torch.testing.assert_close(classifier(y), reference.classifier(y))
        assert (classifier(y) - model.guard(y)).abs().max() > 1e-3  # wrapped, not the plain guard
    pre, classifier = build_service_defenses(spec, model, "checkpoint", "cpu")  # deployed downstream: wrappers left to it
    assert classifier is model.guard and [type(s).__name__ for s in pre.stages] == ["BitDepthReduction",
                                                                                    "RestorerStage"]


def test_shipped_config_files() -> None:
    from ray.serve.schema import ServeDeploySchema

    cfg = load_serve_config(REPO / "configs" / "serve.yaml", ["app.max_batch_size=16"])
    assert cfg.app.max_batch_size == 16 and cfg.app.resize == "reject" and cfg.host == "127.0.0.1"
    deploy = yaml.safe_load((REPO / "configs" / "serve_deploy.yaml").read_text())
    schema = ServeDeploySchema.model_validate(deploy)
    (app,) = schema.applications
    assert app.import_path == "trn_workers.serve:build_app"
    assert app_args_from_mapping(app.args).autoscaling.max_replicas == 4
    docs = list(yaml.safe_load_all((REPO / "configs" / "kuberay-rayservice.yaml").read_text()))
    svc = next(d for d in docs if d and d.get("kind") == "RayService")
    v2 = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    for a in v2.applications:
        assert a.import_path == "trn_workers.serve:build_app"
        app_args_from_mapping(a.args)


def test_downstream_loaders(ckpts, tmp_path) -> None:
    """TorchScript and torch.export programs load and classify; a fixed-batch export falls back to one at a time."""
    clf = ckpts["clf"]
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = torch.softmax(clf(x), 1).detach().numpy()
    with pytest.warns(DeprecationWarning):
        torch.jit.save(torch.jit.trace(clf, x), str(tmp_path / "clf.ts"))
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(clf, (x,), dynamic_shapes=({0: batch},)), str(tmp_path / "clf.pt2"))
    torch.export.save(torch.export.export(clf, (x[:1],)), str(tmp_path / "clf_fixed.pt2"))
    for kind, name in [("torchscript", "clf.ts"), ("export", "clf.pt2"), ("export", "clf_fixed.pt2"),
                       ("checkpoint", ckpts["classifier"])]:
        ds = DownstreamArgs(kind=kind, path=str(tmp_path / name))
        assert isinstance(load_downstream_model(ds)[0], torch.nn.Module)
        replica = DownstreamClassifier.func_or_class(ds)  # the deployment's class, without Ray
        out = np.stack(replica._forward(list(x.numpy())))
        np.testing.assert_allclose(out, expected, atol=1e-5, err_msg=f"{kind} {name}")
        assert replica.per_item == (name == "clf_fixed.pt2")
    # defence-stack wrappers around a loaded downstream: GCM fits any module, UniG needs the features/head split
    replica = DownstreamClassifier.func_or_class(DownstreamArgs(kind="torchscript", path=str(tmp_path / "clf.ts")), 1,
                                                 STACK)
    with torch.no_grad():
        wrapped = torch.softmax(GCMClassifier(clf, w=30.0, eps=0.3)(x), 1).numpy()
    np.testing.assert_allclose(np.stack(replica._forward(list(x.numpy()))), wrapped, atol=1e-5)
    with pytest.raises(ConfigError, match=r"defence #1 \(unig\) around the torchscript downstream .*forward_features"):
        build_app({"restorer": ckpts["restorer"], "defenses": ["trn", {"name": "unig", "reference_dataset": "fmnist"}],
                   "downstream": {"kind": "torchscript", "path": str(tmp_path / "clf.ts")}})
    with pytest.raises(CheckpointError, match="not found"):
        load_downstream_model(DownstreamArgs(kind="torchscript", path=str(tmp_path / "nope.ts")))
    (tmp_path / "junk.pt2").write_bytes(b"not a program")
    with pytest.raises(CheckpointError, match="cannot load"):
        load_downstream_model(DownstreamArgs(kind="export", path=str(tmp_path / "junk.pt2")))


# ---------------------------------------------------------------------------------------------------- library (no Ray)
def test_request_bodies_by_content_type() -> None:
    """Which Content-Type goes where (415 for the rest), and the images decoded under the app's policies."""
    assert body_format("application/x-npy", False) == "npy"
    assert body_format("application/x-npz", True) == "npz"
    assert body_format("Multipart/Form-Data; boundary=xyz", True) == "multipart"
    for ctype in ("image/png", "application/octet-stream", ""):
        assert body_format(ctype, False) == "image"
    with pytest.raises(RequestError) as e:
        body_format("image/png", True)
    assert (e.value.status, e.value.kind) == (415, "UnsupportedMediaType")
    assert e.value.message == ("Content-Type 'image/png' is not accepted here: send multipart/form-data with one file "
                               "part per image, or an .npz (application/x-npz)")
    for ctype in ("application/x-npz", "text/plain; charset=utf-8"):
        with pytest.raises(RequestError) as e:
            body_format(ctype, False)
        assert e.value.status == 415 and e.value.message.startswith(f"Content-Type {ctype.split(';')[0]!r} is not "
                                                                    "accepted: send image bytes")
    shape = (1, 28, 28)
    args = app_args_from_mapping({"restorer": "unused", "resize": "resize", "max_batch_images": 2})
    x = np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, x)
    ((img, rf),) = decode_images([buf.getvalue()], "npy", args, shape)
    np.testing.assert_array_equal(img, x)
    assert rf is None
    out = decode_images([_npz(np.stack([_image(1), _image(2)]))], "npz", args, shape)
    assert [i.shape for i, _ in out] == [shape, shape] and out[0][1] is None
    with pytest.raises(InputError, match="over the limit of 2"):
        decode_images([_npz(np.stack([_image(i) for i in range(3)]))], "npz", args, shape)
    out = decode_images([_png(_image(3)), _png(_image(4, size=32))], "multipart", args, shape)
    assert [i.shape for i, _ in out] == [shape, shape] and [rf for _, rf in out] == [None, (32, 32)]
    with pytest.raises(ShapeError):  # resize: reject (the default)
        decode_images([_png(_image(4, size=32))], "image", app_args_from_mapping({"restorer": "unused"}), shape)


def test_classify_http_maps_downstream_failures() -> None:
    """An external classifier's answers and failures: probabilities, or 502 / 504 with the URL in the message."""
    url = "http://downstream.test/predict"
    img = np.zeros((1, 28, 28), dtype=np.float32)

    def answer(handler) -> tuple[np.ndarray | None, object]:
        async def go():
            async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
                return await classify_http(client, url, img, 2.5)

        return asyncio.run(go())

    def ok(request: httpx.Request) -> httpx.Response:
        assert request.headers["content-type"] == "image/png"
        decode_image(request.content, channels=1, size=(28, 28))  # a real PNG of the image
        return httpx.Response(200, json={"probabilities": [0.25, 0.75], "label": "b"})

    probs, label = answer(ok)
    np.testing.assert_allclose(probs, [0.25, 0.75])
    assert label == "b"

    def raises(exc):
        def handler(request: httpx.Request) -> httpx.Response:
            raise exc("boom", request=request)

        return handler

    for handler, status, kind, message in [
        (raises(httpx.ConnectTimeout), 504, "DownstreamTimeout", f"downstream {url} did not answer within 2.5 s"),
        (raises(httpx.ConnectError), 502, "DownstreamError", f"downstream {url} unreachable: boom"),
        (lambda r: httpx.Response(503, text="x" * 300), 502, "DownstreamError",
         f"downstream {url} answered 503: {'x' * 200}"),
        (lambda r: httpx.Response(200, text="not json"), 502, "DownstreamError",
         f"downstream {url} did not answer JSON"),
        (lambda r: httpx.Response(200, json=[1]), 502, "DownstreamError",
         f"downstream {url} answered list, not an object"),
    ]:
        with pytest.raises(RequestError) as e:
            answer(handler)
        assert (e.value.status, e.value.kind, e.value.message) == (status, kind, message)


def test_output_class_names() -> None:
    """Configured names, else the guard's (kind guard, or any kind with as many classes), else indices; 500 when the
    configured names do not fit."""
    guard = ["a", "b", "c"]
    assert output_class_names(3, ["x", "y", "z"], guard, "checkpoint") == ["x", "y", "z"]
    assert output_class_names(3, None, guard, "http") == guard
    assert output_class_names(2, None, guard, "http") == ["0", "1"]
    with pytest.raises(RequestError) as e:
        output_class_names(2, None, guard, "guard")
    assert (e.value.status, e.value.kind, e.value.message) == (
        500, "ConfigError", "downstream returned 2 classes but 3 class names are configured (downstream.class_names)")


def test_trn_map_from_resolves_and_builds(ckpts, monkeypatch) -> None:
    """``defenses: [{name: trn, map_from: FILE}]``: resolved to an absolute path (replicas run elsewhere), the map then
    comes from that classifier in the replica's preprocessor; a missing file is named."""
    monkeypatch.chdir(ckpts["dir"])
    args = app_args_from_mapping({"restorer": ckpts["restorer"], "defenses": [{"name": "trn", "map_from": "clf"}]})
    spec = args.with_resolved_paths().defenses
    assert spec == [{"name": "trn", "map_from": str((ckpts["dir"] / "clf").resolve())}]
    pre, _ = build_service_defenses(spec, ckpts["model"], "guard", "cpu")
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pre(x), ckpts["model"].with_map_from(ckpts["clf"])(x), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match=r"defenses\[0\] \(trn\) map_from: file not found"):
        app_args_from_mapping({"restorer": ckpts["restorer"],
                               "defenses": [{"name": "trn", "map_from": "missing.pt"}]}).with_resolved_paths()
