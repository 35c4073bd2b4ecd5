"""Async micro-batcher: requests expand into row work, flushed into shared forwards by size or deadline.

Limits are counted in rows (one question × one member). A flush happens when the queue holds
``max_batch_rows`` rows or the oldest queued question has waited ``max_wait_s``; it takes whole
questions in FIFO order up to ``max_batch_rows`` rows (always at least one). The forward runs in the
engine's single worker thread, so the event loop keeps accepting requests meanwhile. If a shared
forward raises, each request in it is retried alone, so one bad request fails only itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from service.engine.errors import EngineUnavailableError, QueueFullError
from service.engine.forward import RowWork
from service.engine.types import EngineObserver, Timings

log = logging.getLogger("uqserve.batcher")
T = TypeVar("T")
ForwardFn = Callable[[list[RowWork]], list[torch.Tensor]]


@dataclass
class _Job:
    future: asyncio.Future[list[tuple[torch.Tensor, Timings]]]
    results: list[tuple[torch.Tensor, Timings] | None]
    remaining: int

    def deliver(self, index: int, value: tuple[torch.Tensor, Timings]) -> None:
        self.results[index] = value
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result([r for r in self.results if r is not None])

    def fail(self, err: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(err)


@dataclass
class _Unit:
    work: RowWork
    job: _Job
    index: int
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Queues :class:`RowWork` and runs it in shared forwards on one worker thread."""

    def __init__(self, forward: ForwardFn, executor: ThreadPoolExecutor, *, max_batch_rows: int,
                 max_wait_s: float, max_queue_rows: int, observer: EngineObserver | None = None) -> None:
        self.forward = forward
        self.executor = executor
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_s
        self.max_queue_rows = max_queue_rows
        self.observer = observer or EngineObserver()
        self._queue: deque[_Unit] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._last_forward_s = 0.05

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    async def start(self) -> None:
        self._wakeup = asyncio.Event()  # bind to the running loop
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="uqserve-batcher")

    async def stop(self) -> None:
        """Stop accepting work, run everything already queued, then return."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def run_in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the forward thread, serialized with forwards (used for LoRA slot writes)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def submit(self, works: list[RowWork]) -> list[tuple[torch.Tensor, Timings]]:
        """Queue one request's questions; returns per question (scores [R, K], timings) in order."""
        if self._closing or self._task is None:
            raise EngineUnavailableError("the engine is not accepting requests (starting or shutting down)")
        rows = sum(w.rows for w in works)
        if self._queued_rows + rows > self.max_queue_rows:
            raise QueueFullError(f"queue full: {self._queued_rows} rows queued, this request needs {rows}, "
                                 f"limit {self.max_queue_rows}", retry_after_s=self._retry_after())
        job = _Job(asyncio.get_running_loop().create_future(), [None] * len(works), len(works))
        for index, work in enumerate(works):
            self._queue.append(_Unit(work, job, index))
        self._queued_rows += rows
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            self._discard(job)
            raise

    def _retry_after(self) -> int:
        batches = self._queued_rows / self.max_batch_rows + 1
        return max(1, math.ceil(batches * self._last_forward_s))

    def _discard(self, job: _Job) -> None:
        kept = deque(u for u in self._queue if u.job is not job)
        self._queued_rows -= sum(u.work.rows for u in self._queue if u.job is job)
        self._queue = kept

    def _take(self) -> list[_Unit]:
        units: list[_Unit] = []
        rows = 0
        while self._queue:
            unit = self._queue[0]
            if units and rows + unit.work.rows > self.max_batch_rows:
                break
            self._queue.popleft()
            self._queued_rows -= unit.work.rows
            if not unit.job.future.done():
                units.append(unit)
                rows += unit.work.rows
        return units

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self._queue[0].enqueued + self.max_wait_s
            while self._queued_rows < self.max_batch_rows and not self._closing:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not self._queue:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            units = self._take()
            if units:
                await self._run(units)

    async def _run(self, units: list[_Unit]) -> None:
        start = time.perf_counter()
        try:
            outputs = await self.run_in_worker(self.forward, [u.work for u in units])
        except Exception as err:  # isolate: retry each request alone so only the bad one fails
            jobs = list({id(u.job): u.job for u in units}.values())
            if len(jobs) == 1:
                log.warning("forward failed for a request: %s", err)
                jobs[0].fail(err)
                return
            for job in jobs:
                await self._run([u for u in units if u.job is job])
            return
        elapsed = time.perf_counter() - start
        self._last_forward_s = elapsed
        rows = sum(u.work.rows for u in units)
        for unit, scores in zip(units, outputs, strict=True):
            unit.job.deliver(unit.index, (scores, Timings(queue_ms=1000 * (start - unit.enqueued),
                                                          forward_ms=1000 * elapsed, batch_rows=rows)))
        try:
            self.observer.batch_done(rows, [start - u.enqueued for u in units])
        except Exception:  # metrics must never break serving
            log.exception("observer failed")
