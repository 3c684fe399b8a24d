"""Attacks: the contract every attack keeps (shape, range, exact budget, seeding, model state, no_grad, errors),
targeted mode, and the PGD-40 check on the shipped Fashion-MNIST guard."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from trn.attacks import ATTACKS as ATTACK_REGISTRY
from trn.attacks import BIM, CW, FGSM, MIM, PGD, Attack, DeepFool, RandomSign, create_attack, list_attacks
from trn.classifiers import load_classifier
from trn.data import FASHION_MNIST_DIR, load_fashion_mnist
from trn.errors import ConfigError, InputError, ShapeError
from trn.utils import accuracy

GUARD = Path(__file__).resolve().parents[1] / "checkpoints" / "fmnist_guard"
N, C, H, W, K = 12, 1, 8, 8, 3  # batch, channels, height, width, classes of the tiny problem


@pytest.fixture
def model(make_tiny_classifier) -> nn.Module:
    """conftest's TinyClassifier: conv + BatchNorm + Dropout + linear head (train/eval leaks into an attack show)."""
    return make_tiny_classifier(in_channels=C, size=H, num_classes=K)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(N, C, H, W, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def y(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


# name -> (factory, norm, budget). CW and DeepFool are run with an explicit L2 budget so it can be checked.
ATTACKS: dict[str, tuple[Callable[..., Attack], str, float]] = {
    "fgsm": (lambda **kw: FGSM(eps=0.1, **kw), "linf", 0.1),
    "bim": (lambda **kw: BIM(eps=0.1, steps=5, **kw), "linf", 0.1),
    "pgd_linf": (lambda **kw: PGD(eps=0.1, steps=5, norm="linf", **kw), "linf", 0.1),
    "pgd_l2": (lambda **kw: PGD(eps=0.5, steps=5, norm="l2", **kw), "l2", 0.5),
    "mim": (lambda **kw: MIM(eps=0.1, steps=5, **kw), "linf", 0.1),
    "cw": (lambda **kw: CW(eps=0.5, steps=10, lr=0.05, **kw), "l2", 0.5),
    "deepfool": (lambda **kw: DeepFool(eps=0.5, steps=10, **kw), "l2", 0.5),
}
NAMES = list(ATTACKS)


def _dist(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    d = (x_adv - x).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


def _assert_budget(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> None:
    tol = 1e-6 if norm == "linf" else 1e-5
    dist = _dist(x_adv, x, norm)
    assert bool((dist <= eps + tol).all()), f"{norm} budget {eps} exceeded: max {dist.max().item():.8f}"


# --------------------------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", NAMES)
def test_output_shape_range_and_budget(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    factory, norm, eps = ATTACKS[name]
    x_before = x.clone()
    x_adv = factory(seed=0)(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not x_adv.requires_grad
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    _assert_budget(x_adv, x, norm, eps)
    assert torch.equal(x, x_before)  # the input is not modified in place
    assert not torch.equal(x_adv, x)  # it did something


@pytest.mark.parametrize("name", NAMES)
def test_budget_on_saturated_images(name: str, model: nn.Module, y: torch.Tensor) -> None:
    """Pixels at 0 and 1 (where clipping to [0, 1] interacts with the projection) keep the budget too."""
    factory, norm, eps = ATTACKS[name]
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(N, C, H, W, generator=g) > 0.5).float()
    x_adv = factory(seed=0)(model, x, y)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    _assert_budget(x_adv, x, norm, eps)


@pytest.mark.parametrize("eps", [1 / 255, 8 / 255, 0.3, 1.0])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_budget_is_exact_for_any_eps(eps: float, norm: str, model: nn.Module, x: torch.Tensor) -> None:
    x_adv = PGD(eps=eps, steps=3, norm=norm, alpha=eps, seed=0)(model, x)  # big steps: the projection does the work
    _assert_budget(x_adv, x, norm, eps)
    if norm == "linf" and eps < 0.5:  # steps of size eps reach the boundary (some pixels are not clipped at 0 / 1)
        assert _dist(x_adv, x, norm).max().item() == pytest.approx(eps, abs=1e-6)


@pytest.mark.parametrize("name", ["fgsm", "bim", "pgd_linf", "pgd_l2", "mim"])
def test_zero_eps_returns_the_input(name: str, model: nn.Module, x: torch.Tensor) -> None:
    factory, _, _ = ATTACKS[name]
    atk = factory(seed=0)
    atk.eps = 0.0
    assert torch.equal(atk(model, x), x)


@pytest.mark.parametrize("name", NAMES)
def test_seeded_reproducibility(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    factory, _, _ = ATTACKS[name]
    rng_before = torch.get_rng_state()
    a = factory(seed=3)(model, x, y)
    b = factory(seed=3)(model, x, y)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), rng_before)  # a seeded attack leaves the global RNG alone


def test_seed_changes_the_random_start(model: nn.Module, x: torch.Tensor) -> None:
    a = PGD(eps=0.1, steps=2, seed=0)(model, x)
    b = PGD(eps=0.1, steps=2, seed=1)(model, x)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_model_modes_are_restored(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    factory, _, _ = ATTACKS[name]
    model.train()
    model.bn.eval()  # a frozen BatchNorm inside a training model must stay frozen
    running_mean = model.bn.running_mean.clone()
    a = factory(seed=0)(model, x, y)
    assert model.training and model.conv.training and model.drop.training and model.fc.training
    assert not model.bn.training
    assert torch.equal(model.bn.running_mean, running_mean)  # ran in eval mode: statistics untouched
    model.eval()
    b = factory(seed=0)(model, x, y)
    assert not any(m.training for m in model.modules())
    assert torch.equal(a, b)  # dropout was off during the attack both times


@pytest.mark.parametrize("name", NAMES)
def test_no_parameter_gradients(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    factory, _, _ = ATTACKS[name]
    factory(seed=0)(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    model.fc.weight.grad = torch.ones_like(model.fc.weight)  # an existing gradient is left as it was
    factory(seed=0)(model, x, y)
    assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight))


@pytest.mark.parametrize("name", NAMES)
def test_works_under_no_grad_and_inference(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    factory, norm, eps = ATTACKS[name]
    expected = factory(seed=0)(model, x, y)
    with torch.no_grad():
        got = factory(seed=0)(model, x, y)
    assert torch.equal(got, expected)
    _assert_budget(got, x, norm, eps)


@pytest.mark.parametrize("name", NAMES)
def test_default_labels_are_predictions(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    factory, _, _ = ATTACKS[name]
    assert torch.equal(factory(seed=0)(model, x), factory(seed=0)(model, x, y))
    assert torch.equal(factory(seed=0)(model, x, y.int()), factory(seed=0)(model, x, y))  # int32 labels work


def test_plain_callable_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    x_adv = PGD(eps=0.1, steps=3)(lambda t: model(t) * 2.0, x, y)  # any callable from images to logits
    _assert_budget(x_adv, x, "linf", 0.1)


@pytest.mark.parametrize("name", NAMES)
def test_batches_of_one_and_two(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    factory, norm, eps = ATTACKS[name]
    for b in (1, 2):
        x_adv = factory(seed=0)(model, x[:b], y[:b])
        assert x_adv.shape == (b, C, H, W)
        _assert_budget(x_adv, x[:b], norm, eps)


def test_empty_batch_returns_empty(model: nn.Module) -> None:
    """Batch 0 is accepted (kornia convention) and gives back an empty batch of the same shape."""
    x0 = torch.zeros(0, C, H, W)
    for name in NAMES:
        out = ATTACKS[name][0]()(model, x0)
        assert out.shape == (0, C, H, W)


# --------------------------------------------------------------------------------------------- effectiveness
@pytest.mark.parametrize("name", NAMES)
def test_untargeted_attacks_flip_predictions(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    kwargs: dict = {"eps": 0.5} if ATTACKS[name][1] == "linf" else {"eps": 3.0}
    if name == "cw":
        kwargs.update(c=10.0, lr=0.05)  # the defaults (c=1, lr=0.01, one binary-search round) are gentle
    atk = create_attack(name.replace("_linf", ""), seed=0, **kwargs)
    with torch.no_grad():
        flipped = (model(atk(model, x, y)).argmax(1) != y).float().mean().item()
    assert flipped >= 0.75, f"{name} flipped only {flipped:.0%} of a tiny random model's predictions"


@pytest.mark.parametrize("name", ["bim", "pgd_linf", "pgd_l2", "mim", "cw"])
def test_targeted_moves_towards_targets(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    target = (y + 1) % K
    norm = ATTACKS[name][1]
    kwargs = {"eps": 0.5, "steps": 20} if norm == "linf" else {"eps": 4.0, "steps": 50}
    if name == "cw":
        kwargs.update(lr=0.05, c=10.0)
    atk = create_attack(name.replace("_linf", ""), targeted=True, seed=0, **kwargs)
    x_adv = atk(model, x, target)
    _assert_budget(x_adv, x, norm, kwargs["eps"])
    with torch.no_grad():
        logp_clean = model(x).log_softmax(1).gather(1, target[:, None])
        logp_adv = model(x_adv).log_softmax(1).gather(1, target[:, None])
        hit = (model(x_adv).argmax(1) == target).float().mean().item()
    assert bool((logp_adv >= logp_clean - 1e-6).all())  # never moves away from the target
    assert hit >= 0.75, f"targeted {name} reached only {hit:.0%} of the targets"


def test_targeted_needs_labels_and_deepfool_is_untargeted(model: nn.Module, x: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="targeted attacks need target labels"):
        PGD(targeted=True)(model, x)
    with pytest.raises(ConfigError, match="DeepFool is untargeted only"):
        DeepFool(targeted=True)


def test_unbounded_cw_and_deepfool_find_small_perturbations(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    for atk in (CW(steps=50, lr=0.05, c=10.0), DeepFool(steps=50)):  # eps = 0: no budget, minimal perturbation
        x_adv = atk(model, x, y)
        with torch.no_grad():
            fooled = model(x_adv).argmax(1) != y
        assert fooled.float().mean().item() >= 0.75
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", NAMES)
def test_bad_images(name: str, model: nn.Module, x: torch.Tensor) -> None:
    atk = ATTACKS[name][0]()
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        atk(model, nan)
    with pytest.raises(ShapeError, match="4-D"):
        atk(model, x[0])
    with pytest.raises(InputError, match="floating-point"):
        atk(model, (x * 255).to(torch.uint8))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        atk(model, x * 255)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        atk(model, x - 0.5)


def test_bad_labels(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    atk = PGD(eps=0.1, steps=1)
    with pytest.raises(ShapeError, match=rf"labels must have shape \({N},\)"):
        atk(model, x, y[:-1])
    with pytest.raises(InputError, match="integer tensor"):
        atk(model, x, y.float())
    with pytest.raises(InputError, match=r"labels must lie in \[0, 2\]"):
        atk(model, x, torch.full((N,), K))
    with pytest.raises(InputError, match=r"labels must lie in \[0, 2\]"):
        atk(model, x, torch.full((N,), -1))


def test_bad_configs() -> None:
    with pytest.raises(ConfigError, match="unknown attack 'autoattack'; available"):
        create_attack("autoattack")
    with pytest.raises(ConfigError, match="eps must be >= 0, got -0.1"):
        create_attack("pgd", eps=-0.1)
    for cls in (FGSM, BIM, PGD, MIM, CW, DeepFool):
        with pytest.raises(ConfigError, match="eps must be >= 0"):
            cls(eps=-1.0)
        with pytest.raises(ConfigError, match="eps must be >= 0"):
            cls(eps=float("nan"))
    with pytest.raises(ConfigError, match="steps must be a positive integer, got 0"):
        PGD(steps=0)
    with pytest.raises(ConfigError, match="binary_search_steps must be a positive integer"):
        CW(binary_search_steps=0)
    with pytest.raises(ConfigError, match="norm must be 'linf' or 'l2'"):
        PGD(norm="l1")
    with pytest.raises(ConfigError, match="bad arguments for attack 'pgd'"):
        create_attack("pgd", epsilon=0.1)


def test_unknown_loss_is_a_config_error(model: nn.Module, x: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="unknown attack loss 'hinge'"):
        PGD(loss="hinge")(model, x)  # type: ignore[arg-type]


def test_registry_and_params() -> None:
    names = list_attacks()
    assert names == sorted(names) == ATTACK_REGISTRY.list()
    assert {"bim", "cw", "deepfool", "fgsm", "mim", "pgd", "pgd_l2", "square"} <= set(names)
    with pytest.raises(ConfigError, match=r"unknown attack 'pgd_l3'; available: \['"):
        create_attack("pgd_l3")
    assert isinstance(create_attack("PGD"), PGD) and isinstance(create_attack("deepfool"), DeepFool)
    l2 = create_attack("pgd-l2", eps=0.5)
    assert l2.norm == "l2" and l2.eps == 0.5
    p = create_attack("pgd", eps=0.1, steps=40, seed=7).params()
    assert p["attack"] == "pgd" and p["norm"] == "linf" and p["eps"] == 0.1 and p["steps"] == 40 and p["seed"] == 7
    assert {"alpha", "random_start", "targeted", "loss"} <= set(p)
    assert CW().params()["norm"] == "l2" and DeepFool().params()["norm"] == "l2"


# --------------------------------------------------------------------------------------------- shipped guard
@pytest.mark.slow
def test_pgd40_breaks_the_shipped_guard() -> None:
    """The required small-sample check: PGD-40, Linf eps 0.1, 200 seeded Fashion-MNIST test images -> < 5%."""
    guard, _ = load_classifier(GUARD)
    test = load_fashion_mnist(FASHION_MNIST_DIR, "test").subset(200, seed=0)
    clean_acc = accuracy(guard, test.images, test.labels)
    x_adv = PGD(eps=0.1, steps=40, norm="linf", seed=0)(guard, test.images, test.labels)
    _assert_budget(x_adv, test.images, "linf", 0.1)
    adv_acc = accuracy(guard, x_adv, test.labels)
    assert clean_acc >= 0.85, f"guard clean accuracy on the sample is only {clean_acc:.3f}"
    assert adv_acc < 0.05, f"PGD-40 left the guard at {adv_acc:.3f} accuracy (clean {clean_acc:.3f})"


# --------------------------------------------------------------------------------------------- random sign noise
def test_random_sign_is_tiled_sign_noise_within_budget(x: torch.Tensor, y: torch.Tensor) -> None:
    """Every pixel moves by exactly +-eps (before clipping), constant within each tile; seeded; never calls the model."""
    calls = []

    def model(t: torch.Tensor) -> torch.Tensor:
        calls.append(len(t))
        return torch.zeros(len(t), K)

    x = 0.25 + 0.5 * x  # away from 0 and 1: no clipping
    for tiles, rows_equal, cols_equal in [(((0, 1),), True, False), (((1, 0),), False, True),
                                          (((4, 4),), False, False), (((1, 1),), False, False)]:
        out = RandomSign(eps=0.1, tiles=tiles, seed=3)(model, x, y)
        d = (out - x).sign()
        assert torch.allclose((out - x).abs(), torch.full_like(x, 0.1), atol=1e-6)
        assert bool((d[:, :, 1:, :] == d[:, :, :1, :]).all()) == rows_equal  # vertical stripes: rows repeat
        assert bool((d[:, :, :, 1:] == d[:, :, :, :1]).all()) == cols_equal
        if tiles == ((4, 4),):
            assert bool((d[:, :, :4, :4] == d[:, :, :1, :1]).all()) and not bool((d == d[:, :, :1, :1]).all())
        assert torch.equal(out, RandomSign(eps=0.1, tiles=tiles, seed=3)(model, x, y))
        assert not torch.equal(out, RandomSign(eps=0.1, tiles=tiles, seed=4)(model, x, y))
    assert calls == [1] * len(calls)  # only the class-count probe of the base class, never a forward of the batch
    edge = RandomSign(eps=0.3, seed=0)(model, torch.zeros(2, 1, 8, 8))
    assert float(edge.min()) == 0.0 and float(edge.max()) <= 0.3 + 1e-6
    assert isinstance(create_attack("random-sign", eps=0.05), RandomSign)
    with pytest.raises(ConfigError, match="tiles"):
        RandomSign(tiles=((1, -1),))
    with pytest.raises(ConfigError, match="tiles"):
        RandomSign(tiles=())
