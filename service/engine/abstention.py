"""Threshold abstention: abstain when a score exceeds its threshold; reasons name every score that did.

Threshold resolution, per score: the request's value, else the bundle's calibrated recommendation,
else the server setting; None at every level means that score never triggers abstention. The bundle's
thresholds were calibrated together, as one rule (:class:`core.bundle.RuleCalibration`); the answer says
whether the rule applied is exactly that one (``as_calibrated``), so its coverage and risk statement holds.
"""

from __future__ import annotations

from collections.abc import Mapping

from core.bundle import Thresholds
from service.engine.types import THRESHOLD_NAMES, ThresholdsUsed


def resolve_thresholds(request: Mapping[str, float | None], bundle: Thresholds,
                       settings: Mapping[str, float | None]) -> ThresholdsUsed:
    values: dict[str, float | None] = {}
    sources: dict[str, str] = {}
    for name in THRESHOLD_NAMES:
        for source, value in (("request", request.get(name)), ("bundle", getattr(bundle, name)),
                              ("settings", settings.get(name))):
            if value is not None:
                values[name], sources[name] = float(value), source
                break
        else:
            values[name], sources[name] = None, "none"
    rule = None
    if bundle.rule is not None:
        # the served rule is the calibrated one iff every threshold applied is the bundle's own, and all of them
        as_calibrated = all(sources[n] == "bundle" or (getattr(bundle, n) is None and sources[n] == "none")
                            for n in THRESHOLD_NAMES)
        rule = {**bundle.rule.model_dump(mode="json"), "as_calibrated": as_calibrated}
    return ThresholdsUsed(values=values, sources=sources, rule=rule)


def abstain_reasons(used: ThresholdsUsed, *, predictive_entropy: float, mutual_information: float | None,
                    max_probability: float, feu: float | None = None) -> list[str]:
    """Names of the scores above their thresholds, in THRESHOLD_NAMES order.

    A score the method does not define (MI of a single routed model, FEU of an ensemble: None) never trips.
    """
    observed = {
        "predictive_entropy": predictive_entropy,
        "mutual_information": mutual_information,
        "one_minus_max_probability": 1.0 - max_probability,
        "one_minus_feu": None if feu is None else 1.0 - feu,
    }
    reasons = []
    for name in THRESHOLD_NAMES:
        limit, value = used.values.get(name), observed[name]
        if limit is not None and value is not None and value > limit:
            reasons.append(name)
    return reasons
