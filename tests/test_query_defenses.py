"""Defences against score-based query attacks and what the service returns: AAA, RND, UniG's serving mode, output
policies, ECE, the per-client query budget, and the HTTP query-attack benchmark end to end on a tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trn.attacks import Square
from trn.defenses import (
    AAAClassifier,
    RandomNoise,
    UniGClassifier,
    aaa_probabilities,
    build_defense_stack,
    build_preprocessor,
    parse_defense_spec,
)
from trn.defenses.spec import canonical_defenses, serving_defenses
from trn.errors import ConfigError, InputError, RequestError
from trn.http_api import request_policy
from trn.output_policy import OutputPolicy, expected_calibration_error, format_prediction, restrict
from trn.query_budget import QueryBudget, charge_request, client_key

REPO = Path(__file__).resolve().parent.parent


class _Net(nn.Module):
    """A tiny classifier with the features/head split UniG needs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- AAA
def test_aaa_keeps_argmax_and_confidence_on_a_clean_batch() -> None:
    z = torch.randn(500, 10, generator=torch.Generator().manual_seed(0)) * 3
    p = torch.softmax(z, 1)
    q = aaa_probabilities(p)
    assert torch.equal(q.argmax(1), p.argmax(1))
    torch.testing.assert_close(q.max(1).values, p.max(1).values, atol=1e-6, rtol=0)
    torch.testing.assert_close(q.sum(1), torch.ones(500), atol=1e-5, rtol=0)
    assert (q - p).abs().max() > 1e-2  # it does change the scores
    labels = p.argmax(1).clone()
    labels[::3] = (labels[::3] + 1) % 10  # a third wrong: a non-trivial calibration
    assert abs(expected_calibration_error(q, labels) - expected_calibration_error(p, labels)) < 1e-6
    # the wrapper: same argmax as the classifier, deterministic
    net = _Net().eval()
    x = _x(64)
    with torch.no_grad():
        out, plain = AAAClassifier(net)(x), net(x)
    assert torch.equal(out.argmax(1), plain.argmax(1))
    torch.testing.assert_close(AAAClassifier(net)(x).detach(), out)


def test_aaa_reverses_the_margin_locally() -> None:
    """Along a path where the true margin grows, the returned margin mostly shrinks (inside the sawtooth's intervals)."""
    base = torch.randn(1, 10, generator=torch.Generator().manual_seed(1)).repeat(400, 1)
    base[:, 0] += torch.linspace(1.0, 8.0, 400)
    p = torch.softmax(base, 1)
    q = aaa_probabilities(p)

    def margin(t: torch.Tensor) -> torch.Tensor:
        s = t.log().sort(1, descending=True).values
        return s[:, 0] - s[:, 1]

    dm, dq = margin(p).diff(), margin(q).diff()
    assert (dm > 0).all()
    assert ((dq < 0).float().mean()) > 0.6
    with pytest.raises(ConfigError, match="interval"):
        aaa_probabilities(p, interval=0)
    with pytest.raises(ConfigError, match="amplitude"):
        aaa_probabilities(p, amplitude=5.0)


def test_aaa_slows_square_on_a_local_model() -> None:
    """Square's margin search against a local model: AAA keeps more images correct for the same query budget."""
    torch.manual_seed(0)
    net = _Net().eval()
    x = _x(40, 3)
    with torch.no_grad():
        y = net(x).argmax(1)
    atk = Square(eps=0.3, queries=150, p_init=0.3, seed=0)
    with torch.no_grad():
        plain = (net(atk(net, x, y)).argmax(1) == y).float().mean()
        defended_model = AAAClassifier(net)
        defended = (defended_model(atk(defended_model, x, y)).argmax(1) == y).float().mean()
    assert defended > plain, (float(plain), float(defended))


# ---------------------------------------------------------------------------------------------------- RND
def test_rnd_is_deterministic_per_image_and_independent_of_the_batch() -> None:
    rnd = RandomNoise(std=0.05)
    x = _x(6)
    y = rnd(x)
    assert torch.equal(y, rnd(x)) and not torch.equal(y, x)
    assert torch.equal(rnd(x[2:3])[0], y[2])  # alone or in a batch: the same noise
    x2 = x.clone()
    x2[0, 0, 0, 0] = (x2[0, 0, 0, 0] + 0.05) % 1  # one changed pixel: fresh noise
    x3 = x.clone()
    x3[0] += 1e-7  # float rounding noise (batched vs single restorer outputs): the same noise
    assert (rnd(x3)[0] - y[0]).abs().max() < 1e-6
    assert (rnd(x2)[0] - y[0]).abs().max() > 1e-2
    assert 0 <= float(y.min()) and float(y.max()) <= 1
    assert (y - x).std() == pytest.approx(0.05, rel=0.3)
    assert not rnd.randomized and RandomNoise(std=0.05, deterministic=False).randomized
    with pytest.raises(ConfigError, match="std"):
        RandomNoise(std=-1)
    pre = build_preprocessor([{"name": "rnd", "std": 0.05}])
    assert torch.equal(pre(x), y)


# ---------------------------------------------------------------------------------------------------- UniG
def test_unig_serving_mode_depends_on_the_image_alone() -> None:
    net = _Net().eval()
    refs = _x(4, 9)
    unig = UniGClassifier(net, reference_images=refs, per_sample=True, deterministic=True)
    x = _x(8, 1)
    with torch.no_grad():
        batch = unig(x)
        alone = torch.cat([unig(x[i : i + 1]) for i in range(len(x))])
        other_batch = unig(torch.cat([_x(5, 7), x[3:4]]))[-1]
    torch.testing.assert_close(alone, batch, atol=1e-5, rtol=0)
    torch.testing.assert_close(other_batch, batch[3], atol=1e-5, rtol=0)
    assert torch.equal(unig(x).detach(), batch)  # re-querying: the same answer
    assert (batch - net(x)).abs().max() > 1e-3  # and UniG did something
    assert not unig.randomized
    with pytest.raises(ConfigError, match="per_sample needs reference images"):
        UniGClassifier(net, per_sample=True)
    with pytest.raises(ConfigError, match="deterministic needs per_sample"):
        UniGClassifier(net, reference_images=refs, deterministic=True)
    # a service's spec: unig in the serving mode, with reference images named
    spec = serving_defenses(canonical_defenses(["trn", {"name": "unig", "reference_dataset": "fashion-mnist"}]))
    assert spec[1]["per_sample"] is True and spec[1]["deterministic"] is True
    with pytest.raises(ConfigError, match="reference_dataset"):
        serving_defenses(canonical_defenses(["trn", "unig"]))
    with pytest.raises(ConfigError, match="other clients"):
        serving_defenses(canonical_defenses(["trn", {"name": "unig", "reference_dataset": "x", "per_sample": False}]))


def test_stack_specs_name_the_new_defences() -> None:
    assert [n for n, _ in parse_defense_spec(["trn", "noise", "unig", "aaa"])] == ["trn", "rnd", "unig", "aaa"]
    net = _Net().eval()
    stack = build_defense_stack([{"name": "rnd", "std": 0.01}, {"name": "aaa", "interval": 0.25}], net)
    assert isinstance(stack.classifier, AAAClassifier) and stack.classifier.interval == 0.25
    assert not stack.randomized
    with pytest.raises(ConfigError, match=r"defence #0 \(aaa\): unknown parameter"):
        parse_defense_spec([{"name": "aaa", "period": 1}])


# ---------------------------------------------------------------------------------------------------- output policy
def test_output_policy_shapes_and_restrictions() -> None:
    names = ["a", "b", "c", "d"]
    p = np.array([0.1234567, 0.5, 0.3, 0.0765433])
    full = format_prediction(p, names, OutputPolicy("full"))
    assert full["label"] == "b" and list(full["probabilities"]) == names and full["probabilities"]["a"] == 0.123457
    top = format_prediction(p, names, OutputPolicy("top_k", k=2))
    assert list(top["probabilities"]) == ["b", "c"] and top["output"] == "top_k"
    rounded = format_prediction(p, names, OutputPolicy("rounded", decimals=1))
    assert rounded["probabilities"] == {"a": 0.1, "b": 0.5, "c": 0.3, "d": 0.1}
    label = format_prediction(p, names, OutputPolicy("label"))
    assert label == {"label": "b", "index": 1, "probabilities": None, "output": "label"}
    app = OutputPolicy("rounded", decimals=2)
    assert restrict(app, OutputPolicy("top_k", k=1, decimals=2), 4).policy == "top_k"
    with pytest.raises(InputError, match="shows more"):
        restrict(app, OutputPolicy("top_k", k=1), 4)  # 6 decimals: more than the app's 2
    assert restrict(app, OutputPolicy("rounded", decimals=1), 4).decimals == 1
    assert restrict(app, None) is app
    with pytest.raises(InputError, match="shows more"):
        restrict(app, OutputPolicy("full"), 4)
    with pytest.raises(InputError, match="shows more"):
        restrict(OutputPolicy("top_k", k=1), OutputPolicy("top_k", k=2), 4)
    with pytest.raises(InputError, match="shows more"):
        restrict(OutputPolicy("label"), OutputPolicy("top_k", k=1), 4)
    with pytest.raises(ConfigError, match="output policy"):
        OutputPolicy("logits")


def test_request_policy_asks_for_less_never_more() -> None:
    """A request's ?output=&k=&decimals=: the app's policy when absent, less when asked; 403 for more, 422 when bad."""
    app = OutputPolicy("rounded", decimals=2)
    assert request_policy(app, None, None, None, 4) is app
    assert request_policy(app, "label", None, None, 4).policy == "label"
    top = request_policy(app, "top_k", 2, None, 4)
    assert (top.policy, top.k, top.decimals) == ("top_k", 2, 2)  # top_k inherits the app's decimals
    assert request_policy(app, None, None, 1, 4) == OutputPolicy("rounded", decimals=1)
    with pytest.raises(RequestError) as e:
        request_policy(app, "full", None, None, 4)  # `full` means every decimal: more than 2
    assert (e.value.status, e.value.kind) == (403, "OutputNotAllowed") and "shows more" in e.value.message
    with pytest.raises(RequestError) as e:
        request_policy(app, "top_k", 0, None, 4)
    assert (e.value.status, e.value.kind, e.value.message) == (422, "ValidationError",
                                                               "output.k must be an integer >= 1, got 0")


def test_expected_calibration_error() -> None:
    assert expected_calibration_error(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]), bins=10) == \
        pytest.approx(0.15)
    p = np.array([[0.6, 0.4]] * 10)
    y = np.array([0] * 6 + [1] * 4)
    assert expected_calibration_error(p, y) == pytest.approx(0.0)
    assert math.isnan(expected_calibration_error(np.zeros((0, 3)), np.zeros(0)))
    with pytest.raises(InputError):
        expected_calibration_error(np.zeros((3, 2)), np.zeros(2))


# ---------------------------------------------------------------------------------------------------- budget
def test_query_budget_token_bucket() -> None:
    b = QueryBudget(rate=2.0, burst=5, total=8)
    assert b.charge("a", 5, now=0.0).allowed
    d = b.charge("a", 1, now=0.0)
    assert not d.allowed and d.retry_after_s == pytest.approx(0.5)
    assert b.charge("b", 3, now=0.0).allowed  # another client has its own bucket
    assert b.charge("a", 2, now=1.0).allowed  # refilled 2 in 1 s
    assert not b.charge("a", 6, now=100.0).allowed  # more than the burst: never
    assert b.charge("a", 1, now=100.0).allowed  # 8 used
    d = b.charge("a", 1, now=200.0)
    assert not d.allowed and math.isinf(d.retry_after_s)  # lifetime total spent
    with pytest.raises(ConfigError, match="rate"):
        QueryBudget(rate=0, burst=1)


def test_query_budget_keys_and_429s() -> None:
    """Requests are keyed by API key (non-empty), else client address; a refusal is a 429 with Retry-After."""
    assert client_key({"x-api-key": "k1"}, "x-api-key", "10.0.0.1") == "key:k1"
    assert client_key({"x-api-key": ""}, "x-api-key", "10.0.0.1") == "addr:10.0.0.1"
    assert client_key({}, "x-api-key", None) == "addr:unknown"
    b = QueryBudget(rate=0.01, burst=5)
    decision, refusal = charge_request(b, "a", 5)
    assert decision.allowed and refusal is None
    decision, refusal = charge_request(b, "a", 3)  # 3 queries at 0.01/s: just under 300 s, rounded up
    assert not decision.allowed and (refusal.status, refusal.kind) == (429, "QueryBudgetExceeded")
    assert refusal.headers == {"Retry-After": "300"}
    assert refusal.message == "query budget spent (0.01 queries/s, burst 5); retry in 300 s"
    _, refusal = charge_request(b, "b", 6)  # more than the burst: never
    assert refusal.headers == {"Retry-After": "86400"}
    assert refusal.message == "this request needs 6 queries, more than the budget can ever grant at once (burst 5)"
    _, refusal = charge_request(QueryBudget(rate=0.5, burst=5, total=3), "c", 4)
    assert refusal.message.endswith("(burst 5, lifetime total 3)") and refusal.headers["Retry-After"] == "86400"


# ---------------------------------------------------------------------------------------------------- benchmark
@pytest.mark.ray
@pytest.mark.slow
def test_query_attack_benchmark_end_to_end(tmp_path) -> None:
    """benchmarks/bench_query_attack.py against a live service on loopback, tiny untrained model, a few cells."""
    cells = "none:full:square,aaa:rounded:square,rnd:full:square_eot,none:label:rays"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_query_attack.py"), "--tiny", "--images", "3",
                        "--queries", "6", "--ece-images", "8", "--eot", "2", "--defences", "none,aaa,rnd", "--cells",
                        cells, "--cpus", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(x["defence"], x["policy"], x["attack"]) for x in rows] == [tuple(c.split(":")) for c in cells.split(",")]
    for row in rows:
        assert 0 <= row["robust_acc"] <= row["clean_acc_attack_set"] <= 100
        assert row["image_queries"] > 0 and row["http_requests"] > 0
        assert (row["ece"] is None) == (row["policy"] == "label")
    assert "| aaa | rounded | square |" in (tmp_path / "results.md").read_text()
