"""Evasion attacks in pixel space [0, 1]: gradient-based FGSM, BIM, PGD (Linf/L2), MIM, CW-L2, DeepFool, APGD-CE /
APGD-DLR (AutoAttack's gradient attacks, with restarts and EOT), the score-based (black-box, gradient-free) Square
attack, and RandomSign: tiled +-eps sign noise, what random-search attacks start from (it never reads the model).

Every attack is a configured callable with one shape, ``x_adv = attack(model, x, y)``:

    >>> atk = PGD(eps=0.1, steps=40, seed=0)
    >>> x_adv = atk(model, x, y)        # (N, C, H, W) in [0, 1], ||x_adv - x||_inf <= 0.1

``model`` is any callable from [0, 1] images to logits (a classifier, or a whole defended pipeline for adaptive
attacks). ``y=None`` attacks the model's own predictions; ``targeted=True`` reads ``y`` as target labels. Attacks run
on the device of ``x``, put ``nn.Module`` models in eval mode (restored afterwards), never accumulate parameter
gradients, and work when called inside ``torch.no_grad()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trn.errors import ConfigError
from trn.registry import Registry
from trn.validation import check_images, check_labels

__all__ = [
    "APGD",
    "ATTACKS",
    "BIM",
    "CW",
    "FGSM",
    "MIM",
    "PGD",
    "Attack",
    "DeepFool",
    "RandomSign",
    "Square",
    "create_attack",
    "eot_input_gradient",
    "input_gradient",
    "list_attacks",
    "per_sample_loss",
    "project",
]

Model = Callable[[torch.Tensor], torch.Tensor]
_TINY = 1e-12


def _flat_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    """Per-sample p-norm, shaped (B, 1, 1, 1) for broadcasting."""
    return t.flatten(1).norm(p=p, dim=1).clamp_min(_TINY).view(-1, 1, 1, 1)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project ``x_adv`` onto the ``norm`` ball of radius ``eps`` around ``x`` intersected with [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norm(delta, 2)).clamp(max=1.0)
    # Clamping to [0, 1] can only shrink |delta| per pixel, so the result stays inside the ball.
    return (x + delta).clamp(0.0, 1.0)


def input_gradient(model: Model, x: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d x, logits) for a batch, without touching parameter gradients."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    if loss == "ce":
        value = F.cross_entropy(logits, y, reduction="sum")
    elif loss == "cw":  # margin loss: max_{j != y} z_j - z_y
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
        value = (other - z_y).sum()
    else:
        raise ConfigError(f"unknown attack loss {loss!r}; use 'ce' or 'cw'")
    (grad,) = torch.autograd.grad(value, x)
    return grad, logits.detach()


@dataclass
class Attack:
    """Base: config fields, input checks, eval-mode handling. Subclasses implement :meth:`perturb`."""

    eps: float = 0.1
    targeted: bool = False
    seed: int | None = 0

    name = "attack"
    norm: Literal["linf", "l2"] = "linf"

    def __post_init__(self) -> None:
        if not self.eps >= 0 or self.eps != self.eps:
            raise ConfigError(f"{type(self).__name__}: eps must be >= 0, got {self.eps}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("steps", "max_iter", "binary_search_steps", "eot_iter") and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{type(self).__name__}: {f.name} must be a positive integer, got {v!r}")

    def params(self) -> dict:
        """The attack's settings, for metadata."""
        return {"attack": self.name, "norm": self.norm, **dataclasses.asdict(self)}

    def _generator(self, device: torch.device) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator(device).manual_seed(self.seed)

    def __call__(self, model: Model, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_images(x, allow_empty=True, name="x")
        if len(x) == 0:
            return x.clone()
        modules = [m for m in (model,) if isinstance(m, nn.Module)]
        # every submodule's own mode, so that e.g. a frozen BatchNorm inside a training model stays in eval mode
        modes = [(sub, sub.training) for m in modules for sub in m.modules()]
        for m in modules:
            m.eval()
        try:
            with torch.enable_grad():
                if y is None:
                    if self.targeted:
                        raise ConfigError(f"{type(self).__name__}: targeted attacks need target labels y")
                    with torch.no_grad():
                        logits = model(x)
                    y, num_classes = logits.argmax(1), logits.shape[1]
                else:
                    with torch.no_grad():  # one image, to learn the class count for the label check
                        num_classes = model(x[:1]).shape[1]
                check_labels(y, len(x), num_classes)  # out-of-range labels would be a device-side assert on CUDA
                y = y.to(device=x.device, dtype=torch.long)  # cross_entropy and gather need int64
                x_adv = self.perturb(model, x.detach(), y)
        finally:
            for sub, mode in modes:
                sub.train(mode)
        return x_adv.detach()

    def perturb(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _ascent_sign(self) -> float:
        """+1 to increase the loss of y (untargeted), -1 to decrease it (targeted towards y)."""
        return -1.0 if self.targeted else 1.0


@dataclass
class PGD(Attack):
    """Projected Gradient Descent (Madry et al. 2018), Linf or L2, with a uniform random start.

    ``alpha`` defaults to 2.5 * eps / steps (Madry's rule of thumb). Linf steps use the gradient sign, L2 steps the
    L2-normalised gradient.
    """

    steps: int = 10
    alpha: float | None = None
    norm: Literal["linf", "l2"] = "linf"
    random_start: bool = True
    loss: Literal["ce", "cw"] = "ce"
    eot_iter: int = 1          # > 1: average each gradient over that many passes (EOT, for random models)

    name = "pgd"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm not in ("linf", "l2"):
            raise ConfigError(f"{type(self).__name__}: norm must be 'linf' or 'l2', got {self.norm!r}")

    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        if not self.random_start or self.eps == 0:
            return x.clone()
        g = self._generator(x.device)
        if self.norm == "linf":
            noise = (torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype) * 2 - 1) * self.eps
        else:
            noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
            r = torch.rand((len(x), 1, 1, 1), generator=g, device=x.device, dtype=x.dtype)
            noise = noise / _flat_norm(noise, 2) * r * self.eps
        return project(x + noise, x, self.eps, self.norm)

    def _direction(self, grad: torch.Tensor, state: dict) -> torch.Tensor:
        return grad.sign() if self.norm == "linf" else grad / _flat_norm(grad, 2)

    def perturb(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv, alpha, state = self._start(x), self.step_size(), {}
        for _ in range(self.steps):
            if self.eot_iter == 1:
                grad, _ = input_gradient(model, x_adv, y, self.loss)
            else:
                grad = eot_input_gradient(model, x_adv, y, self.loss, self.eot_iter)[0]
            x_adv = project(x_adv + self._ascent_sign() * alpha * self._direction(grad, state), x, self.eps, self.norm)
        return x_adv


@dataclass
class BIM(PGD):
    """Basic Iterative Method (Kurakin et al. 2017): PGD without the random start."""

    random_start: bool = False
    name = "bim"


@dataclass
class FGSM(PGD):
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one step of size eps, no random start."""

    steps: int = 1
    random_start: bool = False
    name = "fgsm"

    def step_size(self) -> float:
        return self.eps


@dataclass
class MIM(PGD):
    """Momentum Iterative Method (Dong et al. 2018): accumulates L1-normalised gradients with ``decay``."""

    decay: float = 1.0
    random_start: bool = False
    name = "mim"

    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else self.eps / self.steps

    def _direction(self, grad: torch.Tensor, state: dict) -> torch.Tensor:
        g = grad / grad.abs().flatten(1).mean(1).clamp_min(_TINY).view(-1, 1, 1, 1)
        state["m"] = self.decay * state.get("m", torch.zeros_like(g)) + g
        return super()._direction(state["m"], state)


@dataclass
class CW(Attack):
    """Carlini-Wagner L2 (2017): Adam on tanh-space variables minimising ||delta||_2^2 + c * margin loss.

    ``eps`` here is an optional hard L2 budget (0 = unbounded, the classic minimal-perturbation attack); with a
    budget, the best adversarial found inside the ball is returned, else the last iterate projected onto it. Binary
    search over ``c`` runs ``binary_search_steps`` rounds of ``steps`` Adam steps.
    """

    eps: float = 0.0
    c: float = 1.0
    kappa: float = 0.0
    steps: int = 100
    lr: float = 0.01
    binary_search_steps: int = 1
    norm: Literal["linf", "l2"] = "l2"
    name = "cw"

    def perturb(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = len(x)
        c = torch.full((b,), self.c, device=x.device)
        lo, hi = torch.zeros_like(c), torch.full_like(c, 1e10)
        best_l2 = torch.full((b,), float("inf"), device=x.device)
        best = x.clone()
        w0 = torch.atanh((x * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        onehot = F.one_hot(y, num_classes=model(x[:1]).shape[1]).bool()
        for _ in range(self.binary_search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=self.lr)
            success = torch.zeros(b, dtype=torch.bool, device=x.device)
            for _ in range(self.steps):
                x_adv = (torch.tanh(w) + 1) / 2
                logits = model(x_adv)
                z_y = logits.masked_fill(~onehot, float("-inf")).amax(1)
                z_o = logits.masked_fill(onehot, float("-inf")).amax(1)
                margin = (z_o - z_y) if self.targeted else (z_y - z_o)   # want <= -kappa
                f = margin.clamp(min=-self.kappa)
                l2 = (x_adv - x).flatten(1).pow(2).sum(1)
                loss = (l2 + c * f).sum()
                opt.zero_grad()
                (gw,) = torch.autograd.grad(loss, w)
                w.grad = gw
                opt.step()
                with torch.no_grad():
                    ok = margin < 0 if self.kappa == 0 else margin <= -self.kappa
                    d = l2.sqrt()
                    if self.eps > 0:
                        ok &= d <= self.eps
                    improve = ok & (d < best_l2)
                    best_l2 = torch.where(improve, d, best_l2)
                    best[improve] = x_adv.detach()[improve]
                    success |= ok
            with torch.no_grad():  # binary search on c: smaller on success, larger on failure
                hi = torch.where(success, torch.minimum(hi, c), hi)
                lo = torch.where(success, lo, torch.maximum(lo, c))
                c = torch.where(hi < 1e9, (lo + hi) / 2, c * 10)
        with torch.no_grad():
            failed = torch.isinf(best_l2)
            if failed.any():  # no adversarial found: return the last iterate (inside the budget)
                last = (torch.tanh(w) + 1) / 2
                best[failed] = last.detach()[failed]
            if self.eps > 0:
                best = project(best, x, self.eps, "l2")
        return best


@dataclass
class DeepFool(Attack):
    """DeepFool (Moosavi-Dezfooli et al. 2016), L2: step to the nearest linearised decision boundary, overshoot.

    Untargeted only. ``eps`` is an optional hard L2 budget (0 = unbounded). All classes are candidates
    (``num_candidates`` limits that to the top-k logits for many-class models).
    """

    eps: float = 0.0
    steps: int = 50
    overshoot: float = 0.02
    num_candidates: int = 10
    norm: Literal["linf", "l2"] = "l2"
    name = "deepfool"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targeted:
            raise ConfigError("DeepFool is untargeted only")

    def perturb(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r_tot = torch.zeros_like(x)
        active = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.steps):
            idx = active.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            xa = (x[idx] + (1 + self.overshoot) * r_tot[idx]).clamp(0, 1).requires_grad_(True)
            logits = model(xa)
            still = logits.argmax(1) == y[idx]
            active[idx[~still]] = False
            if not still.any():
                break
            k = min(self.num_candidates, logits.shape[1])
            cand = logits.topk(k, dim=1).indices  # (B, k)
            cand = torch.where(cand[:, :1] == y[idx, None], cand, torch.cat([y[idx, None], cand[:, :-1]], 1))
            grads = []
            for j in range(k):  # one backward per candidate class: (B, k, C, H, W)
                sel = logits.gather(1, cand[:, j : j + 1]).sum()
                (g,) = torch.autograd.grad(sel, xa, retain_graph=j < k - 1)
                grads.append(g)
            grads = torch.stack(grads, 1)
            z = logits.gather(1, cand).detach()
            w = grads[:, 1:] - grads[:, :1]                       # (B, k-1, C, H, W)
            f = z[:, 1:] - z[:, :1]                               # (B, k-1)
            wn = w.flatten(2).norm(dim=2).clamp_min(_TINY)        # (B, k-1)
            dist = f.abs() / wn
            best = dist.argmin(1)
            w_best = w[torch.arange(len(idx)), best]
            r = (dist.gather(1, best[:, None]).squeeze(1) + 1e-4) / wn.gather(1, best[:, None]).squeeze(1)
            r_i = r.view(-1, 1, 1, 1) * w_best
            upd = idx[still]
            r_tot[upd] = r_tot[upd] + r_i[still].detach()
        x_adv = (x + (1 + self.overshoot) * r_tot).clamp(0, 1)
        return project(x_adv, x, self.eps, "l2") if self.eps > 0 else x_adv


@dataclass
class RandomSign(Attack):
    """Random +-eps sign noise in tiles: the perturbations random-search attacks start from and try (Linf, no model).

    Each image gets a tile size drawn from ``tiles`` (rows x cols; 1 x 1 is per-pixel noise, H x 1 Square's vertical
    stripes, 1 x W horizontal ones, 4 x 4 blocks) and an independent uniform +-1 sign per tile and channel:
    ``x + eps * sign`` clipped to [0, 1]. It never reads the model, so it is not an attack in the gradient sense; it
    trains and checks a restorer against the first queries of Square-like attacks (which are exactly this), and
    against noise no classifier shaped. ``0`` in a tile size stands for the full side.

    Shape:
        x (B, C, H, W) -> (B, C, H, W)

    Example:
        >>> x_noisy = RandomSign(eps=0.1, seed=0)(model, x)   # ||x_noisy - x||_inf <= 0.1
    """

    eps: float = 0.1
    tiles: tuple[tuple[int, int], ...] = ((1, 1), (0, 1), (1, 0), (2, 2), (4, 4), (7, 7))
    name = "random_sign"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.tiles = tuple(tuple(t) for t in self.tiles)
        if not self.tiles or any(len(t) != 2 or min(t) < 0 for t in self.tiles):
            raise ConfigError(f"RandomSign: tiles must be non-empty (rows, cols) pairs >= 0, got {self.tiles!r}")

    @torch.no_grad()
    def perturb(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        gen, dev = self._generator(x.device), x.device
        pick = torch.randint(0, len(self.tiles), (b,), generator=gen, device=dev).tolist()
        delta = torch.empty_like(x)
        for i, k in enumerate(pick):
            th, tw = (self.tiles[k][0] or h), (self.tiles[k][1] or w)
            sign = torch.randint(0, 2, (c, -(-h // th), -(-w // tw)), generator=gen, device=dev).to(x.dtype) * 2 - 1
            delta[i] = sign.repeat_interleave(th, 1).repeat_interleave(tw, 2)[:, :h, :w]  # (C, H, W)
        return (x + self.eps * delta).clamp(0.0, 1.0)


def _square_p(p_init: float, it: int, queries: int) -> float:
    """Square's schedule for the fraction of pixels a square covers, rescaled from 10,000 queries to ``queries``."""
    it = int(it / max(queries, 1) * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256), (10000, 512)):
        if it <= bound:
            return p_init / div
    return p_init / 512


@dataclass
class Square(Attack):
    """Square Attack (Andriushchenko et al., ECCV 2020), Linf: a score-based black-box attack.

    It never takes a gradient: it only reads the model's logits, so gradient masking (GCM, non-differentiable
    transforms) does not stop it, while randomised outputs (UniG) can. Random search: start from vertical stripes of
    +-eps, then per query change one random square window (side set by a schedule that shrinks with the query
    count) to +-eps per channel and keep it if the margin loss ``z_y - max_{j != y} z_j`` went down. An image stops
    being queried once it is misclassified (margin < 0), so its query count is the number of model calls it needed.

    ``queries`` counts every model call per image, the initial one included. ``p_init`` is the starting fraction of
    pixels a square covers (the paper's ImageNet/CIFAR Linf default is 0.05; our config for 28x28 grey images may
    raise it). After a call, :attr:`last_queries` holds the per-image query counts of that call (CPU tensor).

    Example:
        >>> x_adv = Square(eps=0.1, queries=1000, seed=0)(model, x, y)
    """

    eps: float = 0.1
    queries: int = 1000
    p_init: float = 0.05
    norm: Literal["linf", "l2"] = "linf"
    name = "square"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.queries, bool) or not isinstance(self.queries, int) or self.queries < 1:
            raise ConfigError(f"Square: queries must be a positive integer, got {self.queries!r}")
        if not 0 < self.p_init <= 1:
            raise ConfigError(f"Square: p_init must be in (0, 1], got {self.p_init}")
        if self.norm != "linf":
            raise ConfigError("Square: only the Linf version is implemented")
        self.last_queries: torch.Tensor | None = None

    def _margin(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) margin; < 0 means success (misclassified, or classified as the target when targeted)."""
        logits = model(x)
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
        return other - z_y if self.targeted else z_y - other

    @torch.no_grad()
    def perturb(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        gen, dev, eps = self._generator(x.device), x.device, self.eps

        def signs(*shape: int) -> torch.Tensor:  # uniform +-1
            return torch.randint(0, 2, shape, generator=gen, device=dev).to(x.dtype) * 2 - 1

        x_best = (x + eps * signs(b, c, 1, w)).clamp(0.0, 1.0)  # vertical stripes
        margin = self._margin(model, x_best, y)
        n_queries = torch.ones(b, dtype=torch.long, device=dev)
        rows = torch.arange(h, device=dev).view(1, 1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, 1, w)
        for it in range(self.queries - 1):
            active = (margin >= 0).nonzero().squeeze(1)  # (A,)
            if len(active) == 0:
                break
            xa, xb = x[active], x_best[active]
            delta = xb - xa
            s = round((_square_p(self.p_init, it, self.queries) * h * w) ** 0.5)
            s = min(max(s, 1), min(h, w) - 1)
            todo = torch.ones(len(active), dtype=torch.bool, device=dev)
            for _ in range(10):  # redraw windows that would not change the image (at most a few times)
                idx = todo.nonzero().squeeze(1)
                r0 = torch.randint(0, h - s + 1, (len(idx), 1, 1, 1), generator=gen, device=dev)
                c0 = torch.randint(0, w - s + 1, (len(idx), 1, 1, 1), generator=gen, device=dev)
                win = (rows >= r0) & (rows < r0 + s) & (cols >= c0) & (cols < c0 + s)  # (k, 1, H, W)
                new = torch.where(win, eps * signs(len(idx), c, 1, 1), delta[idx])
                changed = ((xa[idx] + new).clamp(0, 1) - xb[idx]).abs().amax((1, 2, 3)) > 1e-7
                delta[idx] = new
                todo[idx] = ~changed
                if not todo.any():
                    break
            x_new = (xa + delta).clamp(0.0, 1.0)
            m_new = self._margin(model, x_new, y[active])
            n_queries[active] += 1
            better = m_new < margin[active]
            x_best[active[better]] = x_new[better]
            margin[active[better]] = m_new[better]
        self.last_queries = n_queries.cpu()
        return project(x_best, x, eps, "linf")


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """(B,) attack loss per image: ``ce`` (cross-entropy), ``cw`` (margin ``max_{j != y} z_j - z_y``) or ``dlr``.

    DLR (Croce & Hein 2020) is ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)`` with ``z_pi`` the sorted logits:
    invariant to shifting and rescaling the logits, so a defence cannot hide behind their scale. Needs >= 3 classes.
    """
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    if loss == "cw":
        return other - z_y
    if loss == "dlr":
        if logits.shape[1] < 3:
            raise ConfigError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
        top = logits.sort(dim=1, descending=True).values
        return -(z_y - other) / (top[:, 0] - top[:, 2] + 1e-12)
    raise ConfigError(f"unknown attack loss {loss!r}; use 'ce', 'cw' or 'dlr'")


def eot_input_gradient(model: Model, x: torch.Tensor, y: torch.Tensor, loss: str = "ce",
                       eot_iter: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expectation over Transformation (Athalye et al. 2018): input gradient averaged over ``eot_iter`` passes.

    For a model with randomness (noise, random transforms) every pass draws new randomness, so the mean gradient
    estimates ``E[d loss / d x]``; for a deterministic model ``eot_iter=1`` is the plain gradient.

    Returns:
        (gradient (B, C, H, W), logits (B, K), per-image loss (B,)), each averaged over the passes, detached.
    """
    grad = torch.zeros_like(x)
    logits_sum: torch.Tensor | None = None
    loss_sum = torch.zeros(len(x), device=x.device, dtype=x.dtype)
    for _ in range(eot_iter):
        xg = x.detach().requires_grad_(True)
        logits = model(xg)
        values = per_sample_loss(logits, y, loss)
        (g,) = torch.autograd.grad(values.sum(), xg)
        grad += g
        loss_sum += values.detach()
        logits_sum = logits.detach() if logits_sum is None else logits_sum + logits.detach()
    return grad / eot_iter, logits_sum / eot_iter, loss_sum / eot_iter


@dataclass
class APGD(Attack):
    """Auto-PGD (Croce & Hein, ICML 2020), Linf or L2: the gradient component of AutoAttack.

    PGD without a step size to tune: the step starts at ``2 * eps`` and is halved at checkpoints (after 22 %, then
    progressively shorter stretches of the ``steps``) where the loss went up in fewer than ``rho`` of the steps since
    the last checkpoint, or neither the step nor the best loss changed; after a halving the search restarts from the
    best point found. Steps use momentum ``momentum`` (0.75, the paper's alpha) over the previous update. Per image,
    the best (highest-loss) point is kept and the first misclassified one returned. ``restarts`` runs again, from a
    new random start, on the images still classified correctly. ``loss``: ``ce`` (APGD-CE) or ``dlr`` (APGD-DLR).
    ``eot_iter > 1`` averages each gradient over that many passes (EOT, for models with randomness).

    Example:
        >>> x_adv = APGD(eps=0.1, steps=100, loss="dlr", restarts=3)(model, x, y)
    """

    steps: int = 100
    restarts: int = 1
    loss: Literal["ce", "dlr", "cw"] = "ce"
    eot_iter: int = 1
    rho: float = 0.75
    momentum: float = 0.75
    norm: Literal["linf", "l2"] = "linf"
    name = "apgd"

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in ("restarts", "eot_iter"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"APGD: {f} must be a positive integer, got {v!r}")
        if self.norm not in ("linf", "l2"):
            raise ConfigError(f"APGD: norm must be 'linf' or 'l2', got {self.norm!r}")
        if self.loss not in ("ce", "dlr", "cw"):
            raise ConfigError(f"APGD: loss must be 'ce', 'dlr' or 'cw', got {self.loss!r}")
        if self.targeted:
            raise ConfigError("APGD: only the untargeted version is implemented")

    def _start(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        if self.norm == "linf":
            t = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1
            return project(x + self.eps * t, x, self.eps, "linf")
        t = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        return project(x + self.eps * t / _flat_norm(t, 2), x, self.eps, "l2")

    def _step(self, x_adv: torch.Tensor, grad: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        d = grad.sign() if self.norm == "linf" else grad / _flat_norm(grad, 2)
        return x_adv + size * d

    def _run(self, model: Model, x: torch.Tensor, y: torch.Tensor,
             gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One APGD run: (images to return, still-correct mask)."""
        n_iter = self.steps
        k = max(int(0.22 * n_iter), 1)           # first checkpoint
        k_min, k_decr = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
        x_adv = self._start(x, gen)
        grad, logits, loss = eot_input_gradient(model, x_adv, y, self.loss, self.eot_iter)
        correct = logits.argmax(1) == y
        x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
        x_out = x_adv.clone()                    # first misclassified point, else the best one
        size = torch.full((len(x), 1, 1, 1), 2.0 * self.eps, device=x.device, dtype=x.dtype)
        x_old = x_adv.clone()
        losses = [loss]                          # per-step losses since the start (for the oscillation check)
        loss_best_check, reduced_check = loss_best.clone(), torch.ones_like(correct)
        since_check = 0
        for i in range(n_iter):
            with torch.no_grad():
                a = self.momentum if i > 0 else 1.0
                z = project(self._step(x_adv, grad, size), x, self.eps, self.norm)
                z = project(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_old), x, self.eps, self.norm)
                x_old, x_adv = x_adv, z
            grad, logits, loss = eot_input_gradient(model, x_adv, y, self.loss, self.eot_iter)
            with torch.no_grad():
                wrong = (logits.argmax(1) != y) & correct
                x_out[wrong] = x_adv[wrong]
                correct &= ~wrong
                up = loss > loss_best
                x_best[up], grad_best[up], loss_best[up] = x_adv[up], grad[up], loss[up]
                losses.append(loss)
                since_check += 1
                if since_check == k:  # checkpoint: halve the step where progress stalled
                    recent = torch.stack(losses[-k - 1:])                       # (k + 1, B)
                    increases = (recent[1:] > recent[:-1]).float().sum(0)
                    osc = increases <= k * self.rho
                    stalled = ~reduced_check & (loss_best_check >= loss_best)
                    halve = osc | stalled
                    reduced_check, loss_best_check = halve.clone(), loss_best.clone()
                    if halve.any():
                        size[halve] /= 2.0
                        x_adv[halve], grad[halve] = x_best[halve], grad_best[halve]
                    k, since_check = max(k - k_decr, k_min), 0
        x_out[correct] = x_best[correct]
        return x_out, correct

    def perturb(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gen = self._generator(x.device)
        x_adv = x.clone()
        todo = torch.arange(len(x), device=x.device)
        for _ in range(self.restarts):
            if len(todo) == 0:
                break
            out, still = self._run(model, x[todo], y[todo], gen)
            x_adv[todo] = out
            todo = todo[still]
        return x_adv


_REGISTRY: dict[str, Callable[..., Attack]] = {
    "fgsm": FGSM,
    "bim": BIM,
    "pgd": PGD,
    "pgd_l2": lambda **kw: PGD(**{"norm": "l2", **kw}),
    "mim": MIM,
    "cw": CW,
    "deepfool": DeepFool,
    "square": Square,
    "random_sign": RandomSign,
    "apgd": APGD,
    "apgd_ce": lambda **kw: APGD(**{"loss": "ce", **kw}),
    "apgd_dlr": lambda **kw: APGD(**{"loss": "dlr", **kw}),
}


ATTACKS: Registry[Attack] = Registry("attack")  # names are case-insensitive, '-' reads as '_' ('PGD-L2' = 'pgd_l2')
ATTACKS.update(_REGISTRY)


def list_attacks() -> list[str]:
    """Names :func:`create_attack` accepts (the :data:`ATTACKS` registry)."""
    return ATTACKS.list()


def create_attack(name: str, **kwargs) -> Attack:
    """Build an attack by name (see :func:`list_attacks`); unknown names and bad arguments raise :class:`ConfigError`.

    Example:
        >>> atk = create_attack("pgd", eps=0.1, steps=40)
    """
    return ATTACKS.create(name, **kwargs)
