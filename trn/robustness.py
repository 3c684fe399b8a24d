"""How robust is this pipeline: the one harness every robustness report builds on.

``trn eval`` (:mod:`trn.evaluate`), ``trn eval-defenses`` (:mod:`trn.evaluate_defenses`) and ``trn eval-adaptive``
(:func:`run_adaptive_evaluation`, this module) all use it:

* **gray-box images** (:func:`gray_box_images`): attacks crafted on the guard alone, cached on disk under a key made
  of the *content* (a hash of the images and labels), the dataset's identity, the guard's digest and the attack's
  settings; a cached file is used only if it has the images' shape and lies inside the attack's Linf/L2 budget around
  them, otherwise it is recomputed.
* **white-box variants** (:func:`whitebox_correct`) of any defended model (a :class:`~trn.defenses.stack.DefenseStack`:
  a restorer in front of a classifier, input transforms, classifier wrappers, or a bare classifier), set up by one
  context manager, :func:`attack_view`, that saves and restores every mode it touches (train/eval, BPDA flags,
  held gradient maps):

  - ``naive``: autograd through the model as built (what a careless evaluation reports);
  - ``e2e``: end to end, the TRN's gradient-map estimation differentiated with ``create_graph=True``, BPDA only where a
    stage's gradient is useless (bit depth, GCM);
  - ``gconst``: ``e2e`` with each TRN's gradient map recomputed at every step but held constant in the backward pass;
  - ``bpda``: every input-side stage as the identity in the backward pass (Athalye et al. 2018);
  - ``smooth``: ``e2e`` with each TRN's gradient map differentiated through a smooth surrogate of the guard (its ReLUs
    as softplus, :func:`smooth_surrogate`), the exact map kept in the forward pass. A ReLU guard's input gradient is
    piecewise constant in the input, so ``e2e`` sees almost no second-order signal and ``gconst`` none: this view
    lets the attacker follow how the map moves (BPDA with a differentiable approximation, for the map only).

  Randomness anywhere in the model (a module that says ``randomized = True``, or two forward passes that differ) turns
  on EOT: every gradient is averaged over ``eot_iter`` passes (:func:`trn.attacks.eot_input_gradient`).
* **worst case per image** (:func:`worst_case`): an image counts as robust only if every attack failed on it.
* **gradient-masking sanity checks** (Carlini et al. 2019, "On Evaluating Adversarial Robustness"):
  :func:`check_large_eps`, :func:`check_more_steps`, :func:`check_whitebox_vs_blackbox`, :func:`check_transfer`.
* **the strong adaptive evaluation** (:class:`AdaptiveEvalConfig`, :func:`run_adaptive_evaluation`): APGD-CE and
  APGD-DLR with restarts, PGD end to end / map held constant / BPDA, EOT, Square with thousands of queries, the
  per-image worst case and the sanity checks, for every row (a restorer in front of the frozen guard, or a plain
  classifier such as an adversarially trained guard). Writes ``report.md``, ``report.json`` and ``adaptive.png``.

Example:
    >>> stack = defended_model(guard, restorer)                  # guard(restorer(x))
    >>> ok = whitebox_correct(stack, x, y, "gconst", APGD(eps=0.1, steps=100, loss="dlr"))
    >>> robust = worst_case({"gconst": ok, "e2e": whitebox_correct(stack, x, y, "e2e")})
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from trn.attacks import APGD, PGD, Attack, Square, create_attack
from trn.checkpoint import checkpoint_digest, checkpoint_paths
from trn.classifiers import load_classifier
from trn.config import from_dict, to_dict
from trn.defenses.base import bpda_policy, is_randomized
from trn.defenses.stack import DefenseStack, RestorerStage, build_defense_stack, parse_defense_spec
from trn.errors import ConfigError
from trn.utils import batches, pick_device, seed_everything

__all__ = [
    "VARIANTS",
    "AdaptiveEvalConfig",
    "AdaptiveReport",
    "DefenseRow",
    "Pipeline",
    "SanityCheck",
    "accuracy",
    "attack_view",
    "bpda",
    "build_rows",
    "check_large_eps",
    "check_more_steps",
    "check_transfer",
    "check_whitebox_vs_blackbox",
    "content_digest",
    "correct_mask",
    "defended_model",
    "gray_box_images",
    "holding_maps",
    "looks_random",
    "make_attack",
    "model_modes",
    "run_adaptive_evaluation",
    "smooth_surrogate",
    "square_correct",
    "variants_for",
    "whitebox_correct",
    "worst_case",
]
log = logging.getLogger(__name__)

VARIANTS = ("naive", "e2e", "gconst", "bpda", "smooth")
_POLICY = {"naive": "as_built", "e2e": "nondifferentiable", "gconst": "nondifferentiable", "bpda": "all",
           "smooth": "nondifferentiable"}
SMOOTH_BETA = 30.0  # softplus sharpness of the ``smooth`` view's surrogate guard (chosen by a sweep: docs/design.md)


def smooth_surrogate(model: nn.Module, beta: float = SMOOTH_BETA) -> nn.Module:
    """A copy of ``model`` with every ``nn.ReLU`` replaced by ``nn.Softplus(beta)`` (same weights, frozen, eval mode).

    Softplus is ReLU's smooth version (it tends to ReLU as ``beta`` grows): the copy's input gradient moves smoothly
    with the input, so its map can be differentiated. Functional ``F.relu`` calls are not replaced.
    """
    copy = deepcopy(model).eval()
    for m in list(copy.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(m, child_name, nn.Softplus(beta=beta))
    for p in copy.parameters():
        p.requires_grad_(False)
    return copy


# ----------------------------------------------------------------------------------------------- model modes
@contextmanager
def model_modes(model: Any, *, eval_mode: bool = True, policy: str = "as_built",
                hold_map: bool = False, smooth_map: bool = False) -> Iterator[Any]:
    """Temporarily set every mode an attack depends on; everything is restored on exit, even after an error.

    Args:
        model: any callable; when it is an ``nn.Module`` its submodules are switched.
        eval_mode: put every submodule in eval mode (each submodule's own mode is restored afterwards, so a frozen
            BatchNorm inside a training model stays frozen).
        policy: BPDA policy of :func:`trn.defenses.base.bpda_policy` (``as_built``, ``nondifferentiable``, ``all``).
        hold_map: hold every TRN stage's gradient map constant in the backward pass.
        smooth_map: differentiate every TRN stage's gradient map through a smooth surrogate of its guard.

    Example:
        >>> with model_modes(stack, policy="all"):     # the whole input side as the identity backward
        ...     x_adv = PGD(eps=0.1)(stack, x, y)
    """
    if not isinstance(model, nn.Module):
        yield model
        return
    modes = [(m, m.training) for m in model.modules()]
    stages = [m for m in model.modules() if isinstance(m, RestorerStage)] if hold_map or smooth_map else []
    held = [(m.hold_map, m.map_surrogate) for m in stages]
    try:
        if eval_mode:
            model.eval()
        for m in stages:
            if hold_map:
                m.hold_map = True
            if smooth_map and m.has_map:
                m.map_surrogate = smooth_surrogate(m.restorer.guard)
        with bpda_policy(model, policy):  # type: ignore[arg-type]
            yield model
    finally:
        for m, (h, surrogate) in zip(stages, held, strict=True):
            m.hold_map, m.map_surrogate = h, surrogate
        for m, training in modes:
            m.train(training)


@contextmanager
def holding_maps(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Temporarily hold the gradient map of every TRN stage of ``model`` constant (a no-op when ``on`` is False)."""
    with model_modes(model, eval_mode=False, hold_map=on):
        yield


@contextmanager
def attack_view(model: Any, variant: str) -> Iterator[Any]:
    """The model as the white-box ``variant`` differentiates it (see the module docstring), restored on exit."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown white-box variant {variant!r}; choose from {list(VARIANTS)}")
    with model_modes(model, policy=_POLICY[variant], hold_map=variant == "gconst",
                     smooth_map=variant == "smooth") as m:
        yield m


class Pipeline(nn.Module):
    """``classifier(preprocess(x))``: a defended model an attacker can differentiate end to end."""

    def __init__(self, classifier: nn.Module, preprocess: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.classifier, self.preprocess = classifier, preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.preprocess(x))


def bpda(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Backward Pass Differentiable Approximation: ``fn`` forward, identity backward (Athalye et al. 2018)."""

    def wrapped(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = fn(x.detach())
        return x + (y - x).detach()

    return wrapped


def defended_model(classifier: nn.Module, restorer: nn.Module | None = None,
                   spec: Sequence[Any] | None = None) -> DefenseStack:
    """``classifier(restorer(x))`` (or the bare classifier, or any defence ``spec``) as a :class:`DefenseStack`."""
    if spec is None:
        spec = ["trn"] if restorer is not None else []
    return build_defense_stack(list(spec), classifier, restorer=restorer).eval()


def looks_random(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> bool:
    """Whether ``model`` is random: a module says so (``randomized = True``) or two passes on ``x`` differ."""
    if isinstance(model, nn.Module) and is_randomized(model):
        return True
    with torch.no_grad(), model_modes(model):
        return not torch.equal(model(x), model(x))


def variants_for(model: nn.Module, naive: bool = True) -> list[str]:
    """The white-box variants that differ for this model (``e2e`` always)."""
    out = []
    stages = [m for m in model.modules() if isinstance(getattr(m, "bpda", None), bool)]
    masked = not all(getattr(m, "differentiable", True) for m in stages)
    if naive and (masked or is_randomized(model)):
        out.append("naive")
    out.append("e2e")
    if any(isinstance(m, RestorerStage) and m.has_map for m in model.modules()):
        out += ["gconst", "smooth"]
    pre = getattr(model, "preprocessor", None)
    if pre is not None and any(getattr(s, "differentiable", True) for s in pre.stages):
        out.append("bpda")  # BPDA on the whole input side differs from e2e
    return out


# ----------------------------------------------------------------------------------------------- accuracy
@torch.no_grad()
def correct_mask(model: Callable, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
                 device: torch.device | str = "cpu", needs_labels: bool = False) -> torch.Tensor:
    """(N,) bool on the CPU: whether ``model`` classifies each image correctly (eval mode, restored after)."""
    out = []
    with model_modes(model):
        for s in batches(len(x), batch_size):
            xb, yb = x[s].to(device), y[s].to(device)
            logits = model(xb, yb) if needs_labels else model(xb)
            out.append((logits.argmax(1) == yb).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def accuracy(model: Callable, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
             device: torch.device | str = "cpu", needs_labels: bool = False) -> float:
    """Top-1 accuracy in [0, 1] (0.0 on no images)."""
    return correct_mask(model, x, y, batch_size, device, needs_labels).float().mean().nan_to_num(0.0).item()


def worst_case(masks: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image worst case: robust (True) only where every attack's correctness mask is True.

    Args:
        masks: (N,) bool masks, one per attack (a dict's values or a sequence).

    Returns:
        (N,) bool mask.

    Raises:
        ConfigError: no masks, or masks of different lengths.
    """
    values = list(masks.values()) if isinstance(masks, dict) else list(masks)
    if not values:
        raise ConfigError("worst_case needs at least one attack's results")
    if len({len(v) for v in values}) != 1:
        raise ConfigError(f"worst_case: masks cover different numbers of images: {[len(v) for v in values]}")
    return torch.stack([v.bool().cpu() for v in values]).all(0)


# ----------------------------------------------------------------------------------------------- gray-box cache
def content_digest(x: torch.Tensor, y: torch.Tensor | None = None) -> str:
    """SHA-256 of the images' (and labels') shapes and bytes: the cache key's notion of "the same images"."""
    h = hashlib.sha256()
    for t in (x, y):
        if t is None:
            continue
        t = t.detach().cpu().contiguous()
        h.update(json.dumps([str(t.dtype), list(t.shape)]).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def make_attack(name: str, eps: float, cfg: Any) -> Attack:
    """The reports' gray-box attack settings (fixed here so every report and row sees the same attack).

    ``cfg`` needs ``l2_per_linf`` (CW / DeepFool L2 budget = l2_per_linf x eps) and ``seed``.
    """
    l2 = cfg.l2_per_linf * eps
    settings = {
        "fgsm": {"eps": eps},
        "bim": {"eps": eps, "steps": 20},
        "pgd": {"eps": eps, "steps": 40},
        "mim": {"eps": eps, "steps": 20},
        "cw": {"eps": l2, "c": 5.0, "steps": 50, "lr": 0.05},
        "deepfool": {"eps": l2, "steps": 50, "overshoot": 0.02},
    }
    if name not in settings:
        raise ConfigError(f"unknown evaluation attack {name!r}; choose from {sorted(settings)}")
    return create_attack(name, seed=cfg.seed, **settings[name])


def _within_budget(x_adv: torch.Tensor, x: torch.Tensor, attack: Attack, tol: float = 1e-5) -> tuple[bool, float]:
    """(inside the attack's budget, largest distance) for cached images; an unbounded attack (eps 0) passes."""
    d = (x_adv - x).flatten(1)
    dist = d.abs().amax(1) if attack.norm == "linf" else d.norm(dim=1)
    worst = dist.max().item() if len(dist) else 0.0
    return (attack.eps == 0 or worst <= attack.eps + tol), worst


def gray_box_images(guard: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, *,
                    cache_dir: str | Path | None = None, guard_id: str = "", dataset_id: str = "",
                    batch_size: int = 500, device: torch.device | str = "cpu", desc: str = "") -> torch.Tensor:
    """Adversarial images crafted on ``guard`` alone (the gray-box threat), cached on disk when ``cache_dir`` is set.

    The cache key holds the content (:func:`content_digest` of ``x`` and ``y``), ``dataset_id``, ``guard_id`` (e.g. the
    guard checkpoint's digest) and ``attack.params()``. A cached file is used only when it was written for the same
    content digest, has the shape of ``x`` and lies inside the attack's budget around ``x`` (Linf or L2 ``eps``, with a
    1e-5 tolerance); otherwise it is recomputed and overwritten, with a warning.

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,) -> (N, C, H, W) on the CPU.
    """
    digest = content_digest(x, y)
    key = hashlib.sha256(json.dumps([guard_id, dataset_id, attack.params(), digest], sort_keys=True,
                                    default=str).encode()).hexdigest()
    path = Path(cache_dir) / f"{attack.name}_{attack.eps:g}_{len(x)}_{key[:16]}.safetensors" if cache_dir else None
    if path is not None and path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, x_adv = f.metadata() or {}, f.get_tensor("x_adv")
        except Exception as e:  # noqa: BLE001 - a corrupt cache file is recomputed, whatever the reader raised
            log.warning("unreadable gray-box cache %s (%s): recomputing", path, e)
        else:
            if meta.get("content") != digest or x_adv.shape != x.shape:
                log.warning("gray-box cache %s was written for other images: recomputing", path)
            else:
                ok, dist = _within_budget(x_adv, x.cpu(), attack)
                if ok:
                    return x_adv
                log.warning("gray-box cache %s lies %.4g (%s) from the images, beyond the budget %g: recomputing",
                            path, dist, attack.norm, attack.eps)
    out = []
    with model_modes(guard):
        for s in tqdm(list(batches(len(x), batch_size)), desc=desc or f"gray-box {attack.name} (n={len(x)})",
                      leave=False):
            out.append(attack(guard, x[s].to(device), y[s].to(device)).cpu())
    x_adv = torch.cat(out) if out else x.clone().cpu()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")  # write then rename: a killed run never leaves a truncated file
        save_file({"x_adv": x_adv.contiguous()}, str(tmp), metadata={"content": digest, "dataset": dataset_id,
                                                                     "guard": guard_id})
        tmp.replace(path)
    return x_adv


# ----------------------------------------------------------------------------------------------- white-box
def whitebox_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, variant: str = "e2e",
                     attack: Attack | None = None, *, eps: float = 0.1, steps: int = 40, alpha: float | None = None,
                     eot_samples: int = 8, batch_size: int = 250, seed: int = 0,
                     device: torch.device | str = "cpu", desc: str = "", randomized: bool | None = None,
                     evaluate: Callable | None = None) -> torch.Tensor:
    """Per-image correctness of ``model`` under a white-box attack run through the ``variant`` view.

    Args:
        model: the defended model (a :class:`DefenseStack`, or any ``nn.Module`` from [0, 1] images to logits).
        x, y: (N, C, H, W) images in [0, 1] and (N,) labels (any device; batches are moved to ``device``).
        variant: ``naive``, ``e2e``, ``gconst``, ``bpda`` or ``smooth`` (see the module docstring).
        attack: a gradient attack with an ``eot_iter`` field (PGD, APGD); default ``PGD(eps, steps, alpha, seed)``.
        eot_samples: EOT passes per gradient when the model is random (every variant but ``naive``).
        randomized: whether the model is random; None: :func:`looks_random` on the first batch.
        evaluate: what is scored on the adversarial images (default: ``model`` itself, as built).

    Returns:
        (N,) bool tensor on the CPU: True where the model still classifies the attacked image correctly.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"unknown white-box variant {variant!r}; choose from {list(VARIANTS)}")
    atk = attack if attack is not None else PGD(eps=eps, steps=steps, alpha=alpha, seed=seed)
    if len(x) and randomized is None:
        randomized = looks_random(model, x[: min(len(x), 8)].to(device))
    if randomized and variant != "naive" and hasattr(atk, "eot_iter"):
        atk = replace(atk, eot_iter=max(atk.eot_iter, eot_samples))
    scorer = evaluate or model
    out = []
    for s in tqdm(list(batches(len(x), batch_size)), desc=desc or f"white-box {variant}", leave=False):
        xb, yb = x[s].to(device), y[s].to(device)
        with attack_view(model, variant) as view:
            x_adv = atk(view, xb, yb)
        with torch.no_grad(), model_modes(scorer):
            out.append((scorer(x_adv).argmax(1) == yb).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def square_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, queries: int, p_init: float = 0.3,
                   seed: int = 0, batch_size: int = 250, device: torch.device | str = "cpu",
                   desc: str = "Square") -> dict:
    """Square (score-based, logits only) on ``x``: accuracy, per-image correctness and query counts."""
    atk = Square(eps=eps, queries=queries, p_init=p_init, seed=seed)
    clean, correct, used = [], [], []
    with model_modes(model):
        for s in tqdm(list(batches(len(x), batch_size)), desc=desc, leave=False):
            xb, yb = x[s].to(device), y[s].to(device)
            with torch.no_grad():
                clean.append((model(xb).argmax(1) == yb).cpu())
            x_adv = atk(model, xb, yb)
            used.append(atk.last_queries)
            with torch.no_grad():
                correct.append((model(x_adv).argmax(1) == yb).cpu())
    if not correct:
        return {"accuracy": 0.0, "correct": [], "median_queries_success": None, "mean_queries": 0.0}
    ok0, ok, q = torch.cat(clean), torch.cat(correct), torch.cat(used).float()
    broken = q[ok0 & ~ok]  # queries Square needed on the images it turned from right to wrong
    return {"accuracy": ok.float().mean().item(), "correct": ok.tolist(),
            "median_queries_success": broken.median().item() if len(broken) else None,
            "mean_queries": q.mean().item()}


# ----------------------------------------------------------------------------------------------- sanity checks
@dataclass
class SanityCheck:
    """One gradient-masking sanity check (Carlini et al. 2019): what was measured and whether it passed."""

    name: str
    passed: bool
    values: dict[str, float]
    message: str

    def to_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "values": self.values, "message": self.message}


def _flag(check: SanityCheck) -> SanityCheck:
    if not check.passed:
        log.warning("SANITY CHECK FAILED (%s): %s", check.name, check.message)
    return check


def check_large_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 0.5, steps: int = 40,
                    variants: Sequence[str] = ("e2e",), threshold: float = 0.05, **kw: Any) -> SanityCheck:
    """At a large budget (Linf 0.5 covers any image) the worst case over ``variants`` must reach ~0 accuracy.

    A defence still above ``threshold`` there is hiding the gradient, not resisting it.
    """
    masks = {v: whitebox_correct(model, x, y, v, PGD(eps=eps, steps=steps, seed=kw.pop("seed", 0)), **kw)
             for v in variants}
    acc = worst_case(masks).float().mean().item() if len(x) else 0.0
    return _flag(SanityCheck("large eps", acc <= threshold, {"eps": eps, "accuracy": acc},
                             f"accuracy {100 * acc:.1f}% at Linf eps {eps} ({steps} PGD steps, worst of "
                             f"{list(variants)}); expected <= {100 * threshold:.0f}%"))


def check_more_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: Sequence[int] = (10, 100),
                     variant: str = "e2e", tol: float = 0.01, **kw: Any) -> SanityCheck:
    """More PGD steps must never help the defence: accuracy(PGD-many) <= accuracy(PGD-few) + ``tol``."""
    few, many = min(steps), max(steps)
    seed = kw.pop("seed", 0)
    a_few = whitebox_correct(model, x, y, variant, PGD(eps=eps, steps=few, seed=seed), **kw).float().mean().item()
    a_many = whitebox_correct(model, x, y, variant, PGD(eps=eps, steps=many, seed=seed), **kw).float().mean().item()
    return _flag(SanityCheck(f"more steps ({variant})", a_many <= a_few + tol,
                             {f"pgd{few}": a_few, f"pgd{many}": a_many},
                             f"PGD-{few} {100 * a_few:.1f}% vs PGD-{many} {100 * a_many:.1f}% ({variant}); more steps "
                             f"must not raise accuracy by more than {100 * tol:.0f} points"))


def check_whitebox_vs_blackbox(whitebox: torch.Tensor, blackbox: torch.Tensor, tol: float = 0.02) -> SanityCheck:
    """White-box must be at least as strong as black-box on the same images: acc(white) <= acc(black) + ``tol``."""
    w, b = whitebox.float().mean().item(), blackbox.float().mean().item()
    extra = (whitebox.bool() & ~blackbox.bool()).float().mean().item()  # images only the black-box attack broke
    return _flag(SanityCheck("white-box >= black-box", w <= b + tol,
                             {"whitebox": w, "blackbox": b, "only_blackbox_broke": extra},
                             f"white-box {100 * w:.1f}% vs black-box (Square) {100 * b:.1f}% on the same "
                             f"{len(whitebox)} images; the black-box attack alone broke {100 * extra:.1f}% that "
                             f"every white-box attack missed"))


def check_transfer(transfer: torch.Tensor, whitebox: torch.Tensor, tol: float = 0.02) -> SanityCheck:
    """Transfer from the undefended model must be weaker than white-box: acc(transfer) >= acc(white) - ``tol``."""
    t, w = transfer.float().mean().item(), whitebox.float().mean().item()
    return _flag(SanityCheck("transfer weaker than white-box", t >= w - tol, {"transfer": t, "whitebox": w},
                             f"transfer from the undefended guard {100 * t:.1f}% vs white-box {100 * w:.1f}%"))


# ----------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class DefenseRow:
    name: str                                           # row label in the table (unique)
    defenses: list[Any] = field(default_factory=list)  # build_defense_stack spec; [] = the bare classifier
    classifier: str | None = None                       # classifier checkpoint; None: the config's guard


@dataclass
class BuiltRow:
    """A row's defended model and what its cached results depend on."""

    name: str
    model: DefenseStack
    fingerprint: dict


def _digest(path: str) -> str:
    return checkpoint_digest(path, 12)


def _exists(path: str) -> bool:
    return all(p.is_file() for p in checkpoint_paths(path))


def _row_spec(row: DefenseRow, default_restorer: str | None) -> tuple[list, list[str]]:
    """(spec with every 'trn' entry naming its checkpoint, restorer paths used)."""
    spec, paths = [], []
    for name, params in parse_defense_spec(row.defenses):  # raises a clear ConfigError on unknown names / params
        if name == "trn":
            if "checkpoint" not in params and default_restorer is None:
                raise ConfigError("a 'trn' entry needs a checkpoint (no default restorer configured)")
            params = {"checkpoint": default_restorer, **params}
            paths.append(str(params["checkpoint"]))
        spec.append({"name": name, **params})
    return spec, paths


def build_rows(rows: Sequence[DefenseRow], guard: nn.Module, guard_path: str, device: torch.device | str, *,
               default_restorer: str | None = None, skip_missing: bool = True, seed: int = 0,
               reference_images: Callable[[], torch.Tensor] | None = None) -> tuple[list[BuiltRow], dict[str, str]]:
    """Build every row's defended model; returns (rows, skipped row -> reason).

    A row is a restorer (``trn`` entry) and/or other defences in front of the frozen ``guard``, or of its own
    ``classifier`` checkpoint (e.g. an adversarially trained guard). All specs are checked before anything is loaded.

    Raises:
        ConfigError: a bad spec (message names the row), or a missing checkpoint when ``skip_missing`` is off.
    """
    checked = []
    for row in rows:
        if not isinstance(row.defenses, list):
            raise ConfigError(f"row {row.name!r}: defenses must be a list, got {row.defenses!r}")
        try:
            checked.append((row, *_row_spec(row, default_restorer)))
        except ConfigError as e:
            raise ConfigError(f"row {row.name!r}: {e}") from e
    restorers: dict[str, nn.Module] = {}
    built, skipped = [], {}
    for row, spec, trn_paths in checked:
        missing = [p for p in [row.classifier, *trn_paths] if p is not None and not _exists(p)]
        if missing:
            msg = f"checkpoint(s) not found: {missing}"
            if not skip_missing:
                raise ConfigError(f"row {row.name!r}: {msg} (train it first, or set skip_missing: true)")
            warnings.warn(f"skipping row {row.name!r}: {msg}", stacklevel=2)
            skipped[row.name] = msg
            continue
        classifier, clf_digest = guard, _digest(guard_path)
        if row.classifier is not None:
            classifier, _ = load_classifier(row.classifier, device)
            clf_digest = _digest(row.classifier)
            for p in classifier.parameters():
                p.requires_grad_(False)
        for entry in spec:
            if entry["name"] == "unig":
                if "reference_images" not in entry and "reference_dataset" not in entry and reference_images:
                    entry["reference_images"] = reference_images()
                entry.setdefault("seed", seed)
        for p in trn_paths:
            if p not in restorers:
                from trn.restorer import Restorer  # lazy: only when a row uses a restorer

                restorers[p] = Restorer.load(p, device)
        build_spec = [{k: v for k, v in e.items() if not (e["name"] == "trn" and k == "checkpoint")} for e in spec]
        try:
            if len(set(trn_paths)) > 1:
                raise ConfigError("one row can use one TRN checkpoint")
            model = build_defense_stack(build_spec, classifier, restorer=restorers[trn_paths[0]] if trn_paths else None)
        except ConfigError as e:
            raise ConfigError(f"row {row.name!r}: {e}") from e
        json_spec = [{k: v for k, v in e.items() if not isinstance(v, torch.Tensor)} for e in spec]
        fingerprint = {"spec": json_spec, "classifier": clf_digest, "restorers": [_digest(p) for p in trn_paths]}
        built.append(BuiltRow(row.name, model.eval(), fingerprint))
    return built, skipped


# ----------------------------------------------------------------------------------------------- strong adaptive eval
def _default_adaptive_rows() -> list[DefenseRow]:
    return [
        DefenseRow("no defence"),
        DefenseRow("TRN (gray-box net)", [{"name": "trn", "checkpoint": "checkpoints/trn_fmnist"}]),
        DefenseRow("robust TRN", [{"name": "trn", "checkpoint": "checkpoints/trn_fmnist_robust_pgd20"}]),
        DefenseRow("TRADES adversarial training", [], "checkpoints/fmnist_guard_trades"),
        DefenseRow("PGD adversarial training", [], "checkpoints/fmnist_guard_advtrain"),
    ]


@dataclass(frozen=True)
class AdaptiveEvalConfig:
    """The strong adaptive evaluation (``trn eval-adaptive --config configs/eval_robust_fmnist.yaml``)."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    guard: str = "checkpoints/fmnist_guard"     # the frozen guard; the undefended model for transfer attacks
    rows: list[DefenseRow] = field(default_factory=_default_adaptive_rows)
    skip_missing: bool = True                   # skip (and list) rows whose checkpoint does not exist yet
    n: int = 1000                               # seeded test images for the gradient attacks
    n_square: int = 1000                        # Square on the first n_square of them (nested subset)
    n_sanity: int = 200                         # sanity checks on the first n_sanity of them
    seed: int = 0
    eps: float = 0.1                            # Linf budget
    apgd_steps: int = 100
    apgd_restarts: int = 3
    apgd_losses: list[str] = field(default_factory=lambda: ["ce", "dlr"])  # APGD-CE and APGD-DLR
    apgd_variants: list[str] = field(default_factory=lambda: ["smooth", "gconst", "e2e"])  # views APGD attacks through
    pgd_steps: int = 100
    pgd_variants: list[str] = field(default_factory=lambda: ["e2e", "gconst", "bpda"])
    eot_iter: int = 20                          # EOT passes per gradient, for rows whose output is random
    square_queries: int = 5000
    square_p_init: float = 0.3                  # initial square size (fraction of pixels); ours for 28x28
    cascade: bool = True                        # run each gradient attack only on images every earlier one failed on
    sanity: bool = True
    sanity_large_eps: float = 0.5
    sanity_large_eps_steps: int = 40            # PGD steps of the large-eps check
    sanity_steps: list[int] = field(default_factory=lambda: [10, 100])
    sanity_tol: float = 0.02                    # slack in the comparisons (accuracy, 0-1)
    transfer_steps: int = 40                    # PGD steps of the transfer attack crafted on the undefended guard
    batch_size: int = 250
    device: str = "auto"
    out_dir: str = "runs/eval_robust_fmnist"
    cache_dir: str | None = None                # gray-box (transfer) images; None: out_dir/cache

    def __post_init__(self) -> None:
        for name in ("n", "n_square", "n_sanity", "apgd_steps", "apgd_restarts", "pgd_steps", "eot_iter",
                     "square_queries", "batch_size", "transfer_steps", "sanity_large_eps_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.n_square > self.n or self.n_sanity > self.n:
            raise ConfigError(f"n_square ({self.n_square}) and n_sanity ({self.n_sanity}) must be <= n ({self.n})")
        if not 0 < self.eps <= 1 or not 0 < self.sanity_large_eps <= 1:
            raise ConfigError(f"eps and sanity_large_eps must lie in (0, 1], got {self.eps}, {self.sanity_large_eps}")
        bad = sorted(set(self.apgd_variants + self.pgd_variants) - set(VARIANTS))
        if bad:
            raise ConfigError(f"unknown white-box variant(s) {bad}; choose from {list(VARIANTS)}")
        if set(self.apgd_losses) - {"ce", "dlr"}:
            raise ConfigError(f"apgd_losses must be drawn from ['ce', 'dlr'], got {self.apgd_losses}")
        if len(self.sanity_steps) != 2 or min(self.sanity_steps) < 1:
            raise ConfigError(f"sanity_steps must be two positive step counts, got {self.sanity_steps}")
        names = [r.name for r in self.rows]
        if not names:
            raise ConfigError("rows is empty: nothing to evaluate")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"row names must be unique; repeated: {dup}")
        for row in self.rows:
            try:
                _row_spec(row, None)
            except ConfigError as e:
                raise ConfigError(f"row {row.name!r}: {e}") from e


@dataclass
class AdaptiveReport:
    results: dict
    markdown: str


def _attack_plan(cfg: AdaptiveEvalConfig, variants: list[str], randomized: bool) -> list[tuple[str, str, Attack]]:
    """(label, variant, attack) of every gradient attack for a row, strongest-first as AutoAttack orders them."""
    eot = cfg.eot_iter if randomized else 1
    plan = []
    for loss in cfg.apgd_losses:
        for v in cfg.apgd_variants:
            if v in variants:
                atk = APGD(eps=cfg.eps, steps=cfg.apgd_steps, restarts=cfg.apgd_restarts, loss=loss, eot_iter=eot,
                           seed=cfg.seed)
                plan.append((f"APGD-{loss.upper()} ({v})", v, atk))
    for v in cfg.pgd_variants:
        if v in variants:
            plan.append((f"PGD-{cfg.pgd_steps} ({v})", v, PGD(eps=cfg.eps, steps=cfg.pgd_steps, eot_iter=eot,
                                                                seed=cfg.seed)))
    return plan


def _evaluate_adaptive_row(row: BuiltRow, cfg: AdaptiveEvalConfig, x: torch.Tensor, y: torch.Tensor,
                           x_transfer: torch.Tensor, device: torch.device) -> dict:
    model = row.model
    t_row, c_row = time.time(), time.process_time()
    randomized = looks_random(model, x[: min(len(x), 16)].to(device))
    variants = [v for v in variants_for(model, naive=False)]
    kw = {"batch_size": cfg.batch_size, "device": device, "randomized": randomized, "eot_samples": cfg.eot_iter}
    clean = correct_mask(model, x, y, cfg.batch_size, device)
    robust = clean.clone()
    attacks: dict[str, dict] = {}
    for label, variant, atk in _attack_plan(cfg, variants, randomized):
        t0, c0 = time.time(), time.process_time()
        idx = robust.nonzero().squeeze(1) if cfg.cascade else torch.arange(len(x))
        ok = whitebox_correct(model, x[idx], y[idx], variant, atk, desc=f"{row.name}: {label}", **kw)
        mask = torch.ones(len(x), dtype=torch.bool)
        mask[idx] = ok
        broke = (robust & ~mask).sum().item()
        robust &= mask
        attacks[label] = {"run_on": len(idx), "accuracy_on_run": ok.float().mean().item() if len(idx) else None,
                          "newly_broken": broke, "worst_so_far": robust.float().mean().item(),
                          "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)}
        log.info("%s | %s: run on %d, broke %d more; worst case %.4f (%.0f s)", row.name, label, len(idx), broke,
                 robust.float().mean().item(), time.time() - t0)
    gradient_worst = robust.clone()
    ns = cfg.n_square
    t0, c0 = time.time(), time.process_time()
    sq = square_correct(model, x[:ns], y[:ns], cfg.eps, cfg.square_queries, cfg.square_p_init, cfg.seed,
                        cfg.batch_size, device, f"{row.name}: Square-{cfg.square_queries}")
    sq_mask = torch.tensor(sq.pop("correct"), dtype=torch.bool)
    sq["seconds"], sq["cpu_seconds"] = round(time.time() - t0, 1), round(time.process_time() - c0, 1)
    overall_sub = gradient_worst[:ns] & sq_mask
    transfer = correct_mask(model, x_transfer, y, cfg.batch_size, device)
    result = {
        "randomized": randomized, "variants": variants, "description": model.describe(),
        "clean": clean.float().mean().item(), "transfer_pgd": transfer.float().mean().item(),
        "attacks": attacks, "gradient_worst": gradient_worst.float().mean().item(),
        "square": sq, "square_n": ns, "gradient_worst_on_square_images": gradient_worst[:ns].float().mean().item(),
        "worst_on_square_images": overall_sub.float().mean().item(),
        "worst": (gradient_worst & torch.cat([sq_mask, torch.ones(len(x) - ns, dtype=torch.bool)])).float().mean()
        .item(),
        "sanity": [],
    }
    if cfg.sanity:
        m = cfg.n_sanity
        xs, ys = x[:m], y[:m]
        kw_s = {**kw, "seed": cfg.seed}
        checks = [
            check_large_eps(model, xs, ys, cfg.sanity_large_eps, steps=cfg.sanity_large_eps_steps, variants=variants,
                            threshold=max(cfg.sanity_tol, 0.05), **kw_s),
            *[check_more_steps(model, xs, ys, cfg.eps, cfg.sanity_steps, v, cfg.sanity_tol, **kw_s)
              for v in cfg.pgd_variants if v in variants],
            check_whitebox_vs_blackbox(gradient_worst[:ns], sq_mask, cfg.sanity_tol),
            check_transfer(transfer, gradient_worst, cfg.sanity_tol),
        ]
        result["sanity"] = [c.to_dict() for c in checks]
    result["seconds"], result["cpu_seconds"] = round(time.time() - t_row, 1), round(time.process_time() - c_row, 1)
    return result


def run_adaptive_evaluation(cfg: AdaptiveEvalConfig | dict) -> AdaptiveReport:
    """Run the strong adaptive evaluation on every row; write ``report.md`` and ``report.json`` to ``cfg.out_dir``."""
    from trn.data import load_dataset

    if isinstance(cfg, dict):
        cfg = from_dict(AdaptiveEvalConfig, cfg)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    guard, _ = load_classifier(cfg.guard, device)
    for p in guard.parameters():
        p.requires_grad_(False)
    test = load_dataset(cfg.dataset, cfg.data_dir, "test").subset(cfg.n, cfg.seed)
    x, y = test.images, test.labels
    rows, skipped = build_rows(cfg.rows, guard, cfg.guard, device, skip_missing=cfg.skip_missing, seed=cfg.seed)
    transfer_atk = PGD(eps=cfg.eps, steps=cfg.transfer_steps, seed=cfg.seed)
    x_transfer = gray_box_images(guard, x, y, transfer_atk, cache_dir=cfg.cache_dir or out / "cache",
                                 guard_id=_digest(cfg.guard), dataset_id=f"{cfg.dataset}:{cfg.data_dir}",
                                 batch_size=cfg.batch_size, device=device, desc="transfer PGD on the guard")
    results: dict = {"config": to_dict(cfg), "n": len(x), "eps": cfg.eps, "rows": {}, "skipped": skipped,
                     "flags": []}
    for row in rows:
        r = _evaluate_adaptive_row(row, cfg, x, y, x_transfer, device)
        results["rows"][row.name] = r
        results["flags"] += [f"{row.name}: {c['message']}" for c in r["sanity"] if not c["passed"]]
        (out / "report.json").write_text(json.dumps(results, indent=2) + "\n")  # partial results survive a kill
    results["total_seconds"] = round(time.time() - t_start, 1)
    md = render_adaptive_markdown(results, cfg)
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    if results["rows"]:
        from trn.plots import plot_adaptive

        plot_adaptive(out / "adaptive.png", results)
    return AdaptiveReport(results, md)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def render_adaptive_markdown(results: dict, cfg: AdaptiveEvalConfig) -> str:
    """Headline table (clean, transfer, gradient worst case, Square, overall worst case), attack detail, sanity."""
    n, ns = results["n"], cfg.n_square
    lines = [
        f"### Strong adaptive evaluation, Linf eps = {cfg.eps} (accuracy %)",
        "",
        (f"Gradient attacks on {n} seeded test images: APGD-{'/'.join(x.upper() for x in cfg.apgd_losses)} "
         f"({cfg.apgd_steps} steps, {cfg.apgd_restarts} restarts) through {cfg.apgd_variants}, PGD-{cfg.pgd_steps} "
         f"through {cfg.pgd_variants} (e2e: end to end, the gradient map differentiated; gconst: the map held "
         f"constant; smooth: the map differentiated through a softplus copy of the guard; bpda: the input side as "
         f"the identity backward; each view only where it applies), EOT over {cfg.eot_iter} passes on rows with "
         f"randomness. Square: {cfg.square_queries} queries on the first {ns} of those images. Worst case: an image "
         f"counts only if every attack failed on it. Transfer: PGD-{cfg.transfer_steps} crafted on the undefended "
         f"guard."),
        "",
        f"| defence | clean | transfer PGD | gradient worst case ({n}) | Square ({ns}) | **worst case** | random |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results["rows"].items():
        lines.append(f"| {name} | {_pct(r['clean'])} | {_pct(r['transfer_pgd'])} | {_pct(r['gradient_worst'])} | "
                     f"{_pct(r['square']['accuracy'])} | **{_pct(r['worst'])}** | {'yes' if r['randomized'] else 'no'} |")
    lines += ["", "#### Attack by attack" + (" (cascade: each attack runs on the images every earlier one failed on)"
                                              if cfg.cascade else ""), "",
              "| defence | attack | images attacked | accuracy on them | newly broken | worst case so far | s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in results["rows"].items():
        for label, a in r["attacks"].items():
            lines.append(f"| {name} | {label} | {a['run_on']} | {_pct(a['accuracy_on_run'])} | {a['newly_broken']} | "
                         f"{_pct(a['worst_so_far'])} | {a['seconds']:.0f} |")
        sq = r["square"]
        mq = sq["median_queries_success"]
        lines.append(f"| {name} | Square-{cfg.square_queries} (median queries to break: "
                     f"{'n/a' if mq is None else f'{mq:.0f}'}) | {r['square_n']} | {_pct(sq['accuracy'])} | - | "
                     f"{_pct(r['worst_on_square_images'])} (on these {r['square_n']}) | {sq['seconds']:.0f} |")
    if cfg.sanity:
        lines += ["", (f"#### Gradient-masking sanity checks (Carlini et al. 2019; {cfg.n_sanity} images where an "
                      "attack is rerun)"), "", "| defence | check | result | |", "|---|---|---|---|"]
        for name, r in results["rows"].items():
            for c in r["sanity"]:
                lines.append(f"| {name} | {c['name']} | {'pass' if c['passed'] else '**FLAG**'} | {c['message']} |")
    if results["flags"]:
        lines += ["", "**Flags (possible gradient masking)**", ""] + [f"- {f}" for f in results["flags"]]
    if results["skipped"]:
        lines += ["", "**Skipped rows**", ""] + [f"- {k}: {v}" for k, v in results["skipped"].items()]
    lines += ["", f"Total time: {results.get('total_seconds', 0):.0f} s.", ""]
    return "\n".join(lines)
