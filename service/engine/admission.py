"""Admission by cost: what a request may ask of the engine before any of its rows are queued.

A question costs ``rows × tokens`` (:attr:`RowWork.cost`: its members times its prompt and, in cloze
format, its choices); a request costs the sum over its questions. Two budgets, checked when a request is
admitted (after it is encoded, before anything is queued):

- **per request** ``max_request_cost``: over it the request is refused with 413 ``request_too_costly``; no
  retry helps, the client must split it;
- **per client** ``max_client_cost``: the cost a client (API key or address) may have admitted and not yet
  finished. Over it the request gets 429 ``client_budget_exhausted`` with a Retry-After estimated from the
  engine's measured throughput (cost finished per second over the last minute). A client with nothing in
  flight is always admitted (``max_request_cost ≤ max_client_cost``), so throttling never starves anyone.

The budget is released when the request finishes, fails, times out or is cancelled.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager

from service.engine.errors import ClientBudgetError, RequestTooCostlyError

THROUGHPUT_WINDOW_S = 60.0


class Admission:
    """Per-client cost accounting for one engine (event-loop thread only)."""

    def __init__(self, max_request_cost: int, max_client_cost: int) -> None:
        self.max_request_cost = max_request_cost
        self.max_client_cost = max_client_cost
        self.in_flight: defaultdict[str, int] = defaultdict(int)
        self._finished: deque[tuple[float, int]] = deque()  # (monotonic time, cost) of finished requests
        self.refused = {"request_too_costly": 0, "client_budget_exhausted": 0}

    def throughput(self) -> float | None:
        """Cost finished per second over the last minute (None before anything finished)."""
        now = time.monotonic()
        while self._finished and now - self._finished[0][0] > THROUGHPUT_WINDOW_S:
            self._finished.popleft()
        if not self._finished:
            return None
        span = max(now - self._finished[0][0], 1.0)
        return sum(cost for _, cost in self._finished) / span

    def retry_after(self, client: str) -> int:
        rate = self.throughput()
        if rate is None:
            return 1
        return max(1, math.ceil(self.in_flight[client] / rate))

    @contextmanager
    def admit(self, client: str, cost: int) -> Iterator[None]:
        """Hold ``cost`` of ``client``'s budget for the block, or raise (413 / 429) without holding any."""
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
        self.in_flight[client] = held + cost
        finished = False
        try:
            yield
            finished = True
        finally:
            self.in_flight[client] -= cost
            if not self.in_flight[client]:
                del self.in_flight[client]
            if finished:
                self._finished.append((time.monotonic(), cost))
