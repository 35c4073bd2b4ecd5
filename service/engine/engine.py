"""The multi-LoRA uncertainty engine: base model once, bundles in LoRA slots, one shared forward per batch.

One :class:`~core.multilora.MultiLora` covers every decoder layer × every projection at rank
``max_lora_rank`` with ``max_slots`` slots; each loaded bundle member occupies one slot (smaller ranks are
zero-padded, which is exact). A question expands to its bundle's rows (one per member), rows of many
bundles run together through :class:`~service.engine.forward.MixedForward`, and the bundle's predictor
combines them into the answer distribution with its uncertainty decomposition.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import torch

from core.answers import PROMPT_VERSION, EncodedQuestion, Question, encode_question
from core.basemodel import BaseModel, load_base_model
from core.bundle import Bundle, bundle_path, read_bundle
from core.errors import BundleError, IncompatibleBundleError, InvalidQuestionError
from core.multilora import ALL_MODULES, LoraLayout, MultiLora, check_peft_tensors
from service.engine.abstention import abstain_reasons, resolve_thresholds
from service.engine.base import Engine
from service.engine.batcher import MicroBatcher
from service.engine.errors import (
    BundleIncompatibleError,
    BundleNotFoundError,
    BundleRefusedError,
    EngineUnavailableError,
    InvalidInputError,
    RequestTimeoutError,
)
from service.engine.forward import MixedForward, RowWork
from service.engine.monitoring import Monitor, drift_reference
from service.engine.predictors import PREDICTORS, Prediction, Predictor, SlotLoad, predictor_for
from service.engine.registry import BundleEntry, Registry, SlotPool
from service.engine.types import (
    AnswerOptions,
    AnswerResult,
    BundleMonitor,
    BundleRef,
    BundleStatus,
    EngineObserver,
    FeedbackOutcome,
    Timings,
)
from service.settings import Settings

log = logging.getLogger("uqserve.engine")


class UQEngine(Engine):
    """The real engine; see the module docstring."""

    def __init__(self, base: BaseModel, settings: Settings, *, shared_trunk: bool = True) -> None:
        self.base = base
        self.settings = settings
        torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)
        layout = LoraLayout(ALL_MODULES, tuple(range(base.info.num_layers)), settings.max_lora_rank,
                            alpha=float(settings.max_lora_rank))
        self.multilora = MultiLora(base.model, layout, settings.max_slots)
        self.pool = SlotPool(settings.max_slots)
        self.registry = Registry(self._free_entry)
        self.monitoring = Monitor(settings.feedback_capacity, settings.feedback_window, settings.drift_window,
                                  settings.drift_min_samples)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uqserve-forward")
        self.forward = MixedForward(base.model, base.tokenizer, self.multilora, shared_trunk=shared_trunk)
        self.batcher = MicroBatcher(self.forward, self.executor, max_batch_rows=settings.max_batch_rows,
                                    max_wait_s=settings.max_wait_ms / 1000,
                                    max_queue_rows=settings.max_queue_rows)
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._fill_lock = threading.Lock()
        self._accepting = False

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

    async def start(self) -> None:
        await self.batcher.start()
        self._accepting = True

    async def stop(self) -> None:
        self._accepting = False
        await self.batcher.stop()
        self.executor.shutdown(wait=True)
        self.multilora.remove()
        for entry in self.registry.entries():
            entry.predictor.detach()

    @property
    def ready(self) -> bool:
        return self._accepting

    @property
    def queue_depth_rows(self) -> int:
        return self.batcher.queued_rows

    # --- answering ------------------------------------------------------------------------------------

    async def answer(self, bundle: str, questions: list[Question],
                     options: AnswerOptions) -> list[AnswerResult]:
        if not self._accepting:
            raise EngineUnavailableError("the engine is not accepting requests (starting or shutting down)")
        entry = self.registry.acquire(bundle)
        try:
            encoded = [self._encode(entry, q, i, len(questions)) for i, q in enumerate(questions)]
            rows = tuple(entry.predictor.row_slots())
            works = [RowWork(e, entry.answer_format, rows, entry.predictor.first_layer,
                             custom=entry.predictor.custom_forward) for e in encoded]
            try:
                outputs = await asyncio.wait_for(self.batcher.submit(works), self.settings.request_timeout_s)
            except TimeoutError:
                raise RequestTimeoutError(f"no answer within {self.settings.request_timeout_s:g} s") from None
            k_max = max(s.shape[-1] for s, _ in outputs)
            stacked = torch.stack([torch.nn.functional.pad(s, (0, k_max - s.shape[-1]), value=float("-inf"))
                                   for s, _ in outputs])  # [Q, R, K]
            prediction = entry.predictor.combine(stacked)
            return [self._result(entry, prediction, i, outputs[i][0].shape[-1], timings, options)
                    for i, (_, timings) in enumerate(outputs)]
        finally:
            self.registry.release(entry)

    def _encode(self, entry: BundleEntry, question: Question, index: int, total: int) -> EncodedQuestion:
        try:
            return encode_question(self.base.tokenizer, question, entry.answer_format, entry.max_tokens)
        except InvalidQuestionError as err:
            param = "question" if total == 1 else f"questions.{index}"
            raise InvalidInputError(str(err), param=param) from None

    def _result(self, entry: BundleEntry, prediction: Prediction, i: int, k: int, timings: Timings,
                options: AnswerOptions) -> AnswerResult:
        scores = prediction.scores
        probs = scores.probabilities[i, :k]
        entropy = float(scores.predictive_entropy[i])
        mi = float(scores.mutual_information[i]) if prediction.has_mi else None
        max_prob = float(probs.max())
        feu = None if prediction.feu is None else float(prediction.feu[i])
        used = resolve_thresholds(options.thresholds, entry.predictor.manifest.thresholds,
                                  self.settings.default_thresholds())
        reasons = abstain_reasons(used, predictive_entropy=entropy, mutual_information=mi,
                                  max_probability=max_prob, feu=feu)
        members = None
        if options.return_members and prediction.member_probs is not None:
            members = prediction.member_probs[i, :, :k].tolist()
        request_id = uuid.uuid4().hex
        prob_list = probs.tolist()
        live = {"confidence": max_prob, "predictive_entropy": entropy, "mutual_information": mi}
        self.monitoring.record(request_id, entry.name, entry.generation, prob_list, live)
        return AnswerResult(
            request_id=request_id, answer_index=int(probs.argmax()), abstained=bool(reasons),
            abstain_reasons=reasons, probabilities=prob_list, predictive_entropy=entropy,
            expected_entropy=float(scores.expected_entropy[i]) if prediction.has_mi else None,
            mutual_information=mi, max_probability=max_prob, members=members, thresholds_used=used,
            feu=feu,
            bundle=entry.ref, timings=timings, notes=[*prediction.notes, *entry.notes])

    # --- bundles --------------------------------------------------------------------------------------

    async def load_bundle(self, name: str) -> BundleStatus:
        try:
            path = bundle_path(self.settings.bundle_root, name)
        except BundleError as err:
            raise BundleRefusedError(str(err), reason="invalid_name", param="name") from None
        if not path.is_dir():
            raise BundleNotFoundError(f"no bundle named {name!r} in the bundle root", param="name")
        async with self._locks[name]:
            started = time.perf_counter()
            try:
                bundle = await asyncio.to_thread(read_bundle, path, self.base.info)
            except IncompatibleBundleError as err:
                raise BundleIncompatibleError(str(err), reason="incompatible_base") from None
            except BundleError as err:
                raise BundleRefusedError(str(err), reason="invalid_bundle") from None
            if bundle.manifest.name != name:
                raise BundleRefusedError(f"directory {name!r} holds bundle {bundle.manifest.name!r}",
                                         reason="invalid_bundle")
            reference = await asyncio.to_thread(drift_reference, bundle.manifest.calibration)
            entry = await self._activate(bundle)
            old = self.registry.install(entry)
            self.monitoring.start_bundle(name, entry.generation, reference)
            log.info("%s bundle %s v%s (%d slots) in %.3f s", "replaced" if old else "loaded", name,
                     entry.ref.version, len(entry.slots), time.perf_counter() - started)
            return self._status(entry)

    async def _activate(self, bundle: Bundle) -> BundleEntry:
        """Check the bundle fits the engine, fill its LoRA slots, build its entry."""
        if bundle.manifest.method not in PREDICTORS:
            supported = ", ".join(sorted(m.value for m in PREDICTORS))
            raise BundleRefusedError(f"method {bundle.manifest.method.value!r} has no serving predictor "
                                     f"(this server serves: {supported})", reason="unsupported_method")
        try:
            predictor = predictor_for(bundle)
        except (LookupError, ValueError) as err:  # the method's own checks (missing artifacts, bad config)
            raise BundleRefusedError(f"bundle {bundle.manifest.name!r}: {err}", reason="invalid_bundle") from None
        loads = predictor.slot_loads()
        self._check_fit(bundle, loads)
        slots = self.pool.allocate(len(loads))
        try:  # free slots are referenced by no row, so filling them cannot disturb a running forward
            await asyncio.to_thread(self._fill, slots, loads)
        except BaseException:
            self.pool.release(slots)
            raise
        predictor.slots = slots
        if _overrides(predictor, "attach"):
            try:  # a method's own hooks (MoE routers/experts) attach on the worker thread, between forwards
                await self.batcher.run_in_worker(predictor.attach, self.base.model)
            except BaseException:
                self.pool.release(slots)
                raise
        manifest = bundle.manifest
        ref = BundleRef(name=manifest.name, version=manifest.version, method=manifest.method.value,
                        base_model_hash=manifest.base_model.weight_hash,
                        calibration_hash=manifest.calibration_hash())
        notes = []
        calibrated = manifest.calibration.dtype
        if calibrated is not None and calibrated != self.settings.dtype:
            notes.append(f"bundle calibrated on a {calibrated} base but served on {self.settings.dtype}: its "
                         "stated coverage, risk and validation ECE were not measured on these numerics")
        return BundleEntry(name=manifest.name, generation=self.registry.next_generation(),
                           predictor=predictor, ref=ref, answer_format=manifest.answer_space.answer_format,
                           max_tokens=manifest.answer_space.max_tokens, notes=notes)

    def _check_fit(self, bundle: Bundle, loads: list[SlotLoad]) -> None:
        manifest, problems = bundle.manifest, []
        if manifest.lora.rank > self.settings.max_lora_rank:
            problems.append(f"LoRA rank {manifest.lora.rank} exceeds this server's max_lora_rank "
                            f"{self.settings.max_lora_rank}")
        unknown = sorted(set(manifest.lora.target_modules) - set(ALL_MODULES))
        if unknown:
            problems.append(f"target modules {unknown} are not supported (supported: {list(ALL_MODULES)})")
        if manifest.answer_space.prompt_version != PROMPT_VERSION:
            problems.append(f"prompt_version {manifest.answer_space.prompt_version!r} ≠ server "
                            f"{PROMPT_VERSION!r}")
        if not problems:
            for load in loads:
                problems.extend(check_peft_tensors(load.tensors, self.multilora))
        if problems:
            reason = "rank" if manifest.lora.rank > self.settings.max_lora_rank else "layout"
            raise BundleRefusedError(f"bundle {manifest.name!r}: " + "; ".join(problems[:20]), reason=reason)

    def _fill(self, slots: list[int], loads: list[SlotLoad]) -> None:
        """Write adapters into free slots (clearing each first); runs beside forwards, never on used slots."""
        with self._fill_lock:
            for slot, load in zip(slots, loads, strict=True):
                self.multilora.load_peft_state_dict(slot, load.tensors, load.scaling)

    def _free_entry(self, entry: BundleEntry) -> None:
        """A retired version has no requests left: its slots return to the pool (the next fill clears them)."""
        self._detach(entry.predictor)
        self.pool.release(list(entry.slots))

    def _detach(self, predictor: Predictor) -> None:
        """Remove a freed predictor's own hooks (MoE) on the worker thread, so no running forward loses them."""
        if not _overrides(predictor, "detach"):
            return
        try:
            self.executor.submit(predictor.detach)
        except RuntimeError:  # the executor is shut down: no forward can run any more
            predictor.detach()

    async def unload_bundle(self, name: str) -> BundleStatus:
        async with self._locks[name]:
            entry = self.registry.remove(name)
            self.monitoring.stop_bundle(name)
            return self._status(entry)

    def bundles(self) -> list[BundleStatus]:
        return [self._status(entry) for entry in self.registry.entries()]

    def _status(self, entry: BundleEntry) -> BundleStatus:
        manifest = entry.predictor.manifest
        rule = manifest.thresholds.rule
        return BundleStatus(
            name=entry.name, version=entry.ref.version, method=entry.ref.method,
            members=[m.name for m in manifest.members], answer_format=entry.answer_format.value,
            base_model_hash=entry.ref.base_model_hash, calibration_hash=entry.ref.calibration_hash,
            lora_rank=manifest.lora.rank, lora_layers=list(manifest.lora.layers), slots=list(entry.slots),
            in_flight=entry.refcount, loaded_at=entry.loaded_at,
            validation_ece=manifest.calibration.validation_metrics.get("ece"),
            thresholds=manifest.thresholds.model_dump(exclude={"target", "rule"}),
            abstention_rule=None if rule is None else rule.model_dump(mode="json"),
            notes=list(entry.notes))

    # --- monitoring -----------------------------------------------------------------------------------

    def feedback(self, request_id: str, correct_index: int) -> FeedbackOutcome:
        return self.monitoring.feedback(request_id, correct_index)

    def monitor(self) -> list[BundleMonitor]:
        return [self.monitoring.snapshot(entry.name, entry.predictor.manifest.calibration.validation_metrics.get("ece"))
                for entry in self.registry.entries()]


def _overrides(predictor: Predictor, method: str) -> bool:
    """True when the predictor's class replaces a no-op hook of :class:`Predictor` (then it must run on the
    worker); plain LoRA methods skip the round-trip, so a hot-swap never waits behind a running forward."""
    return getattr(type(predictor), method) is not getattr(Predictor, method)
