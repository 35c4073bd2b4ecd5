"""What :class:`~uqserve.client.Client` and :class:`~uqserve.client.AsyncClient` share, with no I/O:
the request specs (method, path, JSON body, response model), the retry decision and response parsing.

The two clients only send a spec's request, sleep when :meth:`Core.settle` says so, and return what it
parses; every decision is made here once.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import pydantic
from pydantic import BaseModel

from service.protocol import (
    AnswerResponse,
    BatchAnswerResponse,
    BundleActionResponse,
    BundleList,
    FeedbackResponse,
    GuaranteesIn,
    HealthResponse,
    QuestionIn,
    ReadyResponse,
    ThresholdsIn,
)
from uqserve.client.errors import (
    APIConnectionError,
    ClientTimeout,
    InvalidBundleName,
    ProtocolError,
    UqserveClientError,
    error_from_response,
    parse_retry_after,
)

T = TypeVar("T", bound=BaseModel)

DEFAULT_URL = "http://127.0.0.1:8000"
Thresholds = ThresholdsIn | Mapping[str, float | None]
QuestionLike = QuestionIn | Mapping[str, Any]
Guarantees = GuaranteesIn | Mapping[str, Any]  # alpha, target_risk, delta, risk_score
# errors after which nothing reached the application: safe to resend an idempotent GET
_RETRYABLE_TRANSPORT = (httpx.NetworkError, httpx.RemoteProtocolError)


def _user_agent() -> str:
    try:
        version = importlib.metadata.version("uqserve")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return f"uqserve-client/{version} httpx/{httpx.__version__}"


@dataclass(frozen=True)
class RequestSpec(Generic[T]):
    """One API call: what to send and which protocol model the 2xx body is."""

    method: str
    path: str
    model: type[T]
    json: dict[str, Any] | None = None
    admin: bool = False  # send the admin key

    @property
    def idempotent(self) -> bool:
        return self.method == "GET"


@dataclass(frozen=True)
class Retry:
    """:meth:`Core.settle`'s answer when the request should be sent again after ``wait`` seconds."""

    wait: float


@dataclass(frozen=True)
class RetryPolicy:
    """Retry a 429 (any method: the server refuses before queueing anything) after its ``Retry-After``,
    capped at ``max_retry_wait``, or after a capped exponential backoff when the header is absent; retry a
    GET whose connection failed (nothing reached the server's application) with the same backoff. Never a
    timeout, never another status: a POST that got 503/504 may have been logged by the server."""

    max_retries: int = 3
    max_retry_wait: float = 30.0
    backoff_base: float = 0.5
    backoff_max: float = 8.0

    def backoff(self, attempt: int) -> float:
        return min(self.backoff_base * 2.0 ** attempt, self.backoff_max, self.max_retry_wait)

    def wait(self, spec: RequestSpec[Any], attempt: int, outcome: httpx.Response | httpx.RequestError) -> float | None:
        """Seconds to wait before resending after ``attempt`` (0 = the first send), or None: do not retry."""
        if attempt >= self.max_retries:
            return None
        if isinstance(outcome, httpx.Response):
            if outcome.status_code != 429:
                return None
            after = parse_retry_after(outcome.headers.get("Retry-After"))
            return self.backoff(attempt) if after is None else min(after, self.max_retry_wait)
        if spec.idempotent and isinstance(outcome, _RETRYABLE_TRANSPORT):
            return self.backoff(attempt)
        return None


def parse_response(spec: RequestSpec[T], response: httpx.Response) -> T:
    """The 2xx body as ``spec.model``; any other status raises its :class:`UqserveClientError`."""
    if not response.is_success:
        raise error_from_response(response)
    try:
        return spec.model.model_validate_json(response.content)
    except pydantic.ValidationError as err:
        raise ProtocolError(f"{spec.method} {spec.path} answered HTTP {response.status_code} with a body that is "
                            f"not a {spec.model.__name__}: {err}", status=response.status_code,
                            response=response) from None


class Core:
    """Configuration and decisions of one client (sync or async)."""

    def __init__(self, base_url: str, *, admin_key: str | None, timeout: float | httpx.Timeout | None,
                 max_retries: int, max_retry_wait: float, headers: Mapping[str, str] | None,
                 api_key: str | None = None) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.admin_key = admin_key
        self.api_key = api_key
        self.timeout = httpx.Timeout(timeout)
        self.retry = RetryPolicy(max_retries=max_retries, max_retry_wait=max_retry_wait)
        self.headers = {"User-Agent": _user_agent(), "Accept": "application/json", **(headers or {})}

    def http_options(self, transport: Any) -> dict[str, Any]:
        """Keyword arguments of ``httpx.Client`` / ``httpx.AsyncClient``."""
        return {"base_url": self.base_url, "timeout": self.timeout, "headers": self.headers,
                "transport": transport}

    def request_args(self, spec: RequestSpec[Any]) -> dict[str, Any]:
        """Keyword arguments of ``httpx.Client.request`` for ``spec``."""
        headers = None
        if spec.admin and self.admin_key:
            headers = {"Authorization": f"Bearer {self.admin_key}"}
        elif not spec.admin and self.api_key:
            headers = {"X-API-Key": self.api_key}
        return {"method": spec.method, "url": spec.path, "json": spec.json, "headers": headers}

    def settle(self, spec: RequestSpec[T], attempt: int, outcome: httpx.Response | httpx.RequestError) -> T | Retry:
        """After one send: the parsed model, a :class:`Retry`, or raise the error it came to."""
        wait = self.retry.wait(spec, attempt, outcome)
        if wait is not None:
            return Retry(wait)
        if isinstance(outcome, httpx.Response):
            return parse_response(spec, outcome)
        raise self.transport_error(spec, outcome) from outcome

    def transport_error(self, spec: RequestSpec[Any], err: httpx.RequestError) -> UqserveClientError:
        where = f"{spec.method} {self.base_url}{spec.path}"
        if isinstance(err, httpx.TimeoutException):
            phase = {httpx.ConnectTimeout: "connect", httpx.WriteTimeout: "write",
                     httpx.PoolTimeout: "pool"}.get(type(err), "read")
            return ClientTimeout(f"no response to {where} within the client's {phase} timeout "
                                 f"({getattr(self.timeout, phase)}s)")
        return APIConnectionError(f"cannot reach {where}: {type(err).__name__}: {err}")


# --- the API's calls --------------------------------------------------------------------------------------


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _thresholds(thresholds: Thresholds | None) -> dict[str, Any] | None:
    if thresholds is None:
        return None
    if isinstance(thresholds, ThresholdsIn):
        return thresholds.model_dump(exclude_none=True)
    return _drop_none(thresholds)


def _question(question: QuestionLike) -> dict[str, Any]:
    """A question's JSON with absent fields omitted: ``choices`` may be left out for label-set bundles."""
    if isinstance(question, QuestionIn):
        return question.model_dump(exclude_none=True)
    body = _drop_none(question)
    if "choices" in body:
        body["choices"] = list(body["choices"])
    return body


def _options(body: dict[str, Any], thresholds: Thresholds | None, return_members: bool,
             guarantees: Guarantees | None = None) -> dict[str, Any]:
    """The request body; ``guarantees`` (alpha, target_risk, delta, risk_score) go in at the top level."""
    asked = (guarantees.model_dump(exclude_none=True) if isinstance(guarantees, GuaranteesIn)
             else _drop_none(dict(guarantees or {})))
    return _drop_none({**body, **asked, "thresholds": _thresholds(thresholds), "return_members": return_members})


def answer(bundle: str, question: str, choices: Sequence[str] | None, context: str | None,
           thresholds: Thresholds | None, return_members: bool,
           guarantees: Guarantees | None = None) -> RequestSpec[AnswerResponse]:
    body = {"bundle": bundle, **_question({"question": question, "choices": choices, "context": context})}
    return RequestSpec("POST", "/v1/answer", AnswerResponse, _options(body, thresholds, return_members, guarantees))


def answer_batch(bundle: str, questions: Sequence[QuestionLike], thresholds: Thresholds | None,
                 return_members: bool, guarantees: Guarantees | None = None) -> RequestSpec[BatchAnswerResponse]:
    body = {"bundle": bundle, "questions": [_question(q) for q in questions]}
    return RequestSpec("POST", "/v1/answer/batch", BatchAnswerResponse,
                       _options(body, thresholds, return_members, guarantees))


def feedback(request_id: str, correct_index: int) -> RequestSpec[FeedbackResponse]:
    return RequestSpec("POST", "/v1/feedback", FeedbackResponse,
                       {"request_id": request_id, "correct_index": correct_index})


def bundles() -> RequestSpec[BundleList]:
    return RequestSpec("GET", "/v1/bundles", BundleList)


def _bundle_path(name: str) -> str:
    # '.' and '..' reach the server's name check (a 422) instead of being normalised away; a '/' cannot
    # (servers decode %2F before routing), so it is refused here with the server's error
    if "/" in name:
        raise InvalidBundleName(f"invalid bundle name {name!r}: letters, digits, '_', '-', '.' only, no '/'",
                                code="invalid_bundle_name", param="name")
    segment = quote(name, safe="")
    return f"/v1/bundles/{segment.replace('.', '%2E') if set(name) <= {'.'} else segment}"


def load_bundle(name: str) -> RequestSpec[BundleActionResponse]:
    return RequestSpec("POST", _bundle_path(name), BundleActionResponse, admin=True)


def unload_bundle(name: str) -> RequestSpec[BundleActionResponse]:
    return RequestSpec("DELETE", _bundle_path(name), BundleActionResponse, admin=True)


def health() -> RequestSpec[HealthResponse]:
    return RequestSpec("GET", "/healthz", HealthResponse)


def ready() -> RequestSpec[ReadyResponse]:
    return RequestSpec("GET", "/readyz", ReadyResponse)
