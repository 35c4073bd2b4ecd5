"""Admission by cost, per-client budgets, the fair queue, preemption between steps, cancellation, client keys
and the wrong-key brake: on fake forwards for the scheduling, on the tiny real engine over HTTP for the rest."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from core.answers import AnswerFormat, EncodedQuestion
from service.access import AuthBrake, KeyRing, hash_key, new_key, unless_disconnected
from service.app import create_app
from service.engine.admission import Admission
from service.engine.batcher import MicroBatcher
from service.engine.errors import ClientBudgetError, ClientGoneError, EngineBusyError, RequestTooCostlyError
from service.engine.forward import RowWork

ADMIN = "admin-key-123"
SMALL = {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium"]}


def work(rows: int = 5, tokens: int = 4, tag: int = 0) -> RowWork:
    enc = EncodedQuestion(prefix_ids=[tag] * (tokens - 2), choice_ids=[[1], [2]])
    return RowWork(enc, AnswerFormat.CLOZE, tuple(range(rows)), 0)


class SteppedForward:
    """A fake forward with plans: each item takes ``item.tokens`` steps of ``step_s`` seconds."""

    def __init__(self, step_s: float = 0.005) -> None:
        self.step_s = step_s
        self.order: list[int] = []  # prefix tag of each item, in the order items finished
        self.steps = 0

    def __call__(self, items: list[RowWork]) -> list[torch.Tensor]:
        time.sleep(self.step_s)
        self.order.extend(i.encoded.prefix_ids[0] for i in items)
        return [torch.zeros(i.rows, 2) for i in items]

    def plan(self, items: list[RowWork], step_cost: int | None) -> Any:
        forward = self

        class Plan:
            left = max(i.tokens for i in items)
            done = False

            def step(self) -> bool:
                time.sleep(forward.step_s)
                forward.steps += 1
                self.left -= 1
                self.done = self.left <= 0
                if self.done:
                    forward.order.extend(i.encoded.prefix_ids[0] for i in items)
                return self.done

            def result(self) -> list[torch.Tensor]:
                return [torch.zeros(i.rows, 2) for i in items]

        return Plan()


def batcher(forward: Any, **options: Any) -> MicroBatcher:
    values = {"max_batch_rows": 5, "max_wait_s": 0.0, "max_queue_rows": 10_000, "max_batch_cost": 10_000,
              "step_cost": 64, "short_cost": 100}
    values.update(options)
    return MicroBatcher(forward, ThreadPoolExecutor(1), **values)


def test_fair_queue_serves_clients_in_turn() -> None:
    """Client a queues six questions, then b one: b's runs second, not seventh (FIFO gives seventh)."""

    async def main(fair: bool) -> list[int]:
        forward = SteppedForward()
        b = batcher(forward, fair=fair, short_cost=0)
        await b.start()
        flood = asyncio.create_task(b.submit([work(tag=1) for _ in range(6)], "a"))  # noqa: RUF006
        await asyncio.sleep(0)  # a's questions are queued first
        await b.submit([work(tag=2)], "b")
        await flood
        await b.stop()
        return forward.order

    assert asyncio.run(main(fair=True)).index(2) <= 1
    assert asyncio.run(main(fair=False)).index(2) == 6


def test_short_question_runs_between_steps_of_a_costly_batch() -> None:
    """A costly batch (200 steps) is interrupted by a short question, which finishes long before it."""

    async def main() -> tuple[float, float, int]:
        forward = SteppedForward(step_s=0.005)
        b = batcher(forward)
        await b.start()
        start = time.perf_counter()
        costly = asyncio.create_task(b.submit([work(rows=1, tokens=200, tag=1)], "flood"))
        await asyncio.sleep(0.1)  # the costly batch is running
        await b.submit([work(rows=5, tokens=4, tag=2)], "small")
        short_done = time.perf_counter() - start
        await costly
        costly_done = time.perf_counter() - start
        await b.stop()
        return short_done, costly_done, b.preemptions

    short_done, costly_done, preemptions = asyncio.run(main())
    assert preemptions == 1
    assert short_done < 0.5 * costly_done


def test_a_stream_of_short_questions_does_not_starve_costly_work() -> None:
    """A closed loop of short questions (one at a time, back to back) takes at most short_share of the busy time
    while a costly batch runs: the costly batch finishes in about 1 / (1 - share) of its time alone."""

    async def main(share: float) -> tuple[float, int]:
        forward = SteppedForward(step_s=0.004)
        b = batcher(forward, short_share=share)
        await b.start()
        stop = asyncio.Event()
        shorts = 0

        async def stream() -> None:
            nonlocal shorts
            while not stop.is_set():
                await b.submit([work(rows=5, tokens=4, tag=2)], "small")
                shorts += 1

        streaming = asyncio.create_task(stream())
        await asyncio.sleep(0.05)
        start = time.perf_counter()
        await b.submit([work(rows=1, tokens=200, tag=1)], "flood")  # 200 steps: ~0.8 s alone
        elapsed = time.perf_counter() - start
        stop.set()
        await streaming
        await b.stop()
        return elapsed, shorts

    elapsed, shorts = asyncio.run(main(share=0.5))
    assert shorts > 20  # the short questions were served meanwhile
    assert elapsed < 3 * 200 * 0.004  # ~2x its time alone (share 0.5), far from starved


def test_cancelled_request_stops_its_running_batch() -> None:
    """A request that times out mid-forward stops at the next step: its remaining steps never run."""

    async def main() -> int:
        forward = SteppedForward(step_s=0.01)
        b = batcher(forward)
        await b.start()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.submit([work(rows=1, tokens=500)], "x"), 0.2)
        await asyncio.sleep(0.1)
        steps = forward.steps
        await b.stop()
        return steps

    assert asyncio.run(main()) < 100  # of 500


def test_admission_budgets() -> None:
    admission = Admission(max_request_cost=100, max_client_cost=150)
    with pytest.raises(RequestTooCostlyError), admission.admit("a", 101):
        pass
    with admission.admit("a", 100):
        with pytest.raises(ClientBudgetError) as err, admission.admit("a", 60):
            pass
        assert err.value.retry_after_s >= 1
        with admission.admit("b", 100):  # another client is not affected
            assert admission.in_flight == {"a": 100, "b": 100}
        with admission.admit("a", 50):  # within the budget
            pass
    assert not admission.in_flight and admission.throughput() is not None
    assert admission.refused == {"request_too_costly": 1, "client_budget_exhausted": 1, "engine_busy": 0}


def test_costly_work_the_engine_cannot_finish_in_time_is_429_not_504() -> None:
    """Throughput is measured on busy time; a costly request that would finish past the deadline behind what is
    admitted gets EngineBusyError (short ones are still admitted), and idle time does not dilute the rate."""
    admission = Admission(max_request_cost=10_000, max_client_cost=10_000, short_cost=50, deadline_s=1.0)
    for _ in range(3):
        with admission.admit("a", 1000):
            time.sleep(0.1)  # ~10000 cost per busy second
    time.sleep(0.3)  # idle: not counted
    rate = admission.throughput()
    assert rate is not None and 5000 < rate < 11000
    with admission.admit("a", 5000):
        with pytest.raises(EngineBusyError) as err, admission.admit("b", 4000):  # 5000 + 4000 at ~10000/s > 0.8 s
            pass
        assert err.value.retry_after_s >= 1
        with admission.admit("b", 40):  # short: exempt
            pass
        with admission.admit("b", 2000):  # 7000 at ~10000/s < 0.8 s
            pass
    with admission.admit("s", 40), admission.admit("b", 9000):  # alone among costly work: always admitted
        pass
    assert admission.refused["engine_busy"] == 1
    shared = Admission(max_request_cost=10_000, max_client_cost=10_000, short_cost=50, short_share=0.5,
                       deadline_s=1.0)  # costly work is sure of half the throughput only
    for _ in range(3):
        with shared.admit("a", 1000):
            time.sleep(0.1)
    with shared.admit("a", 5000), pytest.raises(EngineBusyError), shared.admit("b", 2000):  # 7000 at ~5000/s
        pass


def test_key_ring_matches_by_hash_only() -> None:
    key = new_key()
    ring = KeyRing([f"alice:{hash_key(key)}", f"bob:{hash_key('other')}"])
    assert ring.match(key) == "alice" and ring.match("other") == "bob"
    assert ring.match(key + "x") is None and ring.match("") is None
    assert key not in repr(ring.entries)
    for bad in ("alice", "alice:xyz", f":{hash_key(key)}", f"alice:{hash_key(key)[:-1]}"):
        with pytest.raises(ValueError):
            KeyRing([bad])


def test_brake_refills() -> None:
    brake = AuthBrake(burst=2, refill_s=0.05)
    brake.failed("x")
    brake.failed("x")
    with pytest.raises(Exception) as err:
        brake.check("x")
    assert getattr(err.value, "status", None) == 429
    brake.check("y")  # others unaffected
    time.sleep(0.06)
    brake.check("x")


def test_disconnect_cancels_the_work() -> None:
    async def main() -> bool:
        cancelled = asyncio.Event()

        async def slow() -> int:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return 1

        class GoneRequest:
            async def receive(self) -> dict[str, str]:
                await asyncio.sleep(0.05)
                return {"type": "http.disconnect"}

        with pytest.raises(ClientGoneError):
            await unless_disconnected(GoneRequest(), slow())  # type: ignore[arg-type]
        await asyncio.sleep(0)
        return cancelled.is_set()

    assert asyncio.run(main())


# --- over HTTP on the tiny real engine --------------------------------------------------------------------


def _app(engine_factory: Any, bundle_maker: Any, bundle_root: Path, **overrides: Any) -> Any:
    bundle_maker(bundle_root, "b", members=3)
    engine = engine_factory(bundle_root, preload_bundles=["b"], admin_key=ADMIN, **overrides)
    return engine, create_app(engine.settings, engine)


def test_costly_request_is_413(engine_factory: Any, bundle_maker: Any, bundle_root: Path) -> None:
    _, app = _app(engine_factory, bundle_maker, bundle_root, max_request_cost=200, max_client_cost=400)
    with TestClient(app) as client:
        ok = client.post("/v1/answer", json={"bundle": "b", **SMALL})
        assert ok.status_code == 200
        batch = client.post("/v1/answer/batch", json={"bundle": "b", "questions": [SMALL] * 8})
        assert batch.status_code == 413
        assert batch.json()["error"]["code"] == "request_too_costly"
        assert "max_request_cost" in batch.json()["error"]["message"]


def test_client_budget_429_while_others_are_served(engine_factory: Any, bundle_maker: Any,
                                                   bundle_root: Path) -> None:
    """Client alice holds her whole budget (the worker is held busy); her next request gets 429 with
    Retry-After, bob's is admitted and answered once the worker frees up. Keys name the clients."""
    keys = {name: new_key() for name in ("alice", "bob")}
    engine, app = _app(engine_factory, bundle_maker, bundle_root, max_request_cost=300, max_client_cost=300,
                       api_keys=[f"{n}:{hash_key(k)}" for n, k in keys.items()])
    release = threading.Event()
    with TestClient(app) as client:
        headers = {name: {"X-API-Key": key} for name, key in keys.items()}
        assert client.post("/v1/answer", json={"bundle": "b", **SMALL}).status_code == 401
        wrong = client.post("/v1/answer", json={"bundle": "b", **SMALL}, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert client.post("/v1/answer", json={"bundle": "b", **SMALL}, headers=headers["bob"]).status_code == 200

        engine.executor.submit(release.wait, 30)  # hold the forward thread
        results: dict[str, Any] = {}

        def ask(name: str, key: str) -> None:
            results[key] = client.post("/v1/answer/batch", json={"bundle": "b", "questions": [SMALL] * 3},
                                       headers=headers[name])

        first = threading.Thread(target=ask, args=("alice", "alice1"))
        first.start()
        deadline = time.monotonic() + 10
        while not engine.admission.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        second = client.post("/v1/answer", json={"bundle": "b", **SMALL}, headers=headers["alice"])
        assert second.status_code == 429, second.text
        assert second.json()["error"]["code"] == "client_budget_exhausted"
        assert int(second.headers["Retry-After"]) >= 1
        other = threading.Thread(target=ask, args=("bob", "bob1"))
        other.start()
        time.sleep(0.2)
        release.set()
        first.join(30)
        other.join(30)
        assert results["alice1"].status_code == 200 and results["bob1"].status_code == 200


def test_wrong_admin_keys_are_braked(engine_factory: Any, bundle_maker: Any, bundle_root: Path) -> None:
    _, app = _app(engine_factory, bundle_maker, bundle_root, auth_failure_burst=3, auth_failure_refill_s=60)
    other = TestClient(app, client=("10.9.8.7", 1234))  # another address; the lifespan runs once, below
    with TestClient(app) as client:
        codes = [client.delete("/v1/bundles/b", headers={"X-Admin-Key": "guess"}).status_code for _ in range(5)]
        assert codes == [403, 403, 403, 429, 429]
        braked = client.delete("/v1/bundles/b", headers={"X-Admin-Key": ADMIN})  # even the right key waits
        assert braked.status_code == 429 and int(braked.headers["Retry-After"]) > 0
        assert braked.json()["error"]["code"] == "too_many_auth_failures"
        assert other.get("/v1/bundles").status_code == 200
        assert other.delete("/v1/bundles/b", headers={"X-Admin-Key": ADMIN}).status_code == 200


def test_flood_is_throttled_not_failed_and_small_questions_are_answered(engine_factory: Any, bundle_maker: Any,
                                                                      bundle_root: Path, tiny_base: Any) -> None:
    """One client floods costly batches from 4 threads while another asks small questions: the flood gets only
    200s and 429s (with Retry-After), the small questions only 200s, nothing 5xx, and the forwards were stepped."""
    keys = {name: new_key() for name in ("flood", "small")}
    wide = {"question": "Which of these is the longest statement about the plants and the sun?",
            "choices": [f"choice {k}: green plants use the light of the sun to make food" for k in range(12)]}
    tokens = len(tiny_base.tokenizer(wide["question"] + " ".join(wide["choices"]))["input_ids"])
    batch_cost = 6 * 3 * tokens  # six questions of 3 members, about
    engine, app = _app(engine_factory, bundle_maker, bundle_root, max_request_cost=2 * batch_cost,
                       max_client_cost=4 * batch_cost, step_cost=64, short_cost=200,
                       api_keys=[f"{n}:{hash_key(k)}" for n, k in keys.items()])
    statuses: dict[str, list[int]] = {"flood": [], "small": []}
    stop = threading.Event()
    with TestClient(app) as client:

        def flood() -> None:
            while not stop.is_set():
                r = client.post("/v1/answer/batch", json={"bundle": "b", "questions": [wide] * 6},
                                headers={"X-API-Key": keys["flood"]})
                statuses["flood"].append(r.status_code)
                if r.status_code == 429:
                    assert int(r.headers["Retry-After"]) >= 1
                    time.sleep(0.05)

        threads = [threading.Thread(target=flood) for _ in range(4)]
        for thread in threads:
            thread.start()
        for _ in range(15):
            r = client.post("/v1/answer", json={"bundle": "b", **SMALL}, headers={"X-API-Key": keys["small"]})
            statuses["small"].append(r.status_code)
        stop.set()
        for thread in threads:
            thread.join(60)
    assert set(statuses["small"]) == {200}
    assert set(statuses["flood"]) <= {200, 429} and 200 in statuses["flood"] and 429 in statuses["flood"]
    assert engine.batcher.preemptions > 0
