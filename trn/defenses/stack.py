"""Defences composed from a config list: input transforms -> (optional) TRN restorer -> classifier wrappers.

    >>> spec = [{"name": "jpeg", "quality": 75}, {"name": "trn", "checkpoint": "checkpoints/trn_fmnist"},
    ...         {"name": "gcm"}]
    >>> defended = build_defense_stack(spec, classifier)   # [0, 1] images in, logits out
    >>> pre = build_preprocessor(spec)                     # jpeg -> trn only: what a batch job / service applies

Entries are mappings with a ``name`` and that defence's parameters (a bare string is a defence with default
parameters). Input-side stages (transforms and ``trn``) run in the listed order and must all come before the
classifier wrappers, which wrap the classifier in the listed order (the first listed sits closest to it).

Input-side stages:
    ``jpeg`` (quality, bpda), ``bit_depth`` (bits, bpda, straight_through), ``median`` (kernel_size, bpda),
    ``gaussian_blur`` (kernel_size, sigma, bpda), ``rnd`` (std, deterministic, salt, bpda: Gaussian noise on each
    query, seeded per image by default), ``trn`` (checkpoint, bpda, map_from, fallback, fallback_above): a TRN
    :class:`~trn.restorer.Restorer`, loaded lazily from ``checkpoint`` or given as ``restorer=``; with ``fallback``
    (a checkpoint) the images it changes by more than ``fallback_above`` (RMS) get that restorer's output instead
    (:class:`~trn.defenses.fallback.FallbackRestorer`).
Classifier wrappers:
    ``gcm`` (w, eps, bpda), ``unig`` (delta, steps, lr, momentum, weight_decay, num_reference, seed,
    reference_images, reference_dataset, reference_data_dir: ``num_reference`` training images of that dataset,
    chosen with ``seed``, pad small batches; per_sample, deterministic: the serving mode), ``aaa`` (interval,
    amplitude: AAA score post-processing against score-based query attacks; list it last).

For attacks, a :class:`DefenseStack` says whether it is ``differentiable`` (else attack it under
:func:`~trn.defenses.base.bpda_policy`) and ``randomized`` (else :meth:`DefenseStack.expected_logits` gives EOT).
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from trn.defenses.aaa import AAAClassifier
from trn.defenses.base import (
    has_feature_split,
    is_randomized,
    reads_gradient_map,
    straight_through,
    takes_create_graph,
)
from trn.defenses.gcm import GCMClassifier
from trn.defenses.rnd import RandomNoise
from trn.defenses.transforms import JPEG, BitDepthReduction, GaussianBlur, MedianSmoothing
from trn.defenses.unig import UniGClassifier
from trn.errors import ConfigError
from trn.validation import check_images

__all__ = [
    "CLASSIFIER_WRAPPERS",
    "INPUT_TRANSFORMS",
    "DefenseStack",
    "Preprocessor",
    "RestorerStage",
    "build_defense_stack",
    "build_preprocessor",
    "list_defenses",
    "parse_defense_spec",
]
log = logging.getLogger(__name__)

INPUT_TRANSFORMS: dict[str, type[nn.Module]] = {
    "jpeg": JPEG,
    "bit_depth": BitDepthReduction,
    "median": MedianSmoothing,
    "gaussian_blur": GaussianBlur,
    "rnd": RandomNoise,
}
CLASSIFIER_WRAPPERS: dict[str, type[nn.Module]] = {"gcm": GCMClassifier, "unig": UniGClassifier, "aaa": AAAClassifier}
_ALIASES = {
    "bitdepth": "bit_depth", "bit_depth_reduction": "bit_depth", "median_smoothing": "median", "median_blur": "median",
    "blur": "gaussian_blur", "gaussian": "gaussian_blur", "restorer": "trn", "random_noise": "rnd", "noise": "rnd",
}
_TRN_PARAMS = ("checkpoint", "bpda", "map_from", "fallback", "fallback_above")
_UNIG_EXTRA = ("reference_dataset", "reference_data_dir")


def list_defenses() -> list[str]:
    """Every defence name a spec may use."""
    return sorted([*INPUT_TRANSFORMS, "trn", *CLASSIFIER_WRAPPERS])


def _init_params(cls: type) -> list[str]:
    return [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "classifier")]


def _valid_params(name: str) -> list[str]:
    if name == "trn":
        return list(_TRN_PARAMS)
    if name in INPUT_TRANSFORMS:
        return _init_params(INPUT_TRANSFORMS[name])
    params = _init_params(CLASSIFIER_WRAPPERS[name])
    return params + list(_UNIG_EXTRA) if name == "unig" else params


def parse_defense_spec(spec: Sequence[dict[str, Any] | str] | None) -> list[tuple[str, dict[str, Any]]]:
    """Check a spec and return ``[(canonical name, params), ...]`` (copies; the input is not modified).

    Raises:
        ConfigError: not a list, an entry without a name, an unknown defence or parameter (the message lists the
            valid ones), or a classifier wrapper listed before an input-side stage.
    """
    if spec is None:
        return []
    if isinstance(spec, (str, dict)) or not isinstance(spec, Sequence):
        raise ConfigError(f"a defence spec must be a list of entries like {{name: jpeg, quality: 75}}, got {spec!r}")
    out: list[tuple[str, dict[str, Any]]] = []
    first_wrapper: str | None = None
    for i, entry in enumerate(spec):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"defence #{i}: expected a mapping with a 'name' (one of {list_defenses()}), "
                              f"got {entry!r}")
        params = dict(entry)
        raw = params.pop("name")
        key = raw.strip().lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        if key not in INPUT_TRANSFORMS and key not in CLASSIFIER_WRAPPERS and key != "trn":
            raise ConfigError(f"defence #{i}: unknown defence {raw!r}; valid names: {list_defenses()}")
        valid = _valid_params(key)
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ConfigError(f"defence #{i} ({key}): unknown parameter(s) {unknown}; valid parameters: {valid}")
        if key in CLASSIFIER_WRAPPERS:
            first_wrapper = first_wrapper or key
        elif first_wrapper is not None:
            raise ConfigError(f"defence #{i} ({key}) is an input-side stage but comes after the classifier wrapper "
                              f"{first_wrapper!r}; list input transforms and 'trn' first, then gcm/unig")
        out.append((key, params))
    return out


def _construct(i: int, name: str, factory: Callable[..., nn.Module], *args: Any, **params: Any) -> nn.Module:
    """Call a constructor; re-raise its errors as ConfigError naming the entry."""
    try:
        return factory(*args, **params)
    except ConfigError as e:
        raise ConfigError(f"defence #{i} ({name}): {e}") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"defence #{i} ({name}): bad parameters {params}: {e}; "
                          f"valid parameters: {_valid_params(name)}") from e


class RestorerStage(nn.Module):
    """A TRN restorer as an input-side stage.

    Gradients go through the restorer (including its gradient-map estimation, ``create_graph=True``) whenever the
    caller differentiates w.r.t. the input, which is what an end-to-end adaptive attack needs; ``hold_map=True``
    recomputes the gradient map but holds it constant in the backward pass (the stronger adaptive attack on a ReLU
    guard, whose map is piecewise constant in the input); ``map_surrogate`` (a smooth stand-in for the guard, e.g.
    its ReLUs as softplus) keeps the exact map in the forward pass but differentiates the map the surrogate gives
    (BPDA with a differentiable approximation, for the map only); ``bpda=True`` uses the identity in the backward pass
    instead (the BPDA attack on the purifier).
    """

    differentiable = True

    def __init__(self, restorer: nn.Module, bpda: bool = False) -> None:
        super().__init__()
        if not callable(restorer):
            raise ConfigError(f"the 'trn' stage needs a callable restorer, got {type(restorer).__name__}")
        self.restorer, self.bpda, self.hold_map = restorer, bool(bpda), False
        self.map_surrogate: nn.Module | None = None
        self._takes_create_graph = takes_create_graph(restorer)

    def _restore(self, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
        return self.restorer(x, create_graph=create_graph) if self._takes_create_graph else self.restorer(x)

    def bpda_forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = self._restore(x, False)
        return straight_through(x, y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bpda:
            return self.bpda_forward(x)
        differentiating = torch.is_grad_enabled() and x.requires_grad
        if self.map_surrogate is not None and self.has_map and differentiating and not self.hold_map \
                and hasattr(self.restorer, "net"):  # a fallback pair has no single map: end to end instead
            r = self.restorer
            g = r.gradient_map(x)                                          # exact map, constant
            g_smooth = r.estimator(x, self.map_surrogate, create_graph=True)  # the surrogate's map, differentiable
            return r.net(x, g + (g_smooth - g_smooth.detach()))            # forward: exact; backward: surrogate's
        return self._restore(x, not self.hold_map and differentiating)

    @property
    def has_map(self) -> bool:
        """Whether the restorer reads a gradient map (so that holding it constant is a distinct attack)."""
        return self._takes_create_graph and reads_gradient_map(self.restorer)

    def extra_repr(self) -> str:
        return f"bpda={self.bpda}"


def _load_restorer(i: int, params: dict[str, Any], restorer: nn.Module | None,
                   device: torch.device | str) -> RestorerStage:
    path = params.get("checkpoint")
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"defence #{i} (trn): checkpoint must be a path, got {path!r}")
        from trn.restorer import Restorer  # lazy: the restorer module is heavy and optional here

        restorer = Restorer.load(path, device)
    elif restorer is None:
        raise ConfigError(f"defence #{i} (trn): give 'checkpoint: PATH' (a saved Restorer) or pass restorer=")
    map_from = params.get("map_from")
    if map_from is not None:  # the gradient map from an in-process downstream classifier, not the restorer's guard
        if not isinstance(map_from, (str, os.PathLike)) or not str(map_from):
            raise ConfigError(f"defence #{i} (trn): map_from must be a classifier file, got {map_from!r}")
        net_cfg = getattr(getattr(restorer, "net", None), "cfg", None)
        if not getattr(net_cfg, "two_stream", False) or not hasattr(restorer, "with_map_from"):
            raise ConfigError(f"defence #{i} (trn): map_from needs a two-stream restorer (this one reads no gradient "
                              "map)")
        from trn.downstream import load_downstream

        classifier = load_downstream(map_from, tuple(restorer.image_shape), len(restorer.class_names), device)
        restorer = restorer.with_map_from(classifier)
    restorer = _with_fallback(i, params, restorer, device)
    return _construct(i, "trn", RestorerStage, restorer, bpda=params.get("bpda", False))


def _with_fallback(i: int, params: dict[str, Any], restorer: nn.Module, device: torch.device | str) -> nn.Module:
    """``restorer``, or a :class:`~trn.defenses.fallback.FallbackRestorer` when the entry names a ``fallback``."""
    path, threshold = params.get("fallback"), params.get("fallback_above")
    if path is None and threshold is None:
        return restorer
    if path is None or threshold is None:
        raise ConfigError(f"defence #{i} (trn): give both 'fallback: CHECKPOINT' (the restorer for images this one "
                          "changes a lot) and 'fallback_above: RMS' (e.g. 0.06), or neither")
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigError(f"defence #{i} (trn): fallback must be a checkpoint path, got {path!r}")
    from trn.defenses.fallback import FallbackRestorer
    from trn.restorer import Restorer

    return _construct(i, "trn", FallbackRestorer, restorer, Restorer.load(path, device), threshold)


class Preprocessor(nn.Module):
    """The input-side stages in order: (N, C, H, W) in [0, 1] -> (N, C, H, W) in [0, 1]. No stages = identity.

    ``differentiable`` is True when every stage's gradient is exact (else attack it with :meth:`bpda_forward`, or
    build the stages with ``bpda: true``).
    """

    def __init__(self, stages: Sequence[nn.Module] = (), names: Sequence[str] = ()) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.names = tuple(names) or tuple(type(s).__name__ for s in stages)

    @property
    def differentiable(self) -> bool:
        return all(getattr(s, "differentiable", True) for s in self.stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, allow_empty=True, name="x")
        for stage in self.stages:
            x = stage(x)
        return x

    def bpda_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The whole preprocessor with an identity backward pass."""
        with torch.no_grad():
            y = self(x)
        return straight_through(x, y)


class DefenseStack(nn.Module):
    """``classifier_wrappers(classifier)(preprocessor(x))``: [0, 1] images in, logits out.

    Attributes:
        preprocessor: the input-side :class:`Preprocessor`.
        classifier: the wrapped classifier (GCM / UniG around the original).
        spec: the parsed spec, ``[(name, params), ...]``.
    """

    def __init__(self, preprocessor: Preprocessor, classifier: nn.Module,
                 spec: Sequence[tuple[str, dict[str, Any]]] = ()) -> None:
        super().__init__()
        self.preprocessor, self.classifier = preprocessor, classifier
        self.spec = [(n, {k: v for k, v in p.items() if not isinstance(v, torch.Tensor)}) for n, p in spec]
        if hasattr(classifier, "num_classes"):
            self.num_classes = classifier.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.preprocessor(x))

    @property
    def randomized(self) -> bool:
        """Whether the output is random (UniG): attack it with EOT (:meth:`expected_logits`)."""
        return is_randomized(self.preprocessor) or is_randomized(self.classifier)

    @property
    def differentiable(self) -> bool:
        """Whether autograd's gradient through every stage is exact and informative (else attack with BPDA)."""
        stages = [m for m in self.modules() if isinstance(getattr(m, "bpda", None), bool)]
        return all(getattr(m, "differentiable", True) for m in stages)

    def expected_logits(self, x: torch.Tensor, samples: int = 8) -> torch.Tensor:
        """Mean logits over ``samples`` runs of the random parts (EOT); the plain output when nothing is random.

        A deterministic preprocessor runs once; a classifier wrapper with its own ``expected_logits`` (UniG) is
        asked for it, so only its random part is repeated.
        """
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConfigError(f"EOT samples must be a positive integer, got {samples!r}")
        if not self.randomized or samples == 1:
            return self(x)
        if is_randomized(self.preprocessor):
            return torch.stack([self(x) for _ in range(samples)]).mean(0)
        z = self.preprocessor(x)
        if callable(getattr(self.classifier, "expected_logits", None)):
            return self.classifier.expected_logits(z, samples)
        return torch.stack([self.classifier(z) for _ in range(samples)]).mean(0)

    def describe(self) -> str:
        """One line: ``jpeg(quality=75) -> trn -> gcm -> classifier``."""
        parts = [n + (f"({', '.join(f'{k}={v}' for k, v in p.items())})" if p else "") for n, p in self.spec]
        return " -> ".join([*parts, "classifier"]) if parts else "classifier (no defence)"


def _build_input_side(parsed: list[tuple[str, dict[str, Any]]], restorer: nn.Module | None,
                      device: torch.device | str) -> Preprocessor:
    stages, names = [], []
    for i, (name, params) in enumerate(parsed):
        if name in CLASSIFIER_WRAPPERS:
            continue
        if name == "trn":
            stages.append(_load_restorer(i, params, restorer, device))
        else:
            stages.append(_construct(i, name, INPUT_TRANSFORMS[name], **params))
        names.append(name)
    if restorer is not None and "trn" not in names:
        warnings.warn("a restorer was passed but the defence spec has no 'trn' stage; it is not used", stacklevel=3)
    return Preprocessor(stages, names).to(device)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def build_preprocessor(spec: Sequence[dict[str, Any] | str] | None, restorer: nn.Module | None = None,
                       device: torch.device | str = "cpu") -> Preprocessor:
    """The input-side part of ``spec`` (transforms and ``trn``, in order); classifier wrappers are checked, then
    skipped (they belong with the classifier).

    Args:
        spec: defence entries (see module docstring).
        restorer: the restorer for a ``trn`` entry without ``checkpoint``.
        device: where to put the stages (and load the restorer).

    Raises:
        ConfigError: bad spec (unknown defence or parameter, bad value, wrong order, ``trn`` without a restorer).
    """
    parsed = parse_defense_spec(spec)
    skipped = [n for n, _ in parsed if n in CLASSIFIER_WRAPPERS]
    if skipped:
        log.debug("build_preprocessor: classifier wrappers %s are left to the classifier side", skipped)
    return _build_input_side(parsed, restorer, device)


def _make_unig(classifier: nn.Module, reference_dataset: str | None = None, reference_data_dir: str | None = None,
               **params: Any) -> UniGClassifier:
    if not has_feature_split(classifier):
        UniGClassifier(classifier)  # raises the ConfigError that explains the missing split, before loading data
    if reference_dataset is not None:
        if params.get("reference_images") is not None:
            raise ConfigError("give either reference_images or reference_dataset, not both")
        from trn.data import load_dataset

        n = params.get("num_reference", 4)
        seed = params.get("seed")
        ds = load_dataset(reference_dataset, reference_data_dir, "train").subset(n, seed or 0)
        params["reference_images"] = ds.images.to(_model_device(classifier))
    return UniGClassifier(classifier, **params)


def build_defense_stack(spec: Sequence[dict[str, Any] | str] | None, classifier: nn.Module,
                        restorer: nn.Module | None = None) -> DefenseStack:
    """Compose the defences in ``spec`` around ``classifier``.

    Args:
        spec: defence entries (see module docstring); empty or None gives the plain classifier.
        classifier: [0, 1] images in, logits out (``forward_features`` / ``forward_head`` needed for ``unig``).
        restorer: the restorer for a ``trn`` entry without ``checkpoint`` (``trn.restorer`` is imported only when
            a checkpoint is to be loaded).

    Returns:
        A :class:`DefenseStack` on the classifier's device.

    Raises:
        ConfigError: bad spec, with the valid names / parameters in the message.
    """
    if not isinstance(classifier, nn.Module):
        raise ConfigError(f"build_defense_stack needs an nn.Module classifier, got {type(classifier).__name__}")
    parsed = parse_defense_spec(spec)
    device = _model_device(classifier)
    pre = _build_input_side(parsed, restorer, device)
    model = classifier
    for i, (name, params) in enumerate(parsed):
        if name == "gcm":
            model = _construct(i, name, GCMClassifier, model, **params)
        elif name == "unig":
            model = _construct(i, name, _make_unig, model, **params)
        elif name == "aaa":
            model = _construct(i, name, AAAClassifier, model, **params)
    return DefenseStack(pre, model, parsed)
