"""Per-client query budgets: a token bucket per client key (API key or address), no Ray here.

Each client gets ``burst`` queries at once, refilled at ``rate`` queries per second; a request of ``n`` images costs
``n`` queries (a batch request counts one query per image). A request the bucket cannot pay is refused whole, with the
number of seconds after which it could be paid (the HTTP layer's ``Retry-After``). Optionally a hard ``total`` per
key over the life of the budget (a query-attack budget; refills never lift it).

    >>> b = QueryBudget(rate=1.0, burst=2)
    >>> b.charge("alice", 2, now=0.0).allowed, b.charge("alice", 1, now=0.0).retry_after_s
    (True, 1.0)

For a service, :func:`client_key` names the client of a request and :func:`charge_request` charges it, with the
HTTP refusal (429, ``Retry-After``) to raise when the budget says no.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from trn.errors import ConfigError, RequestError

__all__ = ["BudgetDecision", "QueryBudget", "charge_request", "client_key"]


@dataclass(frozen=True)
class BudgetDecision:
    """Outcome of :meth:`QueryBudget.charge`.

    Attributes:
        allowed: whether the queries were charged.
        remaining: whole queries left in the bucket after this decision.
        retry_after_s: when refused, seconds until the request could be paid (``inf``: never, over ``total``).
    """

    allowed: bool
    remaining: int
    retry_after_s: float = 0.0


class QueryBudget:
    """Token buckets keyed by client, thread-safe, bounded memory (least recently seen keys are forgotten).

    Args:
        rate: queries per second refilled per client (> 0).
        burst: bucket size: queries a client may send at once (>= 1).
        total: optional lifetime cap of queries per client (None: none).
        max_clients: keys remembered; the least recently used beyond this are dropped (their bucket starts full).

    Raises:
        ConfigError: a setting out of range.
    """

    def __init__(self, rate: float, burst: int, total: int | None = None, max_clients: int = 100_000) -> None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            raise ConfigError(f"query budget: rate must be a positive number of queries per second, got {rate!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ConfigError(f"query budget: burst must be an integer >= 1, got {burst!r}")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
            raise ConfigError(f"query budget: total must be an integer >= 1 or null, got {total!r}")
        self.rate, self.burst, self.total, self.max_clients = float(rate), burst, total, max_clients
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # key -> [tokens, last time, used]
        self._lock = threading.Lock()

    def charge(self, key: str, n: int = 1, now: float | None = None) -> BudgetDecision:
        """Charge ``n`` queries to ``key`` if its bucket (and lifetime total) allows, else refuse without charging.

        A request larger than ``burst`` can never be paid: it is refused with ``retry_after_s = inf``.
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            b = self._buckets.pop(key, None)
            if b is None:
                b = [float(self.burst), now, 0.0]
            b[0] = min(float(self.burst), b[0] + max(0.0, now - b[1]) * self.rate)
            b[1] = now
            self._buckets[key] = b
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            if self.total is not None and b[2] + n > self.total:
                return BudgetDecision(False, int(b[0]), math.inf)
            if n > self.burst:
                return BudgetDecision(False, int(b[0]), math.inf)
            if b[0] + 1e-9 >= n:
                b[0] -= n
                b[2] += n
                return BudgetDecision(True, int(b[0] + 1e-9))
            return BudgetDecision(False, int(b[0] + 1e-9), (n - b[0]) / self.rate)


def client_key(headers: Mapping[str, str], key_header: str, client_host: str | None) -> str:
    """The budget key of a request: ``key:<value>`` of its ``key_header`` header (an API key) when present and not
    empty, else ``addr:<client_host>`` (``addr:unknown`` when the client's address is not known, None)."""
    key = headers.get(key_header)
    return f"key:{key}" if key else f"addr:{client_host if client_host is not None else 'unknown'}"


def charge_request(budget: QueryBudget, key: str, n: int, now: float | None = None
                   ) -> tuple[BudgetDecision, RequestError | None]:
    """Charge a request of ``n`` queries (images) to ``key``; (the decision, the error to answer with or None).

    The error is a 429 ``QueryBudgetExceeded`` with a ``Retry-After`` header: the seconds until the bucket could pay
    (at least 1), or 86400 for a request that can never be paid (over ``burst`` or the lifetime ``total``). The
    decision is returned either way so that the caller can count it before raising.
    """
    decision = budget.charge(key, n, now)
    if decision.allowed:
        return decision, None
    if math.isinf(decision.retry_after_s):
        msg = (f"this request needs {n} queries, more than the budget can ever grant at once "
               f"(burst {budget.burst}" + (f", lifetime total {budget.total})" if budget.total else ")"))
        return decision, RequestError(429, "QueryBudgetExceeded", msg, {"Retry-After": "86400"})
    wait = max(1, math.ceil(decision.retry_after_s))
    return decision, RequestError(429, "QueryBudgetExceeded",
                                  f"query budget spent ({budget.rate:g} queries/s, burst {budget.burst}); "
                                  f"retry in {wait} s", {"Retry-After": str(wait)})
