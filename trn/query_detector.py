"""A stateful similar-query detector per client (Blacklight-style), numpy and hashlib only, no Ray here.

Score-based query attacks (Square, NES) send long runs of near-identical images from one client: each query is the
previous one with a small window changed. Blacklight (Li et al., "Blacklight: Scalable Defense for Neural Networks
against Query-Based Black-Box Attacks", USENIX Security 2022) fingerprints every query so that near-identical images
share most of their fingerprint, and refuses a client whose queries keep matching its earlier ones.

Fingerprint (:func:`fingerprint`): pixels are quantised to ``round(x * 255) // step`` (``step`` 50: six grey levels,
so a +-0.1 change flips the level of only some pixels), every ``window`` x ``window`` patch (stride 1, all channels)
is hashed with BLAKE2b (8 bytes; Python's ``hash()`` is salted per process), patches whose quantised values are all
equal are skipped (flat background would make every Fashion-MNIST image collide), and the ``top`` largest hashes
are the fingerprint. A query *matches* when it shares at least ``match_threshold`` hashes with one of the client's
last ``history`` queries. A client whose matching queries (among those ``history``) exceed ``max_similar`` is
refused for ``cooldown_s`` seconds (None: for good); so a benign client may re-send an image ``max_similar`` times.

    >>> import numpy as np
    >>> d = QueryDetector(max_similar=1, cooldown_s=60.0)
    >>> x = np.random.default_rng(0).random((1, 1, 28, 28))
    >>> [d.check("alice", x, now=0.0).allowed for _ in range(3)], d.check("bob", x, now=0.0).allowed
    ([True, True, False], True)

For a service, :func:`screen_request` checks a request's images and builds the refusal (429 with ``Retry-After``,
or 403 when refused for good). Keys are those of :func:`trn.query_budget.client_key`.

Memory: each remembered client holds at most ``history`` fingerprints of ``top`` 8-byte hashes (400 kB at the
defaults, grown as queries arrive); ``max_clients`` bounds the clients (least recently seen forgotten first).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from trn.errors import ConfigError, InputError, RequestError, ShapeError

__all__ = ["DetectorDecision", "QueryDetector", "fingerprint", "screen_request"]


@dataclass(frozen=True)
class DetectorDecision:
    """Outcome of :meth:`QueryDetector.check`.

    Attributes:
        allowed: whether the request may be answered.
        similar: the client's matching queries among its remembered ones, after this request (when this request
            tipped it over ``max_similar``: the count that did, before the count starts again).
        retry_after_s: when refused, seconds until the client is heard again (``inf``: never).
        matched: images of this request that matched an earlier query of the client (0 when refused unseen).
    """

    allowed: bool
    similar: int
    retry_after_s: float = 0.0
    matched: int = 0


def fingerprint(image: np.ndarray, window: int = 8, step: int = 50, top: int = 50) -> np.ndarray:
    """Blacklight fingerprint of one (C, H, W) float image in [0, 1]: its ``top`` largest window hashes.

    Args:
        image: (C, H, W) real values in [0, 1] (clipped).
        window: side of the square windows (stride 1, all channels); at most the image's side.
        step: quantisation step of the 8-bit pixel value (``round(x * 255) // step``).
        top: hashes kept.

    Returns:
        (k,) sorted uint64, k <= top distinct hashes (fewer, even 0, for an image with few non-flat windows).

    Shape:
        image (C, H, W) -> (k,)

    Example:
        >>> fingerprint(np.zeros((1, 28, 28))).shape  # a blank image: every window is flat
        (0,)
    """
    c, h, w = image.shape
    k = min(window, h, w)
    q = (np.clip(np.rint(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8) // step)
    wins = np.lib.stride_tricks.sliding_window_view(q, (k, k), axis=(1, 2))  # (C, H-k+1, W-k+1, k, k)
    wins = np.ascontiguousarray(wins.transpose(1, 2, 0, 3, 4)).reshape(-1, c * k * k)  # (n, C*k*k)
    wins = wins[wins.max(1) != wins.min(1)]  # flat windows say nothing about the image
    size = wins.shape[1]
    data = wins.tobytes()
    hashes = {int.from_bytes(hashlib.blake2b(data[i : i + size], digest_size=8).digest(), "little")
              for i in range(0, len(data), size)}
    return np.array(sorted(hashes)[-top:], dtype=np.uint64)


class _Client:
    """One client's remembered fingerprints: a ring of ``history`` rows, grown as queries arrive."""

    __slots__ = ("blocked_until", "count", "flags", "lens", "ring", "similar")

    def __init__(self, top: int, capacity: int) -> None:
        self.ring = np.zeros((capacity, top), dtype=np.uint64)  # (rows, top) fingerprints, padded
        self.lens = np.zeros(capacity, dtype=np.int64)  # hashes in each row
        self.flags = np.zeros(capacity, dtype=bool)  # row matched an earlier query
        self.count = self.similar = 0
        self.blocked_until = -math.inf

    def matches(self, fp: np.ndarray, threshold: int) -> bool:
        n = min(self.count, len(self.ring))
        if n == 0 or len(fp) < threshold:
            return False
        rows = self.ring[:n]
        idx = np.minimum(np.searchsorted(fp, rows), len(fp) - 1)
        hit = (fp[idx] == rows) & (np.arange(rows.shape[1]) < self.lens[:n, None])
        return bool((hit.sum(1) >= threshold).any())

    def add(self, fp: np.ndarray, matched: bool, history: int) -> None:
        if self.count == len(self.ring) < history:  # grow (doubling) up to `history` rows
            cap = min(history, 2 * len(self.ring))
            self.ring = np.concatenate([self.ring, np.zeros((cap - len(self.ring), self.ring.shape[1]), np.uint64)])
            self.lens = np.concatenate([self.lens, np.zeros(cap - len(self.lens), np.int64)])
            self.flags = np.concatenate([self.flags, np.zeros(cap - len(self.flags), bool)])
        pos = self.count % len(self.ring)
        self.similar -= int(self.flags[pos])  # the forgotten query (if any) no longer counts
        self.ring[pos, : len(fp)], self.ring[pos, len(fp):], self.lens[pos] = fp, 0, len(fp)
        self.flags[pos] = matched
        self.similar += int(matched)
        self.count += 1


class QueryDetector:
    """Similar-query detector keyed by client, thread-safe, bounded memory (least recently seen keys are forgotten).

    Args:
        window: side of the hashed windows (8 on 28x28; clamped to the image size).
        step: quantisation step of the 8-bit pixel values, in [1, 255] (50 as in the paper).
        top: hashes per fingerprint (>= 1).
        match_threshold: shared hashes that make two queries "the same", in [1, top] (15 of 50: none of the 10,000
            Fashion-MNIST test images, sent in order, matches an earlier one; Square is refused by its 9th query).
        max_similar: matching queries a client may send (among its last ``history``) before it is refused (>= 0).
        cooldown_s: seconds a client is refused once over ``max_similar`` (None: for good). Its count then starts
            again; its fingerprints are kept, so an attack that resumes is refused after ``max_similar`` more.
        history: queries remembered per client (>= 1).
        max_clients: clients remembered; the least recently seen beyond this are forgotten (refusal included).

    Raises:
        ConfigError: a setting out of range.

    Example:
        >>> d = QueryDetector(max_similar=0, cooldown_s=None)
        >>> x = np.random.default_rng(0).random((2, 1, 28, 28))  # one request: an image and ...
        >>> x[1] = x[0]  # ... its copy
        >>> decision = d.check("mallory", x)
        >>> decision.allowed, decision.matched, decision.retry_after_s
        (False, 1, inf)
    """

    def __init__(self, window: int = 8, step: int = 50, top: int = 50, match_threshold: int = 15,
                 max_similar: int = 5, cooldown_s: float | None = 3600.0, history: int = 1000,
                 max_clients: int = 1000) -> None:
        def integer(name: str, v: object, lo: int, hi: float = math.inf) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                bound = f"in [{lo}, {hi}]" if math.isfinite(hi) else f">= {lo}"
                raise ConfigError(f"query detector: {name} must be an integer {bound}, got {v!r}")

        integer("window", window, 1)
        integer("step", step, 1, 255)
        integer("top", top, 1)
        integer("match_threshold", match_threshold, 1, top if isinstance(top, int) else math.inf)
        integer("max_similar", max_similar, 0)
        integer("history", history, 1)
        integer("max_clients", max_clients, 1)
        if cooldown_s is not None and (isinstance(cooldown_s, bool) or not isinstance(cooldown_s, (int, float))
                                       or not math.isfinite(cooldown_s) or cooldown_s <= 0):
            raise ConfigError(f"query detector: cooldown_s must be a positive number of seconds or null (refused "
                              f"for good), got {cooldown_s!r}")
        self.window, self.step, self.top, self.match_threshold = window, step, top, match_threshold
        self.max_similar, self.cooldown_s, self.history, self.max_clients = max_similar, cooldown_s, history, max_clients
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, key: str, images: np.ndarray, now: float | None = None) -> DetectorDecision:
        """Screen the images of one request from ``key`` (in order) and remember them; refuse the whole request when
        the client is cooling down (its images then are not looked at) or when this request takes it over
        ``max_similar``.

        Args:
            key: the client (e.g. :func:`trn.query_budget.client_key`).
            images: (N, C, H, W) real values in [0, 1].
            now: clock (``time.monotonic()`` by default).

        Raises:
            ShapeError: ``images`` not 4-D.
            InputError: non-finite values.
        """
        images = np.asarray(images)
        if images.ndim != 4:
            raise ShapeError(f"query detector: images must be (N, C, H, W), got shape {images.shape}")
        now = time.monotonic() if now is None else now
        with self._lock:  # a client in its cooldown costs no hashing
            c = self._clients.get(key)
            if c is not None and now < c.blocked_until:
                self._clients.move_to_end(key)
                return DetectorDecision(False, c.similar, c.blocked_until - now)
        if not np.isfinite(images).all():
            raise InputError("query detector: images contain NaN or infinite values")
        fps = [fingerprint(x, self.window, self.step, self.top) for x in images]  # outside the lock: the slow part
        with self._lock:
            c = self._clients.pop(key, None) or _Client(self.top, min(self.history, 16))
            self._clients[key] = c
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
            if now < c.blocked_until:  # refused meanwhile by a concurrent request
                return DetectorDecision(False, c.similar, c.blocked_until - now)
            matched = 0
            for fp in fps:
                hit = c.matches(fp, self.match_threshold)
                c.add(fp, hit, self.history)
                matched += hit
            if matched and c.similar > self.max_similar:
                similar, wait = c.similar, math.inf if self.cooldown_s is None else float(self.cooldown_s)
                c.blocked_until = now + wait
                c.flags[:] = False
                c.similar = 0
                return DetectorDecision(False, similar, wait, matched)
            return DetectorDecision(True, c.similar, 0.0, matched)


def screen_request(detector: QueryDetector, key: str, images: np.ndarray, now: float | None = None
                   ) -> tuple[DetectorDecision, RequestError | None]:
    """Screen a request's (N, C, H, W) ``images`` from ``key`` (:meth:`QueryDetector.check`); (the decision, the
    error to answer with or None).

    The error is ``QueryAttackDetected``: 429 with ``Retry-After`` (seconds, at least 1) under a cooldown, 403 when
    the client is refused for good. The decision is returned either way so that the caller can count it first.
    """
    decision = detector.check(key, images, now)
    if decision.allowed:
        return decision, None
    msg = (f"query-attack pattern detected: this client sent more than {detector.max_similar} near-identical "
           f"queries")
    if math.isinf(decision.retry_after_s):
        return decision, RequestError(403, "QueryAttackDetected", msg + "; it is refused for good")
    wait = max(1, math.ceil(decision.retry_after_s))
    return decision, RequestError(429, "QueryAttackDetected", f"{msg}; retry in {wait} s", {"Retry-After": str(wait)})
