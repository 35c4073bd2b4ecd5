"""Every wire model of the HTTP API (pydantic), and the conversions to and from engine values.

Static limits (2..26 choices, bundle-name pattern, threshold ranges) live on the models; limits that
come from settings (text lengths, batch size) are checked by :func:`check_limits`, which raises
:class:`InvalidRequestError` (rendered as 422 with the same error schema as validation errors). Request
models are strict: no coercion (``"yes"`` is not a bool, ``"0.5"`` not a number; an int is a valid float),
no infinite or NaN numbers, no unknown fields. Text rules (valid Unicode, no control characters, visible
text, distinct choices) are :mod:`core.text`'s; their JSON-schema patterns are stated on the fields.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_serializer
from pydantic.functional_serializers import SerializerFunctionWrapHandler

from core.answers import LETTERS, MAX_CHOICES, MIN_CHOICES, Question, validate_question
from core.bundle import RuleCalibration
from core.errors import InvalidQuestionError
from core.text import OPTIONAL_TEXT_PATTERN, TEXT_PATTERN
from service.engine.types import AnswerOptions, AnswerResult, BundleStatus
from service.settings import Settings

# core.bundle.NAME_PATTERN (fullmatch) and no "..", as one pattern that Rust (pydantic), Python and ECMA-262
# regexes read alike: a '.' is followed by a non-'.' or ends the name; the length is max_length
BUNDLE_NAME_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$"
BundleName = Annotated[str, Field(pattern=BUNDLE_NAME_PATTERN, max_length=64, examples=["default"])]
_TEXT = {"pattern": TEXT_PATTERN}  # checked by core.text in to_question (with its own error code), stated here
QuestionText = Annotated[str, Field(min_length=1, json_schema_extra=_TEXT)]


def _json_integer(value: Any) -> Any:
    """JSON has one number type: 2.0 is the integer 2 (as JSON Schema's ``integer`` says); 2.5, "2", true are not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


JsonInt = Annotated[int, BeforeValidator(_json_integer)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# --- errors ---------------------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str  # invalid_request_error | not_found_error | conflict_error | rate_limit_error | ...
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The one error body of every 4xx/5xx response."""

    error: ErrorInfo


class InvalidRequestError(ValueError):
    """A request the models accept but the server refuses: over a configured limit, blank text (422)."""

    def __init__(self, message: str, param: str | None, code: str = "limit_exceeded") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


# --- answering ------------------------------------------------------------------------------------------


class ThresholdsIn(_Request):
    """Abstain when a score exceeds its threshold; omitted fields fall back to the bundle, then the server."""

    predictive_entropy: float | None = Field(default=None, ge=0)
    mutual_information: float | None = Field(default=None, ge=0)
    one_minus_max_probability: float | None = Field(default=None, ge=0, le=1)
    one_minus_feu: float | None = Field(default=None, ge=0, le=1)  # moe bundles only; others never trip it


class QuestionIn(_Request):
    question: QuestionText = Field(examples=["Which gas do plants take in from the air?"])
    # Omitted for a bundle trained on a label set: every question then gets the bundle's labels as choices.
    choices: list[QuestionText] | None = Field(default=None, min_length=MIN_CHOICES, max_length=MAX_CHOICES,
                                               examples=[["oxygen", "carbon dioxide", "helium"]],
                                               json_schema_extra={"uniqueItems": True},
                                               description="distinct texts (compared NFC-normalized, "
                                               "trimmed of whitespace and zero-width characters)")
    context: str | None = Field(default=None, json_schema_extra={"pattern": OPTIONAL_TEXT_PATTERN})

    def to_question(self, param: str = "", labels: tuple[str, ...] | None = None) -> Question:
        """The engine's question; ``labels`` are the bundle's label set (None: the bundle has none).

        Text is checked strictly here (:func:`core.answers.validate_question`): a lone surrogate or control
        character (``invalid_text``), blank text (``blank_text``), duplicate choices (``duplicate_choices``)
        are 422s naming the field, e.g. ``questions.2.choices.1``."""
        prefix = f"{param}." if param and param != "question" else ""
        where = f"{prefix}choices"
        if self.choices is None:
            if labels is None:
                raise InvalidRequestError("choices are required: this bundle has no label set", where,
                                          code="choices_required")
            choices = labels
        else:
            choices = tuple(self.choices)
            if labels is not None and choices != labels:
                raise InvalidRequestError(f"choices differ from the bundle's labels {list(labels)}: send exactly "
                                          "those, in that order, or omit choices", where, code="choices_mismatch")
        try:
            validate_question(self.question, choices, self.context, strict=True)
            return Question(question=self.question, choices=choices, context=self.context)
        except InvalidQuestionError as err:
            raise InvalidRequestError(str(err), f"{prefix}{err.param}" if err.param else param or None,
                                      code=err.code) from None


RiskScore = Literal["one_minus_max_probability", "predictive_entropy", "mutual_information", "one_minus_feu"]


class GuaranteesIn(_Request):
    """What a request may ask of the bundle's calibration split (omitted: the bundle's defaults)."""

    alpha: float | None = Field(default=None, gt=0, lt=1, description="miscoverage of the answer set: it holds "
                                "the answer with probability >= 1 - alpha (at least 1/(n+1) for n calibration "
                                "questions)")
    target_risk: float | None = Field(default=None, gt=0, lt=1, description="answer only under a threshold "
                                      "certified to keep the error rate among answered <= target_risk")
    delta: float | None = Field(default=None, gt=0, lt=1, description="the risk bound holds with probability "
                                ">= 1 - delta over the calibration draw")
    risk_score: RiskScore | None = None


class AnswerRequest(QuestionIn, GuaranteesIn):
    bundle: BundleName
    thresholds: ThresholdsIn | None = None
    return_members: bool = False

    def options(self, client: str = "-") -> AnswerOptions:
        return _options(self, self.thresholds, self.return_members, client)


class BatchAnswerRequest(GuaranteesIn):
    bundle: BundleName
    questions: list[QuestionIn] = Field(min_length=1)
    thresholds: ThresholdsIn | None = None
    return_members: bool = False

    def options(self, client: str = "-") -> AnswerOptions:
        return _options(self, self.thresholds, self.return_members, client)


def _options(guarantees: GuaranteesIn, thresholds: ThresholdsIn | None, return_members: bool,
             client: str) -> AnswerOptions:
    given = {} if thresholds is None else thresholds.model_dump(exclude_none=True)
    return AnswerOptions(thresholds=given, return_members=return_members, alpha=guarantees.alpha,
                         target_risk=guarantees.target_risk, delta=guarantees.delta,
                         risk_score=guarantees.risk_score, client=client)


def check_limits(questions: list[QuestionIn], settings: Settings, prefix: str = "") -> None:
    """Raise InvalidRequestError for the first text longer than its configured limit."""
    if prefix and len(questions) > settings.max_batch_questions:
        raise InvalidRequestError(f"at most {settings.max_batch_questions} questions per batch, "
                                f"got {len(questions)}", "questions")
    for i, q in enumerate(questions):
        where = f"{prefix}{i}." if prefix else ""
        if len(q.question) > settings.max_question_chars:
            raise InvalidRequestError(f"question longer than {settings.max_question_chars} characters",
                                    f"{where}question")
        if q.context is not None and len(q.context) > settings.max_context_chars:
            raise InvalidRequestError(f"context longer than {settings.max_context_chars} characters",
                                    f"{where}context")
        for j, choice in enumerate(q.choices or ()):
            if len(choice) > settings.max_choice_chars:
                raise InvalidRequestError(f"choice longer than {settings.max_choice_chars} characters",
                                        f"{where}choices.{j}")


class AnswerChoice(BaseModel):
    index: int
    label: str  # "A", "B", …
    text: str


class BundleRefOut(BaseModel):
    name: str
    version: str
    method: str
    base_model_hash: str
    calibration_hash: str
    prompt_hash: str = ""  # sha256 of what fixes the prompt tokens (format, template, instruction, chat template)


class CalibratedRuleOut(RuleCalibration):
    """The bundle's abstention rule as calibrated on validation (see :class:`core.bundle.RuleCalibration`);
    ``as_calibrated`` is false when a request or server setting changed the thresholds applied, so the
    stated coverage and risk do not describe this answer."""

    as_calibrated: bool


class ThresholdsUsedOut(BaseModel):
    predictive_entropy: float | None
    mutual_information: float | None
    one_minus_max_probability: float | None
    one_minus_feu: float | None = None  # moe bundles only
    sources: dict[str, str]  # score → "request" | "bundle" | "settings" | "none"
    rule: CalibratedRuleOut | None = None  # how the bundle's thresholds were calibrated (null: older bundles)


class PredictionSetOut(BaseModel):
    """The split-conformal answer set: it contains the true answer with probability >= 1 - alpha for a
    question exchangeable with the bundle's n calibration questions."""

    alpha: float
    score: str  # lac | aps | raps
    qhat: float  # the ⌈(n + 1)(1 − α)⌉-th smallest calibration score
    n_calibration: int
    indices: list[int]
    labels: list[str]  # "A", "B", …
    choices: list[str]


class RiskControlOut(BaseModel):
    """Learn-then-Test risk control: with probability >= 1 - delta over the calibration draw, the error rate
    among answered questions is <= target_risk when answering iff ``score`` <= ``threshold``."""

    target_risk: float
    delta: float
    score: str
    n_calibration: int
    certified: bool  # false: no threshold carries the guarantee, so the question abstains
    threshold: float | None
    value: float | None  # this question's score (null: the method does not define it)
    answered: bool
    calibration_coverage: float
    calibration_risk: float
    reason: str = ""


class TimingsOut(BaseModel):
    queue_ms: float
    forward_ms: float
    total_ms: float
    batch_rows: int


class AnswerResponse(BaseModel):
    """The answer distribution with its uncertainty; ``members`` only when ``return_members`` was set."""

    answer: AnswerChoice | None  # null only when abstaining; the argmax is always in probabilities
    abstained: bool
    abstain_reasons: list[str]
    probabilities: list[float]  # [K], sums to 1
    predictive_entropy: float  # nats
    expected_entropy: float | None  # nats (aleatoric)
    mutual_information: float | None  # nats (epistemic); null when the method cannot separate it
    max_probability: float
    members: list[list[float]] | None = None  # [M][K]
    thresholds_used: ThresholdsUsedOut
    bundle: BundleRefOut
    request_id: str
    timings: TimingsOut
    notes: list[str] | None = None
    # UQ4CT bundles (method moe) only, omitted otherwise: the routers' functional-level confidence in [0, 1]
    # and its complement, an epistemic uncertainty score usable for abstention (higher = more uncertain)
    feu: float | None = None
    one_minus_feu: float | None = None
    prediction_set: PredictionSetOut | None = None  # null: the bundle was exported without a calibration split
    risk_control: RiskControlOut | None = None  # present when the request or the bundle asks for risk control

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in ("members", "notes"):
            if not data.get(key):
                data.pop(key, None)
        for key in ("feu", "one_minus_feu", "risk_control"):
            if data.get(key) is None:
                data.pop(key, None)
        return data

    @classmethod
    def from_result(cls, result: AnswerResult, question: Question, total_ms: float) -> AnswerResponse:
        index = result.answer_index
        answer = None if result.abstained else AnswerChoice(index=index, label=LETTERS[index],
                                                             text=question.choices[index])
        used = result.thresholds_used
        return cls(
            answer=answer, abstained=result.abstained, abstain_reasons=result.abstain_reasons,
            probabilities=result.probabilities, predictive_entropy=result.predictive_entropy,
            expected_entropy=result.expected_entropy, mutual_information=result.mutual_information,
            max_probability=result.max_probability, members=result.members,
            thresholds_used=ThresholdsUsedOut(**used.values, sources=used.sources,  # type: ignore[arg-type]
                                              rule=None if used.rule is None else CalibratedRuleOut(**used.rule)),
            bundle=BundleRefOut(**vars(result.bundle)), request_id=result.request_id,
            timings=TimingsOut(queue_ms=result.timings.queue_ms, forward_ms=result.timings.forward_ms,
                               total_ms=total_ms, batch_rows=result.timings.batch_rows),
            notes=result.notes or None, feu=result.feu,
            one_minus_feu=None if result.feu is None else 1.0 - result.feu,
            prediction_set=_prediction_set(result, question), risk_control=_risk_control(result))


def _prediction_set(result: AnswerResult, question: Question) -> PredictionSetOut | None:
    found = result.answer_set
    if found is None:
        return None
    return PredictionSetOut(alpha=found.alpha, score=found.score, qhat=found.qhat, n_calibration=found.n_calibration,
                            indices=found.indices, labels=[LETTERS[i] for i in found.indices],
                            choices=[question.choices[i] for i in found.indices])


def _risk_control(result: AnswerResult) -> RiskControlOut | None:
    decision = result.risk
    if decision is None:
        return None
    cert = decision.certificate
    return RiskControlOut(target_risk=cert.target_risk, delta=cert.delta, score=cert.score, n_calibration=cert.n,
                          certified=cert.certified, threshold=cert.threshold,
                          value=decision.value if math.isfinite(decision.value) else None, answered=decision.answer,
                          calibration_coverage=cert.calibration_coverage, calibration_risk=cert.calibration_risk,
                          reason=cert.reason)


class BatchAnswerResponse(BaseModel):
    results: list[AnswerResponse]  # in request order


# --- bundles, feedback, health --------------------------------------------------------------------------


class BundleInfo(BaseModel):
    name: str
    version: str
    method: str
    members: list[str]
    answer_format: str
    base_model_hash: str
    calibration_hash: str
    lora_rank: int
    lora_layers: list[int]
    slots: list[int]
    in_flight: int
    loaded_at: float
    validation_ece: float | None
    thresholds: dict[str, float | None]
    abstention_rule: dict[str, Any] | None = None  # how the thresholds were calibrated, what they achieved
    notes: list[str] = []
    engine: str = "torch"  # which engine scores this bundle's rows: torch (in-process) or vllm
    labels: list[str] | None = None  # a label-set bundle's choices (requests may then omit choices)
    prompt: str = ""  # the bundle's prompt template (or the built-in layout)
    prompt_hash: str = ""
    # what the calibration split supports: n, conformal score, default alpha, delta, risk score and target
    # (null: exported without a calibration split)
    guarantees: dict[str, Any] | None = None

    @classmethod
    def from_status(cls, status: BundleStatus) -> BundleInfo:
        return cls(**vars(status))


class BundleList(BaseModel):
    bundles: list[BundleInfo]


class BundleActionResponse(BaseModel):
    action: str  # "loaded" | "replaced" | "unloaded"
    bundle: BundleInfo
    seconds: float


class FeedbackRequest(_Request):
    # the server's request ids are 32 hex digits; letters, digits and "_.:-" leave room for other engines
    request_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    correct_index: JsonInt = Field(ge=0, lt=MAX_CHOICES)


class FeedbackResponse(BaseModel):
    request_id: str
    bundle: str
    result: str  # "joined"


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    ready: bool
    bundles_loaded: int
    queue_depth_rows: int
