"""Admission by cost: what a request may ask of the engine before any of its rows are queued.

A question costs ``rows × tokens`` (:attr:`RowWork.cost`: its members times its prompt and, in cloze
format, its choices); a request costs the sum over its questions. Three checks, made when a request is
admitted (after it is encoded, before anything is queued):

- **per request** ``max_request_cost``: over it the request is refused with 413 ``request_too_costly``; no
  retry helps, the client must split it;
- **per client** ``max_client_cost``: the cost a client (API key or address) may have admitted and not yet
  finished; over it, 429 ``client_budget_exhausted``. A client with nothing in flight is always admitted
  (``max_request_cost ≤ max_client_cost``), so throttling never starves anyone;
- **the engine's own deadline**: a costly request (over ``short_cost``) is admitted alone, or when the costly
  work already admitted plus itself would finish within ``deadline_s`` at the share of the measured
  throughput that costly work is sure of (``1 − short_share``: short questions may take the rest); otherwise
  429 ``engine_busy`` now instead of a 504 thirty seconds later. Short questions are exempt: the scheduler
  runs them between the steps of costly batches.

Throughput is cost finished per second of *busy* time (time with anything admitted), over the last
``THROUGHPUT_REQUESTS`` finished requests, so idle periods do not dilute it. Retry-After is the time the
engine needs for what is ahead. The budget is released when the request finishes, fails, times out or is
cancelled.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager

from service.engine.errors import ClientBudgetError, EngineBusyError, RequestTooCostlyError

THROUGHPUT_REQUESTS = 64
DEADLINE_SHARE = 0.8  # admit costly work the engine expects to finish within this share of the deadline


class Admission:
    """Per-client and engine-wide cost accounting for one engine (event-loop thread only)."""

    def __init__(self, max_request_cost: int, max_client_cost: int, *, short_cost: int = 0,
                 short_share: float = 0.0, deadline_s: float | None = None) -> None:
        self.max_request_cost = max_request_cost
        self.max_client_cost = max_client_cost
        self.short_cost = short_cost
        self.short_share = short_share
        self.deadline_s = deadline_s
        self.in_flight: defaultdict[str, int] = defaultdict(int)
        self.total = 0
        self.costly_total = 0  # admitted, unfinished cost of requests over short_cost
        self._busy_s = 0.0  # busy time before the current busy period
        self._busy_since: float | None = None
        self._finished: deque[tuple[float, int]] = deque(maxlen=THROUGHPUT_REQUESTS)  # (busy clock, cost)
        self.refused = {"request_too_costly": 0, "client_budget_exhausted": 0, "engine_busy": 0}

    def _busy_clock(self) -> float:
        running = 0.0 if self._busy_since is None else time.monotonic() - self._busy_since
        return self._busy_s + running

    def throughput(self) -> float | None:
        """Cost finished per busy second over the last requests (None before two have finished)."""
        if len(self._finished) < 2:
            return None
        span = self._busy_clock() - self._finished[0][0]
        cost = sum(c for _, c in list(self._finished)[1:])
        return cost / span if span > 0 and cost > 0 else None

    def _seconds_for(self, cost: int) -> int:
        rate = self.throughput()
        return 1 if rate is None else max(1, math.ceil(cost / rate))

    def retry_after(self, client: str) -> int:
        return self._seconds_for(self.in_flight[client])

    def _check(self, client: str, cost: int) -> None:
        if cost > self.max_request_cost:
            self.refused["request_too_costly"] += 1
            raise RequestTooCostlyError(f"this request costs {cost} (rows × tokens), over max_request_cost "
                                        f"{self.max_request_cost}: send fewer or shorter questions per request",
                                        param="questions")
        held = self.in_flight[client]
        if held and held + cost > self.max_client_cost:
            self.refused["client_budget_exhausted"] += 1
            raise ClientBudgetError(f"this client has {held} cost admitted and unfinished; with this request's "
                                    f"{cost} that is over max_client_cost {self.max_client_cost}",
                                    retry_after_s=self.retry_after(client))
        rate = self.throughput()
        if self.deadline_s is not None and rate is not None and self.costly_total and cost > self.short_cost:
            eta = (self.costly_total + cost) / (rate * (1 - self.short_share))
            if eta > DEADLINE_SHARE * self.deadline_s:
                self.refused["engine_busy"] += 1
                raise EngineBusyError(f"the engine has {self.costly_total} costly work ahead; this request's {cost} "
                                      f"would finish in ~{eta:.0f} s, past the {self.deadline_s:g} s request timeout",
                                      retry_after_s=self._seconds_for(self.costly_total))

    @contextmanager
    def admit(self, client: str, cost: int) -> Iterator[None]:
        """Hold ``cost`` of ``client``'s budget for the block, or raise (413 / 429) without holding any."""
        self._check(client, cost)
        if not self.total:
            self._busy_since = time.monotonic()
        costly = cost if cost > self.short_cost else 0
        self.in_flight[client] += cost
        self.total += cost
        self.costly_total += costly
        finished = False
        try:
            yield
            finished = True
        finally:
            self.in_flight[client] -= cost
            if not self.in_flight[client]:
                del self.in_flight[client]
            self.total -= cost
            self.costly_total -= costly
            if finished:
                self._finished.append((self._busy_clock(), cost))
            if not self.total and self._busy_since is not None:
                self._busy_s += time.monotonic() - self._busy_since
                self._busy_since = None
