"""The similar-query detector (trn.query_detector, Blacklight-style): Square's query sequence on a real Fashion-MNIST
image is refused within a few queries while 2,000 distinct test images from one client never are; resends up to
``max_similar``; clients apart; cooldown and ban (429 / 403); settings; bounded memory; and the service refusing an
attacking API key while another key still gets answers (one Ray Serve app on loopback, ``@pytest.mark.ray``).

Everything but the service test runs in a few seconds on two shared cores.
"""

from __future__ import annotations

import io
import math
import socket
import threading

import numpy as np
import pytest
import torch
from conftest import start_ray

from trn.attacks import Square
from trn.data import load_dataset
from trn.errors import ConfigError, InputError, RequestError, ShapeError
from trn.query_detector import DetectorDecision, QueryDetector, fingerprint, screen_request
from trn.serve_config import QueryDetectorArgs, app_args_from_mapping


@pytest.fixture(scope="module")
def fmnist() -> np.ndarray:
    """Fashion-MNIST test images, (10000, 1, 28, 28) float32 in [0, 1]."""
    return load_dataset("fashion-mnist", None, "test").images.numpy()


def _noise(seed: int, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28))


# ---------------------------------------------------------------------------------------------------- fingerprint
def test_fingerprint_is_stable_and_skips_flat_windows() -> None:
    x = np.arange(16, dtype=np.float64).reshape(1, 4, 4) / 15
    # BLAKE2b, not Python's per-process salted hash(): the same value in every process and replica
    assert [hex(int(v)) for v in fingerprint(x, window=2, step=50, top=3)] == [
        "0xcc30cdfc16ff8516", "0xd9022d638229948f", "0xe593653f823bac2c"]
    assert fingerprint(np.zeros((1, 28, 28))).shape == (0,)  # every window flat
    assert fingerprint(np.full((3, 28, 28), 0.5)).shape == (0,)
    fp = fingerprint(_noise(0)[0])
    assert fp.dtype == np.uint64 and fp.shape == (50,) and (np.diff(fp.astype(np.float64)) > 0).all()
    # a Square step on the background (0 -> 0.1) stays in the lowest quantisation level: the same fingerprint
    img = np.zeros((1, 28, 28))
    img[:, 8:20, 8:20] = 0.7
    moved = img.copy()
    moved[:, :5, :5] = 0.1
    assert np.array_equal(fingerprint(img), fingerprint(moved))
    assert fingerprint(np.ones((1, 5, 5)) * np.eye(5), window=8).shape == (1,)  # window clamped to the image


def test_bad_inputs_and_settings() -> None:
    d = QueryDetector()
    with pytest.raises(ShapeError, match=r"\(N, C, H, W\)"):
        d.check("a", np.zeros((1, 28, 28)))
    with pytest.raises(InputError, match="NaN"):
        d.check("a", np.full((1, 1, 28, 28), np.nan))
    bad = [({"window": 0}, "window"), ({"step": 256}, "step"), ({"top": 0}, "top"),
           ({"top": 10, "match_threshold": 11}, "match_threshold"), ({"max_similar": -1}, "max_similar"),
           ({"cooldown_s": 0}, "cooldown_s"), ({"cooldown_s": math.nan}, "cooldown_s"), ({"cooldown_s": True}, "cooldown_s"),
           ({"history": 0}, "history"), ({"max_clients": 0}, "max_clients"), ({"window": 8.0}, "window")]
    for kwargs, name in bad:
        with pytest.raises(ConfigError, match=f"query detector: {name} must be"):
            QueryDetector(**kwargs)
    for kwargs, message in [({"match_threshold": 51}, "match_threshold must be an integer in \\[1, 50\\]"),
                            ({"step": 300}, "step must be an integer in \\[1, 255\\]"),
                            ({"cooldown_s": -1}, "cooldown_s must be a positive number"),
                            ({"history": 0}, "history must be an integer >= 1")]:
        with pytest.raises(ConfigError, match=message):
            app_args_from_mapping({"query_detector": kwargs})
    with pytest.raises(ConfigError, match="unknown option"):
        app_args_from_mapping({"query_detector": {"threshold": 3}})
    assert QueryDetector(**QueryDetectorArgs().model_dump()).match_threshold == 15  # the defaults agree
    assert app_args_from_mapping({}).query_detector is None


# ---------------------------------------------------------------------------------------------------- detection
class _Screened:
    """A seeded linear "classifier" on 28x28 images that screens every query with the detector (one client); class 0
    wins by a wide margin, so Square keeps searching (as on an image it cannot break)."""

    def __init__(self, detector: QueryDetector, key: str) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Linear(784, 10)
        with torch.no_grad():
            self.net.bias[0] += 10.0
        self.detector, self.key, self.decisions = detector, key, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.decisions.append(self.detector.check(self.key, x.numpy(), now=0.0))
        return self.net(x.flatten(1))


def test_square_is_refused_within_a_few_queries(fmnist) -> None:
    """Square (Linf 0.1, its own query sequence: stripes, then one +-0.1 square per query) against three test
    images, one client each: refused by query 10 at the defaults (max_similar 5: queries 2-6 may match)."""
    d = QueryDetector(cooldown_s=None)
    for i in (0, 1, 2):
        model = _Screened(d, f"attacker{i}")
        Square(eps=0.1, queries=40, p_init=0.3, seed=i)(model, torch.from_numpy(fmnist[i : i + 1]),
                                                         torch.tensor([0]))
        refused = [k for k, dec in enumerate(model.decisions) if not dec.allowed]
        assert refused and refused[0] <= 9, [dec.similar for dec in model.decisions]
        assert math.isinf(model.decisions[refused[0]].retry_after_s)


def test_benign_stream_of_2000_test_images_is_never_refused(fmnist) -> None:
    """One client sends 2,000 distinct test images (in requests of 20): no request refused, (almost) no match."""
    d = QueryDetector(max_similar=5, cooldown_s=None)
    matched = 0
    for i in range(0, 2000, 20):
        decision = d.check("benign", fmnist[i : i + 20], now=float(i))
        assert decision.allowed, (i, decision)
        matched += decision.matched
    assert matched <= 2


def test_resends_up_to_max_similar_then_429_with_retry_after(fmnist) -> None:
    d = QueryDetector(max_similar=3, cooldown_s=90.0)
    x = fmnist[:1]
    seen = [d.check("a", x, now=0.0) for _ in range(4)]  # the image, then 3 resends
    assert [s.allowed for s in seen] == [True] * 4 and [s.similar for s in seen] == [0, 1, 2, 3]
    assert [s.matched for s in seen] == [0, 1, 1, 1]
    decision, refusal = screen_request(d, "a", x, now=0.0)  # a 4th resend: over max_similar
    assert not decision.allowed and decision.similar == 4 and decision.retry_after_s == 90.0
    assert isinstance(refusal, RequestError) and (refusal.status, refusal.kind) == (429, "QueryAttackDetected")
    assert refusal.headers == {"Retry-After": "90"}
    assert refusal.message == ("query-attack pattern detected: this client sent more than 3 near-identical queries; "
                               "retry in 90 s")
    # cooling down: refused without looking at the images (even a new one)
    assert d.check("a", fmnist[5:6], now=30.0) == DetectorDecision(False, 0, 60.0)


def test_clients_are_independent_and_a_batch_can_match_itself(fmnist) -> None:
    d = QueryDetector(max_similar=1, cooldown_s=None)
    x = fmnist[:1]
    assert d.check("a", x).allowed and d.check("a", x).allowed and not d.check("a", x).allowed
    assert d.check("b", x).allowed and d.check("b", x).allowed  # b's history is its own
    decision = d.check("c", np.concatenate([x, x, x]))  # one request: the image twice re-sent
    assert not decision.allowed and decision.matched == 2


def test_cooldown_then_the_count_starts_again_and_bans_are_403(fmnist) -> None:
    d = QueryDetector(max_similar=1, cooldown_s=10.0)
    x = fmnist[:1]
    assert [d.check("a", x, now=0.0).allowed for _ in range(3)] == [True, True, False]
    assert d.check("a", x, now=9.5).retry_after_s == pytest.approx(0.5)
    _, refusal = screen_request(d, "a", x, now=10.0)  # the cooldown is over: the count starts again
    assert refusal is None
    assert not d.check("a", x, now=10.0).allowed  # the fingerprints were kept: 2 matches since the cooldown
    banned = QueryDetector(max_similar=0, cooldown_s=None)
    banned.check("m", x)
    decision, refusal = screen_request(banned, "m", x)
    assert math.isinf(decision.retry_after_s) and (refusal.status, refusal.kind) == (403, "QueryAttackDetected")
    assert refusal.headers is None and "\n" not in refusal.message
    assert refusal.message.startswith("query-attack pattern detected") and refusal.message.endswith("for good")


def test_bounded_history_and_clients() -> None:
    imgs = _noise(1, 6)
    d = QueryDetector(max_similar=0, cooldown_s=None, history=3)
    for k in range(4):  # image 0, then 3 others: image 0 is forgotten
        assert d.check("a", imgs[k : k + 1]).allowed
    assert d.check("a", imgs[:1]).allowed
    assert not d.check("a", imgs[:1]).allowed
    lru = QueryDetector(max_similar=0, cooldown_s=None, max_clients=2)
    lru.check("a", imgs[:1])
    assert not lru.check("a", imgs[:1]).allowed  # banned ...
    lru.check("b", imgs[1:2])
    lru.check("c", imgs[2:3])
    assert lru.check("a", imgs[:1]).allowed  # ... and forgotten: two newer clients pushed it out
    assert len(lru._clients) == 2


def test_concurrent_requests_are_counted_once_each() -> None:
    d = QueryDetector(max_similar=1000, cooldown_s=None)
    x = _noise(2)

    def send() -> None:
        for _ in range(10):
            d.check("a", x)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert d.check("a", x).similar == 40  # 41 sends, the first one new


# ---------------------------------------------------------------------------------------------------- service
def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((a[0] * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _npz(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, images=x.astype(np.float32))
    return buf.getvalue()


def test_client_screen_budget_then_detector_and_refusals_pickle(fmnist) -> None:
    """One call screens a request as the service does: the budget first (a refused request is not hashed), then the
    detector; counts per outcome; the refusal survives pickling whole (it crosses Ray to the replica that answers)."""
    import pickle

    from trn.client_screen import BUDGET_METRIC, DETECTOR_METRIC, ClientScreen
    from trn.query_budget import QueryBudget

    screen = ClientScreen(QueryBudget(rate=0.001, burst=3), QueryDetector(max_similar=0, cooldown_s=60.0))
    x = fmnist[:1]
    assert screen.screen("k", 1, x, now=0.0) == ([(BUDGET_METRIC, 1, "charged"), (DETECTOR_METRIC, 1, "passed")], None)
    counts, refusal = screen.screen("k", 1, x, now=0.0)  # the same image again: refused by the detector
    assert counts == [(BUDGET_METRIC, 1, "charged"), (DETECTOR_METRIC, 1, "refused")] and refusal.status == 429
    counts, refusal = screen.screen("k", 2, fmnist[1:3], now=0.0)  # 2 more than the bucket holds: not hashed
    assert counts == [(BUDGET_METRIC, 2, "refused")] and refusal.kind == "QueryBudgetExceeded"
    back = pickle.loads(pickle.dumps(refusal))
    assert (back.status, back.kind, back.message, back.headers) == (429, refusal.kind, refusal.message,
                                                                     refusal.headers)
    assert ClientScreen().screen("k", 5, x) == ([], None)  # nothing configured: nothing counted, nothing refused
    restore = ClientScreen(QueryBudget(rate=1.0, burst=5), QueryDetector())
    assert restore.screen("k", 2) == ([(BUDGET_METRIC, 2, "charged")], None)  # restore requests: budget only


def test_client_state_placement() -> None:
    """``client_state: auto`` shares the state exactly when there can be more than one replica, and only when there
    is state to share."""
    base = {"restorer": "checkpoints/trn_fmnist", "query_detector": {}}
    shared = lambda **kw: app_args_from_mapping({**base, **kw}).shared_client_state
    assert not shared() and shared(num_replicas=2) and shared(autoscaling={"min_replicas": 1, "max_replicas": 3})
    assert not shared(num_replicas=2, autoscaling={"min_replicas": 1, "max_replicas": 1})  # autoscaling wins
    assert shared(client_state="shared") and not shared(num_replicas=3, client_state="replica")
    assert not app_args_from_mapping({"restorer": "checkpoints/trn_fmnist", "num_replicas": 2}).shared_client_state
    with pytest.raises(ConfigError, match="client_state"):
        app_args_from_mapping({**base, "client_state": "global"})


@pytest.mark.ray
def test_service_refuses_the_attacking_key_only(fmnist, tmp_path) -> None:
    """/v1/classify behind the detector: an API key re-sending near-identical images gets 429 + Retry-After, another
    key (and the restore endpoint) still answers; a batch of a Square-like run is refused whole."""
    httpx = pytest.importorskip("httpx")
    serve = pytest.importorskip("ray.serve")

    from trn.restorer import Restorer
    from trn_workers.serve import build_app

    Restorer.build((1, 28, 28), num_classes=10, seed=0).save(tmp_path / "tiny")
    ray = start_ray(2, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"restorer": str(tmp_path / "tiny"), "num_cpus": 0.5, "health_check_period_s": 2.0,
                         "output": {"policy": "full"}, "query_detector": {"max_similar": 2, "cooldown_s": 600}})
        serve.run(app, name="detect", route_prefix="/d")
        assert "ClientState" not in serve.status().applications["detect"].deployments  # one replica: kept in it
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/d", timeout=60) as c:
            png = {"Content-Type": "image/png"}
            x = fmnist[:1]
            for _ in range(3):  # the image and 2 resends (max_similar 2)
                r = c.post("/v1/classify", content=_png(x[0]), headers={**png, "x-api-key": "mallory"})
                assert r.status_code == 200, r.text
            r = c.post("/v1/classify", content=_png(x[0]), headers={**png, "x-api-key": "mallory"})
            assert r.status_code == 429 and r.headers["retry-after"] == "600", r.text
            err = r.json()["error"]
            assert err["type"] == "QueryAttackDetected" and "query-attack pattern detected" in err["message"]
            r = c.post("/v1/classify", content=_png(x[0]), headers={**png, "x-api-key": "alice"})
            assert r.status_code == 200 and r.json()["probabilities"], r.text
            r = c.post("/v1/restore", content=_png(x[0]), headers={**png, "x-api-key": "mallory"})
            assert r.status_code == 200  # only the classify endpoints are screened
            steps = np.repeat(fmnist[1:2], 4, axis=0)  # a Square-like run: one +-0.1 square more each query
            for k in range(1, 4):
                steps[k:, :, 4 * k : 4 * k + 4, 10:14] = np.clip(steps[k:, :, 4 * k : 4 * k + 4, 10:14] + 0.1, 0, 1)
            npz = {"Content-Type": "application/x-npz"}
            r = c.post("/v1/classify/batch", content=_npz(steps), headers={**npz, "x-api-key": "bob"})
            assert r.status_code == 429 and r.json()["error"]["type"] == "QueryAttackDetected"
            r = c.post("/v1/classify/batch", content=_npz(fmnist[2:6]), headers={**npz, "x-api-key": "carol"})
            assert r.status_code == 200 and len(r.json()["results"]) == 4
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.ray
def test_client_state_is_shared_across_replicas(fmnist, tmp_path) -> None:
    """Two restorer replicas (client_state auto -> shared): a client's budget and query history are the app's, not
    a replica's. Per replica, 5 distinct images at burst 3 pass unless all but two reach one replica; shared,
    exactly 3 do, and an image sent again is refused (max_similar 0) whichever replica each copy reached."""
    httpx = pytest.importorskip("httpx")
    serve = pytest.importorskip("ray.serve")

    from trn.restorer import Restorer
    from trn_workers.serve import build_app

    Restorer.build((1, 28, 28), num_classes=10, seed=0).save(tmp_path / "tiny")
    ray = start_ray(2, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"restorer": str(tmp_path / "tiny"), "num_cpus": 0.25, "num_replicas": 2,
                         "health_check_period_s": 2.0, "output": {"policy": "full"},
                         "query_budget": {"rate": 0.001, "burst": 3},
                         "query_detector": {"max_similar": 0, "cooldown_s": 600}})
        serve.run(app, name="shared", route_prefix="/s")
        deployments = serve.status().applications["shared"].deployments
        assert "ClientState" in deployments and len(deployments) == 2
        png = {"Content-Type": "image/png"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/s", timeout=60) as c:
            codes = [c.post("/v1/classify", content=_png(fmnist[20 + i]),
                            headers={**png, "x-api-key": "dave"}).status_code for i in range(5)]
            assert codes == [200, 200, 200, 429, 429], codes
            replies = [c.post("/v1/classify", content=_png(fmnist[40]), headers={**png, "x-api-key": "frank"})
                       for _ in range(2)]
            assert [r.status_code for r in replies] == [200, 429]
            assert replies[1].json()["error"]["type"] == "QueryAttackDetected"
    finally:
        serve.shutdown()
        ray.shutdown()
