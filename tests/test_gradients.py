"""Gradient-map estimation: each mode against a hand-written autograd reference, per-sample scales, classifier state
left untouched, ``create_graph`` differentiability (gradcheck in float64), and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trn.errors import ConfigError, InputError, ShapeError
from trn.gradients import MODES, SCALES, GradientMapEstimator, estimate_gradient_map

N, C, H, W, K = 6, 1, 8, 8, 5  # batch, channels, height, width, classes


@pytest.fixture
def model(make_tiny_classifier) -> nn.Module:
    """conftest's TinyClassifier (conv + BatchNorm + Dropout + linear head) with non-trivial BatchNorm statistics."""
    net = make_tiny_classifier(in_channels=C, size=H, num_classes=K)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that eval and train mode differ
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(N, C, H, W, generator=torch.Generator().manual_seed(1))


def _reference(model: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """d/dx sum_i sum_j w_ij CE(model(x_i), j), written the slow obvious way."""
    xg = x.clone().requires_grad_(True)
    logp = F.log_softmax(model(xg), 1)
    loss = -(weights * logp).sum()
    (g,) = torch.autograd.grad(loss, xg)
    return g


def _probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).softmax(1)


# --------------------------------------------------------------------------------------------- modes
def test_argmax_is_ce_against_the_prediction(model: nn.Module, x: torch.Tensor) -> None:
    pred = _probs(model, x).argmax(1)
    g = estimate_gradient_map(x, model, mode="argmax", scale="none")
    assert g.shape == x.shape and g.dtype == x.dtype and not g.requires_grad
    torch.testing.assert_close(g, _reference(model, x, F.one_hot(pred, K).float()))


def test_oracle_is_ce_against_the_true_label(model: nn.Module, x: torch.Tensor) -> None:
    y = torch.arange(N) % K
    g = estimate_gradient_map(x, model, mode="oracle", scale="none", y=y)
    torch.testing.assert_close(g, _reference(model, x, F.one_hot(y, K).float()))
    assert not torch.allclose(g, estimate_gradient_map(x, model, mode="argmax", scale="none"))


@pytest.mark.parametrize("k", [2, 3, K])
def test_topk_is_the_renormalised_mixture(model: nn.Module, x: torch.Tensor, k: int) -> None:
    p = _probs(model, x)
    top_p, top_i = p.topk(k, 1)
    w = torch.zeros_like(p).scatter_(1, top_i, top_p)
    w = w / w.sum(1, keepdim=True)
    g = estimate_gradient_map(x, model, mode="topk", k=k, scale="none")
    torch.testing.assert_close(g, _reference(model, x, w))


def test_at_a_decision_boundary_argmax_points_across_and_topk_cancels() -> None:
    """What the top-k map loses (docs/design.md): logits z = (Wx)_j with classes 0 and 1 tied, the rest far below.

    argmax's logit gradient is softmax - onehot(0) = (-1/2, 1/2, 0, ...): the map is (w_1 - w_0) / 2, the direction
    across the boundary. top-k's is softmax - renormalised top-k probabilities, which is ~0 there.
    """
    w = torch.zeros(K, C * H * W)
    w[0, 0], w[1, 1] = 1.0, 1.0
    w[2:, 2] = -20.0
    head = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K, bias=False))
    with torch.no_grad():
        head[1].weight.copy_(w)
    x = torch.zeros(1, C, H, W)
    x.view(-1)[:3] = torch.tensor([0.5, 0.5, 1.0])  # z = (0.5, 0.5, -20, -20, -20): 0 and 1 tied, the rest ~0 mass
    g_arg = estimate_gradient_map(x, head, mode="argmax", scale="none").view(-1)
    g_top = estimate_gradient_map(x, head, mode="topk", k=3, scale="none").view(-1)
    assert g_arg[0].item() == pytest.approx(-0.5, abs=1e-4) and g_arg[1].item() == pytest.approx(0.5, abs=1e-4)
    assert g_top.abs().max().item() < 1e-6 < g_arg.abs().max().item()


def test_topk_edge_cases(model: nn.Module, x: torch.Tensor) -> None:
    argmax = estimate_gradient_map(x, model, mode="argmax", scale="none")
    torch.testing.assert_close(estimate_gradient_map(x, model, mode="topk", k=1, scale="none"), argmax)
    # k above the class count means all classes
    torch.testing.assert_close(estimate_gradient_map(x, model, mode="topk", k=100, scale="none"),
                               estimate_gradient_map(x, model, mode="topk", k=K, scale="none"))


# --------------------------------------------------------------------------------------------- scales
def test_scales_are_per_sample(model: nn.Module, x: torch.Tensor) -> None:
    raw = estimate_gradient_map(x, model, scale="none")
    std = estimate_gradient_map(x, model, scale="std")
    maxabs = estimate_gradient_map(x, model, scale="maxabs")
    sign = estimate_gradient_map(x, model, scale="sign")
    torch.testing.assert_close(std.flatten(1).pow(2).mean(1).sqrt(), torch.ones(N))
    torch.testing.assert_close(maxabs.flatten(1).abs().amax(1), torch.ones(N))
    assert set(sign.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(sign, raw.sign())
    for scaled in (std, maxabs):  # same direction as the raw map, a positive factor per sample
        ratio = scaled.flatten(1) / raw.flatten(1)
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
        assert (ratio > 0).all()


@pytest.mark.parametrize("scale", SCALES)
def test_each_sample_is_independent_of_the_batch(model: nn.Module, x: torch.Tensor, scale: str) -> None:
    """Normalisation is per sample, never per batch: one image gives the same map alone or in a batch."""
    whole = estimate_gradient_map(x, model, scale=scale)
    for i in (0, N - 1):
        torch.testing.assert_close(estimate_gradient_map(x[i : i + 1], model, scale=scale), whole[i : i + 1])
    doubled = estimate_gradient_map(torch.cat([x, x.flip(0)]), model, scale=scale)
    torch.testing.assert_close(doubled[:N], whole)


def test_zero_gradient_stays_finite() -> None:
    """A classifier with a flat loss surface gives a zero map, not NaN, under every scale."""
    const = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K))
    nn.init.zeros_(const[1].weight)
    for scale in SCALES:
        g = estimate_gradient_map(torch.rand(2, C, H, W), const, scale=scale)
        assert torch.isfinite(g).all() and (g == 0).all()


# --------------------------------------------------------------------------------------------- classifier state
def test_works_under_no_grad(model: nn.Module, x: torch.Tensor) -> None:
    expected = estimate_gradient_map(x, model)
    with torch.no_grad():
        got = estimate_gradient_map(x, model)
    assert torch.equal(got, expected) and got.abs().sum() > 0


def test_no_parameter_gradients_and_flags_kept(model: nn.Module, x: torch.Tensor) -> None:
    model.fc.weight.requires_grad_(False)  # a mix of frozen and trainable parameters
    flags = [p.requires_grad for p in model.parameters()]
    for create_graph in (False, True):
        estimate_gradient_map(x, model, create_graph=create_graph)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    model.conv.weight.grad = torch.ones_like(model.conv.weight)  # an existing gradient is left as it was
    estimate_gradient_map(x, model)
    assert torch.equal(model.conv.weight.grad, torch.ones_like(model.conv.weight))


def test_training_modes_restored_and_eval_used(model: nn.Module, x: torch.Tensor) -> None:
    expected = estimate_gradient_map(x, model)  # eval mode: deterministic
    model.train()
    model.bn.eval()  # a frozen BatchNorm inside a training model stays frozen
    running = model.bn.running_mean.clone()
    got = estimate_gradient_map(x, model)
    assert model.training and model.conv.training and model.drop.training and not model.bn.training
    assert torch.equal(model.bn.running_mean, running)
    torch.testing.assert_close(got, expected)  # dropout and batch statistics were off during the call
    model.eval()
    estimate_gradient_map(x, model)
    assert not any(m.training for m in model.modules())


def test_modes_restored_after_an_error(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    with pytest.raises(InputError, match="needs the true labels"):
        estimate_gradient_map(x, model, mode="oracle")
    assert all(m.training for m in model.modules())


def test_function_equals_module(model: nn.Module, x: torch.Tensor) -> None:
    est = GradientMapEstimator(mode="topk", k=2, scale="maxabs")
    torch.testing.assert_close(est(x, model), estimate_gradient_map(x, model, "topk", 2, "maxabs"))
    assert est.settings() == {"mode": "topk", "k": 2, "scale": "maxabs"}
    assert "mode='topk'" in repr(est)
    assert list(est.parameters()) == []  # holds settings, not the classifier
    y = torch.zeros(N, dtype=torch.long)
    torch.testing.assert_close(GradientMapEstimator("oracle", scale="none")(x, model, y),
                               estimate_gradient_map(x, model, "oracle", scale="none", y=y))


@pytest.mark.parametrize("batch", [0, 1, 2])
def test_batch_sizes(model: nn.Module, batch: int) -> None:
    x = torch.rand(batch, C, H, W)
    for mode in ("argmax", "topk"):
        g = estimate_gradient_map(x, model, mode=mode)
        assert g.shape == (batch, C, H, W) and torch.isfinite(g).all()
    assert estimate_gradient_map(x, model, mode="oracle", y=torch.zeros(batch, dtype=torch.long)).shape == x.shape


# --------------------------------------------------------------------------------------------- create_graph
@pytest.fixture
def smooth_model(make_tiny_classifier) -> nn.Module:
    """Float64, tanh activations: smooth, so finite differences and gradcheck are meaningful."""
    return make_tiny_classifier(in_channels=C, size=H, num_classes=K, act=nn.Tanh).double().eval()


@pytest.mark.parametrize(("mode", "scale"), [("argmax", "none"), ("argmax", "std"), ("oracle", "std"),
                                             ("oracle", "maxabs")])
def test_create_graph_passes_gradcheck(mode: str, scale: str, smooth_model: nn.Module) -> None:
    """Second-order gradients through the map are right (label weights are constants: argmax/oracle are exactly
    differentiable where the prediction does not change; topk's probability weights are deliberately detached)."""
    model = smooth_model
    x = torch.rand(2, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.8 + 0.1
    y = torch.tensor([1, 3])
    w = torch.randn(2, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def f(inp: torch.Tensor) -> torch.Tensor:
        return (estimate_gradient_map(inp, model, mode=mode, scale=scale, y=y, create_graph=True) * w).sum()

    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True),), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode", ["argmax", "topk"])
def test_create_graph_second_order_gradient_is_nonzero(model: nn.Module, x: torch.Tensor, mode: str) -> None:
    xg = x.clone().requires_grad_(True)
    g = estimate_gradient_map(xg, model, mode=mode, create_graph=True)
    assert g.requires_grad
    (h,) = torch.autograd.grad(g.pow(2).sum() + (g * x).sum(), xg)
    assert torch.isfinite(h).all() and h.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(g.detach(), estimate_gradient_map(x, model, mode=mode))  # same values


def test_without_create_graph_the_map_is_a_constant(model: nn.Module, x: torch.Tensor) -> None:
    xg = x.clone().requires_grad_(True)
    g = estimate_gradient_map(xg, model)
    assert not g.requires_grad and g.grad_fn is None


# --------------------------------------------------------------------------------------------- bad input
def test_bad_settings(model: nn.Module, x: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match=r"unknown gradient-map mode 'random'; choose from \['argmax'"):
        estimate_gradient_map(x, model, mode="random")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown gradient-map scale 'l2'"):
        estimate_gradient_map(x, model, scale="l2")  # type: ignore[arg-type]
    for k in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="top-k needs an integer k >= 1"):
            estimate_gradient_map(x, model, k=k)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown gradient-map mode"):
        GradientMapEstimator(mode="true")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown gradient-map scale"):
        GradientMapEstimator(scale="rms")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="top-k"):
        GradientMapEstimator(k=0)
    assert MODES == ("argmax", "topk", "hybrid", "oracle", "dual")


def test_bad_images(model: nn.Module, x: torch.Tensor) -> None:
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        estimate_gradient_map(nan, model)
    with pytest.raises(ShapeError, match="4-D"):
        estimate_gradient_map(x[0], model)
    with pytest.raises(InputError, match="floating-point"):
        estimate_gradient_map((x * 255).to(torch.uint8), model)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        estimate_gradient_map(x * 255, model)
    with pytest.raises(InputError, match="torch.Tensor"):
        estimate_gradient_map(x.numpy(), model)  # type: ignore[arg-type]


def test_bad_oracle_labels(model: nn.Module, x: torch.Tensor) -> None:
    with pytest.raises(InputError, match="'oracle' gradient map needs the true labels y"):
        estimate_gradient_map(x, model, mode="oracle")
    with pytest.raises(ShapeError, match=rf"y must have shape \({N},\)"):
        estimate_gradient_map(x, model, mode="oracle", y=torch.zeros(N - 1, dtype=torch.long))
    with pytest.raises(InputError, match="integer tensor"):
        estimate_gradient_map(x, model, mode="oracle", y=torch.zeros(N))
    with pytest.raises(InputError, match=r"y must lie in \[0, 4\]"):
        estimate_gradient_map(x, model, mode="oracle", y=torch.full((N,), K))


def test_dual_stacks_the_topk_and_argmax_maps(model: nn.Module, x: torch.Tensor) -> None:
    for scale in ("std", "none"):
        g = estimate_gradient_map(x, model, mode="dual", k=3, scale=scale)
        assert g.shape == (N, 2 * C, H, W)
        torch.testing.assert_close(g[:, :C], estimate_gradient_map(x, model, mode="topk", k=3, scale=scale))
        torch.testing.assert_close(g[:, C:], estimate_gradient_map(x, model, mode="argmax", scale=scale))
    assert estimate_gradient_map(x[:0], model, mode="dual").shape == (0, 2 * C, H, W)


def test_dual_create_graph_is_both_maps_create_graph(model: nn.Module, x: torch.Tensor) -> None:
    xg = x.clone().requires_grad_(True)
    g = estimate_gradient_map(xg, model, mode="dual", create_graph=True)
    (h,) = torch.autograd.grad((g * x).sum(), xg)
    parts = [estimate_gradient_map(xg, model, mode=m, create_graph=True) for m in ("topk", "argmax")]
    (h_ref,) = torch.autograd.grad(sum((p * x).sum() for p in parts), xg)
    torch.testing.assert_close(h, h_ref)
    assert h.abs().sum() > 0 and all(p.grad is None for p in model.parameters())


def test_map_channels() -> None:
    from trn.gradients import map_channels

    assert [map_channels(m, 3) for m in ("argmax", "topk", "hybrid", "oracle", "dual")] == [3, 3, 3, 3, 6]
    with pytest.raises(ConfigError, match="unknown gradient-map mode 'soft'"):
        map_channels("soft", 1)


@pytest.mark.parametrize("confidence", [0.3, 0.5, 0.9])
def test_hybrid_is_argmax_where_unsure_and_topk_elsewhere(model: nn.Module, x: torch.Tensor, confidence: float) -> None:
    x = torch.cat([x, x * 0.1])  # more varied confidence
    top1 = _probs(model, x).amax(1)
    g = estimate_gradient_map(x, model, mode="hybrid", k=3, confidence=confidence)
    ga = estimate_gradient_map(x, model, mode="argmax")
    gt = estimate_gradient_map(x, model, mode="topk", k=3)
    unsure = top1 < confidence
    torch.testing.assert_close(g[unsure], ga[unsure])
    torch.testing.assert_close(g[~unsure], gt[~unsure])
    assert g.shape == x.shape


def test_hybrid_switches_by_confidence_and_is_differentiable(model: nn.Module, x: torch.Tensor) -> None:
    # confidence 1 (every sample is unsure): the argmax map; a tiny threshold (none is): the top-k map
    torch.testing.assert_close(estimate_gradient_map(x, model, mode="hybrid", confidence=1.0),
                               estimate_gradient_map(x, model, mode="argmax"))
    torch.testing.assert_close(estimate_gradient_map(x, model, mode="hybrid", confidence=1e-6),
                               estimate_gradient_map(x, model, mode="topk"))
    xg = x.clone().requires_grad_(True)
    g = estimate_gradient_map(xg, model, mode="hybrid", create_graph=True)
    (h,) = torch.autograd.grad((g * x).sum(), xg)
    assert torch.isfinite(h).all() and h.abs().sum() > 0
    est = GradientMapEstimator(mode="hybrid", confidence=0.7)
    assert est.settings() == {"mode": "hybrid", "k": 3, "scale": "std", "confidence": 0.7}
    assert "confidence" not in GradientMapEstimator().settings()  # topk checkpoints' metadata unchanged
    for bad in (0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ConfigError, match="confidence threshold must lie in"):
            GradientMapEstimator(mode="hybrid", confidence=bad)  # type: ignore[arg-type]
