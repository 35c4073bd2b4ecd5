"""The torch engine: base model once in this process, bundles in LoRA slots, one shared forward per batch.

One :class:`~core.multilora.MultiLora` covers every decoder layer × every projection at rank
``max_lora_rank`` with ``max_slots`` slots; each loaded bundle member occupies one slot (smaller ranks are
zero-padded, which is exact). A question expands to its bundle's rows (one per member), rows of many
bundles run together through :class:`~service.engine.forward.MixedForward` (the frozen trunk below the
lowest adapted layer runs once per question), and :class:`~service.engine.serving.ServingEngine` combines
them through the bundle's predictor. This is the embedded default and the reference for other engines.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from core.basemodel import BaseModel, load_base_model
from core.bundle import Bundle
from core.multilora import ALL_MODULES, LoraLayout, MultiLora, check_peft_tensors
from service.engine.batcher import MicroBatcher
from service.engine.errors import BundleRefusedError
from service.engine.forward import MixedForward, RowWork
from service.engine.predictors import Predictor, SlotLoad, overrides_hook
from service.engine.registry import BundleEntry, SlotPool
from service.engine.serving import ServingEngine
from service.engine.types import EngineObserver, Timings
from service.settings import Settings


class UQEngine(ServingEngine):
    """The torch engine; see the module docstring."""

    name = "torch"

    def __init__(self, base: BaseModel, settings: Settings, *, shared_trunk: bool = True) -> None:
        super().__init__(base.tokenizer, base.info, settings)
        self.base = base
        torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)
        layout = LoraLayout(ALL_MODULES, tuple(range(base.info.num_layers)), settings.max_lora_rank,
                            alpha=float(settings.max_lora_rank))
        self.multilora = MultiLora(base.model, layout, settings.max_slots)
        self.pool = SlotPool(settings.max_slots)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uqserve-forward")
        self.forward = MixedForward(base.model, base.tokenizer, self.multilora, shared_trunk=shared_trunk)
        self.batcher = MicroBatcher(self.forward, self.executor, max_batch_rows=settings.max_batch_rows,
                                    max_wait_s=settings.max_wait_ms / 1000,
                                    max_queue_rows=settings.max_queue_rows, max_batch_cost=settings.max_batch_cost,
                                    step_cost=settings.step_cost, short_cost=settings.short_cost,
                                    short_share=settings.short_share,
                                    fair=settings.fair_scheduling)
        self._fill_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> UQEngine:
        """Load the configured base model and build the engine around it."""
        dtype = getattr(torch, settings.dtype)
        base = load_base_model(settings.base_model, dtype=dtype, device=settings.device)
        return cls(base, settings)

    # --- lifecycle ------------------------------------------------------------------------------------

    def set_observer(self, observer: EngineObserver) -> None:
        self.observer = observer
        self.batcher.observer = observer

    async def _start_scoring(self) -> None:
        await self.batcher.start()

    async def _stop_scoring(self) -> None:
        await self.batcher.stop()
        self.executor.shutdown(wait=True)
        self.multilora.remove()
        for entry in self.registry.entries():
            entry.predictor.detach()

    @property
    def queue_depth_rows(self) -> int:
        return self.batcher.queued_rows

    # --- rows → choice scores -------------------------------------------------------------------------

    async def _score(self, works: list[RowWork], client: str) -> list[tuple[torch.Tensor, Timings]]:
        return await self.batcher.submit(works, client)

    # --- adapters in slots ----------------------------------------------------------------------------

    def _check_fit(self, bundle: Bundle, predictor: Predictor, loads: list[SlotLoad]) -> None:
        manifest = bundle.manifest
        problems = self._lora_problems(bundle)
        if not problems:
            for load in loads:
                problems.extend(check_peft_tensors(load.tensors, self.multilora))
        if problems:
            reason = "rank" if manifest.lora.rank > self.settings.max_lora_rank else "layout"
            raise BundleRefusedError(f"bundle {manifest.name!r}: " + "; ".join(problems[:20]), reason=reason)

    async def _place(self, predictor: Predictor, loads: list[SlotLoad]) -> list[int]:
        slots = self.pool.allocate(len(loads))
        try:  # free slots are referenced by no row, so filling them cannot disturb a running forward
            await asyncio.to_thread(self._fill, slots, loads)
        except BaseException:
            self.pool.release(slots)
            raise
        predictor.slots = slots
        if overrides_hook(predictor, "attach"):
            try:  # a method's own hooks (MoE routers/experts) attach on the worker thread, between forwards
                await self.batcher.run_in_worker(predictor.attach, self.base.model)
            except BaseException:
                self.pool.release(slots)
                raise
        return slots

    def _fill(self, slots: list[int], loads: list[SlotLoad]) -> None:
        """Write adapters into free slots (clearing each first); runs beside forwards, never on used slots."""
        with self._fill_lock:
            for slot, load in zip(slots, loads, strict=True):
                self.multilora.load_peft_state_dict(slot, load.tensors, load.scaling)

    def _release(self, entry: BundleEntry) -> None:
        """A retired version has no requests left: its slots return to the pool (the next fill clears them)."""
        self._detach(entry.predictor)
        self.pool.release(list(entry.slots))

    def _detach(self, predictor: Predictor) -> None:
        """Remove a freed predictor's own hooks (MoE) on the worker thread, so no running forward loses them."""
        if not overrides_hook(predictor, "detach"):
            return
        try:
            self.executor.submit(predictor.detach)
        except RuntimeError:  # the executor is shut down: no forward can run any more
            predictor.detach()

