"""What a classification service returns: output policies, and the calibration of what it returns.

Every answer carries the label. How much of the score vector comes with it is the output policy, the main lever
against score-based query attacks (Square, NES, ...), which need scores to compare candidates:

* ``full``: every class probability (6 decimals unless ``decimals`` says fewer);
* ``top_k``: the ``k`` most probable classes with their probabilities (6 decimals unless ``decimals`` says fewer);
* ``rounded``: every class probability, rounded to ``decimals`` decimals (default 2: coarse steps hide small
  changes);
* ``label``: the label only (a score-based attack is blind; label-only attacks such as RayS / HopSkipJump remain).

A policy is a point of a small lattice: ``k`` classes shown (0 for ``label``, all for ``full``/``rounded``) times
``decimals`` of precision. A request may ask for *less* than its application allows (fewer classes, fewer decimals,
or the label only), never more: :func:`restrict` combines them and refuses the rest.

    >>> app = OutputPolicy("rounded", decimals=2)
    >>> restrict(app, OutputPolicy("label")).policy
    'label'
    >>> format_prediction(np.array([0.1, 0.7, 0.2]), ["a", "b", "c"], OutputPolicy("top_k", k=2))
    {'label': 'b', 'index': 1, 'probabilities': {'b': 0.7, 'c': 0.2}, 'output': 'top_k'}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from trn.errors import ConfigError, InputError

__all__ = ["FULL_DECIMALS", "OutputPolicy", "expected_calibration_error", "format_prediction",
           "probabilities_from_output", "restrict"]

FULL_DECIMALS = 6
PolicyName = Literal["full", "top_k", "rounded", "label"]


@dataclass(frozen=True)
class OutputPolicy:
    """How much of the score vector an answer carries.

    Attributes:
        policy: ``full``, ``top_k``, ``rounded`` or ``label``.
        k: classes shown by ``top_k`` (>= 1).
        decimals: decimals of the probabilities shown (0..6); None: 2 for ``rounded``, 6 for ``full`` and ``top_k``.
    """

    policy: PolicyName = "full"
    k: int = 1
    decimals: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in ("full", "top_k", "rounded", "label"):
            raise ConfigError(f"output policy must be full, top_k, rounded or label, got {self.policy!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"output.k must be an integer >= 1, got {self.k!r}")
        if self.decimals is not None and (isinstance(self.decimals, bool) or not isinstance(self.decimals, int)
                                          or not 0 <= self.decimals <= 6):
            raise ConfigError(f"output.decimals must be an integer in [0, 6], got {self.decimals!r}")

    def shown(self, num_classes: int) -> int:
        """How many classes' probabilities an answer shows."""
        return {"full": num_classes, "rounded": num_classes, "top_k": min(self.k, num_classes), "label": 0}[
            self.policy]

    @property
    def precision(self) -> int:
        """Decimals of the probabilities shown."""
        if self.decimals is not None:
            return self.decimals
        return 2 if self.policy == "rounded" else FULL_DECIMALS

    def describe(self) -> str:
        if self.policy == "label":
            return "label"
        extra = f"k={self.k}, " if self.policy == "top_k" else ""
        return f"{self.policy}({extra}decimals={self.precision})"


def restrict(app: OutputPolicy, requested: OutputPolicy | None, num_classes: int | None = None) -> OutputPolicy:
    """The policy for one request: ``requested`` when it shows no more than ``app`` does, else an error.

    "No more" means: no more classes, and no more decimals. ``num_classes`` (when known) lets ``top_k`` with
    ``k >= num_classes`` count as all classes.

    Raises:
        InputError: the request asks for more than the application allows (the message says what is allowed).
    """
    if requested is None:
        return app
    n = num_classes or 10**9
    if requested.shown(n) > app.shown(n) or (requested.shown(n) > 0 and requested.precision > app.precision):
        raise InputError(f"output {requested.describe()} shows more than this service allows ({app.describe()}); "
                         "ask for the same or less: fewer classes (top_k, label) or fewer decimals (rounded)")
    return requested


def probabilities_from_output(out: torch.Tensor) -> torch.Tensor:
    """Rows of probabilities from a classifier's output: softmax of logits, or the output itself when it already is
    a probability vector (non-negative rows summing to 1).

    Raises:
        InputError: an output that is not (N, num_classes) or (num_classes,).

    Shape:
        (N, C) or (C,) -> (N, C)
    """
    out = out.detach().float()
    if out.ndim == 1:
        out = out[None]
    if out.ndim != 2:
        raise InputError(f"classifier output must be (N, num_classes), got shape {tuple(out.shape)}")
    if (out >= 0).all() and torch.allclose(out.sum(1), torch.ones(len(out), device=out.device), atol=1e-4):
        return out
    return torch.softmax(out, dim=1)


def format_prediction(probs: np.ndarray, names: Sequence[str], policy: OutputPolicy) -> dict[str, Any]:
    """The JSON body of one answer under ``policy``.

    Args:
        probs: (C,) probabilities.
        names: C class names.
        policy: what to show.

    Returns:
        ``{"label", "index", "probabilities" (a dict, most probable first for top_k; None for label), "output"}``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    idx = int(np.argmax(probs))
    body: dict[str, Any] = {"label": str(names[idx]), "index": idx}
    if policy.policy == "label":
        body["probabilities"] = None
    elif policy.policy == "top_k":
        order = np.argsort(-probs, kind="stable")[: policy.k]
        body["probabilities"] = {str(names[i]): round(float(probs[i]), policy.precision) for i in order}
    else:
        d = policy.precision
        body["probabilities"] = {str(n): round(float(p), d) for n, p in zip(names, probs)}
    body["output"] = policy.policy
    return body


def expected_calibration_error(probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                               bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence (Guo et al. 2017), equal-width bins.

    ``sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|`` over ``bins`` bins of the top-1 probability.

    Args:
        probs: (N, C) probabilities (rows need not sum exactly to 1: rounded answers are fine).
        labels: (N,) true classes.
        bins: number of bins in [0, 1].

    Returns:
        ECE in [0, 1] (nan for N = 0).

    Example:
        >>> expected_calibration_error(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]), bins=10)
        0.15
    """
    p = np.asarray(probs.detach().cpu() if isinstance(probs, torch.Tensor) else probs, dtype=np.float64)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    if p.ndim != 2 or y.shape != (len(p),):
        raise InputError(f"ECE needs (N, C) probabilities and (N,) labels, got {p.shape} and {y.shape}")
    if len(p) == 0:
        return math.nan
    conf, pred = p.max(1), p.argmax(1)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return round(float(ece), 12)
