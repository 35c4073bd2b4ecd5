"""Hot-swap under concurrent load (0 failures, versions switch, slots freed) and refusal of bad bundles."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest

from core.answers import Question
from core.basemodel import BaseModel
from core.bundle import Method
from service.engine.errors import (
    BundleIncompatibleError,
    BundleNotFoundError,
    BundleRefusedError,
    CapacityError,
)
from service.engine.predictors import PREDICTORS, EnsemblePredictor
from service.engine.types import AnswerOptions

Q = Question("Which gas do plants take in?", ("oxygen", "carbon dioxide", "helium"))


def test_hot_swap_under_concurrent_load(engine_factory: Any, bundle_maker: Any, bundle_root: Path) -> None:
    bundle_maker(bundle_root, "swap", members=3, version="1", seed=1)
    engine = engine_factory(bundle_root, max_wait_ms=1.0)
    seen: list[str] = []
    errors: list[BaseException] = []

    async def main() -> None:
        await engine.start()
        await engine.load_bundle("swap")
        done = asyncio.Event()

        async def client() -> None:
            while not done.is_set():
                try:
                    result = await engine.answer("swap", [Q], AnswerOptions())
                    seen.append(result[0].bundle.version)
                except Exception as err:
                    errors.append(err)

        clients = [asyncio.create_task(client()) for _ in range(8)]

        async def progress(count: int) -> None:  # wait for answers rather than wall time (slow CI machines)
            target = len(seen) + count
            while len(seen) < target and not errors:
                await asyncio.sleep(0.01)

        for version in range(2, 6):
            await progress(8)
            await asyncio.to_thread(bundle_maker, bundle_root, "swap", members=3, version=str(version), seed=version)
            await engine.load_bundle("swap")
        await progress(8)
        done.set()
        await asyncio.gather(*clients)
        after = await engine.answer("swap", [Q], AnswerOptions())
        assert after[0].bundle.version == "5"
        assert engine.pool.free == engine.pool.num_slots - 3  # every replaced version's slots came back
        assert engine.registry.draining == 0
        await engine.stop()

    asyncio.run(main())
    assert errors == []
    assert {"1", "5"} <= set(seen) and len(seen) > 20


def test_in_flight_request_finishes_on_its_version(engine_factory: Any, bundle_maker: Any, bundle_root: Path) -> None:
    bundle_maker(bundle_root, "swap", members=2, version="1", seed=1)
    engine = engine_factory(bundle_root, max_wait_ms=0.0)
    gate = threading.Event()

    async def main() -> None:
        await engine.start()
        await engine.load_bundle("swap")
        v1_slots = set(engine.registry.get("swap").slots)
        blocker = asyncio.create_task(engine.batcher.run_in_worker(gate.wait, 10))  # hold the worker thread
        old = asyncio.create_task(engine.answer("swap", [Q], AnswerOptions()))
        await asyncio.sleep(0.05)  # its forward is queued on the worker, behind the blocker
        bundle_maker(bundle_root, "swap", members=2, version="2", seed=2)
        swap = asyncio.create_task(engine.load_bundle("swap"))
        await asyncio.sleep(0.05)
        gate.set()
        await blocker
        status = await swap
        assert status.version == "2" and not v1_slots & set(status.slots)
        assert (await old)[0].bundle.version == "1"
        assert (await engine.answer("swap", [Q], AnswerOptions()))[0].bundle.version == "2"
        assert engine.pool.free == engine.pool.num_slots - 2
        await engine.stop()

    asyncio.run(main())


def test_swap_does_not_wait_for_a_running_forward(engine_factory: Any, bundle_maker: Any, bundle_root: Path) -> None:
    bundle_maker(bundle_root, "swap", members=3, version="1", seed=1)
    engine = engine_factory(bundle_root)
    gate = threading.Event()

    async def main() -> None:
        await engine.start()
        await engine.load_bundle("swap")
        blocker = asyncio.create_task(engine.batcher.run_in_worker(gate.wait, 30))  # a long forward
        bundle_maker(bundle_root, "swap", members=3, version="2", seed=2)
        status = await asyncio.wait_for(engine.load_bundle("swap"), 10)  # done while the worker is busy
        assert status.version == "2" and not blocker.done()
        gate.set()
        await blocker
        await engine.stop()

    asyncio.run(main())


def test_unload_waits_for_in_flight_then_frees_slots(engine_factory: Any, bundle_maker: Any, bundle_root: Path) -> None:
    bundle_maker(bundle_root, "gone", members=4)
    engine = engine_factory(bundle_root, max_wait_ms=0.0)
    gate = threading.Event()

    async def main() -> None:
        await engine.start()
        await engine.load_bundle("gone")
        blocker = asyncio.create_task(engine.batcher.run_in_worker(gate.wait, 10))
        pending = asyncio.create_task(engine.answer("gone", [Q], AnswerOptions()))
        await asyncio.sleep(0.05)
        await engine.unload_bundle("gone")
        assert engine.pool.free == engine.pool.num_slots - 4  # still held by the in-flight request
        with pytest.raises(BundleNotFoundError):
            await engine.answer("gone", [Q], AnswerOptions())
        gate.set()
        await blocker
        assert len((await pending)[0].probabilities) == 3
        assert engine.pool.free == engine.pool.num_slots
        await engine.stop()

    asyncio.run(main())


class BrokenPredictor(EnsemblePredictor):
    """Stands in for a method whose own checks reject the bundle (e.g. a missing posterior artifact)."""

    def __init__(self, bundle: Any) -> None:
        raise LookupError("bundle lacks its method artifact")


def test_bad_bundles_are_refused_and_serving_continues(
    engine_factory: Any, bundle_maker: Any, bundle_root: Path, tiny_base: BaseModel, monkeypatch: Any
) -> None:
    monkeypatch.delitem(PREDICTORS, Method.LAPLACE, raising=False)  # a method without a predictor
    monkeypatch.setitem(PREDICTORS, Method.MOE, BrokenPredictor)
    bundle_maker(bundle_root, "good", members=2)
    bundle_maker(bundle_root, "moe", members=2, method=Method.MOE)
    bundle_maker(bundle_root, "too-big", members=2, rank=32)
    bundle_maker(bundle_root, "laplace", members=1, method=Method.LAPLACE)
    other = BaseModel(tiny_base.model, tiny_base.tokenizer, dataclasses.replace(tiny_base.info, weight_hash="0" * 64))
    bundle_maker(bundle_root, "other-base", base=other, members=2)
    broken = bundle_maker(bundle_root, "broken", members=2)
    (broken / "members" / "m1" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    pickled = bundle_maker(bundle_root, "pickled", members=2)
    (pickled / "extra.bin").write_bytes(b"\x80\x04")
    (bundle_root / "misnamed").mkdir()
    engine = engine_factory(bundle_root, max_slots=4)

    async def main() -> None:
        await engine.start()
        await engine.load_bundle("good")
        cases = {
            "too-big": (BundleRefusedError, "rank"),
            "laplace": (BundleRefusedError, "unsupported_method"),
            "moe": (BundleRefusedError, "invalid_bundle"),
            "other-base": (BundleIncompatibleError, "incompatible_base"),
            "broken": (BundleRefusedError, "invalid_bundle"),
            "pickled": (BundleRefusedError, "invalid_bundle"),
            "misnamed": (BundleRefusedError, "invalid_bundle"),
            "../good": (BundleRefusedError, "invalid_name"),
        }
        for name, (error, reason) in cases.items():
            with pytest.raises(error) as info:
                await engine.load_bundle(name)
            assert info.value.reason == reason, (name, info.value)
            assert str(info.value)
        with pytest.raises(BundleNotFoundError):
            await engine.load_bundle("absent")
        bundle_maker(bundle_root, "three", members=3)
        with pytest.raises(CapacityError):  # 2 of 4 slots are taken
            await engine.load_bundle("three")
        assert engine.pool.free == 2
        result = await engine.answer("good", [Q], AnswerOptions())
        assert abs(sum(result[0].probabilities) - 1) < 1e-9
        assert [s.name for s in engine.bundles()] == ["good"]
        await engine.stop()

    asyncio.run(main())
