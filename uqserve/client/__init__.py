"""Typed Python client for the uqserve HTTP API, blocking (:class:`Client`) and asyncio (:class:`AsyncClient`).

Requests and responses are the server's own pydantic models from :mod:`service.protocol`, so a client and
server of the same version agree on every field::

    from uqserve.client import Client, BundleNotFound, QueueFull

    with Client("http://127.0.0.1:8000", timeout=10) as client:
        r = client.answer("default", "Which gas do plants take in from the air?",
                          ["oxygen", "carbon dioxide", "helium"])
        if r.abstained:
            print("abstained:", r.abstain_reasons)
        else:
            print(r.answer.text, r.probabilities, r.predictive_entropy, r.mutual_information)
        client.feedback(r.request_id, correct_index=1)      # the true answer, when it is known
        print([b.name for b in client.bundles().bundles])

    # asyncio, and the admin endpoints (the key goes as ``Authorization: Bearer``)
    async with AsyncClient(url, admin_key="s3cret") as client:
        await client.load_bundle("arc-laplace")
        batch = await client.answer_batch("arc-laplace", [
            {"question": "2 + 2?", "choices": ["3", "4"]},
            QuestionIn(question="Capital of France?", choices=["Paris", "Rome"], context="Europe"),
        ])

``choices`` may be left out (None) for bundles trained on a fixed label set: the key is then omitted from
the JSON and the server uses the bundle's labels (:class:`ChoicesRequired` from a bundle without one;
:class:`ChoicesMismatch` when the choices sent differ from the labels).

Retries: a 429 (``queue_full``) is resent after its ``Retry-After`` (capped at ``max_retry_wait``), or
after a capped exponential backoff without the header, at most ``max_retries`` times, then
:class:`QueueFull` is raised; a GET whose connection failed is retried the same way. Nothing else is
retried: not timeouts, not 503/504 (a POST /v1/answer that got one may already be in the prediction log).

Errors: every failure is a :class:`UqserveClientError` (``status``, ``code``, ``type``, ``param``,
``message``, ``response``, ``retry_after``); the class comes from the server's ``error.code`` through
:data:`ERROR_CODES`, else from the HTTP status (see :mod:`uqserve.client.errors` for the tree). The
client's own timeout is :class:`ClientTimeout` (also a ``TimeoutError``); the server's 504 is
:class:`RequestTimeout`.
"""

from __future__ import annotations

from service.protocol import (
    AnswerRequest,
    AnswerResponse,
    BatchAnswerRequest,
    BatchAnswerResponse,
    BundleActionResponse,
    BundleInfo,
    BundleList,
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    HealthResponse,
    QuestionIn,
    ReadyResponse,
    ThresholdsIn,
)
from uqserve.client._async import AsyncClient
from uqserve.client._core import DEFAULT_URL, RetryPolicy
from uqserve.client._sync import Client
from uqserve.client.errors import (
    ERROR_CODES,
    STATUS_CLASSES,
    AdminAuthError,
    AdminDisabled,
    AlphaTooSmall,
    APIConnectionError,
    ApiKeyError,
    BlankText,
    BundleNotFound,
    BundleRefused,
    ChoiceCount,
    ChoicesMismatch,
    ChoicesRequired,
    ClientBudgetExhausted,
    ClientClosedRequest,
    ClientTimeout,
    ConflictError,
    DuplicateChoices,
    DuplicateFeedback,
    EngineBusy,
    GuaranteeUnavailable,
    IncompatibleBaseModel,
    InternalServerError,
    InvalidAdminKey,
    InvalidApiKey,
    InvalidBundleName,
    InvalidInput,
    InvalidQuestion,
    InvalidRequestError,
    InvalidText,
    LimitExceeded,
    MalformedBody,
    MalformedRequest,
    MethodNotAllowed,
    MissingAdminKey,
    MissingApiKey,
    NoCalibrationSplit,
    NotFoundError,
    PayloadTooLarge,
    ProtocolError,
    QueueFull,
    RateLimitError,
    RequestTimeout,
    RequestTooCostly,
    RequestValidationError,
    ScoreUnavailable,
    ServerError,
    SlotsExhausted,
    SlowRequest,
    TooManyAuthFailures,
    TooManyConnections,
    Unavailable,
    UnknownRequest,
    UnsupportedMediaType,
    UqserveClientError,
)

__all__ = [
    "DEFAULT_URL",
    "ERROR_CODES",
    "STATUS_CLASSES",
    "APIConnectionError",
    "AdminAuthError",
    "AdminDisabled",
    "AlphaTooSmall",
    "AnswerRequest",
    "AnswerResponse",
    "ApiKeyError",
    "AsyncClient",
    "BatchAnswerRequest",
    "BatchAnswerResponse",
    "BlankText",
    "BundleActionResponse",
    "BundleInfo",
    "BundleList",
    "BundleNotFound",
    "BundleRefused",
    "ChoiceCount",
    "ChoicesMismatch",
    "ChoicesRequired",
    "Client",
    "ClientBudgetExhausted",
    "ClientClosedRequest",
    "ClientTimeout",
    "ConflictError",
    "DuplicateChoices",
    "DuplicateFeedback",
    "EngineBusy",
    "ErrorResponse",
    "FeedbackRequest",
    "FeedbackResponse",
    "GuaranteeUnavailable",
    "HealthResponse",
    "IncompatibleBaseModel",
    "InternalServerError",
    "InvalidAdminKey",
    "InvalidApiKey",
    "InvalidBundleName",
    "InvalidInput",
    "InvalidQuestion",
    "InvalidRequestError",
    "InvalidText",
    "LimitExceeded",
    "MalformedBody",
    "MalformedRequest",
    "MethodNotAllowed",
    "MissingAdminKey",
    "MissingApiKey",
    "NoCalibrationSplit",
    "NotFoundError",
    "PayloadTooLarge",
    "ProtocolError",
    "QuestionIn",
    "QueueFull",
    "RateLimitError",
    "ReadyResponse",
    "RequestTimeout",
    "RequestTooCostly",
    "RequestValidationError",
    "RetryPolicy",
    "ScoreUnavailable",
    "ServerError",
    "SlotsExhausted",
    "SlowRequest",
    "ThresholdsIn",
    "TooManyAuthFailures",
    "TooManyConnections",
    "Unavailable",
    "UnknownRequest",
    "UnsupportedMediaType",
    "UqserveClientError",
]
