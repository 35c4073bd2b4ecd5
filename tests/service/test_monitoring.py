"""Feedback joins labels to answers; window gauges equal core.metrics on the same data; drift gauges."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient

from core import metrics
from service.app import create_app


def _padded(rows: list[list[float]]) -> torch.Tensor:
    k = max(map(len, rows))
    return torch.tensor([r + [0.0] * (k - len(r)) for r in rows], dtype=torch.float64)


def _question(i: int) -> dict[str, Any]:
    k = 2 + i % 3
    return {
        "bundle": "b",
        "question": f"Question number {i}: which one?",
        "choices": [f"option {j}" for j in range(k)],
    }


def test_feedback_window_gauges_equal_core_metrics(engine_factory: Any, bundle_maker: Any, bundle_root: Path) -> None:
    bundle_maker(bundle_root, "b", members=3, scale=0.3)
    engine = engine_factory(bundle_root, preload_bundles=["b"], feedback_window=20, drift_min_samples=5)
    rng = random.Random(0)
    with TestClient(create_app(engine.settings, engine)) as client:
        answers = [client.post("/v1/answer", json=_question(i)).json() for i in range(30)]
        labels = [rng.randrange(len(a["probabilities"])) for a in answers]
        for answer, label in zip(answers, labels, strict=True):
            r = client.post("/v1/feedback", json={"request_id": answer["request_id"], "correct_index": label})
            assert r.status_code == 200 and r.json()["result"] == "joined"
        registry = client.app.state.metrics.registry  # type: ignore[attr-defined]

        def gauge(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, {"bundle": "b", **labels})

        probs = _padded([a["probabilities"] for a in answers[-20:]])  # the window holds the last 20 labels
        y = torch.tensor(labels[-20:])
        assert gauge("uqserve_window_ece") == metrics.ece(probs, y)
        assert gauge("uqserve_window_accuracy") == metrics.accuracy(probs, y)
        assert gauge("uqserve_window_brier") == metrics.brier(probs, y)
        assert gauge("uqserve_window_nll") == metrics.nll(probs, y)
        assert gauge("uqserve_window_labelled") == 20
        assert gauge("uqserve_labelled_total") == 30
        assert gauge("uqserve_validation_ece") == 0.05
        assert gauge("uqserve_requests_total", outcome="answered") == 30

        # label-free drift against the manifest's reference histograms, all 30 live answers
        refs = engine.registry.get("b").predictor.manifest.calibration.reference_histograms
        live = {
            "confidence": [a["max_probability"] for a in answers],
            "predictive_entropy": [a["predictive_entropy"] for a in answers],
            "mutual_information": [a["mutual_information"] for a in answers],
        }
        for score, values in live.items():
            ref = refs[score]
            values_t = torch.tensor(values, dtype=torch.float64)
            assert gauge("uqserve_drift_ks", score=score) == metrics.ks_statistic(values_t, ref.edges, ref.counts)
            assert gauge("uqserve_drift_psi", score=score) == metrics.psi(values_t, ref.edges, ref.counts)

        # late or repeated feedback
        dup = client.post("/v1/feedback", json={"request_id": answers[0]["request_id"], "correct_index": 0})
        assert dup.status_code == 409
        assert gauge("uqserve_feedback_total", result="duplicate") == 1

        # a new version starts fresh windows; labels for the old version are joined but not counted
        fresh = client.post("/v1/answer", json=_question(99)).json()
        client.portal.call(engine.load_bundle, "b")  # type: ignore[union-attr]
        assert gauge("uqserve_window_labelled") is None
        r = client.post("/v1/feedback", json={"request_id": fresh["request_id"], "correct_index": 0})
        assert r.status_code == 200 and gauge("uqserve_window_labelled") is None
        assert gauge("uqserve_drift_ks", score="confidence") is None  # fewer than drift_min_samples
