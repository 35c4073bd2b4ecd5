"""Prometheus metrics on an app-owned registry (names ``uqserve_*``, base units, bounded labels).

Counters and histograms are updated as requests happen; gauges that describe engine state (queue
depth, loaded bundles, feedback-window calibration, label-free drift) are computed at scrape time by
:class:`EngineCollector`, so a bundle's series disappear when it is unloaded. Every drift statistic has a
``*_threshold`` gauge with the same labels, its no-drift alarm threshold at the current window fill
(:mod:`core.drift`); the alert rules compare the two, so no margin is hard-coded in PromQL. ``bundle`` labels only
ever hold loaded bundle names (``_unknown`` for requests naming a bundle that is not loaded).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Summary
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.drift import ECE_BINS
from service.engine import errors as engine_errors
from service.engine.base import Engine
from service.engine.types import AnswerResult, BundleStatus, CalibrationTerms, EngineObserver, FeedbackOutcome

UNKNOWN_BUNDLE = "_unknown"  # cannot collide: bundle names start with a letter or digit
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ENTROPY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.6, 2.0, 2.5, 3.3)
MI_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)
PROB_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def load_failure_reason(err: BaseException) -> str:
    """Bounded label value for uqserve_bundle_load_failures_total."""
    if isinstance(err, engine_errors.BundleRefusedError):
        return err.reason
    if isinstance(err, engine_errors.BundleNotFoundError):
        return "not_found"
    if isinstance(err, engine_errors.CapacityError):
        return "capacity"
    return "error"


class ServiceMetrics(EngineObserver):
    """Every uqserve metric, registered on ``registry``; also the engine's batching observer."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.request_latency = Histogram("uqserve_request_latency_seconds", "HTTP latency by endpoint",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("uqserve_queue_wait_seconds", "Time a question waited for its forward",
                                    buckets=WAIT_BUCKETS, registry=r)
        self.batch_rows = Histogram("uqserve_batch_rows", "Rows (question × member) per shared forward",
                                    buckets=ROW_BUCKETS, registry=r)
        self.requests = Counter("uqserve_requests_total", "Answered questions by outcome",
                                ["bundle", "outcome"], registry=r)
        self.abstentions = Counter("uqserve_abstentions_total", "Abstentions by tripped threshold",
                                   ["bundle", "reason"], registry=r)
        self.entropy = Histogram("uqserve_predictive_entropy_nats", "Predictive entropy of answers",
                                 ["bundle"], buckets=ENTROPY_BUCKETS, registry=r)
        self.mutual_information = Histogram("uqserve_mutual_information_nats", "Mutual information (nats)",
                                            ["bundle"], buckets=MI_BUCKETS, registry=r)
        self.max_probability = Histogram("uqserve_max_probability", "Max choice probability of answers",
                                         ["bundle"], buckets=PROB_BUCKETS, registry=r)
        self.bundle_loads = Counter("uqserve_bundle_loads_total", "Bundle loads and replacements",
                                    ["bundle"], registry=r)
        self.bundle_unloads = Counter("uqserve_bundle_unloads_total", "Bundle unloads", ["bundle"],
                                      registry=r)
        self.bundle_load_failures = Counter("uqserve_bundle_load_failures_total", "Refused bundle loads",
                                            ["reason"], registry=r)
        self.feedback = Counter("uqserve_feedback_total", "Feedback submissions by result",
                                ["bundle", "result"], registry=r)
        self.labelled = Counter("uqserve_labelled_total", "Answers that received a label", ["bundle"],
                                registry=r)
        self.calibration = CalibrationCounters(r)
        self._engine: Engine | None = None

    # engine observer
    def batch_done(self, rows: int, queue_waits_s: list[float]) -> None:
        self.batch_rows.observe(rows)
        for wait in queue_waits_s:
            self.queue_wait.observe(wait)

    def answered(self, results: Iterable[AnswerResult]) -> None:
        for result in results:
            bundle = result.bundle.name
            self.requests.labels(bundle, "abstained" if result.abstained else "answered").inc()
            for reason in result.abstain_reasons:
                self.abstentions.labels(bundle, reason).inc()
            self.entropy.labels(bundle).observe(result.predictive_entropy)
            if result.mutual_information is not None:
                self.mutual_information.labels(bundle).observe(result.mutual_information)
            self.max_probability.labels(bundle).observe(result.max_probability)

    def loaded(self, status: BundleStatus) -> None:
        """A bundle version went live: count it and create its calibration series at zero."""
        self.bundle_loads.labels(status.name).inc()
        self.calibration.create(status.name, status.version)

    def joined(self, outcome: FeedbackOutcome) -> None:
        self.feedback.labels(outcome.bundle, "joined").inc()
        self.labelled.labels(outcome.bundle).inc()
        if outcome.terms is not None:
            self.calibration.add(outcome.bundle, outcome.version, outcome.terms)

    def failed(self, bundle: str, err: BaseException, questions: int = 1) -> None:
        loaded = self._engine is not None and any(s.name == bundle for s in self._engine.bundles())
        self.requests.labels(bundle if loaded else UNKNOWN_BUNDLE, "error").inc(questions)

    def attach(self, engine: Engine) -> None:
        """Expose the engine's scrape-time gauges (registered once per registry)."""
        if self._engine is None:
            self.registry.register(EngineCollector(lambda: self._engine))
        self._engine = engine


class CalibrationCounters:
    """Fleet-wide calibration: sums over labelled answers per bundle, version and confidence bin (15
    equal-width bins, ``bin`` = "0" … "14"), so Prometheus recording rules can add them across replicas and
    compute accuracy, ECE (Σ_b |correct_b − confidence_b| / Σ_b labelled_b), Brier and NLL over any range
    (``deploy/recording_rules.yml``). Every bin of a loaded version exists from zero, so ``increase()`` does
    not extrapolate a series' start."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["bundle", "version", "bin"]
        self.labelled = Counter("uqserve_calibration_labelled", "Labelled answers per confidence bin", labels,
                                registry=registry)
        self.correct = Counter("uqserve_calibration_correct",
                               "Labelled answers whose top choice was the label, per confidence bin", labels,
                               registry=registry)
        self.confidence = Summary("uqserve_calibration_confidence",
                                  "Confidence (max probability) of labelled answers, per confidence bin", labels,
                                  registry=registry)
        self.brier = Summary("uqserve_calibration_brier", "Multi-class Brier score of labelled answers",
                             ["bundle", "version"], registry=registry)
        self.nll = Summary("uqserve_calibration_nll", "Negative log-likelihood (nats) of labelled answers",
                           ["bundle", "version"], registry=registry)
        self._created: set[tuple[str, str]] = set()

    def create(self, bundle: str, version: str) -> None:
        self._created.add((bundle, version))
        for b in range(ECE_BINS):
            for family in (self.labelled, self.correct, self.confidence):
                family.labels(bundle, version, str(b))
        self.brier.labels(bundle, version)
        self.nll.labels(bundle, version)

    def add(self, bundle: str, version: str, terms: CalibrationTerms) -> None:
        b = str(terms.bin)
        if (bundle, version) not in self._created:  # a version this replica never loaded (fleet feedback)
            self.create(bundle, version)
        self.labelled.labels(bundle, version, b).inc()
        if terms.correct:
            self.correct.labels(bundle, version, b).inc()
        self.confidence.labels(bundle, version, b).observe(terms.confidence)
        self.brier.labels(bundle, version).observe(terms.brier)
        self.nll.labels(bundle, version).observe(terms.nll)


class EngineCollector(Collector):
    """Scrape-time gauges read from the engine."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self._engine = engine

    def collect(self) -> Iterable[Metric]:
        engine = self._engine()
        if engine is None:
            return
        monitors = engine.monitor()
        yield _gauge("uqserve_queue_depth_rows", "Rows waiting for a forward", [],
                     [([], engine.queue_depth_rows)])
        yield _gauge("uqserve_bundles_loaded", "Loaded bundles", [], [([], len(engine.bundles()))])
        window: dict[str, list[tuple[list[str], float]]] = {k: [] for k in
                                                              ("labelled", "accuracy", "ece", "brier", "nll")}
        samples: dict[str, list[tuple[list[str], float]]] = {k: [] for k in
                                                               ("validation", "ece_threshold", "ks", "psi",
                                                                "ks_threshold", "psi_threshold")}
        for m in monitors:
            if m.validation_ece is not None:
                samples["validation"].append(([m.bundle], m.validation_ece))
            if m.window is not None:
                for key in window:
                    window[key].append(([m.bundle], float(getattr(m.window, key))))
                if m.window.ece_threshold is not None:
                    samples["ece_threshold"].append(([m.bundle], m.window.ece_threshold))
            for key, per_score in (("ks", m.drift_ks), ("psi", m.drift_psi), ("ks_threshold", m.drift_ks_threshold),
                                   ("psi_threshold", m.drift_psi_threshold)):
                samples[key].extend(([m.bundle, score], value) for score, value in per_score.items())
        helps = {"labelled": "Labelled answers in the feedback window", "accuracy": "Window accuracy",
                 "ece": "Window expected calibration error (15 bins)",
                 "brier": "Window multi-class Brier score", "nll": "Window negative log-likelihood (nats)"}
        for key, rows in window.items():
            yield _gauge(f"uqserve_window_{key}", helps[key], ["bundle"], rows)
        yield _gauge("uqserve_window_ece_threshold",
                     "No-drift alarm threshold for uqserve_window_ece at the current labelled count: validation "
                     "ECE + the alarm quantile (99.9 % by default) of its bootstrap no-drift excess",
                     ["bundle"], samples["ece_threshold"])
        yield _gauge("uqserve_validation_ece", "ECE on validation data, from the bundle manifest", ["bundle"],
                     samples["validation"])
        yield _gauge("uqserve_drift_ks", "KS statistic of live scores vs the bundle's reference histogram",
                     ["bundle", "score"], samples["ks"])
        yield _gauge("uqserve_drift_psi", "PSI of live scores vs the bundle's reference histogram",
                     ["bundle", "score"], samples["psi"])
        thresholds = [([m.bundle, m.version, str(n)], value) for m in monitors for n, value in m.ece_thresholds.items()]
        yield _gauge("uqserve_calibration_ece_threshold",
                     "No-drift alarm threshold (99.9 % by default) of the ECE of min_labelled labelled answers of "
                     "the version; it falls with min_labelled", ["bundle", "version", "min_labelled"], thresholds)
        yield _gauge("uqserve_calibration_ece_threshold_min_labelled",
                     "min_labelled as a value, so rules can pick the threshold for a fleet's labelled count",
                     ["bundle", "version", "min_labelled"], [(labels, float(labels[2])) for labels, _ in thresholds])
        yield from _guarantee_gauges(monitors)
        for stat in ("ks", "psi"):
            yield _gauge(f"uqserve_drift_{stat}_threshold",
                         f"No-drift alarm threshold for uqserve_drift_{stat} at the current live-window fill "
                         "(the alarm quantile, 99.9 % by default, of its bootstrap no-drift distribution)",
                         ["bundle", "score"], samples[f"{stat}_threshold"])


_GUARANTEE_GAUGES = (
    ("alpha", "conformal_alpha", "The bundle's conformal miscoverage alpha (sets hold the answer w.p. >= 1 - alpha)"),
    ("labelled", "conformal_labelled", "Labelled answers of the version watched for coverage (since load)"),
    ("coverage_window", "conformal_coverage", "Empirical coverage of the bundle-alpha sets over the feedback window"),
    ("miscoverage_lower", "conformal_miscoverage_lower",
     "Anytime-valid lower confidence bound (1 - alarm level) on the average miss rate of the sets since load; "
     "above alpha means the coverage guarantee does not hold for this traffic"),
    ("target_risk", "selective_risk_target", "The bundle's default risk-control target epsilon"),
    ("answered", "selective_answered", "Labelled answers the bundle's risk-control rule answers (since load)"),
    ("risk_window", "selective_risk", "Error rate among risk-control-answered labelled answers, feedback window"),
    ("risk_lower", "selective_risk_lower",
     "Anytime-valid lower confidence bound on the error rate among answered since load; above epsilon "
     "means the risk guarantee does not hold for this traffic"),
)


def _guarantee_gauges(monitors: list[Any]) -> Iterable[Metric]:
    """uqserve_conformal_* and uqserve_selective_* per bundle and version (bundles with a calibration split)."""
    for attr, name, help_ in _GUARANTEE_GAUGES:
        rows = [([m.bundle, m.version], getattr(m.guarantees, attr)) for m in monitors if m.guarantees is not None]
        yield _gauge(f"uqserve_{name}", help_, ["bundle", "version"], rows)


def _gauge(name: str, documentation: str, labels: list[str], samples: list[tuple[list[str], Any]]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for values, value in samples:
        if value is not None and math.isfinite(float(value)):
            family.add_metric(values, float(value))
    return family


class LatencyMiddleware:
    """Pure ASGI middleware observing uqserve_request_latency_seconds by route template."""

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.request_latency.labels(endpoint).observe(time.perf_counter() - start)
