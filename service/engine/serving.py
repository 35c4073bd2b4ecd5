"""What every engine shares: bundles, per-method predictors, answers, abstention, feedback and drift.

An engine differs only in how it turns rows (question × member) into choice scores. A subclass says

- ``name``: ``torch`` or ``vllm`` (reported per bundle in ``GET /v1/bundles``);
- :meth:`ServingEngine._check_fit`: whether a bundle's method and adapters fit the engine (4xx otherwise);
- :meth:`ServingEngine._place`: put a predictor's adapters where rows can use them; return one row handle
  (a LoRA slot, a vLLM LoRA id) per adapter;
- :meth:`ServingEngine._release`: free them when the version has no requests left;
- :meth:`ServingEngine._score`: choice scores [R_i, K_i] for each :class:`RowWork`;
- :meth:`ServingEngine._start_scoring` / :meth:`ServingEngine._stop_scoring`: bring the scorer up and down.

Everything else (encoding, versions and hot-swap, combining rows through the bundle's predictor,
abstention, the prediction log, monitoring) is here, so both engines give the same answer for the same
scores, and every answer is committed to the prediction log before :meth:`ServingEngine.answer` returns it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from abc import abstractmethod
from collections import defaultdict
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, ClassVar

import torch

from core.answers import PROMPT_VERSION, EncodedQuestion, Question, encode_question
from core.basemodel import BaseModelInfo
from core.bundle import MANIFEST, Bundle, bundle_path, read_bundle
from core.bundle_checks import answer_space_problem
from core.errors import BundleError, IncompatibleBundleError, InvalidQuestionError
from core.multilora import ALL_MODULES
from service.engine.abstention import abstain_reasons, resolve_thresholds
from service.engine.admission import Admission
from service.engine.base import Engine
from service.engine.errors import (
    BundleIncompatibleError,
    BundleNotFoundError,
    BundleRefusedError,
    DuplicateFeedbackError,
    EngineError,
    EngineUnavailableError,
    FeedbackNotFoundError,
    InvalidInputError,
    RequestTimeoutError,
)
from service.engine.forward import RowWork
from service.engine.guarantee_watch import GuaranteeWatch
from service.engine.guarantees import RISK_CONTROL, BundleGuarantees, guarantee_log
from service.engine.monitoring import Monitor, calibration_terms, drift_reference
from service.engine.predictors import PREDICTORS, Prediction, Predictor, SlotLoad, predictor_for
from service.engine.registry import BundleEntry, Registry
from service.engine.types import (
    AnswerOptions,
    AnswerResult,
    BundleMonitor,
    BundleRef,
    BundleStatus,
    FeedbackOutcome,
    Timings,
)
from service.predlog import (
    AlreadyLabelledError,
    LabelOutOfRangeError,
    PredictionLogError,
    PredictionRecord,
    UnknownRequestError,
    open_store,
    texts_hash,
)
from service.settings import Settings

log = logging.getLogger("uqserve.engine")


class ServingEngine(Engine):
    """The engine-independent part of serving; see the module docstring."""

    name: ClassVar[str]

    def __init__(self, tokenizer: Any, info: BaseModelInfo, settings: Settings) -> None:
        self.tokenizer = tokenizer
        self.info = info
        self.settings = settings
        self.registry = Registry(self._release)
        self.monitoring = Monitor(settings.feedback_window, settings.drift_window, settings.drift_min_samples)
        self.watch = GuaranteeWatch(settings.feedback_window, settings.guarantee_alarm_level)
        self.store = open_store(settings)
        self.admission = Admission(settings.max_request_cost, settings.max_client_cost,
                                   short_cost=settings.short_cost, short_share=settings.short_share,
                                   deadline_s=settings.request_timeout_s)
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._accepting = False
        self._in_flight = 0  # answer and feedback calls between entry and return

    # --- what an engine supplies ----------------------------------------------------------------------

    @abstractmethod
    async def _start_scoring(self) -> None:
        """Start whatever scores rows (batching loop, vLLM engine)."""

    @abstractmethod
    async def _stop_scoring(self) -> None:
        """Finish queued and running rows, then release the scorer."""

    @abstractmethod
    async def _score(self, works: list[RowWork], client: str) -> list[tuple[torch.Tensor, Timings]]:
        """Per work item: choice scores [R_i, K_i] float32 (softmax over K_i = row i's distribution); ``client``
        is who asked (engines that schedule fairly queue per client)."""

    @abstractmethod
    def _check_fit(self, bundle: Bundle, predictor: Predictor, loads: list[SlotLoad]) -> None:
        """Raise :class:`BundleRefusedError` when this engine cannot serve the bundle."""

    @abstractmethod
    async def _place(self, predictor: Predictor, loads: list[SlotLoad]) -> list[int]:
        """Make the adapters usable by rows; one handle per load (becomes ``predictor.slots``)."""

    @abstractmethod
    def _release(self, entry: BundleEntry) -> None:
        """A retired version has no requests left: free what :meth:`_place` took."""

    def _lora_problems(self, bundle: Bundle) -> list[str]:
        """What every engine checks of a bundle's LoRA spec: rank within max_lora_rank, known target modules."""
        lora, problems = bundle.manifest.lora, []
        if lora.rank > self.settings.max_lora_rank:
            problems.append(f"LoRA rank {lora.rank} exceeds this server's max_lora_rank {self.settings.max_lora_rank}")
        unknown = sorted(set(lora.target_modules) - set(ALL_MODULES))
        if unknown:
            problems.append(f"target modules {unknown} are not supported (supported: {list(ALL_MODULES)})")
        return problems

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.start()  # PredictionLogError: the server does not start
        await self._start_scoring()
        self._accepting = True

    async def stop(self) -> None:
        self._accepting = False
        await self._stop_scoring()
        deadline = time.monotonic() + self.settings.request_timeout_s
        while self._in_flight and time.monotonic() < deadline:  # scored answers still being logged
            await asyncio.sleep(0.01)
        await self.store.stop()

    # --- answering ------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._accepting

    async def answer(self, bundle: str, questions: list[Question],
                     options: AnswerOptions) -> list[AnswerResult]:
        if not self.ready:
            raise EngineUnavailableError("the engine is not accepting requests (starting, shutting down or dead)")
        started = time.perf_counter()
        entry = self.registry.acquire(bundle)
        self._in_flight += 1
        try:
            entry.guarantees.check(options)
            encoded = [self._encode(entry, q, i, len(questions)) for i, q in enumerate(questions)]
            rows = tuple(entry.predictor.row_slots())
            works = [RowWork(e, entry.answer_format, rows, entry.predictor.first_layer,
                             custom=entry.predictor.custom_forward) for e in encoded]
            with self.admission.admit(options.client, sum(w.cost for w in works)):  # 413 / 429 before queueing
                try:
                    outputs = await asyncio.wait_for(self._score(works, options.client),
                                                     self.settings.request_timeout_s)
                except TimeoutError:  # its queued rows left the queue; a running batch of its own stops
                    raise RequestTimeoutError(f"no answer within {self.settings.request_timeout_s:g} s") from None
            k_max = max(s.shape[-1] for s, _ in outputs)
            stacked = torch.stack([torch.nn.functional.pad(s, (0, k_max - s.shape[-1]), value=float("-inf"))
                                   for s, _ in outputs])  # [Q, R, K]
            prediction = entry.predictor.combine(stacked)
            results = [self._result(entry, prediction, i, outputs[i][0].shape[-1], timings, options)
                       for i, (_, timings) in enumerate(outputs)]
            await self._log(entry, questions, results, 1000 * (time.perf_counter() - started))
            return results
        finally:
            self._in_flight -= 1
            self.registry.release(entry)

    async def _log(self, entry: BundleEntry, questions: list[Question], results: list[AnswerResult],
                   latency_ms: float) -> None:
        """Commit the answers to the prediction log (none is acknowledged otherwise), then count them live."""
        now = datetime.now(UTC)
        records = [self._record(entry, q, r, now, latency_ms) for q, r in zip(questions, results, strict=True)]
        try:
            await self.store.write(records)
        except PredictionLogError as err:
            raise EngineUnavailableError(f"the answer was not recorded, so it is not given: {err}") from None
        for result in results:
            self.monitoring.record(entry.name, entry.ref.window_key, {"confidence": result.max_probability,
                                                     "predictive_entropy": result.predictive_entropy,
                                                     "mutual_information": result.mutual_information})

    def _record(self, entry: BundleEntry, question: Question, result: AnswerResult, now: datetime,
                latency_ms: float) -> PredictionRecord:
        choices = list(question.choices)
        keep = self.settings.log_texts
        return PredictionRecord(
            request_id=result.request_id, created_at=now, bundle=entry.name, version=entry.ref.version,
            method=entry.ref.method, base_model_hash=entry.ref.base_model_hash,
            calibration_hash=entry.ref.calibration_hash, prompt_hash=entry.ref.prompt_hash,
            question=question.question if keep else None, context=question.context if keep else None,
            choices=choices if keep else None, texts_hash=texts_hash(question.question, question.context, choices),
            probabilities=result.probabilities, answer_index=result.answer_index,
            max_probability=result.max_probability, predictive_entropy=result.predictive_entropy,
            expected_entropy=result.expected_entropy, mutual_information=result.mutual_information,
            feu=result.feu, thresholds={"values": result.thresholds_used.values,
                                        "sources": result.thresholds_used.sources, **guarantee_log(result)},
            abstained=result.abstained, abstain_reasons=list(result.abstain_reasons), latency_ms=latency_ms)

    def _encode(self, entry: BundleEntry, question: Question, index: int, total: int) -> EncodedQuestion:
        try:
            if entry.space.labels is not None and question.choices != entry.space.labels:
                raise InvalidQuestionError(f"choices differ from the bundle's labels {list(entry.space.labels)}")
            return encode_question(self.tokenizer, question, entry.answer_format, entry.max_tokens,
                                   entry.space.prompt)
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
        guarantees = entry.guarantees
        decision = guarantees.decide({"predictive_entropy": entropy, "mutual_information": mi,
                                      "one_minus_max_probability": 1.0 - max_prob,
                                      "one_minus_feu": None if feu is None else 1.0 - feu}, options)
        if decision is not None and not decision.answer:
            reasons.append(RISK_CONTROL)
        members = None
        if options.return_members and prediction.member_probs is not None:
            members = prediction.member_probs[i, :, :k].tolist()
        return AnswerResult(
            request_id=uuid.uuid4().hex, answer_index=int(probs.argmax()), abstained=bool(reasons),
            abstain_reasons=reasons, probabilities=probs.tolist(), predictive_entropy=entropy,
            expected_entropy=float(scores.expected_entropy[i]) if prediction.has_mi else None,
            mutual_information=mi, max_probability=max_prob, members=members, thresholds_used=used,
            feu=feu, answer_set=guarantees.answer_set(probs, options), risk=decision,
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
                bundle = await asyncio.to_thread(read_bundle, path, self.info)
            except IncompatibleBundleError as err:
                raise BundleIncompatibleError(str(err), reason="incompatible_base") from None
            except BundleError as err:
                raise BundleRefusedError(str(err), reason="invalid_bundle") from None
            if bundle.manifest.name != name:
                raise BundleRefusedError(f"directory {name!r} holds bundle {bundle.manifest.name!r}",
                                         reason="invalid_bundle")
            try:
                reference = await asyncio.to_thread(drift_reference, bundle.manifest.calibration)
            except Exception as err:  # reference histograms the drift monitor cannot use
                raise BundleRefusedError(f"bundle {name!r}: {MANIFEST}: calibration: {type(err).__name__}: {err}",
                                         reason="invalid_bundle") from None
            try:  # before any adapter is placed, so a failing log leaves nothing to release
                history = await self.store.history(name, bundle.manifest.version, bundle.manifest.calibration_hash(),
                                                   self.settings.feedback_window, self.settings.drift_window)
            except PredictionLogError as err:
                raise EngineUnavailableError(f"cannot rebuild {name!r}'s windows from the log: {err}") from None
            entry = await self._activate(bundle)
            old = self.registry.install(entry)
            self.monitoring.start_bundle(name, entry.ref.window_key, reference, history)
            self.watch.start_bundle(name, entry.ref.window_key, bundle.manifest.calibration, history)
            log.info("%s bundle %s v%s (%d adapters, %s engine) in %.3f s", "replaced" if old else "loaded", name,
                     entry.ref.version, len(entry.slots), self.name, time.perf_counter() - started)
            return self._status(entry)

    async def _activate(self, bundle: Bundle) -> BundleEntry:
        """Check the bundle fits the engine, place its adapters, build its entry."""
        if bundle.manifest.method not in PREDICTORS:
            supported = ", ".join(sorted(m.value for m in PREDICTORS))
            raise BundleRefusedError(f"method {bundle.manifest.method.value!r} has no serving predictor "
                                     f"(this server serves: {supported})", reason="unsupported_method")
        try:
            predictor = predictor_for(bundle)
            loads = predictor.slot_loads()
        except EngineError:
            raise
        except Exception as err:  # the method's own checks (missing artifacts or members, bad config)
            raise BundleRefusedError(f"bundle {bundle.manifest.name!r}: {err}", reason="invalid_bundle") from None
        manifest = bundle.manifest
        if manifest.answer_space.prompt_version != PROMPT_VERSION:
            raise BundleRefusedError(f"bundle {manifest.name!r}: prompt_version "
                                     f"{manifest.answer_space.prompt_version!r} ≠ server {PROMPT_VERSION!r}",
                                     reason="layout")
        mismatch = manifest.answer_space.prompt.mismatch(self.tokenizer)
        if mismatch is not None:
            raise BundleRefusedError(f"bundle {manifest.name!r}: {mismatch}", reason="prompt_mismatch")
        problem = answer_space_problem(manifest.answer_space, self.tokenizer)
        if problem is not None:  # it would fail every question: refuse it now rather than 4xx each request
            raise BundleRefusedError(f"bundle {manifest.name!r}: {MANIFEST}: {problem}", reason="answer_space")
        self._check_fit(bundle, predictor, loads)
        try:  # an engine's _place frees what it took before raising
            predictor.slots = await self._place(predictor, loads)
        except EngineError:
            raise
        except Exception as err:  # adapters the engine's own loader rejects
            raise BundleRefusedError(f"bundle {manifest.name!r}: adapters do not load: {err}",
                                     reason="layout") from None
        ref = BundleRef(name=manifest.name, version=manifest.version, method=manifest.method.value,
                        base_model_hash=manifest.base_model.weight_hash,
                        calibration_hash=manifest.calibration_hash(),
                        prompt_hash=manifest.answer_space.prompt_hash())
        notes = []
        calibrated = manifest.calibration.dtype
        if calibrated is not None and calibrated != self.settings.dtype:
            notes.append(f"bundle calibrated on a {calibrated} base but served on {self.settings.dtype}: its "
                         "stated coverage, risk and validation ECE were not measured on these numerics")
        return BundleEntry(name=manifest.name, generation=self.registry.next_generation(),
                           predictor=predictor, ref=ref, space=manifest.answer_space,
                           guarantees=BundleGuarantees(manifest.calibration), notes=notes)

    async def unload_bundle(self, name: str) -> BundleStatus:
        async with self._locks[name]:
            entry = self.registry.remove(name)
            self.monitoring.stop_bundle(name)
            self.watch.stop_bundle(name)
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
            notes=list(entry.notes), engine=self.name,
            labels=None if entry.space.labels is None else list(entry.space.labels),
            prompt=entry.space.prompt_text(), prompt_hash=entry.ref.prompt_hash,
            guarantees=entry.guarantees.summary())

    def labels(self, bundle: str) -> tuple[str, ...] | None:
        return self.registry.get(bundle).space.labels

    # --- monitoring -----------------------------------------------------------------------------------

    async def feedback(self, request_id: str, correct_index: int) -> FeedbackOutcome:
        self._in_flight += 1
        try:
            answer = await self.store.label(request_id, correct_index)
        except UnknownRequestError as err:
            raise FeedbackNotFoundError(str(err), param="request_id") from None
        except AlreadyLabelledError as err:
            raise DuplicateFeedbackError(str(err), bundle=err.bundle, param="request_id") from None
        except LabelOutOfRangeError as err:
            raise InvalidInputError(str(err), param="correct_index") from None
        except PredictionLogError as err:
            raise EngineUnavailableError(f"the label was not recorded: {err}") from None
        finally:
            self._in_flight -= 1
        self.monitoring.labelled(answer)
        self.watch.labelled(answer)
        return FeedbackOutcome(request_id=request_id, bundle=answer.bundle, result="joined", version=answer.version,
                               terms=calibration_terms(answer.probabilities, answer.label))

    def monitor(self) -> list[BundleMonitor]:
        return [replace(self.monitoring.snapshot(entry.name, entry.ref.version,
                                                 entry.predictor.manifest.calibration.validation_metrics.get("ece")),
                        guarantees=self.watch.stats(entry.name))
                for entry in self.registry.entries()]
