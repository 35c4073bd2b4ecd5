"""HTTP contract against a fake engine: status codes, the one error schema, response fields, admin auth."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.answers import Question
from service.app import create_app
from service.engine import errors as E
from service.engine.base import Engine
from service.engine.types import (
    AnswerOptions,
    AnswerResult,
    BundleMonitor,
    BundleRef,
    BundleStatus,
    FeedbackOutcome,
    ThresholdsUsed,
    Timings,
)
from service.settings import Settings

ADMIN = "admin-key-123"
RESPONSE_FIELDS = {
    "answer",
    "abstained",
    "abstain_reasons",
    "probabilities",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "max_probability",
    "thresholds_used",
    "bundle",
    "request_id",
    "timings",
    "prediction_set",  # null for this fake engine: no calibration split
}


def _status(name: str) -> BundleStatus:
    return BundleStatus(
        name=name,
        version="1",
        method="ensemble",
        members=["m0", "m1"],
        answer_format="cloze",
        base_model_hash="h" * 64,
        calibration_hash="c" * 16,
        lora_rank=8,
        lora_layers=[2, 3],
        slots=[0, 1],
        in_flight=0,
        loaded_at=time.time(),
        validation_ece=0.05,
        thresholds={
            "predictive_entropy": None,
            "mutual_information": None,
            "one_minus_max_probability": None,
        },
    )


class FakeEngine(Engine):
    """Answers uniformly; 'unsure' in a question makes it abstain; ``fail`` makes the next call raise."""

    def __init__(self) -> None:
        self.loaded = {"default": _status("default")}
        self.fail: BaseException | None = None
        self.given_labels: dict[str, int] = {}
        self.answered_ids: dict[str, int] = {}
        self._ready = False

    async def start(self) -> None:
        self._ready = True

    async def stop(self) -> None:
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def queue_depth_rows(self) -> int:
        return 0

    def _raise(self) -> None:
        if self.fail is not None:
            err, self.fail = self.fail, None
            raise err

    async def answer(self, bundle: str, questions: list[Question], options: AnswerOptions) -> list[AnswerResult]:
        self._raise()
        if bundle not in self.loaded:
            raise E.BundleNotFoundError(f"bundle {bundle!r} is not loaded", param="bundle")
        out = []
        for i, q in enumerate(questions):
            k = len(q.choices)
            unsure = "unsure" in q.question
            request_id = f"req{len(self.answered_ids)}"
            self.answered_ids[request_id] = k
            used = ThresholdsUsed(
                values={
                    "predictive_entropy": 0.5,
                    "mutual_information": None,
                    "one_minus_max_probability": None,
                },
                sources={
                    "predictive_entropy": "request" if options.thresholds else "bundle",
                    "mutual_information": "none",
                    "one_minus_max_probability": "none",
                },
            )
            out.append(
                AnswerResult(
                    request_id=request_id,
                    answer_index=i % k,
                    abstained=unsure,
                    abstain_reasons=["predictive_entropy"] if unsure else [],
                    probabilities=[1.0 / k] * k,
                    predictive_entropy=0.69,
                    expected_entropy=0.6,
                    mutual_information=0.09,
                    max_probability=1.0 / k,
                    members=[[1.0 / k] * k] * 2 if options.return_members else None,
                    thresholds_used=used,
                    bundle=BundleRef(bundle, "1", "ensemble", "h" * 64, "c" * 16),
                    timings=Timings(queue_ms=1.0, forward_ms=2.0, batch_rows=2),
                )
            )
        return out

    async def load_bundle(self, name: str) -> BundleStatus:
        self._raise()
        self.loaded[name] = _status(name)
        return self.loaded[name]

    async def unload_bundle(self, name: str) -> BundleStatus:
        if name not in self.loaded:
            raise E.BundleNotFoundError(f"bundle {name!r} is not loaded", param="name")
        return self.loaded.pop(name)

    def bundles(self) -> list[BundleStatus]:
        return [self.loaded[n] for n in sorted(self.loaded)]

    async def feedback(self, request_id: str, correct_index: int) -> FeedbackOutcome:
        if request_id not in self.answered_ids:
            raise E.FeedbackNotFoundError("unknown", param="request_id")
        if request_id in self.given_labels:
            raise E.DuplicateFeedbackError("duplicate", bundle="default", param="request_id")
        if correct_index >= self.answered_ids[request_id]:
            raise E.InvalidInputError("out of range", param="correct_index")
        self.given_labels[request_id] = correct_index
        return FeedbackOutcome(request_id, "default", "joined")

    def monitor(self) -> list[BundleMonitor]:
        return [BundleMonitor("default", 0.05, None, {"confidence": 0.1}, {"confidence": 0.2})]


def make_client(tmp_path: Any, **overrides: Any) -> tuple[TestClient, FakeEngine]:
    engine = FakeEngine()
    values: dict[str, Any] = {
        "bundle_root": tmp_path,
        "preload_bundles": [],
        "max_question_chars": 100,
        "max_context_chars": 200,
        "max_choice_chars": 20,
        "max_batch_questions": 3,
    }
    values.update(overrides)
    app = create_app(Settings(_env_file=None, **values), engine=engine)  # type: ignore[call-arg]
    return TestClient(app, raise_server_exceptions=False), engine


@pytest.fixture
def client(tmp_path: Any) -> Iterator[tuple[TestClient, FakeEngine]]:
    c, engine = make_client(tmp_path, admin_key=ADMIN)
    with c:
        yield c, engine


def body(**extra: Any) -> dict[str, Any]:
    return {
        "bundle": "default",
        "question": "Which gas do plants take in?",
        "choices": ["oxygen", "carbon dioxide", "helium"],
        **extra,
    }


def assert_error(response: Any, status: int, type_: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    payload = response.json()
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["message"]
    if type_ is not None:
        assert payload["error"]["type"] == type_
    if param is not None:
        assert payload["error"]["param"] == param
    return payload["error"]


def test_answer_fields(client: tuple[TestClient, FakeEngine]) -> None:
    c, _ = client
    r = c.post("/v1/answer", json=body())
    assert r.status_code == 200
    data = r.json()
    assert set(data) == RESPONSE_FIELDS  # no members unless asked
    assert data["answer"] == {"index": 0, "label": "A", "text": "oxygen"}
    assert abs(sum(data["probabilities"]) - 1) < 1e-9 and len(data["probabilities"]) == 3
    assert set(data["bundle"]) == {"name", "version", "method", "base_model_hash", "calibration_hash", "prompt_hash"}
    assert set(data["thresholds_used"]) == {
        "predictive_entropy",
        "mutual_information",
        "one_minus_max_probability",
        "one_minus_feu",
        "sources",
        "rule",
    }
    assert {"queue_ms", "forward_ms", "total_ms"} <= set(data["timings"])
    with_members = c.post("/v1/answer", json=body(return_members=True)).json()
    assert with_members["members"] == [[1 / 3] * 3] * 2


def test_abstention_fields(client: tuple[TestClient, FakeEngine]) -> None:
    c, _ = client
    data = c.post("/v1/answer", json=body(question="unsure: which gas?")).json()
    assert data["answer"] is None and data["abstained"] is True
    assert data["abstain_reasons"] == ["predictive_entropy"]
    assert len(data["probabilities"]) == 3  # the distribution is always computed
    data = c.post("/v1/answer", json=body(thresholds={"predictive_entropy": 0.5})).json()
    assert data["thresholds_used"]["sources"]["predictive_entropy"] == "request"


@pytest.mark.parametrize(
    "payload, param",
    [
        ({"question": "q", "choices": ["a", "b"]}, "bundle"),
        (body(choices=["only one"]), "choices"),
        (body(choices=[f"c{i}" for i in range(27)]), "choices"),
        (body(bundle="../x"), "bundle"),
        (body(bundle="a/b"), "bundle"),
        (body(unexpected=1), "unexpected"),
        (body(thresholds={"predictive_entropy": -1}), "thresholds.predictive_entropy"),
        (body(thresholds={"one_minus_max_probability": 2}), "thresholds.one_minus_max_probability"),
        (body(question=""), "question"),
    ],
)
def test_validation_errors_use_error_schema(client: tuple[TestClient, FakeEngine], payload: dict, param: str) -> None:
    c, _ = client
    err = assert_error(c.post("/v1/answer", json=payload), 422, "invalid_request_error", param)
    assert err["code"] == "validation_error"


def test_malformed_json_is_422(client: tuple[TestClient, FakeEngine]) -> None:
    c, _ = client
    r = c.post("/v1/answer", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(r, 422, "invalid_request_error")


@pytest.mark.parametrize(
    "payload, param",
    [
        (body(question="x" * 101), "question"),
        (body(context="x" * 201), "context"),
        (body(choices=["a", "y" * 21]), "choices.1"),
        (body(question="   "), "question"),
        (body(choices=["a", "  "]), "choices.1"),  # the blank choice itself
    ],
)
def test_configured_limits(client: tuple[TestClient, FakeEngine], payload: dict, param: str) -> None:
    c, _ = client
    assert_error(c.post("/v1/answer", json=payload), 422, "invalid_request_error", param)


def test_batch_endpoint(client: tuple[TestClient, FakeEngine]) -> None:
    c, _ = client
    qs = [{"question": f"q{i}", "choices": ["a", "b", "c"]} for i in range(3)]
    r = c.post("/v1/answer/batch", json={"bundle": "default", "questions": qs})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["answer"]["index"] for x in results] == [0, 1, 2]
    assert len({x["request_id"] for x in results}) == 3
    too_many = {"bundle": "default", "questions": qs + qs}
    assert_error(c.post("/v1/answer/batch", json=too_many), 422, "invalid_request_error", "questions")
    assert_error(c.post("/v1/answer/batch", json={"bundle": "default", "questions": []}), 422)
    long = {"bundle": "default", "questions": [qs[0], {"question": "x" * 101, "choices": ["a", "b"]}]}
    assert_error(c.post("/v1/answer/batch", json=long), 422, param="questions.1.question")


@pytest.mark.parametrize(
    "error, status, type_, header",
    [
        (E.BundleNotFoundError("nope", param="bundle"), 404, "not_found_error", None),
        (E.QueueFullError("full", retry_after_s=3), 429, "rate_limit_error", "3"),
        (E.RequestTimeoutError("slow"), 504, "timeout_error", None),
        (E.EngineUnavailableError("draining"), 503, "unavailable_error", None),
        (E.InvalidInputError("too many tokens", param="question"), 422, "invalid_request_error", None),
        (RuntimeError("boom"), 500, "internal_error", None),
    ],
)
def test_engine_errors_map_to_status(
    client: tuple[TestClient, FakeEngine], error: BaseException, status: int, type_: str, header: str | None
) -> None:
    c, engine = client
    engine.fail = error
    r = c.post("/v1/answer", json=body())
    err = assert_error(r, status, type_)
    if header is not None:
        assert r.headers["Retry-After"] == header
    if status == 500:
        assert "boom" not in err["message"]  # internals are not leaked


def test_unknown_bundle_404_and_error_metric(client: tuple[TestClient, FakeEngine]) -> None:
    c, _ = client
    assert_error(c.post("/v1/answer", json=body(bundle="missing")), 404, "not_found_error")
    registry = c.app.state.metrics.registry  # type: ignore[attr-defined]
    assert registry.get_sample_value("uqserve_requests_total", {"bundle": "_unknown", "outcome": "error"}) == 1


def test_admin_disabled_without_key(tmp_path: Any) -> None:
    c, _ = make_client(tmp_path)
    with c:
        err = assert_error(c.post("/v1/bundles/default", headers={"X-Admin-Key": "anything"}), 403, "permission_error")
        assert "UQSERVE_ADMIN_KEY" in err["message"]


def test_admin_auth(client: tuple[TestClient, FakeEngine]) -> None:
    c, _ = client
    r = c.post("/v1/bundles/new")
    assert_error(r, 401, "authentication_error")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert_error(c.post("/v1/bundles/new", headers={"X-Admin-Key": "wrong-key-123"}), 403, "permission_error")
    assert_error(c.delete("/v1/bundles/new", headers={"Authorization": "Bearer wrong"}), 403)
    ok = c.post("/v1/bundles/new", headers={"Authorization": f"Bearer {ADMIN}"})
    assert ok.status_code == 200 and ok.json()["action"] == "loaded"
    again = c.post("/v1/bundles/new", headers={"X-Admin-Key": ADMIN})
    assert again.json()["action"] == "replaced"
    assert {b["name"] for b in c.get("/v1/bundles").json()["bundles"]} == {"default", "new"}
    gone = c.delete("/v1/bundles/new", headers={"X-Admin-Key": ADMIN})
    assert gone.status_code == 200 and gone.json()["action"] == "unloaded"
    assert_error(c.delete("/v1/bundles/new", headers={"X-Admin-Key": ADMIN}), 404, "not_found_error")


@pytest.mark.parametrize("name", ["a..b", ".hidden", "-x", "x" * 65, "a b"])
def test_admin_bundle_names_are_validated(client: tuple[TestClient, FakeEngine], name: str) -> None:
    c, engine = client
    assert_error(c.post(f"/v1/bundles/{name}", headers={"X-Admin-Key": ADMIN}), 422, "invalid_request_error", "name")
    assert name not in engine.loaded


@pytest.mark.parametrize(
    "path", ["/v1/bundles/..%2Fx", "/v1/bundles/%2E%2E%2Fetc", "/v1/bundles/../x", "/v1/bundles/.."]
)
def test_path_traversal_never_loads(client: tuple[TestClient, FakeEngine], path: str) -> None:
    c, engine = client
    r = c.post(path, headers={"X-Admin-Key": ADMIN})
    assert r.status_code in (404, 405, 422)
    assert_error(r, r.status_code)
    assert set(engine.loaded) == {"default"}


@pytest.mark.parametrize(
    "error, status",
    [
        (E.BundleRefusedError("rank 64 > 16", reason="rank"), 422),
        (E.BundleIncompatibleError("other base", reason="incompatible_base"), 409),
        (E.BundleNotFoundError("no such dir", param="name"), 404),
        (E.CapacityError("no slots"), 503),
    ],
)
def test_bad_bundle_load(client: tuple[TestClient, FakeEngine], error: BaseException, status: int) -> None:
    c, engine = client
    engine.fail = error
    assert_error(c.post("/v1/bundles/bad", headers={"X-Admin-Key": ADMIN}), status)
    assert c.post("/v1/answer", json=body()).status_code == 200  # still serving
    registry = c.app.state.metrics.registry  # type: ignore[attr-defined]
    failures = sum(
        registry.get_sample_value("uqserve_bundle_load_failures_total", {"reason": r}) or 0
        for r in ("rank", "incompatible_base", "not_found", "capacity")
    )
    assert failures == 1


def test_feedback(client: tuple[TestClient, FakeEngine]) -> None:
    c, _ = client
    request_id = c.post("/v1/answer", json=body()).json()["request_id"]
    assert_error(c.post("/v1/feedback", json={"request_id": "nope", "correct_index": 0}), 404, "not_found_error")
    assert_error(c.post("/v1/feedback", json={"request_id": request_id, "correct_index": -1}), 422)
    assert_error(
        c.post("/v1/feedback", json={"request_id": request_id, "correct_index": 5}),
        422,
        param="correct_index",
    )
    ok = c.post("/v1/feedback", json={"request_id": request_id, "correct_index": 1})
    assert ok.status_code == 200 and ok.json() == {
        "request_id": request_id,
        "bundle": "default",
        "result": "joined",
    }
    assert_error(c.post("/v1/feedback", json={"request_id": request_id, "correct_index": 1}), 409)
    registry = c.app.state.metrics.registry  # type: ignore[attr-defined]
    for result in ("joined", "duplicate"):
        assert registry.get_sample_value("uqserve_feedback_total", {"bundle": "default", "result": result}) == 1
    assert registry.get_sample_value("uqserve_feedback_total", {"bundle": "_unknown", "result": "unknown_request"}) == 1
    assert registry.get_sample_value("uqserve_labelled_total", {"bundle": "default"}) == 1


def test_health_metrics_docs(client: tuple[TestClient, FakeEngine]) -> None:
    c, _ = client
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/readyz").json()["ready"] is True
    c.post("/v1/answer", json=body())
    text = c.get("/metrics").text
    for name in (
        "uqserve_request_latency_seconds_bucket",
        "uqserve_requests_total",
        "uqserve_queue_depth_rows",
        "uqserve_bundles_loaded",
        "uqserve_validation_ece",
        "uqserve_drift_ks",
        "uqserve_drift_psi",
        "uqserve_predictive_entropy_nats_bucket",
        "uqserve_max_probability_bucket",
    ):
        assert name in text, name
    assert 'endpoint="/v1/answer"' in text
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/v1/answer", "/v1/answer/batch", "/v1/bundles", "/v1/bundles/{name}", "/v1/feedback"} <= set(paths)
    assert c.get("/docs").status_code == 200
    assert_error(c.get("/nope"), 404, "not_found_error")
    assert_error(c.get("/v1/answer"), 405)


def test_readyz_503_after_shutdown(tmp_path: Any) -> None:
    c, engine = make_client(tmp_path)
    with c:
        pass
    assert engine.ready is False
    app = c.app
    with TestClient(app, raise_server_exceptions=False) as again:
        engine._ready = False
        assert_error(again.get("/readyz"), 503, "unavailable_error")
