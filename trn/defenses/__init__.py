"""Related defences, as selectable components and baselines for the TRN evaluation.

* :mod:`~trn.defenses.gcm`: Gradient Concealment (gradient shattering; BPDA breaks it).
* :mod:`~trn.defenses.unig`: UniG (Hadamard feature weights against score-based query attacks).
* :mod:`~trn.defenses.gfa`: DeepDefense gradient-feature alignment (a training regulariser).
* :mod:`~trn.defenses.transforms`: JPEG, bit-depth reduction, median and Gaussian smoothing.
* :mod:`~trn.defenses.stack`: compose them (and the TRN restorer) from a config list.

Importing this package does not import :mod:`trn.restorer`.
"""

from trn.defenses.base import InputTransform, has_feature_split, straight_through
from trn.defenses.gcm import GCM, GCMClassifier, gcm
from trn.defenses.gfa import gfa_layer_names, gfa_penalty
from trn.defenses.stack import (
    DefenseStack,
    Preprocessor,
    RestorerStage,
    build_defense_stack,
    build_preprocessor,
    list_defenses,
    parse_defense_spec,
)
from trn.defenses.transforms import (
    JPEG,
    BitDepthReduction,
    GaussianBlur,
    MedianSmoothing,
    bit_depth_reduction,
    gaussian_blur,
    jpeg,
    median_smoothing,
)
from trn.defenses.unig import UniGClassifier

__all__ = [
    "InputTransform", "has_feature_split", "straight_through",
    "gcm", "GCM", "GCMClassifier",
    "UniGClassifier",
    "gfa_penalty", "gfa_layer_names",
    "jpeg", "bit_depth_reduction", "median_smoothing", "gaussian_blur",
    "JPEG", "BitDepthReduction", "MedianSmoothing", "GaussianBlur",
    "DefenseStack", "Preprocessor", "RestorerStage", "build_defense_stack", "build_preprocessor",
    "list_defenses", "parse_defense_spec",
]
