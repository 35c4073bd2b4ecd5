"""Online coverage and selective risk of a bundle version's guarantees, from delayed labels.

For each labelled answer of the live version (and, at load, those in the log's history of that version)
the watch recomputes from the logged probabilities p [K]:

- *miss*: the label is outside the conformal set at the bundle's α (the set is a function of p and the
  version's calibration, so it is the one served at that α);
- *error among answered*: when the bundle serves risk control by default (a target ε), whether the rule
  "answer iff score ≤ λ̂" would answer, and if so whether the argmax was wrong. Only scores computable
  from p alone are watched (1 − max p, predictive entropy); a bundle defaulting to MI or 1 − FEU is not.

Two kinds of gauges come out: windowed empirical rates (the last ``window`` labels, for dashboards) and
anytime-valid lower bounds (:func:`core.risk_control.anytime_lower_bound`) on the average miss and error
rates since the version went live, valid at every label count at once. The alerts fire when a lower bound
exceeds α (or ε): then, with confidence 1 − ``level`` however often Prometheus evaluated it, the
guarantee no longer describes the traffic.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from core.bundle import Calibration
from core.risk_control import anytime_lower_bound
from service.engine.types import GuaranteeStats
from service.predlog import LabelledAnswer, WindowHistory

WATCHABLE = ("one_minus_max_probability", "predictive_entropy")


def _score(probs: torch.Tensor, name: str) -> float:
    p = probs.double()
    if name == "one_minus_max_probability":
        return float(1 - p.max())
    return float(-(torch.special.xlogy(p, p)).sum())


@dataclass
class _Watch:
    key: tuple[str, str]
    calibration: Calibration
    threshold: float | None  # λ̂ of the bundle's default risk control (None: not watched or not certified)
    misses: deque[bool] = field(default_factory=deque)
    errors: deque[bool] = field(default_factory=deque)
    labelled: int = 0
    missed: int = 0
    answered: int = 0
    wrong: int = 0


class GuaranteeWatch:
    """Per loaded bundle: the version's miss and error streams (see the module docstring)."""

    def __init__(self, window: int, level: float = 0.05) -> None:
        self.window = window
        self.level = level
        self._watches: dict[str, _Watch] = {}

    def start_bundle(self, name: str, key: tuple[str, str], calibration: Calibration,
                     history: WindowHistory | None = None) -> None:
        if calibration.conformal is None:
            self._watches.pop(name, None)
            return
        risk, threshold = calibration.risk, None
        if risk is not None and risk.target_risk is not None and risk.score in WATCHABLE:
            threshold = risk.certify(risk.score, risk.target_risk, risk.delta).threshold
        watch = _Watch(key=key, calibration=calibration, threshold=threshold,
                       misses=deque(maxlen=self.window), errors=deque(maxlen=self.window))
        self._watches[name] = watch
        for probs, label in (history.labelled if history is not None else []):
            self._add(watch, probs, label)

    def stop_bundle(self, name: str) -> None:
        self._watches.pop(name, None)

    def labelled(self, answer: LabelledAnswer) -> None:
        watch = self._watches.get(answer.bundle)
        if watch is not None and watch.key == (answer.version, answer.calibration_hash):
            self._add(watch, answer.probabilities, answer.label)

    def _add(self, watch: _Watch, probabilities: list[float], label: int) -> None:
        conformal = watch.calibration.conformal
        assert conformal is not None
        probs = torch.tensor(probabilities, dtype=torch.float64)
        if not 0 <= label < probs.numel():
            return
        miss = not bool(conformal.sets(probs[None, :], conformal.alpha)[0, label])
        watch.misses.append(miss)
        watch.labelled += 1
        watch.missed += miss
        risk = watch.calibration.risk
        if watch.threshold is not None and risk is not None and _score(probs, risk.score) <= watch.threshold:
            wrong = int(probs.argmax()) != label
            watch.errors.append(wrong)
            watch.answered += 1
            watch.wrong += wrong

    def stats(self, name: str) -> GuaranteeStats | None:
        watch = self._watches.get(name)
        if watch is None or watch.calibration.conformal is None:
            return None
        risk = watch.calibration.risk
        target = risk.target_risk if (risk is not None and watch.threshold is not None) else None

        def rate(values: deque[bool]) -> float | None:
            return sum(values) / len(values) if values else None

        coverage = rate(watch.misses)
        return GuaranteeStats(
            alpha=watch.calibration.conformal.alpha, labelled=watch.labelled,
            coverage_window=None if coverage is None else 1.0 - coverage,
            miscoverage_lower=anytime_lower_bound(watch.missed, watch.labelled, self.level) if watch.labelled else None,
            target_risk=target, answered=watch.answered, risk_window=rate(watch.errors),
            risk_lower=(anytime_lower_bound(watch.wrong, watch.answered, self.level)
                        if watch.answered and target is not None else None))
