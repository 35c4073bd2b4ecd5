"""What the prediction log stores and returns (plain dataclasses), and its errors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from core.errors import UqserveError


class PredictionLogError(UqserveError):
    """The log cannot be used (unreachable database, schema newer than this server)."""


class UnknownRequestError(LookupError):
    """No answered request with this id is on record."""


class AlreadyLabelledError(ValueError):
    """The request already has a label (another replica may have taken it)."""

    def __init__(self, message: str, bundle: str) -> None:
        super().__init__(message)
        self.bundle = bundle


class LabelOutOfRangeError(ValueError):
    """The label is not a choice index of the answered question."""


def texts_hash(question: str, context: str | None, choices: list[str]) -> str:
    """sha256 of the question's texts (what the log keeps when UQSERVE_LOG_TEXTS=false)."""
    payload = json.dumps([question, context, choices], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class PredictionRecord:
    """One answered question, as logged. ``probabilities`` [K]."""

    request_id: str
    created_at: datetime  # UTC
    bundle: str
    version: str
    method: str
    base_model_hash: str
    calibration_hash: str
    prompt_hash: str
    question: str | None  # None when texts are not logged
    context: str | None
    choices: list[str] | None
    texts_hash: str
    probabilities: list[float]
    answer_index: int
    max_probability: float
    predictive_entropy: float
    expected_entropy: float | None
    mutual_information: float | None
    feu: float | None
    thresholds: dict[str, Any]  # {"values": {name: float | None}, "sources": {name: str}}
    abstained: bool
    abstain_reasons: list[str]
    latency_ms: float

    def row(self, replica: str) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {**values, "replica": replica, "num_choices": len(self.probabilities)}


@dataclass(frozen=True)
class LabelledAnswer:
    """A label joined to its answer: what the calibration windows and counters need. ``probabilities`` [K]."""

    request_id: str
    bundle: str
    version: str
    calibration_hash: str
    probabilities: list[float]
    label: int


@dataclass(frozen=True)
class WindowHistory:
    """A bundle version's recent history, oldest first: labelled (probabilities [K], label) pairs and the
    live scores of its answers (name → value)."""

    labelled: list[tuple[list[float], int]] = field(default_factory=list)
    live: list[dict[str, float | None]] = field(default_factory=list)
