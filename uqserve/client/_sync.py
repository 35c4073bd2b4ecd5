"""The blocking client; every decision is :mod:`uqserve.client._core`'s, this module only does the I/O."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from types import TracebackType

import httpx

from service.protocol import (
    AnswerResponse,
    BatchAnswerResponse,
    BundleActionResponse,
    BundleList,
    FeedbackResponse,
    HealthResponse,
    ReadyResponse,
)
from uqserve.client import _core
from uqserve.client._core import DEFAULT_URL, Guarantees, QuestionLike, RequestSpec, Retry, T, Thresholds


class Client:
    """Blocking uqserve client (one pooled ``httpx.Client``); see :mod:`uqserve.client` for an example.

    ``timeout`` (seconds, or an ``httpx.Timeout``) bounds each send; ``max_retries`` bounds the resends
    after 429s (waiting ``Retry-After``, at most ``max_retry_wait`` seconds each) and after failed
    connections of GETs. ``admin_key`` is sent as ``Authorization: Bearer`` to the admin endpoints only;
    ``api_key`` (servers with ``UQSERVE_API_KEYS``) as ``X-API-Key`` to the others.
    ``transport`` replaces httpx's (e.g. ``httpx.MockTransport`` in tests); ``headers`` go on every request.
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, admin_key: str | None = None, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = 30.0, max_retries: int = 3, max_retry_wait: float = 30.0,
                 transport: httpx.BaseTransport | None = None, headers: Mapping[str, str] | None = None) -> None:
        self._core = _core.Core(base_url, admin_key=admin_key, timeout=timeout, max_retries=max_retries,
                                max_retry_wait=max_retry_wait, headers=headers, api_key=api_key)
        self._http = httpx.Client(**self._core.http_options(transport))

    @property
    def base_url(self) -> str:
        return self._core.base_url

    def _send(self, spec: RequestSpec[T]) -> T:
        for attempt in itertools.count():
            try:
                outcome: httpx.Response | httpx.RequestError = self._http.request(**self._core.request_args(spec))
            except httpx.RequestError as err:
                outcome = err
            step = self._core.settle(spec, attempt, outcome)
            if not isinstance(step, Retry):
                return step
            time.sleep(step.wait)
        raise AssertionError("unreachable")

    def answer(self, bundle: str, question: str, choices: Sequence[str] | None = None, *,
               context: str | None = None, thresholds: Thresholds | None = None,
               return_members: bool = False, guarantees: Guarantees | None = None) -> AnswerResponse:
        """``POST /v1/answer``; leave ``choices`` out (None) for a bundle trained on a fixed label set;
        ``guarantees``: ``alpha`` of the answer set, ``target_risk`` (with ``delta``, ``risk_score``)."""
        return self._send(_core.answer(bundle, question, choices, context, thresholds, return_members,
                                              guarantees))

    def answer_batch(self, bundle: str, questions: Sequence[QuestionLike], *, thresholds: Thresholds | None = None,
                     return_members: bool = False, guarantees: Guarantees | None = None) -> BatchAnswerResponse:
        """``POST /v1/answer/batch``: ``QuestionIn`` models or dicts (``question``, ``choices``, ``context``)."""
        return self._send(_core.answer_batch(bundle, questions, thresholds, return_members, guarantees))

    def feedback(self, request_id: str, correct_index: int) -> FeedbackResponse:
        """``POST /v1/feedback``: the correct choice index of an answered request."""
        return self._send(_core.feedback(request_id, correct_index))

    def bundles(self) -> BundleList:
        """``GET /v1/bundles``."""
        return self._send(_core.bundles())

    def load_bundle(self, name: str) -> BundleActionResponse:
        """``POST /v1/bundles/{name}`` (admin): load, or hot-swap the loaded version."""
        return self._send(_core.load_bundle(name))

    def unload_bundle(self, name: str) -> BundleActionResponse:
        """``DELETE /v1/bundles/{name}`` (admin)."""
        return self._send(_core.unload_bundle(name))

    def health(self) -> HealthResponse:
        """``GET /healthz``."""
        return self._send(_core.health())

    def ready(self) -> ReadyResponse:
        """``GET /readyz`` (raises :class:`~uqserve.client.Unavailable` while starting or draining)."""
        return self._send(_core.ready())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.base_url!r})"
