"""Engine-internal values passed between the HTTP layer and the engine (plain dataclasses, no pydantic)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.risk_control import RiskCertificate

THRESHOLD_NAMES = ("predictive_entropy", "mutual_information", "one_minus_max_probability", "one_minus_feu")


@dataclass(frozen=True)
class AnswerOptions:
    """Per-request options: threshold overrides (None = fall through to bundle, then settings)."""

    thresholds: dict[str, float | None] = field(default_factory=dict)
    return_members: bool = False
    alpha: float | None = None  # conformal miscoverage (None: the bundle's)
    target_risk: float | None = None  # risk control's ε (None: the bundle's, if any)
    delta: float | None = None  # risk control's δ (None: the bundle's)
    risk_score: str | None = None  # the score risk control thresholds (None: the bundle's)
    client: str = "-"  # who asks (API key name or address): the per-client budget and fair queue count it


@dataclass(frozen=True)
class BundleRef:
    """Lineage of an answer: which bundle version and calibration produced it."""

    name: str
    version: str
    method: str
    base_model_hash: str
    calibration_hash: str
    prompt_hash: str = ""  # AnswerSpaceSpec.prompt_hash(): what fixes the prompt tokens

    @property
    def window_key(self) -> tuple[str, str]:
        """Which calibration windows (and logged history) this version's answers and labels belong to."""
        return self.version, self.calibration_hash


@dataclass(frozen=True)
class ThresholdsUsed:
    values: dict[str, float | None]  # name → threshold (None = not applied)
    sources: dict[str, str]  # name → "request" | "bundle" | "settings"
    rule: dict[str, Any] | None = None  # the bundle's calibrated rule (RuleCalibration) + "as_calibrated"


@dataclass(frozen=True)
class Timings:
    queue_ms: float  # enqueue → forward start
    forward_ms: float  # the shared forward this question rode in
    batch_rows: int  # rows in that forward (all bundles and members)


@dataclass(frozen=True)
class AnswerSet:
    """The conformal answer set of one question: indices of the choices in it (ascending)."""

    alpha: float
    score: str
    qhat: float
    n_calibration: int
    indices: list[int]


@dataclass(frozen=True)
class RiskDecision:
    """The risk-control statement of one answer: the certificate, the question's score and the verdict."""

    certificate: RiskCertificate
    value: float  # this question's score
    answer: bool  # False: abstain with reason risk_control


@dataclass(frozen=True)
class AnswerResult:
    """One answered question. ``probabilities`` [K]; ``members`` [M][K] only when requested."""

    request_id: str
    answer_index: int
    abstained: bool
    abstain_reasons: list[str]
    probabilities: list[float]
    predictive_entropy: float
    expected_entropy: float | None
    mutual_information: float | None
    max_probability: float
    members: list[list[float]] | None
    thresholds_used: ThresholdsUsed
    bundle: BundleRef
    timings: Timings
    notes: list[str] = field(default_factory=list)
    feu: float | None = None  # functional-level confidence in [0, 1] (method moe only)
    answer_set: AnswerSet | None = None  # None: the bundle has no conformal calibration
    risk: RiskDecision | None = None  # None: risk control was not asked for


@dataclass(frozen=True)
class BundleStatus:
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
    loaded_at: float  # unix time
    validation_ece: float | None
    thresholds: dict[str, float | None]
    abstention_rule: dict[str, Any] | None = None  # the bundle's RuleCalibration (how the thresholds were chosen)
    notes: list[str] = field(default_factory=list)
    engine: str = "torch"  # the engine that scores this bundle's rows (torch | vllm)
    labels: list[str] | None = None  # a label-set bundle's fixed choices
    prompt: str = ""  # the prompt template (or the built-in layout)
    prompt_hash: str = ""
    guarantees: dict[str, Any] | None = None  # calibration split size, score, default alpha / delta / target


@dataclass(frozen=True)
class CalibrationTerms:
    """One labelled answer's share of the calibration sums: confidence bin (15 equal-width bins
    ``(b/15, (b+1)/15]``, 0 in bin 0), confidence = max probability, argmax = label, Brier and NLL terms."""

    bin: int
    confidence: float
    correct: bool
    brier: float
    nll: float


@dataclass(frozen=True)
class FeedbackOutcome:
    request_id: str
    bundle: str
    result: str  # "joined"
    version: str = ""
    terms: CalibrationTerms | None = None


@dataclass(frozen=True)
class WindowStats:
    """Sliding-window metrics over the last labelled requests of one bundle."""

    labelled: int
    accuracy: float
    ece: float
    brier: float
    nll: float
    ece_threshold: float | None = None  # no-drift alarm threshold for ``ece`` at ``labelled`` (core.drift)


@dataclass(frozen=True)
class GuaranteeStats:
    """Scrape-time view of one version's guarantees. Rates are None until a label arrives."""

    alpha: float | None
    labelled: int
    coverage_window: float | None
    miscoverage_lower: float | None  # anytime-valid lower bound on the average miss rate since load
    target_risk: float | None = None
    answered: int = 0
    risk_window: float | None = None
    risk_lower: float | None = None


@dataclass(frozen=True)
class BundleMonitor:
    """What the metrics collector reads per loaded bundle at scrape time."""

    bundle: str
    validation_ece: float | None
    window: WindowStats | None
    drift_ks: dict[str, float]  # score name → KS statistic vs the bundle's drift reference histogram
    drift_psi: dict[str, float]
    drift_ks_threshold: dict[str, float] = field(default_factory=dict)  # score → no-drift alarm threshold
    drift_psi_threshold: dict[str, float] = field(default_factory=dict)
    version: str = ""
    ece_thresholds: dict[int, float] = field(default_factory=dict)  # labelled n → no-drift ECE alarm threshold
    guarantees: GuaranteeStats | None = None  # online coverage and selective risk (None: no calibration split)


class EngineObserver:
    """Hooks the engine calls from its batching loop; the service implements them with Prometheus."""

    def batch_done(self, rows: int, queue_waits_s: list[float]) -> None:
        """One shared forward ran ``rows`` rows; ``queue_waits_s`` has one entry per question in it."""
