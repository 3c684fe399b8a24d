"""Related defences, as selectable components and baselines for the TRN evaluation.

* :mod:`~trn.defenses.gcm`: Gradient Concealment (gradient shattering; BPDA breaks it).
* :mod:`~trn.defenses.unig`: UniG (Hadamard feature weights against score-based query attacks).
* :mod:`~trn.defenses.aaa`: AAA score post-processing (misleads score-based query attacks; label and confidence kept).
* :mod:`~trn.defenses.rnd`: RND, Gaussian noise on each query's input (seeded per image by default).
* :mod:`~trn.defenses.gfa`: DeepDefense gradient-feature alignment (a training regulariser).
* :mod:`~trn.defenses.fallback`: a second restorer for the images the first one changes a lot (the ``trn`` stage's
  ``fallback``).
* :mod:`~trn.defenses.transforms`: JPEG, bit-depth reduction, median and Gaussian smoothing.
* :mod:`~trn.defenses.stack`: compose them (and the TRN restorer) from a config list.
* :mod:`~trn.defenses.spec`: specs as plain data (YAML/inline parsing, canonical form) for batch jobs and services.

:mod:`trn.evaluate_defenses` attacks every composition gray-box, white-box (naive and adaptive: BPDA where a gradient
is shattered, EOT where the output is random) and with the score-based Square attack.

Importing this package does not import :mod:`trn.restorer`.
"""

from trn.defenses.aaa import AAAClassifier, aaa_probabilities
from trn.defenses.base import InputTransform, bpda_policy, has_feature_split, is_randomized, straight_through
from trn.defenses.fallback import FallbackRestorer, restoration_change
from trn.defenses.gcm import GCM, GCMClassifier, gcm
from trn.defenses.gfa import gfa_layer_names, gfa_penalty
from trn.defenses.rnd import RandomNoise, image_seed, random_noise
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
    "GCM",
    "JPEG",
    "AAAClassifier",
    "BitDepthReduction",
    "DefenseStack",
    "FallbackRestorer",
    "GCMClassifier",
    "GaussianBlur",
    "InputTransform",
    "MedianSmoothing",
    "Preprocessor",
    "RandomNoise",
    "RestorerStage",
    "UniGClassifier",
    "aaa_probabilities",
    "bit_depth_reduction",
    "bpda_policy",
    "build_defense_stack",
    "build_preprocessor",
    "gaussian_blur",
    "gcm",
    "gfa_layer_names",
    "gfa_penalty",
    "has_feature_split",
    "image_seed",
    "is_randomized",
    "jpeg",
    "list_defenses",
    "median_smoothing",
    "parse_defense_spec",
    "random_noise",
    "restoration_change",
    "straight_through",
]
