"""AAA-style output post-processing against score-based query attacks.

Chen et al., "Adversarial Attack on Attackers: Post-Process to Mitigate Black-Box Score-Based Query Attacks",
NeurIPS 2022. A score-based attacker (Square, NES, ...) reads the returned scores and keeps a candidate when its
loss went down, almost always the margin ``log p_y - max_{j != y} log p_j``. AAA changes the scores so that this loss
points the wrong way *locally* while the label, and the confidence a calibrated user reads, stay as they were.

Our closed form (deterministic, no inner optimisation; the paper optimises the logits for a few Adam steps towards a
similar target):

* the top-1 probability ``p1`` is returned **unchanged** (so the argmax and the top-1 calibration, hence ECE, are
  exactly those of the undefended classifier);
* what changes is how the remaining mass ``1 - p1`` is spread over the other classes. Spread evenly, the margin
  ``M = log p1 - log max_{j != 1} p_j`` is ``L + log(C - 1)``; all on the runner-up, it is ``L``, where
  ``L = log(p1 / (1 - p1))``. So ``M = L + phi`` for any ``phi`` in ``[0, log(C - 1)]`` can be returned.
* ``phi`` is a sawtooth of ``L``: ``phi = amplitude * (1 - frac(L / interval))``. Inside each interval of ``L`` the
  returned margin therefore *decreases while the true one increases* (slope ``1 - amplitude / interval < 0``): a
  candidate that really moves towards the decision boundary looks worse to the attacker and is thrown away, and the
  attacker is attracted to the top of its interval.

The second class keeps its place (it gets ``p1 * exp(-M)``) and the other classes share the rest in proportion to
their original probabilities (capped below the runner-up). Needs at least three classes (with two, the margin is
fixed by ``p1``).

Limits, said plainly: with the default settings an attacker who uses the top-1 probability (cross-entropy loss)
instead of the margin sees the true, unchanged ``p1``; a top-1-only or rounded output policy also removes the signal
the margin reversal shapes. ``confidence_interval`` adds the same sawtooth reversal to the top-1 log-odds itself
(``L' = (2k + 1) * w - L`` inside ``[k w, (k + 1) w)``, argmax kept): the top-1 loss then points the wrong way
locally too, at the price of moving each confidence by up to ``w`` in log-odds. Over many images the mirror
preserves the distribution of confidences, so ECE moves little; measure it (benchmarks/bench_query_attack.py).

    >>> defended = AAAClassifier(classifier)              # logits in, log-probabilities out
    >>> (defended(x).argmax(1) == classifier(x).argmax(1)).all()
    tensor(True)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trn.defenses.base import straight_through
from trn.errors import ConfigError

__all__ = ["AAAClassifier", "aaa_probabilities"]


def _positive(v: object, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"AAA: {name} must be a positive number, got {v!r}")
    return float(v)


def aaa_probabilities(probs: torch.Tensor, interval: float = 0.5, amplitude: float | None = None,
                      confidence_interval: float | None = None) -> torch.Tensor:
    """Post-process class probabilities as AAA does: same argmax (and top-1 probability), reversed local margin.

    Args:
        probs: (N, C) probabilities (rows summing to 1), C >= 3 for any effect (C < 3 is returned unchanged).
        interval: width of the sawtooth in top-1 log-odds (smaller: stronger reversal, more jumps).
        amplitude: range of the margin offset ``phi``; None: ``0.95 * log(C - 1)`` (must not exceed ``log(C - 1)``).
            The reversal needs ``amplitude > interval``.
        confidence_interval: if set, also reverse the top-1 log-odds within intervals of this width (then ``max``
            changes by up to this much in log-odds); None: the top-1 probability is returned unchanged.

    Returns:
        (N, C) probabilities, ``argmax`` equal to that of ``probs`` (and ``max`` too unless ``confidence_interval``).

    Shape:
        (N, C) -> (N, C)

    Example:
        >>> p = torch.softmax(torch.randn(4, 10), 1)
        >>> q = aaa_probabilities(p)
        >>> bool((q.argmax(1) == p.argmax(1)).all()) and torch.allclose(q.max(1).values, p.max(1).values)
        True
    """
    interval = _positive(interval, "interval")
    n, c = probs.shape
    if c < 3 or n == 0:
        return probs
    band = math.log(c - 1)
    amp = 0.95 * band if amplitude is None else _positive(amplitude, "amplitude")
    if amp > band + 1e-9:
        raise ConfigError(f"AAA: amplitude {amp} exceeds log(num_classes - 1) = {band:.4f}")
    p = probs.double().clamp_min(0)
    p = p / p.sum(1, keepdim=True)
    p1, top = p.max(1)  # (N,)
    rest = (1.0 - p1).clamp_min(1e-300)
    log_odds = torch.log(p1.clamp_min(1e-300)) - torch.log(rest)  # L
    others = p.scatter(1, top[:, None], 0.0)  # (N, C), top-1 zeroed
    if confidence_interval is not None:
        w = _positive(confidence_interval, "confidence_interval")
        k = torch.floor(log_odds / w)
        mirrored = (2 * k + 1) * w - log_odds
        # keep the top-1 above the runner-up once the rest is rescaled: L' > log(q2 / (1 - p1))
        floor_ = torch.log(others.max(1).values.clamp_min(1e-300)) - torch.log(rest)
        mirrored = torch.where(mirrored > floor_ + 1e-6, mirrored, (log_odds + floor_) / 2)
        new_p1 = torch.sigmoid(mirrored)
        others = others * ((1 - new_p1) / rest)[:, None]
        p1, rest = new_p1, (1 - new_p1).clamp_min(1e-300)
    frac = torch.frac(log_odds / interval)
    frac = torch.where(frac < 0, frac + 1, frac)  # frac in [0, 1) for negative L too
    phi = amp * (1.0 - frac)
    # the margin must stay > 0 (argmax kept): L + phi > 0 where feasible (L + band >= 0 always holds for a top-1)
    shown = torch.log(p1.clamp_min(1e-300)) - torch.log(rest)  # the returned top-1 log-odds (L, or L mirrored)
    phi = torch.maximum(phi, (-shown + 1e-6).clamp(max=band))
    margin = shown + phi  # M, returned margin to the runner-up
    second = others.argmax(1)
    p2 = (p1 * torch.exp(-margin)).minimum(rest)  # runner-up's new probability
    remaining = (rest - p2).clamp_min(0)
    tail = others.scatter(1, second[:, None], 0.0)  # classes 3.., original proportions
    tail_sum = tail.sum(1, keepdim=True)
    # proportional share; where the tail had no mass, share evenly
    share = torch.where(tail_sum > 1e-300, tail / tail_sum.clamp_min(1e-300),
                        torch.ones_like(tail).scatter(1, top[:, None], 0).scatter(1, second[:, None], 0) / (c - 2))
    tail_new = share * remaining[:, None]
    # cap the tail below the runner-up (keeps the runner-up second, hence the margin as set); spill the excess evenly
    for _ in range(4):
        over = (tail_new - p2[:, None]).clamp_min(0)
        if not (over > 0).any():
            break
        tail_new = tail_new - over
        room = (p2[:, None] - tail_new).clamp_min(0)
        room = room.scatter(1, top[:, None], 0).scatter(1, second[:, None], 0)
        tail_new = tail_new + room / room.sum(1, keepdim=True).clamp_min(1e-300) * over.sum(1, keepdim=True)
    out = tail_new.scatter(1, second[:, None], p2[:, None]).scatter(1, top[:, None], p1[:, None])
    out = out / out.sum(1, keepdim=True)
    return out.to(probs.dtype)


class AAAClassifier(nn.Module):
    """Wrap a classifier with AAA output post-processing: ``log aaa_probabilities(softmax(classifier(x)))``.

    Deterministic (a function of the classifier's output), training-free, same argmax and top-1 probability as the
    classifier. The returned log-probabilities are valid logits.

    Args:
        classifier: [0, 1] images in, logits out.
        interval: sawtooth width in top-1 log-odds (default 0.5).
        amplitude: margin offset range (None: 0.95 * log(C - 1)).
        confidence_interval: also reverse the top-1 log-odds within intervals of this width (None: off; the top-1
            probability, hence calibration, is then exactly the classifier's).

    Gradients (for white-box evaluators) are those of ``log_softmax(classifier(x))``: the post-processing is held as
    a straight-through step, since AAA targets score-based attackers and must not mask gradients.

    Shape:
        (N, C, H, W) -> (N, num_classes) log-probabilities.
    """

    def __init__(self, classifier: nn.Module, interval: float = 0.5, amplitude: float | None = None,
                 confidence_interval: float | None = None) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Module):
            raise ConfigError(f"AAA needs an nn.Module classifier, got {type(classifier).__name__}")
        self.classifier = classifier
        self.interval = _positive(interval, "interval")
        self.amplitude = None if amplitude is None else _positive(amplitude, "amplitude")
        self.confidence_interval = (None if confidence_interval is None
                                    else _positive(confidence_interval, "confidence_interval"))
        if hasattr(classifier, "num_classes"):
            self.num_classes = classifier.num_classes

    def extra_repr(self) -> str:
        return (f"interval={self.interval}, amplitude={self.amplitude}, "
                f"confidence_interval={self.confidence_interval}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.log_softmax(self.classifier(x).float(), dim=1)
        with torch.no_grad():
            q = aaa_probabilities(z.exp(), self.interval, self.amplitude, self.confidence_interval)
            q = q.clamp_min(1e-30).log()
        return straight_through(z, q) if z.requires_grad else q
