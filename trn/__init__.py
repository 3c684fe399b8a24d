"""TRN: clean adversarial images with a Two-stream Restoration Network before they reach a classifier.

    >>> import trn
    >>> r = trn.Restorer.pretrained("fashion-mnist")      # the shipped restorer (weights inside the wheel)
    >>> x_clean = r(x_adv)                               # (N, 1, 28, 28) in [0, 1]
    >>> atk = trn.create_attack("pgd", eps=0.1, steps=40)
    >>> net = trn.create_trn("trn_small_28")              # trn.list_trn_variants(): the named variants

The names below are the public API (``trn.__all__``). They are imported on first use, so ``import trn`` is fast and
loads neither torch nor anything else heavy; the package never imports Ray (the Ray layer is ``trn_workers``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # restoration
    "Restorer": "trn.restorer",
    "PRETRAINED": "trn.restorer",
    "TRN": "trn.model",
    "TRNConfig": "trn.model",
    "TRN_VARIANTS": "trn.model",
    "create_trn": "trn.model",
    "list_trn_variants": "trn.model",
    # the gradient-map estimator
    "GradientMapEstimator": "trn.gradients",
    "estimate_gradient_map": "trn.gradients",
    # attacks
    "ATTACKS": "trn.attacks",
    "Attack": "trn.attacks",
    "APGD": "trn.attacks",
    "BIM": "trn.attacks",
    "CW": "trn.attacks",
    "DeepFool": "trn.attacks",
    "FGSM": "trn.attacks",
    "MIM": "trn.attacks",
    "PGD": "trn.attacks",
    "Square": "trn.attacks",
    "create_attack": "trn.attacks",
    "list_attacks": "trn.attacks",
    # defences
    "AAAClassifier": "trn.defenses",
    "BitDepthReduction": "trn.defenses",
    "DefenseStack": "trn.defenses",
    "GCMClassifier": "trn.defenses",
    "GaussianBlur": "trn.defenses",
    "JPEG": "trn.defenses",
    "MedianSmoothing": "trn.defenses",
    "RandomNoise": "trn.defenses",
    "UniGClassifier": "trn.defenses",
    "build_defense_stack": "trn.defenses",
    "list_defenses": "trn.defenses",
    # classifiers
    "CLASSIFIERS": "trn.classifiers",
    "create_classifier": "trn.classifiers",
    "list_classifiers": "trn.classifiers",
    "load_classifier": "trn.classifiers",
    "save_classifier": "trn.classifiers",
    "wrap_classifier": "trn.classifiers",
    # data, checkpoints, configs, registries, errors
    "ImageDataset": "trn.data",
    "load_dataset": "trn.data",
    "load_checkpoint": "trn.checkpoint",
    "save_checkpoint": "trn.checkpoint",
    "resolve_checkpoint": "trn.weights",
    "load_config": "trn.config",
    "Registry": "trn.registry",
    "TRNError": "trn.errors",
    "CheckpointError": "trn.errors",
    "ConfigError": "trn.errors",
    "DataError": "trn.errors",
    "InputError": "trn.errors",
    "ShapeError": "trn.errors",
}

__all__ = [  # the public API: every name of _EXPORTS (a test checks the two agree)
    "APGD",
    "ATTACKS",
    "BIM",
    "CLASSIFIERS",
    "CW",
    "FGSM",
    "JPEG",
    "MIM",
    "PGD",
    "PRETRAINED",
    "TRN",
    "TRN_VARIANTS",
    "AAAClassifier",
    "Attack",
    "BitDepthReduction",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DeepFool",
    "DefenseStack",
    "GCMClassifier",
    "GaussianBlur",
    "GradientMapEstimator",
    "ImageDataset",
    "InputError",
    "MedianSmoothing",
    "RandomNoise",
    "Registry",
    "Restorer",
    "ShapeError",
    "Square",
    "TRNConfig",
    "TRNError",
    "UniGClassifier",
    "__version__",
    "build_defense_stack",
    "create_attack",
    "create_classifier",
    "create_trn",
    "estimate_gradient_map",
    "list_attacks",
    "list_classifiers",
    "list_defenses",
    "list_trn_variants",
    "load_checkpoint",
    "load_classifier",
    "load_config",
    "load_dataset",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_classifier",
    "wrap_classifier",
]


def __getattr__(name: str) -> Any:
    """Import the public name ``name`` from its module on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from trn.attacks import (
        APGD,
        ATTACKS,
        BIM,
        CW,
        FGSM,
        MIM,
        PGD,
        Attack,
        DeepFool,
        Square,
        create_attack,
        list_attacks,
    )
    from trn.checkpoint import load_checkpoint, save_checkpoint
    from trn.classifiers import (
        CLASSIFIERS,
        create_classifier,
        list_classifiers,
        load_classifier,
        save_classifier,
        wrap_classifier,
    )
    from trn.config import load_config
    from trn.data import ImageDataset, load_dataset
    from trn.defenses import (
        JPEG,
        AAAClassifier,
        BitDepthReduction,
        DefenseStack,
        GaussianBlur,
        GCMClassifier,
        MedianSmoothing,
        RandomNoise,
        UniGClassifier,
        build_defense_stack,
        list_defenses,
    )
    from trn.errors import CheckpointError, ConfigError, DataError, InputError, ShapeError, TRNError
    from trn.gradients import GradientMapEstimator, estimate_gradient_map
    from trn.model import TRN, TRN_VARIANTS, TRNConfig, create_trn, list_trn_variants
    from trn.registry import Registry
    from trn.restorer import PRETRAINED, Restorer
    from trn.weights import resolve_checkpoint
