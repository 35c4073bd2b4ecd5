"""uqserve.client (sync and async) and ``uqserve ask`` against a live uvicorn server on a fake engine."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from core.answers import Question
from service.app import create_app
from service.engine import errors as E
from service.engine.types import AnswerOptions, AnswerResult
from service.settings import Settings
from tests.live_uvicorn import serving
from tests.service.test_api_contract import ADMIN, FakeEngine, _status
from uqserve import cli
from uqserve.client import (
    AdminAuthError,
    AdminDisabled,
    AnswerResponse,
    APIConnectionError,
    AsyncClient,
    BatchAnswerResponse,
    BundleList,
    BundleNotFound,
    BundleRefused,
    ChoicesMismatch,
    ChoicesRequired,
    Client,
    ClientTimeout,
    ConflictError,
    DuplicateFeedback,
    IncompatibleBaseModel,
    InternalServerError,
    InvalidAdminKey,
    InvalidBundleName,
    InvalidInput,
    InvalidQuestion,
    InvalidRequestError,
    LimitExceeded,
    MissingAdminKey,
    NotFoundError,
    ProtocolError,
    QuestionIn,
    QueueFull,
    RequestTimeout,
    RequestValidationError,
    ServerError,
    SlotsExhausted,
    ThresholdsIn,
    Unavailable,
    UnknownRequest,
    UqserveClientError,
)
from uqserve.client._core import RetryPolicy, answer
from uqserve.client.errors import ERROR_CODES, parse_retry_after

CHOICES = ["oxygen", "carbon dioxide", "helium"]
LABELS = ("billing", "technical", "account")  # the label set of bundle "tickets"


class LiveEngine(FakeEngine):
    """The contract tests' fake engine, plus: ``queue_full`` answers raise QueueFullError first, then each
    answer sleeps ``delay_s``; ``calls`` counts answer calls; bundle "tickets" has a label set."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.loaded = {"default": _status("default"), "tickets": _status("tickets")}
        self.fail = None
        self.calls = 0
        self.queue_full = 0
        self.retry_after_s = 1
        self.delay_s = 0.0

    async def answer(self, bundle: str, questions: list[Question], options: AnswerOptions) -> list[AnswerResult]:
        self.calls += 1
        if self.queue_full > 0:
            self.queue_full -= 1
            raise E.QueueFullError("the row queue is full", retry_after_s=self.retry_after_s)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return await super().answer(bundle, questions, options)

    def labels(self, bundle: str) -> tuple[str, ...] | None:
        return LABELS if bundle == "tickets" else None


@contextmanager
def live_server(engine: FakeEngine, root: Path, **settings: Any) -> Iterator[str]:
    values: dict[str, Any] = {"bundle_root": root, "preload_bundles": [], "max_question_chars": 100,
                              "max_batch_questions": 3, **settings}
    app = create_app(Settings(_env_file=None, **values), engine=engine)  # type: ignore[call-arg]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    try:
        with serving(config, sock, start_timeout_s=10, stop_timeout_s=10):
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, LiveEngine]]:
    engine = LiveEngine()
    with live_server(engine, tmp_path_factory.mktemp("bundles"), admin_key=ADMIN) as url:
        yield url, engine


@pytest.fixture
def server(live: tuple[str, LiveEngine]) -> tuple[str, LiveEngine]:
    live[1].reset()
    return live


@pytest.fixture
def client(server: tuple[str, LiveEngine]) -> Iterator[Client]:
    with Client(server[0], admin_key=ADMIN, timeout=5) as c:
        yield c


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- round trips ------------------------------------------------------------------------------------------


def test_answer_batch_feedback_bundles_round_trip(client: Client) -> None:
    r = client.answer("default", "Which gas do plants take in?", CHOICES, context="photosynthesis",
                      thresholds=ThresholdsIn(predictive_entropy=0.9), return_members=True)
    assert isinstance(r, AnswerResponse)
    assert r.answer is not None and (r.answer.index, r.answer.label, r.answer.text) == (0, "A", "oxygen")
    assert r.abstained is False and len(r.probabilities) == 3 and r.members is not None
    assert r.thresholds_used.sources["predictive_entropy"] == "request"
    assert r.bundle.name == "default" and r.timings.total_ms >= 0

    unsure = client.answer("default", "unsure: which gas?", CHOICES, thresholds={"predictive_entropy": None})
    assert unsure.abstained and unsure.answer is None and unsure.abstain_reasons == ["predictive_entropy"]

    batch = client.answer_batch("default", [{"question": "q0", "choices": ["a", "b"], "context": None},
                                            QuestionIn(question="q1", choices=["a", "b", "c"])])
    assert isinstance(batch, BatchAnswerResponse)
    assert [x.answer.index for x in batch.results if x.answer] == [0, 1]

    fb = client.feedback(r.request_id, 1)
    assert (fb.request_id, fb.bundle, fb.result) == (r.request_id, "default", "joined")

    listed = client.bundles()
    assert isinstance(listed, BundleList) and [b.name for b in listed.bundles] == ["default", "tickets"]
    assert client.health().status == "ok"
    ready = client.ready()
    assert ready.ready is True and ready.bundles_loaded == 2


def test_label_set_bundle_without_choices(client: Client) -> None:
    r = client.answer("tickets", "My invoice is wrong")  # choices omitted: the bundle's labels
    assert r.answer is not None and r.answer.text == "billing" and len(r.probabilities) == 3
    batch = client.answer_batch("tickets", [{"question": "Cannot log in"}, {"question": "VPN down", "choices": None}])
    assert [x.answer.text for x in batch.results if x.answer] == ["billing", "technical"]
    assert client.answer("tickets", "q", list(LABELS)).answer is not None
    with pytest.raises(ChoicesMismatch) as mismatch:
        client.answer("tickets", "q", ["billing", "other"])
    assert mismatch.value.status == 422 and mismatch.value.param == "choices"
    with pytest.raises(ChoicesRequired) as required:
        client.answer("default", "q")
    assert required.value.status == 422 and isinstance(required.value, InvalidRequestError)


def test_admin_load_unload_and_auth_errors(server: tuple[str, LiveEngine], client: Client) -> None:
    url, engine = server
    with Client(url) as anonymous, pytest.raises(MissingAdminKey) as missing:
        anonymous.load_bundle("new")
    assert missing.value.status == 401 and missing.value.code == "missing_admin_key"
    with Client(url, admin_key="wrong-key") as wrong, pytest.raises(InvalidAdminKey) as bad:
        wrong.unload_bundle("default")
    assert isinstance(bad.value, AdminAuthError) and bad.value.status == 403
    assert "default" in engine.loaded

    assert client.load_bundle("new").action == "loaded"
    again = client.load_bundle("new")
    assert again.action == "replaced" and again.bundle.name == "new"
    assert {b.name for b in client.bundles().bundles} == {"default", "tickets", "new"}
    assert client.unload_bundle("new").action == "unloaded"
    with pytest.raises(BundleNotFound) as gone:
        client.unload_bundle("new")
    assert gone.value.status == 404 and gone.value.param == "name"
    for name in ("a..b", "..", "a/b", "a b"):
        with pytest.raises(InvalidBundleName):
            client.load_bundle(name)
    assert set(engine.loaded) == {"default", "tickets"}


def test_admin_disabled(tmp_path: Path) -> None:
    with live_server(FakeEngine(), tmp_path) as url, Client(url, admin_key="anything") as c:
        with pytest.raises(AdminDisabled) as err:
            c.load_bundle("x")
        assert err.value.status == 403 and "UQSERVE_ADMIN_KEY" in err.value.message


# --- error mapping ----------------------------------------------------------------------------------------


def test_request_errors_map_to_classes(client: Client) -> None:
    with pytest.raises(BundleNotFound) as nf:
        client.answer("missing", "q?", CHOICES)
    assert (nf.value.status, nf.value.code, nf.value.type, nf.value.param) == (
        404, "bundle_not_found", "not_found_error", "bundle")
    assert isinstance(nf.value, NotFoundError) and "not loaded" in str(nf.value)
    assert nf.value.response is not None and nf.value.response.status_code == 404

    with pytest.raises(RequestValidationError) as invalid:
        client.answer("default", "q?", ["only one"])
    assert invalid.value.status == 422 and invalid.value.param == "choices"
    with pytest.raises(RequestValidationError):
        client.answer("default", "q?", CHOICES, thresholds={"one_minus_max_probability": 2})
    with pytest.raises(LimitExceeded) as limit:
        client.answer("default", "x" * 101, CHOICES)
    assert limit.value.param == "question"
    with pytest.raises(LimitExceeded):
        client.answer_batch("default", [{"question": "q", "choices": ["a", "b"]}] * 4)
    with pytest.raises(InvalidQuestion):
        client.answer("default", "q?", ["a", "  "])


def test_feedback_errors(client: Client) -> None:
    request_id = client.answer("default", "q?", CHOICES).request_id
    with pytest.raises(UnknownRequest) as unknown:
        client.feedback("nope", 0)
    assert unknown.value.status == 404 and isinstance(unknown.value, NotFoundError)
    with pytest.raises(InvalidInput) as out_of_range:
        client.feedback(request_id, 5)
    assert out_of_range.value.status == 422 and out_of_range.value.param == "correct_index"
    with pytest.raises(RequestValidationError):
        client.feedback(request_id, -1)
    client.feedback(request_id, 1)
    with pytest.raises(DuplicateFeedback) as dup:
        client.feedback(request_id, 1)
    assert dup.value.status == 409 and isinstance(dup.value, ConflictError)


@pytest.mark.parametrize("error, cls, status", [
    (E.EngineUnavailableError("draining"), Unavailable, 503),
    (E.RequestTimeoutError("slow"), RequestTimeout, 504),
    (RuntimeError("boom"), InternalServerError, 500),
])
def test_server_errors_are_not_retried(server: tuple[str, LiveEngine], client: Client, error: BaseException,
                                       cls: type[UqserveClientError], status: int) -> None:
    _, engine = server
    engine.fail = error
    with pytest.raises(cls) as err:
        client.answer("default", "q?", CHOICES)
    assert err.value.status == status and isinstance(err.value, ServerError)
    assert engine.calls == 1  # a POST /v1/answer that got a 5xx is never resent


@pytest.mark.parametrize("error, cls, status", [
    (E.BundleRefusedError("rank 64 > 16", reason="rank"), BundleRefused, 422),
    (E.BundleIncompatibleError("other base", reason="incompatible_base"), IncompatibleBaseModel, 409),
    (E.CapacityError("no slots"), SlotsExhausted, 503),
])
def test_bundle_load_errors(server: tuple[str, LiveEngine], client: Client, error: BaseException,
                            cls: type[UqserveClientError], status: int) -> None:
    server[1].fail = error
    with pytest.raises(cls) as err:
        client.load_bundle("bad")
    assert err.value.status == status
    if cls is IncompatibleBaseModel:
        assert isinstance(err.value, BundleRefused) and isinstance(err.value, ConflictError)
    if cls is SlotsExhausted:
        assert err.value.retry_after == 1.0


def test_every_server_code_has_a_class() -> None:
    """Every ``code="..."`` / ``code = "..."`` in service/ (and the admin codes) maps to its own class."""
    source = "\n".join(p.read_text() for p in (Path(__file__).parents[1] / "service").rglob("*.py"))
    codes = set(re.findall(r'\bcode\s*=\s*"([a-z_]+)"', source))
    codes |= {"validation_error", "missing_admin_key", "invalid_admin_key", "admin_disabled"}
    assert {"queue_full", "choices_required", "invalid_bundle_name", "internal_error"} <= codes
    assert codes - {"engine_error"} <= set(ERROR_CODES), codes - set(ERROR_CODES)


# --- retries and timeouts ---------------------------------------------------------------------------------


def test_retry_after_is_honoured(server: tuple[str, LiveEngine], client: Client) -> None:
    _, engine = server
    engine.queue_full, engine.retry_after_s = 2, 1
    start = time.monotonic()
    r = client.answer("default", "q?", CHOICES)
    elapsed = time.monotonic() - start
    assert r.answer is not None and engine.calls == 3
    assert 2.0 <= elapsed < 3.0, elapsed  # two waits of Retry-After: 1


def test_queue_full_after_max_retries(server: tuple[str, LiveEngine]) -> None:
    url, engine = server
    engine.queue_full, engine.retry_after_s = 10, 1
    with Client(url, max_retries=2, max_retry_wait=0.2) as c:
        start = time.monotonic()
        with pytest.raises(QueueFull) as err:
            c.answer("default", "q?", CHOICES)
        elapsed = time.monotonic() - start
    assert engine.calls == 3 and 0.4 <= elapsed < 1.0, (engine.calls, elapsed)  # waits capped at 0.2 s
    assert err.value.status == 429 and err.value.retry_after == 1.0 and err.value.code == "queue_full"
    engine.calls = 0
    with Client(url, max_retries=0) as c, pytest.raises(QueueFull):
        c.answer("default", "q?", CHOICES)
    assert engine.calls == 1


def test_client_timeout(server: tuple[str, LiveEngine]) -> None:
    url, engine = server
    engine.delay_s = 1.0
    with Client(url, timeout=0.25) as c:
        start = time.monotonic()
        with pytest.raises(ClientTimeout) as err:
            c.answer("default", "q?", CHOICES)
    assert time.monotonic() - start < 0.9 and engine.calls == 1  # not retried
    assert isinstance(err.value, TimeoutError) and isinstance(err.value, UqserveClientError)
    assert err.value.status is None and "0.25" in str(err.value)


def test_connection_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with Client(url, max_retries=0) as c, pytest.raises(APIConnectionError) as err:
        c.answer("default", "q?", CHOICES)
    assert err.value.status is None and "/v1/answer" in str(err.value)

    sent: list[str] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        sent.append(request.method)
        if len(sent) == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"status": "ok"})

    with Client(transport=httpx.MockTransport(flaky), max_retry_wait=0.01) as c:
        assert c.health().status == "ok" and sent == ["GET", "GET"]  # a GET is resent
        sent.clear()
        with pytest.raises(APIConnectionError):
            c.answer("default", "q?", CHOICES)
        assert sent == ["POST"]  # a POST is not


def test_backoff_without_retry_after() -> None:
    sent: list[float] = []

    def limited(request: httpx.Request) -> httpx.Response:
        sent.append(time.monotonic())
        if len(sent) < 3:
            return httpx.Response(429, json={"error": {"message": "slow down", "type": "rate_limit_error",
                                                       "param": None, "code": None}})
        return httpx.Response(200, json={"status": "ok"})

    with Client(transport=httpx.MockTransport(limited), max_retry_wait=0.05) as c:
        assert c.health().status == "ok"
    assert len(sent) == 3 and sent[2] - sent[0] >= 0.1
    policy = RetryPolicy(max_retries=5, max_retry_wait=3.0)
    spec = answer("default", "q", None, None, None, False)
    no_header = httpx.Response(429)
    assert [policy.wait(spec, a, no_header) for a in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, None]
    assert policy.wait(spec, 0, httpx.Response(429, headers={"Retry-After": "120"})) == 3.0
    assert policy.wait(spec, 0, httpx.Response(503, headers={"Retry-After": "1"})) is None
    assert policy.wait(spec, 0, httpx.ReadTimeout("slow")) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after("-3") == 0.0


def test_non_json_and_unknown_errors() -> None:
    def proxy(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/healthz":
            return httpx.Response(502, text="<html><h1>502 Bad Gateway</h1></html>" + " " * 500,
                                  headers={"Content-Type": "text/html"})
        if request.url.path == "/readyz":
            return httpx.Response(200, json={"unexpected": True})
        return httpx.Response(418, json={"error": {"message": "teapot", "type": "x", "param": None,
                                                   "code": "brand_new_code"}})

    with Client(transport=httpx.MockTransport(proxy)) as c:
        with pytest.raises(ServerError) as bad_gateway:
            c.health()
        text = str(bad_gateway.value)
        assert bad_gateway.value.status == 502 and bad_gateway.value.code is None
        assert "502" in text and "<html><h1>502 Bad Gateway" in text and "text/html" in text and "…" in text
        with pytest.raises(ProtocolError):
            c.ready()
        with pytest.raises(InvalidRequestError) as teapot:
            c.bundles()
        assert teapot.value.code == "brand_new_code" and teapot.value.status == 418


def test_request_bodies_omit_absent_fields() -> None:
    """``choices=None`` (label-set bundles) and other absent fields are left out of the JSON."""
    bodies: list[dict[str, Any]] = []
    response = AnswerResponse.model_validate({
        "answer": None, "abstained": True, "abstain_reasons": [], "probabilities": [1.0],
        "predictive_entropy": 0.0, "expected_entropy": None, "mutual_information": None, "max_probability": 1.0,
        "thresholds_used": {"predictive_entropy": None, "mutual_information": None,
                            "one_minus_max_probability": None, "sources": {}},
        "bundle": {"name": "labels", "version": "1", "method": "ensemble", "base_model_hash": "h",
                   "calibration_hash": "c"},
        "request_id": "r", "timings": {"queue_ms": 0, "forward_ms": 0, "total_ms": 0, "batch_rows": 1}})

    def record(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        if request.url.path == "/v1/answer/batch":
            return httpx.Response(200, json={"results": [response.model_dump()]})
        return httpx.Response(200, content=response.model_dump_json())

    with Client(transport=httpx.MockTransport(record)) as c:
        c.answer("labels", "My invoice is wrong")
        c.answer("labels", "q", ["a", "b"], thresholds=ThresholdsIn(mutual_information=0.1))
        c.answer_batch("labels", [{"question": "q", "choices": None, "context": None}])
    assert bodies == [
        {"bundle": "labels", "question": "My invoice is wrong", "return_members": False},
        {"bundle": "labels", "question": "q", "choices": ["a", "b"], "thresholds": {"mutual_information": 0.1},
         "return_members": False},
        {"bundle": "labels", "questions": [{"question": "q"}], "return_members": False},
    ]


# --- async ------------------------------------------------------------------------------------------------


def test_async_client(server: tuple[str, LiveEngine]) -> None:
    url, engine = server

    async def main() -> None:
        async with AsyncClient(url, admin_key=ADMIN, timeout=5) as c:
            r = await c.answer("default", "Which gas?", CHOICES)
            assert r.answer is not None and r.answer.text == "oxygen"
            batch = await c.answer_batch("default", [{"question": f"q{i}", "choices": CHOICES} for i in range(3)])
            assert [x.answer.index for x in batch.results if x.answer] == [0, 1, 2]
            assert (await c.feedback(r.request_id, 1)).result == "joined"
            with pytest.raises(DuplicateFeedback):
                await c.feedback(r.request_id, 1)
            assert [b.name for b in (await c.bundles()).bundles] == ["default", "tickets"]
            assert (await c.load_bundle("extra")).action == "loaded"
            assert (await c.unload_bundle("extra")).action == "unloaded"
            assert (await c.health()).status == "ok" and (await c.ready()).ready
            with pytest.raises(BundleNotFound):
                await c.answer("missing", "q?", CHOICES)
            engine.calls, engine.queue_full = 0, 1
            start = time.monotonic()
            assert (await c.answer("default", "q?", CHOICES)).answer is not None
            assert engine.calls == 2 and 1.0 <= time.monotonic() - start < 2.0
        async with AsyncClient(url, timeout=0.25) as slow:
            engine.delay_s = 1.0
            with pytest.raises(ClientTimeout):
                await slow.answer("default", "q?", CHOICES)
            with pytest.raises(MissingAdminKey):
                await slow.load_bundle("x")

    asyncio.run(main())


# --- uqserve ask ------------------------------------------------------------------------------------------


def test_ask_cli(server: tuple[str, LiveEngine], capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = server
    choices = ["--choice", "oxygen", "-c", "carbon dioxide", "-c", "helium"]
    assert cli.main(["ask", "default", "Which gas do plants take in?", *choices, "--url", url]) == 0
    out = capsys.readouterr().out
    assert "A. oxygen" in out and "carbon dioxide" in out and "0.333" in out
    assert "predictive entropy  0.690 nats" in out and "mutual information  0.090 nats" in out
    assert "abstained           no" in out

    assert cli.main(["ask", "default", "unsure: which gas?", *choices, "--url", url, "--context", "leaves"]) == 3
    out = capsys.readouterr().out
    assert "(abstained)" in out and "abstained           yes: predictive_entropy 0.690 > 0.500" in out

    assert cli.main(["ask", "default", "Which gas?", *choices, "--url", url, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["answer"]["text"] == "oxygen" and len(payload["probabilities"]) == 3

    assert cli.main(["ask", "tickets", "My invoice is wrong", "--url", url]) == 0  # label set: no --choice
    out = capsys.readouterr().out
    assert "A. billing" in out and ">A billing" in out

    assert cli.main(["ask", "missing", "Which gas?", *choices, "--url", url]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "bundle_not_found" in captured.err and "not loaded" in captured.err

    assert cli.main(["ask", "default", "q?", "-c", "only one", "--url", url]) == 2
    assert "validation_error" in capsys.readouterr().err

    down = f"http://127.0.0.1:{closed_port()}"
    assert cli.main(["ask", "default", "q?", *choices, "--url", down, "--timeout", "2"]) == 2
    assert "cannot reach" in capsys.readouterr().err
