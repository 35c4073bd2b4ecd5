"""Calibration monitoring: delayed-label feedback windows and label-free drift of live scores.

- :class:`FeedbackStore` remembers the last ``capacity`` answered requests (id → bundle, version,
  probabilities [K]); ``POST /v1/feedback`` joins a label to one of them.
- Per bundle, the last ``window`` labelled requests give accuracy, ECE, Brier and NLL.
- Per bundle, the last ``drift_window`` live answers (confidence, entropy, MI) are compared with the
  manifest's reference histograms by KS statistic and PSI.

Windows belong to one loaded version (``generation``): loading a new version starts fresh windows, and
labels that arrive late for an older version are joined but not counted in the new version's window.
Everything here runs on the event-loop thread.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from core import metrics
from core.bundle import Histogram
from service.engine.errors import DuplicateFeedbackError, FeedbackNotFoundError, InvalidInputError
from service.engine.types import FeedbackOutcome, WindowStats

DRIFT_SCORES = ("confidence", "predictive_entropy", "mutual_information")


@dataclass
class _Record:
    bundle: str
    generation: int
    probabilities: list[float]  # [K]
    labelled: bool = False


@dataclass
class _Window:
    generation: int
    labelled: deque[tuple[list[float], int]]  # (probabilities [K], label)
    live: dict[str, deque[float]] = field(default_factory=dict)  # score name → recent values
    references: dict[str, Histogram] = field(default_factory=dict)


def _padded(probs: list[list[float]]) -> torch.Tensor:
    """Ragged probability lists → [N, K_max] with zeros for absent choices (exact for every metric)."""
    k = max(len(p) for p in probs)
    return torch.tensor([p + [0.0] * (k - len(p)) for p in probs], dtype=torch.float64)


class Monitor:
    """Feedback store plus per-bundle labelled and live windows."""

    def __init__(self, capacity: int, window: int, drift_window: int, drift_min_samples: int) -> None:
        self.capacity = capacity
        self.window = window
        self.drift_window = drift_window
        self.drift_min_samples = drift_min_samples
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._windows: dict[str, _Window] = {}

    def start_bundle(self, name: str, generation: int, references: dict[str, Histogram]) -> None:
        """A new version of ``name`` is live: fresh windows against its reference histograms."""
        self._windows[name] = _Window(
            generation=generation, labelled=deque(maxlen=self.window),
            live={s: deque(maxlen=self.drift_window) for s in DRIFT_SCORES if s in references},
            references={s: h for s, h in references.items() if s in DRIFT_SCORES})

    def stop_bundle(self, name: str) -> None:
        self._windows.pop(name, None)

    def record(self, request_id: str, bundle: str, generation: int, probabilities: list[float],
               scores: dict[str, float | None]) -> None:
        """Remember an answer for feedback and add its live scores to the drift window."""
        self._records[request_id] = _Record(bundle, generation, probabilities)
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)
        window = self._windows.get(bundle)
        if window is not None and window.generation == generation:
            for name, values in window.live.items():
                value = scores.get(name)
                if value is not None and math.isfinite(value):
                    values.append(value)

    def feedback(self, request_id: str, correct_index: int) -> FeedbackOutcome:
        record = self._records.get(request_id)
        if record is None:
            raise FeedbackNotFoundError(f"no answered request {request_id!r} is held (unknown or evicted)",
                                        param="request_id")
        if record.labelled:
            raise DuplicateFeedbackError(f"request {request_id!r} already has a label", bundle=record.bundle,
                                         param="request_id")
        if not 0 <= correct_index < len(record.probabilities):
            last = len(record.probabilities) - 1
            raise InvalidInputError(f"correct_index {correct_index} outside 0..{last}", param="correct_index")
        record.labelled = True
        window = self._windows.get(record.bundle)
        if window is not None and window.generation == record.generation:
            window.labelled.append((record.probabilities, correct_index))
        return FeedbackOutcome(request_id=request_id, bundle=record.bundle, result="joined")

    def window_stats(self, name: str) -> WindowStats | None:
        window = self._windows.get(name)
        if window is None or not window.labelled:
            return None
        probs = _padded([p for p, _ in window.labelled])  # [N, K]
        labels = torch.tensor([y for _, y in window.labelled], dtype=torch.long)  # [N]
        return WindowStats(labelled=len(labels), accuracy=metrics.accuracy(probs, labels),
                           ece=metrics.ece(probs, labels), brier=metrics.brier(probs, labels),
                           nll=metrics.nll(probs, labels))

    def drift(self, name: str) -> tuple[dict[str, float], dict[str, float]]:
        """(KS, PSI) per score with at least ``drift_min_samples`` live values and a reference histogram."""
        window = self._windows.get(name)
        ks: dict[str, float] = {}
        psi: dict[str, float] = {}
        if window is None:
            return ks, psi
        for score, values in window.live.items():
            if len(values) < self.drift_min_samples:
                continue
            ref = window.references[score]
            live = torch.tensor(list(values), dtype=torch.float64)
            ks[score] = metrics.ks_statistic(live, ref.edges, ref.counts)
            psi[score] = metrics.psi(live, ref.edges, ref.counts)
        return ks, psi
