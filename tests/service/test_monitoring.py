"""Feedback joins labels to answers; window and drift gauges against independent references (naive
per-bin loops, a brute-force empirical CDF, PSI by hand); alarm-threshold gauges from the bundle's drift
reference, or the server's fallback for a bundle exported without one."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient

from core.bundle import MANIFEST
from core.drift import build_drift_reference
from service.app import create_app
from service.engine.monitoring import drift_reference

SCORES = ("confidence", "predictive_entropy", "mutual_information")


def _question(i: int) -> dict[str, Any]:
    k = 2 + i % 3
    return {"bundle": "b", "question": f"Question number {i}: which one?", "choices": [f"option {j}" for j in range(k)]}


# --- independent references: plain Python, no core.metrics ----------------------------------------------


def _argmax(row: list[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)  # first maximum, as torch.argmax


def naive_ece(rows: list[list[float]], labels: list[int], bins: int = 15) -> float:
    """Σ_b (n_b / N) |acc_b − conf_b| over bins (b/B, (b+1)/B], the first also holding 0."""
    total = 0.0
    for b in range(bins):
        members = [(max(r), float(_argmax(r) == y)) for r, y in zip(rows, labels, strict=True)
                   if b / bins < max(r) <= (b + 1) / bins or (b == 0 and max(r) == 0)]
        if members:
            conf = sum(c for c, _ in members) / len(members)
            acc = sum(h for _, h in members) / len(members)
            total += len(members) / len(rows) * abs(acc - conf)
    return total


def naive_brier(rows: list[list[float]], labels: list[int]) -> float:
    return sum(sum((p - (k == y)) ** 2 for k, p in enumerate(r)) for r, y in zip(rows, labels, strict=True)) / len(rows)


def naive_nll(rows: list[list[float]], labels: list[int]) -> float:
    return -sum(math.log(r[y]) for r, y in zip(rows, labels, strict=True)) / len(rows)


def brute_ks(values: list[float], edges: tuple[float, ...], counts: tuple[int, ...]) -> float:
    """max over the interior edges e of |#{live < e}/n − reference mass below e| (empirical CDFs)."""
    total, out = sum(counts), 0.0
    for b in range(1, len(edges) - 1):
        live = sum(v < edges[b] for v in values) / len(values)
        out = max(out, abs(live - sum(counts[:b]) / total))
    return out


def hand_psi(values: list[float], edges: tuple[float, ...], counts: tuple[int, ...], eps: float = 1e-4) -> float:
    """Σ_b (q_b − p_b) ln(q_b / p_b), q = live and p = reference bin shares floored at eps; a value goes to
    the bin of the last interior edge at or below it (so out-of-range values land in the end bins)."""
    live = [0] * len(counts)
    for v in values:
        live[sum(v >= e for e in edges[1:-1])] += 1
    out = 0.0
    for q_count, p_count in zip(live, counts, strict=True):
        q, p = max(q_count / len(values), eps), max(p_count / sum(counts), eps)
        out += (q - p) * math.log(q / p)
    return out


def _answer_and_label(client: TestClient, n: int, seed: int) -> tuple[list[dict[str, Any]], list[int]]:
    rng = random.Random(seed)
    answers = [client.post("/v1/answer", json=_question(i)).json() for i in range(n)]
    labels = [rng.randrange(len(a["probabilities"])) for a in answers]
    for answer, label in zip(answers, labels, strict=True):
        r = client.post("/v1/feedback", json={"request_id": answer["request_id"], "correct_index": label})
        assert r.status_code == 200 and r.json()["result"] == "joined"
    return answers, labels


def _live(answers: list[dict[str, Any]]) -> dict[str, list[float]]:
    return {"confidence": [a["max_probability"] for a in answers],
            "predictive_entropy": [a["predictive_entropy"] for a in answers],
            "mutual_information": [a["mutual_information"] for a in answers]}


def test_window_and_drift_gauges_match_independent_references(engine_factory: Any, bundle_maker: Any,
                                                              bundle_root: Path) -> None:
    bundle_maker(bundle_root, "b", members=3, scale=0.3)  # an older bundle: no drift reference in its manifest
    engine = engine_factory(bundle_root, preload_bundles=["b"], feedback_window=50, drift_min_samples=5)
    with TestClient(create_app(engine.settings, engine)) as client:
        answers, labels = _answer_and_label(client, 60, seed=0)
        registry = client.app.state.metrics.registry  # type: ignore[attr-defined]

        def gauge(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, {"bundle": "b", **labels})

        def value(name: str, **labels: str) -> float:
            found = gauge(name, **labels)
            assert found is not None, (name, labels)
            return found

        rows, y = [a["probabilities"] for a in answers[-50:]], labels[-50:]  # the window: the last 50 labels
        assert math.isclose(value("uqserve_window_ece"), naive_ece(rows, y), abs_tol=1e-12)
        assert gauge("uqserve_window_accuracy") == sum(_argmax(r) == t for r, t in zip(rows, y, strict=True)) / 50
        assert math.isclose(value("uqserve_window_brier"), naive_brier(rows, y), abs_tol=1e-12)
        assert math.isclose(value("uqserve_window_nll"), naive_nll(rows, y), abs_tol=1e-12)
        assert gauge("uqserve_window_labelled") == 50
        assert gauge("uqserve_labelled_total") == 60
        assert gauge("uqserve_validation_ece") == 0.05
        assert gauge("uqserve_requests_total", outcome="answered") == 60

        # label-free drift of all 60 live answers; without a drift reference the server bins like the manifest
        calibration = engine.registry.get("b").predictor.manifest.calibration
        assert calibration.drift is None
        fallback = drift_reference(calibration)
        for score, values in _live(answers).items():
            ref = calibration.reference_histograms[score]
            assert math.isclose(value("uqserve_drift_ks", score=score), brute_ks(values, ref.edges, ref.counts),
                                abs_tol=1e-12)
            assert math.isclose(value("uqserve_drift_psi", score=score), hand_psi(values, ref.edges, ref.counts),
                                abs_tol=1e-12)
            # thresholds at the current fill, from the fallback the server built at load
            assert gauge("uqserve_drift_ks_threshold", score=score) == fallback.ks_threshold(score, 60)
            assert gauge("uqserve_drift_psi_threshold", score=score) == fallback.psi_threshold(score, 60)
        threshold = value("uqserve_window_ece_threshold")
        assert threshold == fallback.ece_threshold(50) and threshold > 0.05

        # late or repeated feedback
        dup = client.post("/v1/feedback", json={"request_id": answers[0]["request_id"], "correct_index": 0})
        assert dup.status_code == 409
        assert gauge("uqserve_feedback_total", result="duplicate") == 1

        # reloading the same version rebuilds its windows from the prediction log: the same gauges
        before = {name: value(name) for name in ("uqserve_window_ece", "uqserve_window_labelled",
                                                 "uqserve_window_brier", "uqserve_window_nll")}
        ks_before = value("uqserve_drift_ks", score="confidence")
        client.portal.call(engine.load_bundle, "b")  # type: ignore[union-attr]
        assert {name: value(name) for name in before} == before
        assert value("uqserve_drift_ks", score="confidence") == ks_before

        # a new version starts fresh windows; labels for the old version are joined but not counted
        fresh = client.post("/v1/answer", json=_question(99)).json()
        bundle_maker(bundle_root, "b", members=3, scale=0.3, version="2")
        client.portal.call(engine.load_bundle, "b")  # type: ignore[union-attr]
        assert gauge("uqserve_window_labelled") is None and gauge("uqserve_window_ece_threshold") is None
        r = client.post("/v1/feedback", json={"request_id": fresh["request_id"], "correct_index": 0})
        assert r.status_code == 200 and gauge("uqserve_window_labelled") is None
        assert gauge("uqserve_drift_ks", score="confidence") is None  # fewer than drift_min_samples
        _answer_and_label(client, 10, seed=1)  # 10 labels, 10 live values: gauges, but below the smallest window
        assert gauge("uqserve_window_labelled") == 10 and gauge("uqserve_window_ece_threshold") is None
        assert gauge("uqserve_drift_ks", score="confidence") is not None
        assert gauge("uqserve_drift_ks_threshold", score="confidence") is None


def test_a_bundle_drift_reference_sets_bins_and_thresholds(engine_factory: Any, bundle_maker: Any,
                                                           bundle_root: Path) -> None:
    """With ``calibration.drift`` in the manifest the server compares against its quantile bins, not the
    equal-width reference histograms, and reads the thresholds from it."""
    path = bundle_maker(bundle_root, "b", members=3, scale=0.3)
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(300, 4, generator=gen, dtype=torch.float64) * 0.3, -1)
    labels = torch.multinomial(probs, 1, generator=gen)[:, 0]
    mi = torch.rand(300, generator=gen, dtype=torch.float64) * 0.01
    reference = build_drift_reference(probs, labels, {"confidence": probs.max(-1).values, "mutual_information": mi,
                                                      "predictive_entropy": -(probs * probs.log()).sum(-1)})
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["calibration"]["drift"] = reference.model_dump(mode="json")
    (path / MANIFEST).write_text(json.dumps(manifest))
    engine = engine_factory(bundle_root, preload_bundles=["b"], feedback_window=100, drift_min_samples=5)
    with TestClient(create_app(engine.settings, engine)) as client:
        answers, _ = _answer_and_label(client, 70, seed=2)
        registry = client.app.state.metrics.registry  # type: ignore[attr-defined]
        assert engine.registry.get("b").predictor.manifest.calibration.drift == reference
        for score, values in _live(answers).items():
            ref = reference.scores[score]
            ks = registry.get_sample_value("uqserve_drift_ks", {"bundle": "b", "score": score})
            assert ks is not None and math.isclose(ks, brute_ks(values, ref.edges, ref.counts), abs_tol=1e-12)
            psi = registry.get_sample_value("uqserve_drift_psi", {"bundle": "b", "score": score})
            assert psi is not None and math.isclose(psi, hand_psi(values, ref.edges, ref.counts), abs_tol=1e-12)
            assert registry.get_sample_value("uqserve_drift_ks_threshold", {"bundle": "b", "score": score}) == \
                reference.ks_threshold(score, 70)
        assert registry.get_sample_value("uqserve_window_ece_threshold", {"bundle": "b"}) == reference.ece_threshold(70)
