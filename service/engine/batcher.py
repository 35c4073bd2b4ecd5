"""Async micro-batcher: requests expand into row work, flushed into shared forwards by size or deadline.

Limits are counted in rows (one question × one member) and in **cost** (rows × tokens, what a forward's
layers pay; a batch pays its rows × its longest question, since rows are padded to it).

- **Flush.** A flush happens when the queue holds ``max_batch_rows`` rows or the oldest queued question
  has waited ``max_wait_s``; it takes whole questions up to ``max_batch_rows`` rows and ``max_batch_cost``
  padded cost (always at least one question).
- **Fair order.** Each client (an API key or an address) has its own FIFO queue; a flush takes one question
  from each client in turn, so a client that queued 64 questions does not push back another's one.
- **Bounded steps, short questions first, within a share.** The forward runs on the engine's single worker
  thread as a :class:`~service.engine.forward.ForwardPlan` of steps of about ``step_cost`` row-tokens.
  Between the steps of a costly batch, questions waiting with a cost of at most ``short_cost`` run to
  completion first: a small question waits for one step of a maximal batch, not for the whole batch. Short
  questions jump ahead only while they have used at most ``short_share`` of the busy time (and batches
  never mix short and costly questions), so admitted costly work still finishes in time.
- **Cancellation.** A request that is cancelled (timed out, client gone) leaves the queue; a running batch
  whose every request is cancelled stops at its next step.
- **Isolation.** If a shared forward raises, each request in it is retried alone, so one bad request fails
  only itself.

``fair=False`` restores one FIFO queue and run-to-completion forwards (the benchmarks' "before").
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
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
ANONYMOUS = "-"


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
    client: str
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def cost(self) -> int:
        return self.work.cost


def padded_cost(units: list[_Unit]) -> int:
    """What a forward of ``units`` pays: all rows, each as long as the longest question."""
    return sum(u.work.rows for u in units) * max((u.work.tokens for u in units), default=0)


class MicroBatcher:
    """Queues :class:`RowWork` per client and runs it in shared forwards on one worker thread."""

    def __init__(self, forward: ForwardFn, executor: ThreadPoolExecutor, *, max_batch_rows: int,
                 max_wait_s: float, max_queue_rows: int, observer: EngineObserver | None = None,
                 max_batch_cost: int | None = None, step_cost: int | None = None, short_cost: int = 0,
                 short_share: float = 0.5, fair: bool = True) -> None:
        self.forward = forward
        self.executor = executor
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_s
        self.max_queue_rows = max_queue_rows
        self.max_batch_cost = max_batch_cost
        self.step_cost = step_cost if fair else None
        self.short_cost = short_cost if fair else 0
        self.fair = fair
        self.observer = observer or EngineObserver()
        self._queues: OrderedDict[str, deque[_Unit]] = OrderedDict()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._last_forward_s = 0.05
        self.preemptions = 0  # short batches run between the steps of a costly one
        self.short_share = short_share
        self._short_s = 0.0  # busy time spent on short questions since the queue was last empty
        self._costly_s = 0.0  # … and on costly ones

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

    async def submit(self, works: list[RowWork], client: str = ANONYMOUS) -> list[tuple[torch.Tensor, Timings]]:
        """Queue one request's questions for ``client``; returns per question (scores [R, K], timings) in order."""
        if self._closing or self._task is None:
            raise EngineUnavailableError("the engine is not accepting requests (starting or shutting down)")
        rows = sum(w.rows for w in works)
        if self._queued_rows + rows > self.max_queue_rows:
            raise QueueFullError(f"queue full: {self._queued_rows} rows queued, this request needs {rows}, "
                                 f"limit {self.max_queue_rows}", retry_after_s=self._retry_after())
        job = _Job(asyncio.get_running_loop().create_future(), [None] * len(works), len(works))
        queue = self._queues.setdefault(client if self.fair else ANONYMOUS, deque())
        for index, work in enumerate(works):
            queue.append(_Unit(work, job, index, client))
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
        for client, queue in list(self._queues.items()):
            self._queued_rows -= sum(u.work.rows for u in queue if u.job is job)
            kept = deque(u for u in queue if u.job is not job)
            if kept:
                self._queues[client] = kept
            else:
                del self._queues[client]

    def _oldest(self) -> float:
        return min(queue[0].enqueued for queue in self._queues.values())

    def _short(self, unit: _Unit) -> bool:
        return unit.cost <= self.short_cost

    def _kind(self) -> bool | None:
        """Which questions the next flush takes: short ones (True), costly ones (False), or any (None: no short
        class). Short questions go first while they have used at most ``short_share`` of the busy time, so a
        stream of small questions cannot starve costly work that was admitted (it would time out)."""
        if not self.short_cost:
            return None
        heads = [queue[0] for queue in self._queues.values() if queue]
        has_short = any(self._short(u) for u in heads)
        if not has_short or all(self._short(u) for u in heads):
            return has_short
        return self._short_may_run()

    def _short_may_run(self) -> bool:
        return self._short_s * (1 - self.short_share) <= self._costly_s * self.short_share

    def _take(self, short_only: bool | None = None) -> list[_Unit]:
        """Whole questions for one forward: one per client in turn (FIFO within a client), within the row and
        padded-cost caps; ``short_only`` True takes only questions of cost ≤ ``short_cost``, False only costlier
        ones, None any."""
        units: list[_Unit] = []
        rows = 0
        progress = True
        while progress:
            progress = False
            for client in list(self._queues):
                queue = self._queues[client]
                while queue and queue[0].job.future.done():  # cancelled: drop
                    self._queued_rows -= queue.popleft().work.rows
                if not queue:
                    del self._queues[client]
                    continue
                unit = queue[0]
                if short_only is not None and self._short(unit) != short_only:
                    continue
                if units and (rows + unit.work.rows > self.max_batch_rows or (
                        self.max_batch_cost is not None and padded_cost([*units, unit]) > self.max_batch_cost)):
                    continue
                queue.popleft()
                self._queued_rows -= unit.work.rows
                units.append(unit)
                rows += unit.work.rows
                progress = True
                self._queues.move_to_end(client)  # the next flush starts with the next client
                if not queue:
                    del self._queues[client]
        return units

    async def _loop(self) -> None:
        while True:
            if not self._queues:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self._oldest() + self.max_wait_s
            while self._queued_rows < self.max_batch_rows and not self._closing:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not self._queues:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            units = self._take(self._kind())
            if units:
                await self._run(units)
            if not self._queues:  # idle again: the time shares start afresh
                self._short_s = self._costly_s = 0.0

    async def _run(self, units: list[_Unit], preemptible: bool = True) -> None:
        start = time.perf_counter()
        try:
            outputs = await self._forward(units, preemptible)
        except Exception as err:  # isolate: retry each request alone so only the bad one fails
            jobs = list({id(u.job): u.job for u in units}.values())
            if len(jobs) == 1:
                log.warning("forward failed for a request: %s", err)
                jobs[0].fail(err)
                return
            for job in jobs:
                await self._run([u for u in units if u.job is job], preemptible=False)
            return
        if outputs is None:  # every request in the batch was cancelled
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

    async def _forward(self, units: list[_Unit], preemptible: bool) -> list[torch.Tensor] | None:
        """Run the forward of ``units``; between its steps run short waiting questions first. None when
        every request in it was cancelled before it finished."""
        works = [u.work for u in units]
        plan_of = getattr(self.forward, "plan", None)
        costly = padded_cost(units) > self.short_cost
        if plan_of is None or self.step_cost is None or not costly:
            started = time.perf_counter()
            whole: list[torch.Tensor] = await self.run_in_worker(self.forward, works)
            if preemptible:  # a nested short batch is counted by the costly batch that let it in
                all_short = self.short_cost > 0 and all(self._short(u) for u in units)
                elapsed = time.perf_counter() - started
                if all_short:
                    self._short_s += elapsed
                else:
                    self._costly_s += elapsed
            return whole
        plan = plan_of(works, self.step_cost)
        while True:
            started = time.perf_counter()
            done = await self.run_in_worker(plan.step)
            self._costly_s += time.perf_counter() - started
            if done:
                break
            if all(u.job.future.done() for u in units):
                return None
            if preemptible and self.short_cost and self._queues and self._short_may_run():
                short = self._take(short_only=True)
                if short:
                    self.preemptions += 1
                    started = time.perf_counter()
                    await self._run(short, preemptible=False)
                    self._short_s += time.perf_counter() - started
        result: list[torch.Tensor] = plan.result()
        return result
