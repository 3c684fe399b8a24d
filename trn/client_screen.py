"""A service's per-client screening as one call: the query budget, then the similar-query detector. No Ray here.

The Ray Serve layer holds one :class:`ClientScreen` per replica (``app.client_state: replica``) or one for the whole
application in a deployment of its own that every replica asks (``shared``: a client's budget and query history do
not depend on which replica its request reached). Either way a request is screened by :meth:`ClientScreen.screen`,
which returns what to count and the refusal to answer with.

    >>> from trn.query_budget import QueryBudget
    >>> s = ClientScreen(QueryBudget(rate=1.0, burst=2), None)
    >>> s.screen("key:alice", 2, now=0.0)[1] is None, s.screen("key:alice", 1, now=0.0)[1].status
    (True, 429)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trn.errors import RequestError
from trn.query_budget import QueryBudget, charge_request
from trn.query_detector import QueryDetector, screen_request

__all__ = ["BUDGET_METRIC", "DETECTOR_METRIC", "ClientScreen", "Count"]

BUDGET_METRIC = "trn_queries_total"  # images charged to (or refused by) the query budget; outcome: charged, refused
DETECTOR_METRIC = "trn_query_detector_total"  # classify images screened; outcome: passed, similar, refused

Count = tuple[str, int, str]  # (metric, images, outcome)


@dataclass
class ClientScreen:
    """The query budget and the similar-query detector of one service (either may be None: not configured).

    Thread-safe (both parts lock their own state); plain data in and out, so it can live behind a Ray handle.
    """

    budget: QueryBudget | None = None
    detector: QueryDetector | None = None

    def screen(self, key: str, n: int, images: np.ndarray | None = None, now: float | None = None
               ) -> tuple[list[Count], RequestError | None]:
        """Charge ``n`` queries to ``key``'s budget, then (classify requests: ``images``, (N, C, H, W) in [0, 1])
        screen the images with the detector; stop at the first refusal.

        Returns:
            (counts, refusal): metric increments (:data:`BUDGET_METRIC`, :data:`DETECTOR_METRIC`) and the 429 / 403
            to answer with, or None when the request may be answered.

        Raises:
            ShapeError / InputError: ``images`` not (N, C, H, W) or not finite (the detector's checks).
        """
        counts: list[Count] = []
        if self.budget is not None:
            decision, refusal = charge_request(self.budget, key, n, now)
            counts.append((BUDGET_METRIC, n, "charged" if decision.allowed else "refused"))
            if refusal is not None:
                return counts, refusal
        refusal = None
        if self.detector is not None and images is not None:
            verdict, refusal = screen_request(self.detector, key, images, now)
            if refusal is not None:
                counts.append((DETECTOR_METRIC, n, "refused"))
            else:
                counts += [(DETECTOR_METRIC, n - verdict.matched, "passed"), (DETECTOR_METRIC, verdict.matched, "similar")]
        return [c for c in counts if c[1] > 0], refusal
