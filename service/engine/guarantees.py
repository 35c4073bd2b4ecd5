"""Conformal answer sets and risk-controlled abstention, served from a bundle's calibration split.

Per request: α is the request's ``alpha``, else the bundle's; the set is every choice whose nonconformity
score is ≤ q̂(α) (:class:`core.conformal.ConformalReference`). Risk control applies when the request
or the bundle names a target risk ε; δ and the score come from the request, else the bundle. The threshold
is Learn-then-Test's (:func:`core.risk_control.learn_then_test`, cached per (score, ε, δ)); a question
whose score exceeds it, or any question when nothing certifies ε, abstains with reason ``risk_control``.
The other thresholds keep their own precedence (:mod:`service.engine.abstention`); the rules combine by
"answer iff every one says answer".
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from core.bundle import Calibration
from core.conformal import min_alpha
from core.risk_control import RiskCertificate, RiskReference
from service.engine.errors import GuaranteeError
from service.engine.types import AnswerOptions, AnswerResult, AnswerSet, RiskDecision

RISK_CONTROL = "risk_control"


class BundleGuarantees:
    """What one loaded bundle version can guarantee (None parts: no calibration split was held out)."""

    def __init__(self, calibration: Calibration) -> None:
        self.conformal = calibration.conformal
        self.risk = calibration.risk
        self._certify = lru_cache(maxsize=256)(self._certificate)

    def check(self, options: AnswerOptions) -> None:
        """Refuse, before any scoring, what cannot be given (GuaranteeError → 422)."""
        if options.alpha is not None:
            if self.conformal is None:
                raise GuaranteeError("this bundle has no conformal calibration (it was exported without a "
                                     "calibration split): alpha cannot be served", code="no_calibration_split",
                                     param="alpha")
            if options.alpha < min_alpha(self.conformal.n):
                raise GuaranteeError(f"alpha {options.alpha:g} needs more calibration questions: this bundle's "
                                     f"n = {self.conformal.n} supports alpha >= 1/(n+1) = "
                                     f"{min_alpha(self.conformal.n):.4g}", code="alpha_too_small", param="alpha")
        asked = options.target_risk is not None or options.delta is not None or options.risk_score is not None
        if asked and self.risk is None:
            raise GuaranteeError("this bundle has no risk-control calibration (it was exported without a "
                                 "calibration split)", code="no_calibration_split",
                                 param="target_risk" if options.target_risk is not None else "delta")
        if self.risk is not None and options.risk_score is not None and options.risk_score not in self.risk.values:
            raise GuaranteeError(f"risk_score {options.risk_score!r} is not defined for this bundle's method "
                                 f"(it offers {sorted(self.risk.values)})", code="score_unavailable",
                                 param="risk_score")

    def summary(self) -> dict[str, Any] | None:
        """For ``GET /v1/bundles``: what the calibration split supports (None: no split was held out)."""
        if self.conformal is None or self.risk is None:
            return None
        return {"n_calibration": self.conformal.n, "data_hash": self.conformal.data_hash, "score": self.conformal.score,
                "alpha": self.conformal.alpha, "min_alpha": min_alpha(self.conformal.n), "delta": self.risk.delta,
                "risk_score": self.risk.score, "risk_scores": sorted(self.risk.values),
                "target_risk": self.risk.target_risk}

    def answer_set(self, probs: torch.Tensor, options: AnswerOptions) -> AnswerSet | None:
        """The set for one question's probabilities [K] (None: the bundle has no conformal calibration)."""
        if self.conformal is None:
            return None
        alpha = self.conformal.alpha if options.alpha is None else options.alpha
        members = self.conformal.sets(probs[None, :].double(), alpha)[0]
        return AnswerSet(alpha=alpha, score=self.conformal.score, qhat=self.conformal.qhat(alpha),
                         n_calibration=self.conformal.n, indices=torch.nonzero(members).reshape(-1).tolist())

    def decide(self, observed: dict[str, float | None], options: AnswerOptions) -> RiskDecision | None:
        """Risk control for one question (None when neither the request nor the bundle asks for it).
        ``observed``: the question's abstention scores by name (None where the method has none)."""
        risk = self.risk
        if risk is None:
            return None
        epsilon = options.target_risk if options.target_risk is not None else risk.target_risk
        if epsilon is None:
            return None
        score = options.risk_score or risk.score
        delta = options.delta if options.delta is not None else risk.delta
        certificate = self._certify(score, float(epsilon), float(delta))
        value = observed.get(score)
        value = float("inf") if value is None else float(value)
        answer = certificate.certified and certificate.threshold is not None and value <= certificate.threshold
        return RiskDecision(certificate=certificate, value=value, answer=answer)

    def _certificate(self, score: str, epsilon: float, delta: float) -> RiskCertificate:
        assert isinstance(self.risk, RiskReference)
        return self.risk.certify(score, epsilon, delta)


def guarantee_log(result: AnswerResult) -> dict[str, Any]:
    """What the prediction log keeps of an answer's guarantees (inside its ``thresholds`` JSON)."""
    out: dict[str, Any] = {}
    if result.answer_set is not None:
        out["answer_set"] = {"alpha": result.answer_set.alpha, "qhat": result.answer_set.qhat,
                             "indices": result.answer_set.indices}
    if result.risk is not None:
        cert = result.risk.certificate
        out["risk_control"] = {"target_risk": cert.target_risk, "delta": cert.delta, "score": cert.score,
                               "threshold": cert.threshold, "certified": cert.certified,
                               "answered": result.risk.answer}
    return out
