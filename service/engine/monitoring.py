"""Calibration monitoring: delayed-label windows and label-free drift of live scores, per loaded bundle.

- Answers and labels are kept by the prediction log (:mod:`service.predlog`); this module holds, per
  bundle, the last ``window`` labelled answers (accuracy, ECE, Brier and NLL) and the last ``drift_window``
  live scores (confidence, entropy, MI) compared with the bundle's drift reference by KS statistic and PSI.
- A window belongs to one bundle version, identified by ``(version, calibration_hash)``: loading another
  version starts fresh windows, rebuilt from the log's history of that version (so a restart keeps them),
  and labels that arrive late for an older version are joined but not counted in the new version's window.
- Each statistic comes with its no-drift alarm threshold at the current window fill, read from the
  bundle's :class:`~core.drift.DriftReference` (``manifest.calibration.drift``, bootstrapped at export).
  A bundle exported without one gets :func:`core.drift.fallback_drift_reference` from its manifest's
  equal-width histograms and validation ECE, built once per calibration off the event loop
  (:func:`drift_reference`), so no comparison is ever against a bias-blind fixed margin.
- :func:`calibration_terms` gives one labelled answer's share of the fleet-wide calibration counters.

Everything here except :func:`drift_reference` runs on the event-loop thread and costs O(window) per
scrape: threshold look-ups are interpolations in a small table, never a bootstrap.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from core import metrics
from core.bundle import Calibration
from core.drift import ECE_BINS, DriftReference, fallback_drift_reference, ks_psi_of_counts
from core.drift import SCORES as DRIFT_SCORES
from service.engine.types import BundleMonitor, CalibrationTerms, WindowStats
from service.predlog import LabelledAnswer, WindowHistory

__all__ = ["DRIFT_SCORES", "DriftStats", "Monitor", "calibration_terms", "drift_reference"]
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
class _Window:
    key: tuple[str, str]  # (version, calibration_hash)
    reference: DriftReference
    labelled: deque[tuple[list[float], int]]  # (probabilities [K], label)
    live: dict[str, deque[float]] = field(default_factory=dict)  # score name → recent values


def _add_live(window: _Window, scores: dict[str, float | None]) -> None:
    for name, values in window.live.items():
        value = scores.get(name)
        if value is not None and math.isfinite(value):
            values.append(value)


def calibration_terms(probabilities: list[float], label: int) -> CalibrationTerms:
    """One labelled answer's terms of the calibration sums (the counters Prometheus aggregates across a
    fleet), by :mod:`core.metrics` on a one-row batch: its confidence bin, correctness, Brier and NLL, so the
    fleet's sums add up to exactly what those functions give on the pooled labels. probabilities [K]."""
    p = torch.tensor([probabilities], dtype=torch.float64)  # [1, K]
    y = torch.tensor([label])
    confidence = p.max(-1).values
    return CalibrationTerms(bin=int(metrics.confidence_bins(confidence, ECE_BINS)[0]), confidence=float(confidence),
                            correct=metrics.accuracy(p, y) == 1.0, brier=metrics.brier(p, y), nll=metrics.nll(p, y))


def _padded(probs: list[list[float]]) -> torch.Tensor:
    """Ragged probability lists → [N, K_max] with zeros for absent choices (exact for every metric)."""
    lengths = set(map(len, probs))
    if len(lengths) == 1:
        return torch.tensor(probs, dtype=torch.float64)
    k = max(lengths)
    return torch.tensor([p + [0.0] * (k - len(p)) for p in probs], dtype=torch.float64)


class Monitor:
    """Per-bundle labelled and live windows."""

    def __init__(self, window: int, drift_window: int, drift_min_samples: int) -> None:
        self.window = window
        self.drift_window = drift_window
        self.drift_min_samples = drift_min_samples
        self._windows: dict[str, _Window] = {}

    def start_bundle(self, name: str, key: tuple[str, str], reference: DriftReference,
                     history: WindowHistory | None = None) -> None:
        """Version ``key`` of ``name`` is live: fresh windows against its drift reference (see
        :func:`drift_reference`), filled from the log's ``history`` of that version."""
        window = _Window(key=key, reference=reference, labelled=deque(maxlen=self.window),
                         live={s: deque(maxlen=self.drift_window) for s in DRIFT_SCORES if s in reference.scores})
        self._windows[name] = window
        if history is not None:
            window.labelled.extend(history.labelled)
            for scores in history.live:
                _add_live(window, scores)

    def stop_bundle(self, name: str) -> None:
        self._windows.pop(name, None)

    def record(self, bundle: str, key: tuple[str, str], scores: dict[str, float | None]) -> None:
        """Add an acknowledged answer's live scores to its bundle's drift window."""
        window = self._windows.get(bundle)
        if window is not None and window.key == key:
            _add_live(window, scores)

    def labelled(self, answer: LabelledAnswer) -> None:
        """Count a joined label in its bundle's window when it belongs to the live version."""
        window = self._windows.get(answer.bundle)
        if window is not None and window.key == (answer.version, answer.calibration_hash):
            window.labelled.append((answer.probabilities, answer.label))

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

    def snapshot(self, name: str, version: str, validation_ece: float | None) -> BundleMonitor:
        """Everything the metrics collector reads for one bundle at scrape time."""
        drift = self.drift(name)
        window = self._windows.get(name)
        ece_thresholds: dict[int, float] = {}
        if window is not None:
            for n in window.reference.windows:
                value = window.reference.ece_threshold(n)
                if value is not None:
                    ece_thresholds[n] = value
        return BundleMonitor(bundle=name, version=version, validation_ece=validation_ece,
                             window=self.window_stats(name), drift_ks=drift.ks, drift_psi=drift.psi,
                             drift_ks_threshold=drift.ks_threshold, drift_psi_threshold=drift.psi_threshold,
                             ece_thresholds=ece_thresholds)
