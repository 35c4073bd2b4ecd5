"""Shared builders for service tests: random-weight ensemble bundles on the tiny model, engines, settings."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from core.answers import AnswerFormat
from core.basemodel import BaseModel
from core.bundle import (
    AnswerSpaceSpec,
    BundleManifest,
    Calibration,
    Histogram,
    LoraSpec,
    MemberSpec,
    Method,
    Thresholds,
    base_ref,
    write_bundle,
)
from core.multilora import ALL_MODULES, LoraLayout, MultiLora
from service.settings import Settings

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def random_member(model: torch.nn.Module, layout: LoraLayout, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """peft-format tensors of one LoRA member with random (non-zero) A and B."""
    multilora = MultiLora(model, layout, num_slots=1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for factors in multilora.factors.values():
            factors.lora_A[0].copy_(torch.randn(factors.lora_A[0].shape, generator=generator) * scale)
            factors.lora_B[0].copy_(torch.randn(factors.lora_B[0].shape, generator=generator) * scale)
    tensors = multilora.peft_state_dict(0)
    multilora.remove()
    return tensors


def reference_histograms(bins: int = 10, top: float = math.log(4)) -> dict[str, Histogram]:
    counts = tuple(range(1, bins + 1))
    conf = Histogram(edges=tuple(b / bins for b in range(bins + 1)), counts=counts)
    ent = Histogram(edges=tuple(top * b / bins for b in range(bins + 1)), counts=counts[::-1])
    return {"confidence": conf, "predictive_entropy": ent, "mutual_information": ent}


def make_bundle(
    root: Path,
    base: BaseModel,
    name: str,
    *,
    members: int = 3,
    layers: tuple[int, ...] = (2, 3),
    modules: tuple[str, ...] = ALL_MODULES,
    rank: int = 4,
    alpha: float = 8.0,
    version: str = "1",
    answer_format: AnswerFormat = AnswerFormat.CLOZE,
    temperature: float = 1.0,
    seed: int = 0,
    thresholds: Thresholds | None = None,
    method: Method = Method.ENSEMBLE,
    weights: list[float] | None = None,
    scale: float = 0.1,
    validation_ece: float = 0.05,
) -> Path:
    """Write a random-weight bundle for ``base`` under ``root/name`` and return its path."""
    layout = LoraLayout(modules, layers, rank, alpha)
    tensors = {f"m{i}": random_member(base.model, layout, seed * 1000 + i, scale) for i in range(members)}
    weights = weights or [1.0] * members
    manifest = BundleManifest(
        name=name,
        version=version,
        method=method,
        members=tuple(MemberSpec(name=f"m{i}", weight=weights[i], seed=i) for i in range(members)),
        base_model=base_ref(base.info),
        answer_space=AnswerSpaceSpec(answer_format=answer_format),
        lora=LoraSpec(rank=rank, alpha=alpha, target_modules=modules, layers=layers),
        calibration=Calibration(
            temperature=temperature,
            validation_metrics={"ece": validation_ece},
            reference_histograms=reference_histograms(),
        ),
        thresholds=thresholds or Thresholds(),
    )
    return write_bundle(root / name, manifest, tensors)


def tiny_settings(root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "bundle_root": root,
        "preload_bundles": [],
        "max_slots": 32,
        "max_lora_rank": 16,
        "max_wait_ms": 2.0,
        "torch_threads": 1,
        "drift_min_samples": 5,
        "state_dir": Path(root).parent / "state",  # each test's own SQLite prediction log
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def bundle_maker(tiny_base: BaseModel) -> Any:
    """``bundle_maker(root, name, **options)`` writes a random-weight bundle for the tiny model."""

    def make(root: Path, name: str, base: BaseModel | None = None, **options: Any) -> Path:
        return make_bundle(root, base or tiny_base, name, **options)

    return make


@pytest.fixture
def settings_factory() -> Any:
    """``settings_factory(bundle_root, **overrides)``: test Settings (no env file, small waits, 1 thread)."""
    return tiny_settings


@pytest.fixture
def bundle_root(tmp_path: Path) -> Path:
    root = tmp_path / "bundles"
    root.mkdir()
    return root


@pytest.fixture
def engine_factory(tiny_base: BaseModel) -> Iterator[Any]:
    """``engine_factory(bundle_root, **settings)`` builds a UQEngine on the tiny model; hooks are removed at
    teardown even if a test fails."""
    from service.engine.engine import UQEngine

    made: list[UQEngine] = []

    def make(root: Path, shared_trunk: bool = True, **overrides: Any) -> UQEngine:
        engine = UQEngine(tiny_base, tiny_settings(root, **overrides), shared_trunk=shared_trunk)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.multilora.remove()
        engine.executor.shutdown(wait=False)
