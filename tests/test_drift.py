"""core.drift: quantile reference bins, the vectorized bootstrap statistics, threshold look-up, and the
alarms they drive through the server's Monitor: a day of no-drift traffic rarely alarms, a shift does.

The stream tests model the deployment: one rule evaluation per 15 s scrape (deploy/prometheus.yml),
``for: 15m`` (the condition holds at 61 consecutive evaluations), the server's default windows (500
labelled, 500 live, drift gauges from 50 live values), 4 answers per scrape with a label for each one
with probability 1/4 (≈ 23 000 answers and 5 760 labels a day).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator

import pytest
import torch
from pydantic import ValidationError

from core import drift, metrics
from core.bundle import Calibration
from core.uncertainty import UncertaintyScores, decompose
from service.engine.monitoring import Monitor
from service.predlog import LabelledAnswer

DAY = 24 * 3600 // 15  # rule evaluations in a day
FOR_EVALS = 60  # for: 15m at 15 s
FALSE_ALARM_BUDGET = 0.01  # the spec: at most 1 % of rule evaluations may carry a false alarm


def model(n: int, gen: torch.Generator, *, sharpness: float = 1.0, truth_temperature: float = 1.0,
          disagreement: float = 1.0) -> tuple[UncertaintyScores, torch.Tensor]:
    """A 5-member ensemble on 4 choices; 40 % of questions have identical members (MI exactly 0).
    Labels are drawn from softmax(log p̄ / truth_temperature): at 1 the model is perfectly calibrated."""
    scale = torch.rand(n, 1, 1, generator=gen, dtype=torch.float64) * 3 * sharpness
    logits = torch.randn(n, 1, 4, generator=gen, dtype=torch.float64) * scale
    spread = torch.where(torch.rand(n, 1, 1, generator=gen) < 0.4, 0.0,
                         torch.rand(n, 1, 1, generator=gen, dtype=torch.float64)) * disagreement
    u = decompose((logits + spread * torch.randn(n, 5, 4, generator=gen, dtype=torch.float64)).softmax(-1))
    truth = torch.softmax(u.probabilities.log() / truth_temperature, -1)
    return u, torch.multinomial(truth, 1, generator=gen)[:, 0]


def known(value: float | None) -> float:
    assert value is not None
    return value


def live_scores(u: UncertaintyScores) -> dict[str, torch.Tensor]:
    return {"confidence": u.max_probability, "predictive_entropy": u.predictive_entropy,
            "mutual_information": u.mutual_information}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is fastest, and the machine's cores are shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(one_thread: None) -> drift.DriftReference:
    u, y = model(600, torch.Generator().manual_seed(1))
    return drift.bootstrap_drift_reference(u.probabilities, y, live_scores(u), seed=0, resamples=4000)


# --- reference bins ----------------------------------------------------------------------------------


def test_quantile_edges_give_a_point_mass_its_own_bin() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([torch.zeros(600, dtype=torch.float64), torch.rand(400, generator=gen, dtype=torch.float64)])
    edges = drift.quantile_edges(values)
    counts = drift.bin_counts(values, edges)
    assert all(b > a for a, b in itertools.pairwise(edges))
    assert counts[0] == 600  # the atom, and nothing else, in the first bin
    assert all(c >= 1000 / drift.MAX_BINS / 2 for c in counts) and sum(counts) == 1000
    assert not set(edges[1:-1]) & set(values.tolist())  # cuts fall between values, never on a tie
    # equal-width bins on [0, log 4] put (almost) everything in one bin: the quantile bins do not
    equal_width = metrics.histogram(values * 0.05, [math.log(4) * b / 20 for b in range(21)])
    assert max(equal_width) / 1000 > 0.9 and max(counts[1:]) / 1000 <= 2 / drift.MAX_BINS


def test_quantile_edges_continuous_and_degenerate() -> None:
    values = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = drift.bin_counts(values, drift.quantile_edges(values))
    assert len(counts) == drift.MAX_BINS and max(counts) - min(counts) <= 2
    assert drift.quantile_edges(torch.full((500,), 0.3)) == []  # one value: no information, no bins
    assert len(drift.quantile_edges(values[:60])) - 1 == 60 // drift.MIN_PER_BIN  # few values, fewer bins


# --- the vectorized statistics equal core.metrics ------------------------------------------------------


def test_ece_of_rows_equals_metrics_ece() -> None:
    gen = torch.Generator().manual_seed(3)
    u, y = model(300, gen)
    rows = torch.randint(300, (6, 120), generator=gen)
    fast = drift.ece_of_rows(u.max_probability, u.probabilities.argmax(-1) == y, rows)
    for r, value in zip(rows, fast.tolist(), strict=True):
        assert value == pytest.approx(metrics.ece(u.probabilities[r], y[r]), abs=1e-12)


def test_ks_psi_of_counts_equal_metrics() -> None:
    gen = torch.Generator().manual_seed(4)
    ref_values, live_values = torch.rand(500, generator=gen), torch.rand(80, generator=gen) ** 2
    edges = drift.quantile_edges(ref_values)
    ref_counts = drift.bin_counts(ref_values, edges)
    ks, psi = drift.ks_psi_of_counts(torch.tensor([drift.bin_counts(live_values, edges)]), torch.tensor([ref_counts]))
    assert float(ks[0]) == pytest.approx(metrics.ks_statistic(live_values, edges, ref_counts), abs=1e-12)
    assert float(psi[0]) == pytest.approx(metrics.psi(live_values, edges, ref_counts), abs=1e-12)


def test_multinomial_counts() -> None:
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2], dtype=torch.float64)
    counts = drift.multinomial_counts(probs, 200, 4000, torch.Generator().manual_seed(0))
    assert (counts.sum(-1) == 200).all() and (counts[:, 1] == 0).all()
    mean, var = counts.mean(0), counts.var(0)
    assert torch.allclose(mean, 200 * probs, atol=1.0)
    assert torch.allclose(var, 200 * probs * (1 - probs), rtol=0.1, atol=0.5)


def test_interpolate_is_exact_for_power_laws() -> None:
    windows = (50, 100, 200, 500, 1000)
    values = [3.0 / math.sqrt(n) for n in windows]
    assert drift.interpolate(windows, values, 300) == pytest.approx(3.0 / math.sqrt(300))
    assert drift.interpolate(windows, values, 49) is None
    assert drift.interpolate(windows, values, 5000) == values[-1]  # conservative above the grid
    linear_in_log_n = -math.log2(1.5)  # where a value is ≤ 0
    assert drift.interpolate(windows, [0.0, -1.0, 1.0, 2.0, 3.0], 75) == pytest.approx(linear_in_log_n)


# --- the reference as a bundle field -------------------------------------------------------------------


def test_reference_round_trips_in_the_manifest_and_old_calibrations_load(reference: drift.DriftReference) -> None:
    calibration = Calibration(validation_metrics={"ece": 0.05}, drift=reference)
    loaded = Calibration.model_validate_json(calibration.model_dump_json())
    assert loaded == calibration and loaded.drift is not None
    assert set(loaded.drift.scores) == set(drift.SCORES)
    old = json.loads(calibration.model_dump_json())
    del old["drift"]
    assert Calibration.model_validate(old).drift is None
    with pytest.raises(ValidationError):
        drift.DriftReference.model_validate({**reference.model_dump(), "surprise": 1})
    with pytest.raises(ValidationError):  # a quantile table that does not match the grid
        drift.DriftReference.model_validate({**reference.model_dump(), "ece_excess": [[0.1] * 4]})
    with pytest.raises(ValidationError):  # windows out of order
        drift.DriftReference.model_validate({**reference.model_dump(), "windows": tuple(reversed(reference.windows))})


def test_build_drift_reference_contract(reference: drift.DriftReference) -> None:
    u, y = model(200, torch.Generator().manual_seed(2))
    probs = torch.cat([u.probabilities, torch.zeros(200, 1, dtype=torch.float64)], -1)  # a padded 5th choice
    single = drift.build_drift_reference(probs, y, {"confidence": u.max_probability,
                                                    "predictive_entropy": u.predictive_entropy})
    assert set(single.scores) == {"confidence", "predictive_entropy"}  # MI left out, as for one member
    assert single.validation_ece == pytest.approx(metrics.ece(u.probabilities, y))
    assert single == drift.build_drift_reference(probs, y, {"confidence": u.max_probability,
                                                            "predictive_entropy": u.predictive_entropy})
    validation_ece = known(reference.validation_ece)
    for n in (50, 120, 500):  # thresholds shrink as windows grow; the ECE one stays above validation ECE
        assert known(reference.ece_threshold(n)) > known(reference.ece_threshold(2 * n)) > validation_ece
        for score in drift.SCORES:
            assert known(reference.ks_threshold(score, n)) > known(reference.ks_threshold(score, 2 * n)) > 0
            assert known(reference.psi_threshold(score, n)) > known(reference.psi_threshold(score, 2 * n)) > 0
    assert reference.ece_threshold(49) is None and reference.ks_threshold("confidence", 49) is None


def test_fallback_reference_from_an_old_manifest() -> None:
    u, y = model(600, torch.Generator().manual_seed(5))
    hist = metrics.reference_histograms(u, num_choices=4)
    val_ece = metrics.ece(u.probabilities, y)
    fb = drift.fallback_drift_reference({k: (h["edges"], h["counts"]) for k, h in hist.items()}, val_ece)
    assert fb.source.startswith("fallback") and set(fb.scores) == set(drift.SCORES)
    assert known(fb.ece_threshold(100)) > known(fb.ece_threshold(500)) > val_ece
    assert drift.fallback_drift_reference({}, None).scores == {}
    # coverage of the calibrated-model ECE null: fresh windows of a calibrated model rarely exceed it
    gen = torch.Generator().manual_seed(6)
    exceed = 0
    for _ in range(200):
        fresh, labels = model(200, gen)
        exceed += metrics.ece(fresh.probabilities, labels) > known(fb.ece_threshold(200))
    assert exceed <= 200 * FALSE_ALARM_BUDGET


# --- streams through the Monitor ----------------------------------------------------------------------


VERSION = ("1", "calibration-hash")  # the window's (version, calibration hash)


def stream(reference: drift.DriftReference, phases: list[tuple[int, dict[str, float]]],
           seed: int) -> dict[str, list[bool]]:
    """Stream ``model(**kwargs)`` answers for each (evaluations, kwargs) phase; per alert (``ece``,
    ``ks_<score>``, ``psi_<score>``) whether its condition holds at each rule evaluation."""
    gen = torch.Generator().manual_seed(seed)
    monitor = Monitor(window=500, drift_window=500, drift_min_samples=50)
    monitor.start_bundle("b", VERSION, reference)
    alerts = ["ece"] + [f"{s}_{score}" for s in ("ks", "psi") for score in drift.SCORES]
    out: dict[str, list[bool]] = {a: [] for a in alerts}
    request = 0
    for evaluations, kwargs in phases:
        u, y = model(4 * evaluations, gen, **kwargs)
        rows, labels = u.probabilities.tolist(), y.tolist()
        labelled = (torch.rand(len(y), generator=gen) < 0.25).tolist()
        scores = {k: v.tolist() for k, v in live_scores(u).items()}
        for evaluation in range(evaluations):
            for i in range(4 * evaluation, 4 * evaluation + 4):
                monitor.record("b", VERSION, {k: v[i] for k, v in scores.items()})
                if labelled[i]:
                    monitor.labelled(LabelledAnswer(str(request), "b", *VERSION, rows[i], labels[i]))
                request += 1
            snap = monitor.snapshot("b", VERSION[0], None)
            w = snap.window
            out["ece"].append(w is not None and w.ece_threshold is not None and w.ece > w.ece_threshold)
            for stat, values, thresholds in (("ks", snap.drift_ks, snap.drift_ks_threshold),
                                             ("psi", snap.drift_psi, snap.drift_psi_threshold)):
                for score in drift.SCORES:
                    out[f"{stat}_{score}"].append(score in thresholds and values[score] > thresholds[score])
    return out


def firing(condition: list[bool]) -> list[bool]:
    """``for: 15m``: fires at t when the condition held at evaluations t − 60 … t."""
    run, out = 0, []
    for holds in condition:
        run = run + 1 if holds else 0
        out.append(run > FOR_EVALS)
    return out


def test_a_day_without_drift_rarely_alarms(reference: drift.DriftReference) -> None:
    """A perfectly calibrated model, a day of rule evaluations: the fraction of evaluations at which an
    alert's condition holds (before ``for``) is ≤ 1 % per alert, and so is the fraction at which any alert
    fires. Whether anything fired that day is reported in the failure message (benchmarks/drift_simulation.py
    measures it over days of real scores)."""
    conditions = stream(reference, [(DAY, {})], seed=11)
    any_condition = [any(c) for c in zip(*conditions.values(), strict=True)]
    any_firing = firing(any_condition)
    rates = {a: sum(c) / DAY for a, c in conditions.items()}
    report = f"condition rates {rates}, firing rate {sum(any_firing) / DAY}, fired today: {any(any_firing)}"
    assert max(rates.values()) <= FALSE_ALARM_BUDGET, report
    assert sum(any_condition) / DAY <= FALSE_ALARM_BUDGET, report
    assert sum(any_firing) / DAY <= FALSE_ALARM_BUDGET, report
    assert all(len(c) == DAY for c in conditions.values())


def test_a_shift_is_detected(reference: drift.DriftReference) -> None:
    """Two hours of no drift, then the model turns overconfident (labels from a flatter distribution)
    on sharper, more disputed inputs: every alert fires within six hours and none before the switch."""
    before, after = 2 * 3600 // 15, 6 * 3600 // 15
    conditions = stream(reference, [(before, {}), (after, {"sharpness": 1.5, "truth_temperature": 2.0,
                                                           "disagreement": 2.0})], seed=12)
    for alert, condition in conditions.items():
        fire = firing(condition)
        assert not any(fire[:before]), alert
        assert any(fire[before:]), alert
