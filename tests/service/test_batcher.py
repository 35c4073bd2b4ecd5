"""Micro-batcher: flush by size or deadline, bounded queue, isolation of a failing request, drain."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from core.answers import AnswerFormat, EncodedQuestion, Question
from service.engine.batcher import MicroBatcher
from service.engine.errors import EngineUnavailableError, QueueFullError
from service.engine.forward import RowWork
from service.engine.types import AnswerOptions, EngineObserver

BAD_LAYER = 99  # a RowWork with this first_layer makes the fake forward raise


def work(rows: int = 5, bad: bool = False) -> RowWork:
    enc = EncodedQuestion(prefix_ids=[1, 2, 3], choice_ids=[[4], [5]])
    return RowWork(enc, AnswerFormat.CLOZE, tuple(range(rows)), BAD_LAYER if bad else 0)


class Recorder(EngineObserver):
    def __init__(self) -> None:
        self.batches: list[int] = []

    def batch_done(self, rows: int, queue_waits_s: list[float]) -> None:
        self.batches.append(rows)


class Gate(threading.Event):
    """Holds the fake forward while cleared; ``entered`` is set once a forward has started."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.set()


def make(**kwargs: Any) -> tuple[MicroBatcher, list[list[RowWork]], Recorder, Gate]:
    calls: list[list[RowWork]] = []
    gate = Gate()

    def forward(items: list[RowWork]) -> list[torch.Tensor]:
        gate.entered.set()
        gate.wait(10)
        calls.append(items)
        if any(i.first_layer == BAD_LAYER for i in items):
            raise RuntimeError("bad row")
        return [torch.zeros(i.rows, 2) for i in items]

    recorder = Recorder()
    options = {"max_batch_rows": 10, "max_wait_s": 30.0, "max_queue_rows": 100, "observer": recorder}
    options.update(kwargs)
    return MicroBatcher(forward, ThreadPoolExecutor(1), **options), calls, recorder, gate


def test_flush_by_size() -> None:
    async def main() -> float:
        batcher, calls, recorder, _ = make(max_wait_s=30.0)
        await batcher.start()
        start = time.perf_counter()
        out = await asyncio.gather(batcher.submit([work()]), batcher.submit([work()]))
        elapsed = time.perf_counter() - start
        await batcher.stop()
        assert [len(c) for c in calls] == [2] and recorder.batches == [10]
        assert all(t.batch_rows == 10 for res in out for _, t in res)
        return elapsed

    assert asyncio.run(main()) < 5.0  # did not wait for the 30 s deadline


def test_flush_by_deadline() -> None:
    async def main() -> float:
        batcher, _calls, recorder, _ = make(max_batch_rows=100, max_wait_s=0.2)
        await batcher.start()
        start = time.perf_counter()
        ((scores, timings),) = await batcher.submit([work(rows=3)])
        elapsed = time.perf_counter() - start
        await batcher.stop()
        assert scores.shape == (3, 2) and recorder.batches == [3] and timings.queue_ms >= 150
        return elapsed

    assert 0.18 <= asyncio.run(main()) < 5.0


def test_large_request_spans_batches_in_order() -> None:
    async def main() -> None:
        batcher, _calls, recorder, _ = make(max_batch_rows=10, max_wait_s=0.01)
        await batcher.start()
        out = await batcher.submit([work(rows=r) for r in (4, 4, 4, 12, 1)])
        await batcher.stop()
        assert [s.shape[0] for s, _ in out] == [4, 4, 4, 12, 1]
        assert recorder.batches == [8, 4, 12, 1]  # whole questions, ≤ 10 rows unless one is larger

    asyncio.run(main())


def test_one_bad_request_fails_only_itself() -> None:
    async def main() -> None:
        batcher, calls, _, _ = make(max_batch_rows=15, max_wait_s=0.05)
        await batcher.start()
        results = await asyncio.gather(
            batcher.submit([work()]),
            batcher.submit([work(bad=True)]),
            batcher.submit([work()]),
            return_exceptions=True,
        )
        await batcher.stop()
        assert isinstance(results[1], RuntimeError)
        assert not isinstance(results[0], BaseException) and not isinstance(results[2], BaseException)
        assert len(calls[0]) == 3  # they first shared one forward, then were retried alone

    asyncio.run(main())


def test_bounded_queue_raises_queue_full() -> None:
    async def main() -> None:
        batcher, _calls, _, gate = make(max_batch_rows=5, max_wait_s=0.0, max_queue_rows=10)
        gate.clear()  # hold the worker
        await batcher.start()
        running = asyncio.create_task(batcher.submit([work()]))
        await asyncio.to_thread(gate.entered.wait, 10)  # taken off the queue, blocked in the forward
        queued = [asyncio.create_task(batcher.submit([work()])) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert batcher.queued_rows == 10
        with pytest.raises(QueueFullError) as info:
            await batcher.submit([work()])
        assert info.value.retry_after_s >= 1
        gate.set()
        await asyncio.gather(running, *queued)
        await batcher.stop()
        assert batcher.queued_rows == 0

    asyncio.run(main())


def test_cancelled_request_leaves_the_queue() -> None:
    async def main() -> None:
        batcher, calls, _, gate = make(max_batch_rows=5, max_wait_s=0.0)
        gate.clear()
        await batcher.start()
        running = asyncio.create_task(batcher.submit([work()]))
        await asyncio.to_thread(gate.entered.wait, 10)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher.submit([work(rows=4)]), 0.05)
        assert batcher.queued_rows == 0
        gate.set()
        await running
        await batcher.stop()
        assert [sum(i.rows for i in c) for c in calls] == [5]  # the cancelled one never ran

    asyncio.run(main())


def test_stop_drains_queued_requests() -> None:
    async def main() -> None:
        batcher, _calls, _, gate = make(max_batch_rows=5, max_wait_s=10.0)
        gate.clear()
        await batcher.start()
        jobs = [asyncio.create_task(batcher.submit([work(rows=2)])) for _ in range(6)]
        await asyncio.sleep(0.02)
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.02)
        with pytest.raises(EngineUnavailableError):
            await batcher.submit([work()])
        gate.set()
        await stopping
        assert all(j.done() and not j.exception() for j in jobs)

    asyncio.run(main())


def test_engine_merges_concurrent_requests(
    engine_factory: Any, bundle_maker: Any, bundle_root: Path, tiny_questions: list[Question]
) -> None:
    """Through the real engine: concurrent requests share forwards (batch_rows > one request's rows)."""
    bundle_maker(bundle_root, "b", members=3)
    engine = engine_factory(bundle_root, max_wait_ms=50.0, max_batch_rows=64)

    async def main() -> list[Any]:
        await engine.start()
        await engine.load_bundle("b")
        out = await asyncio.gather(*(engine.answer("b", [q], AnswerOptions()) for q in tiny_questions))
        await engine.stop()
        return out

    results = asyncio.run(main())
    assert max(r[0].timings.batch_rows for r in results) == 3 * len(tiny_questions)


def test_engine_timeout_releases_the_bundle(engine_factory: Any, bundle_maker: Any, bundle_root: Path) -> None:
    from service.engine.errors import RequestTimeoutError

    bundle_maker(bundle_root, "b", members=2)
    engine = engine_factory(bundle_root, request_timeout_s=0.1)
    gate = threading.Event()
    q = Question("Which gas?", ("a", "b"))

    async def main() -> None:
        await engine.start()
        await engine.load_bundle("b")
        blocker = asyncio.create_task(engine.batcher.run_in_worker(gate.wait, 10))
        with pytest.raises(RequestTimeoutError):
            await engine.answer("b", [q], AnswerOptions())
        assert engine.registry.get("b").refcount == 0 and engine.queue_depth_rows == 0
        engine.settings.request_timeout_s = 60.0
        gate.set()
        await blocker
        assert len((await engine.answer("b", [q], AnswerOptions()))[0].probabilities) == 2
        await engine.stop()

    asyncio.run(main())
