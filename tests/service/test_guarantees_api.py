"""Conformal sets and risk control served end to end: a bundle calibrated by the exporter's own path
(training.guarantees), answered over HTTP by the real engine on the tiny model; the 4xx cases; the online
coverage gauges after feedback; the alarm on a stream whose coverage breaks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from core.answers import Question
from core.basemodel import BaseModel
from core.bundle import read_bundle
from service.app import create_app
from service.engine.guarantee_watch import GuaranteeWatch
from service.predlog import LabelledAnswer
from training.guarantees import attach_guarantees

CHOICES = ("red", "green", "blue", "yellow")


def labelled(n: int, seed: int = 0) -> list[Question]:
    gen = torch.Generator().manual_seed(seed)
    return [Question(question=f"Which colour is number {i}?", choices=CHOICES,
                     answer=int(torch.randint(0, 4, (1,), generator=gen))) for i in range(n)]


@pytest.fixture
def served(tiny_base: BaseModel, bundle_maker: Any, engine_factory: Any, tmp_path: Path) -> Any:
    root = tmp_path / "bundles"
    path = bundle_maker(root, "calibrated", members=2)
    manifest = attach_guarantees(tiny_base, path, labelled(60), alpha=0.2, delta=0.1)
    bundle_maker(root, "plain", members=1)
    engine = engine_factory(root, preload_bundles=["calibrated", "plain"])
    with TestClient(create_app(engine.settings, engine)) as client:
        yield client, manifest, engine


def ask(client: TestClient, **extra: Any) -> Any:
    return client.post("/v1/answer", json={"bundle": "calibrated", "question": "Which colour is the sky?",
                                           "choices": list(CHOICES), **extra})


def test_answer_carries_the_conformal_set_at_the_bundle_alpha_and_a_request_alpha(served: Any) -> None:
    client, manifest, _ = served
    conformal = manifest.calibration.conformal
    assert conformal is not None and conformal.n == 60 and conformal.alpha == 0.2
    for alpha in (None, 0.05, 0.5):
        r = ask(client, **({} if alpha is None else {"alpha": alpha}))
        assert r.status_code == 200, r.text
        body = r.json()
        got = body["prediction_set"]
        expected_alpha = 0.2 if alpha is None else alpha
        mine = conformal.sets(torch.tensor([body["probabilities"]], dtype=torch.float64), expected_alpha)[0]
        assert got["alpha"] == expected_alpha and got["n_calibration"] == 60 and got["score"] == "lac"
        assert got["indices"] == torch.nonzero(mine).reshape(-1).tolist()
        assert got["labels"] == ["ABCD"[i] for i in got["indices"]]
        assert got["choices"] == [CHOICES[i] for i in got["indices"]]
        assert got["qhat"] == pytest.approx(conformal.qhat(expected_alpha))
        assert "risk_control" not in body  # nobody asked for it
    listed = {b["name"]: b for b in client.get("/v1/bundles").json()["bundles"]}
    assert listed["plain"]["guarantees"] is None
    summary = listed["calibrated"]["guarantees"]
    assert summary["n_calibration"] == 60 and summary["alpha"] == 0.2 and summary["min_alpha"] == pytest.approx(1 / 61)
    assert summary["delta"] == 0.1 and summary["target_risk"] is None and "mutual_information" in summary["risk_scores"]


def test_guarantees_that_cannot_be_given_are_422(served: Any) -> None:
    client, _, _ = served
    for extra, code, param in (({"alpha": 0.01}, "alpha_too_small", "alpha"),  # n = 60 supports >= 1/61
                               ({"risk_score": "one_minus_feu", "target_risk": 0.2}, "score_unavailable",
                                "risk_score")):
        r = ask(client, **extra)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == code and r.json()["error"]["param"] == param
    r = client.post("/v1/answer", json={"bundle": "plain", "question": "q?", "choices": ["a", "b"], "alpha": 0.1})
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_calibration_split"
    plain = client.post("/v1/answer", json={"bundle": "plain", "question": "q?", "choices": ["a", "b"]})
    assert plain.status_code == 200 and plain.json()["prediction_set"] is None
    for bad in ({"alpha": 0}, {"alpha": 1.5}, {"target_risk": 1}, {"delta": -0.1}, {"risk_score": "accuracy"}):
        r = ask(client, **bad)
        assert r.status_code == 422 and "error" in r.json(), bad


def test_risk_control_abstains_unless_certified_and_states_the_guarantee(served: Any) -> None:
    client, manifest, _ = served
    strict = ask(client, target_risk=0.01).json()
    rc = strict["risk_control"]
    assert rc["certified"] is False and rc["threshold"] is None and "certifies" in rc["reason"]
    assert strict["abstained"] and "risk_control" in strict["abstain_reasons"] and strict["answer"] is None
    loose = ask(client, target_risk=0.95, delta=0.5).json()["risk_control"]
    cert = manifest.calibration.risk.certify("one_minus_max_probability", 0.95, 0.5)
    assert loose["certified"] is cert.certified is True and loose["threshold"] == pytest.approx(cert.threshold)
    assert loose["n_calibration"] == 60 and loose["delta"] == 0.5 and loose["score"] == "one_minus_max_probability"
    assert loose["answered"] == (loose["value"] <= loose["threshold"])
    entropy = ask(client, target_risk=0.95, delta=0.5, risk_score="predictive_entropy").json()
    assert entropy["risk_control"]["score"] == "predictive_entropy"
    assert entropy["risk_control"]["value"] == pytest.approx(entropy["predictive_entropy"])
    batch = client.post("/v1/answer/batch", json={"bundle": "calibrated", "target_risk": 0.01, "alpha": 0.3,
                                                  "questions": [{"question": "a?", "choices": list(CHOICES)},
                                                                {"question": "b?", "choices": list(CHOICES)}]})
    assert batch.status_code == 200
    assert all(r["abstained"] and r["prediction_set"]["alpha"] == 0.3 for r in batch.json()["results"])


def test_feedback_feeds_the_coverage_gauges_and_the_log_keeps_the_set(served: Any) -> None:
    client, _, engine = served
    ids = []
    for i in range(6):
        body = ask(client, question=f"Which colour is thing {i}?").json()
        ids.append((body["request_id"], body["prediction_set"]["indices"]))
    for request_id, _ in ids:
        assert client.post("/v1/feedback", json={"request_id": request_id, "correct_index": 0}).status_code == 200
    text = client.get("/metrics").text
    covered = sum(0 in indices for _, indices in ids) / len(ids)
    line = next(ln for ln in text.splitlines() if ln.startswith("uqserve_conformal_coverage{"))
    assert 'bundle="calibrated"' in line and float(line.split()[-1]) == pytest.approx(covered)
    assert 'uqserve_conformal_alpha{bundle="calibrated",version="1"} 0.2' in text
    assert 'uqserve_conformal_labelled{bundle="calibrated",version="1"} 6.0' in text
    assert "uqserve_conformal_miscoverage_lower{" in text
    rows = list(engine.store.rows())  # type: ignore[attr-defined]
    logged = [json.loads(r["thresholds"]) if isinstance(r["thresholds"], str) else r["thresholds"] for r in rows]
    assert all("answer_set" in t and t["answer_set"]["alpha"] == 0.2 for t in logged)


def test_the_watch_alarms_on_a_stream_whose_coverage_breaks(tiny_base: BaseModel, bundle_maker: Any,
                                                           tmp_path: Path) -> None:
    path = bundle_maker(tmp_path, "watched", members=1)
    manifest = attach_guarantees(tiny_base, path, labelled(60), alpha=0.1)
    conformal = manifest.calibration.conformal
    key = (manifest.version, manifest.calibration_hash())
    watch = GuaranteeWatch(window=100, level=0.05)
    watch.start_bundle("watched", key, read_bundle(path).manifest.calibration)
    confident = [0.97, 0.01, 0.01, 0.01]  # a set of {A} at alpha 0.1 for any q̂ < 0.97
    assert conformal.sets(torch.tensor([confident], dtype=torch.float64), 0.1)[0].tolist()[0]
    fired = None
    for t in range(1, 400):
        label = 0 if t <= 100 else 1  # after 100 labels the truth is always outside the set
        watch.labelled(LabelledAnswer(f"r{t}", "watched", key[0], key[1], confident, label))
        stats = watch.stats("watched")
        assert stats is not None
        if t <= 100:
            assert stats.miscoverage_lower == 0.0
        if fired is None and stats.miscoverage_lower is not None and stats.miscoverage_lower > 0.1:
            fired = t
    assert fired is not None and 100 < fired < 400
    print(f"coverage alarm fired at label {fired} (coverage broke at label 101)")


def test_the_client_sends_guarantees_and_parses_them(served: Any) -> None:
    from service.protocol import AnswerResponse, GuaranteesIn
    from uqserve.client import _core

    spec = _core.answer("calibrated", "Which colour is the sky?", list(CHOICES), None, None, False,
                        GuaranteesIn(alpha=0.3, target_risk=0.95, delta=0.5))
    assert spec.json is not None and spec.json["alpha"] == 0.3 and spec.json["target_risk"] == 0.95
    assert "risk_score" not in spec.json
    as_dict = _core.answer_batch("calibrated", [{"question": "q?", "choices": list(CHOICES)}], None, False,
                                 {"alpha": 0.3, "delta": None})
    assert as_dict.json is not None and as_dict.json["alpha"] == 0.3 and "delta" not in as_dict.json
    client, _, _ = served
    parsed = AnswerResponse.model_validate(client.post("/v1/answer", json=spec.json).json())
    assert parsed.prediction_set is not None and parsed.prediction_set.alpha == 0.3
    assert parsed.risk_control is not None and parsed.risk_control.delta == 0.5
