"""Calibration monitoring: delayed-label feedback windows and label-free drift of live scores.

- :class:`FeedbackStore` remembers the last ``capacity`` answered requests (id → bundle, version,
  probabilities [K]); ``POST /v1/feedback`` joins a label to one of them.
- Per bundle, the last ``window`` labelled requests give accuracy, ECE, Brier and NLL.
- Per bundle, the last ``drift_window`` live answers (confidence, entropy, MI) are compared with the
  bundle's drift reference histograms by KS statistic and PSI.
- Each statistic comes with its no-drift alarm threshold at the current window fill, read from the
  bundle's :class:`~core.drift.DriftReference` (``manifest.calibration.drift``, bootstrapped at export).
  A bundle exported without one gets :func:`core.drift.fallback_drift_reference` from its manifest's
  equal-width histograms and validation ECE, built once per calibration off the event loop
  (:func:`drift_reference`), so no comparison is ever against a bias-blind fixed margin.

Windows belong to one loaded version (``generation``): loading a new version starts fresh windows, and
labels that arrive late for an older version are joined but not counted in the new version's window.
Everything here except :func:`drift_reference` runs on the event-loop thread and costs O(window) per
scrape: threshold look-ups are interpolations in a small table, never a bootstrap.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from core import metrics
from core.bundle import Calibration
from core.drift import SCORES as DRIFT_SCORES
from core.drift import DriftReference, fallback_drift_reference, ks_psi_of_counts
from service.engine.errors import DuplicateFeedbackError, FeedbackNotFoundError, InvalidInputError
from service.engine.types import BundleMonitor, FeedbackOutcome, WindowStats

__all__ = ["DRIFT_SCORES", "DriftStats", "Monitor", "drift_reference"]
log = logging.getLogger(__name__)
_FALLBACKS: dict[str, DriftReference] = {}
_FALLBACK_LOCK = threading.Lock()


def drift_reference(calibration: Calibration) -> DriftReference:
    """The bundle's drift reference, or for a bundle exported without one a fallback built from its
    reference histograms and validation ECE (≈ 0.3 s on one CPU thread, cached by calibration: call it off the
    event loop). A bundle with neither histograms nor a validation ECE gets an empty reference (no thresholds)."""
    if calibration.drift is not None:
        return calibration.drift
    histograms = {k: (h.edges, h.counts) for k, h in calibration.reference_histograms.items()}
    ece = calibration.validation_metrics.get("ece")
    key = hashlib.sha256(repr((sorted(histograms.items()), ece)).encode()).hexdigest()
    with _FALLBACK_LOCK:
        cached = _FALLBACKS.get(key)
    if cached is None:
        cached = fallback_drift_reference(histograms, ece)
        with _FALLBACK_LOCK:
            _FALLBACKS[key] = cached
        log.info("bundle without a drift reference: fallback thresholds from its manifest (%s)", cached.source)
    return cached


@dataclass(frozen=True)
class DriftStats:
    """Label-free drift of one bundle: score name → statistic, and its no-drift threshold at the window's fill."""

    ks: dict[str, float]
    psi: dict[str, float]
    ks_threshold: dict[str, float]
    psi_threshold: dict[str, float]


@dataclass
class _Record:
    bundle: str
    generation: int
    probabilities: list[float]  # [K]
    labelled: bool = False


@dataclass
class _Window:
    generation: int
    reference: DriftReference
    labelled: deque[tuple[list[float], int]]  # (probabilities [K], label)
    live: dict[str, deque[float]] = field(default_factory=dict)  # score name → recent values


def _padded(probs: list[list[float]]) -> torch.Tensor:
    """Ragged probability lists → [N, K_max] with zeros for absent choices (exact for every metric)."""
    lengths = set(map(len, probs))
    if len(lengths) == 1:
        return torch.tensor(probs, dtype=torch.float64)
    k = max(lengths)
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

    def start_bundle(self, name: str, generation: int, reference: DriftReference) -> None:
        """A new version of ``name`` is live: fresh windows against its drift reference (see
        :func:`drift_reference`)."""
        self._windows[name] = _Window(
            generation=generation, reference=reference, labelled=deque(maxlen=self.window),
            live={s: deque(maxlen=self.drift_window) for s in DRIFT_SCORES if s in reference.scores})

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
                           nll=metrics.nll(probs, labels), ece_threshold=window.reference.ece_threshold(len(labels)))

    def drift(self, name: str) -> DriftStats:
        """KS and PSI per score with at least ``drift_min_samples`` live values, with their thresholds
        (a threshold is absent below the reference's smallest window size)."""
        stats = DriftStats({}, {}, {}, {})
        window = self._windows.get(name)
        if window is None:
            return stats
        for score, values in window.live.items():
            n = len(values)
            if n < self.drift_min_samples:
                continue
            ref = window.reference.scores[score]
            counts = metrics.histogram(torch.tensor(list(values), dtype=torch.float64), ref.edges)
            # = metrics.ks_statistic / metrics.psi on the live values, binned once; the bootstrap's own code
            ks, psi = ks_psi_of_counts(torch.tensor([counts]), torch.tensor([ref.counts]))
            stats.ks[score], stats.psi[score] = float(ks[0]), float(psi[0])
            for thresholds, value in ((stats.ks_threshold, window.reference.ks_threshold(score, n)),
                                      (stats.psi_threshold, window.reference.psi_threshold(score, n))):
                if value is not None:
                    thresholds[score] = value
        return stats

    def snapshot(self, name: str, validation_ece: float | None) -> BundleMonitor:
        """Everything the metrics collector reads for one bundle at scrape time."""
        drift = self.drift(name)
        return BundleMonitor(bundle=name, validation_ece=validation_ece, window=self.window_stats(name),
                             drift_ks=drift.ks, drift_psi=drift.psi, drift_ks_threshold=drift.ks_threshold,
                             drift_psi_threshold=drift.psi_threshold)
