"""Client exceptions: one class per server error code, a class per HTTP status for everything else.

Every error is a :class:`UqserveClientError` carrying ``status`` (None when no response came back),
``code``, ``type``, ``param`` and ``message`` from the server's ``{"error": {...}}`` body, the
``httpx.Response`` as ``response`` and the parsed ``Retry-After`` header (seconds) as ``retry_after``.

Hierarchy (server code in brackets)::

    UqserveClientError
    ├── APIConnectionError            no response: refused, reset, DNS, …
    │   └── ClientTimeout             the client's timeout ran out (also a builtins.TimeoutError)
    ├── ProtocolError                 a 2xx body that is not the expected protocol model
    ├── InvalidRequestError           400/405/415/422 and any other unmapped 4xx
    │   ├── RequestValidationError    [validation_error]  the request models rejected the body
    │   ├── LimitExceeded             [limit_exceeded]    over a configured text or batch limit
    │   ├── InvalidQuestion           [invalid_question]  blank question or choices
    │   ├── ChoicesRequired           [choices_required]  choices omitted, but the bundle has no label set
    │   ├── ChoicesMismatch           [choices_mismatch]  choices differ from the bundle's label set
    │   ├── InvalidBundleName         [invalid_bundle_name]
    │   ├── InvalidInput              [invalid_input]     the engine cannot score it / bad label index
    │   ├── PayloadTooLarge           [body_too_large]    413: over the server's (or proxy's) body limit
    │   │   └── RequestTooCostly      [request_too_costly] 413: over max_request_cost (rows × tokens)
    │   ├── MalformedRequest          [malformed_http]    400: the server could not parse the HTTP request
    │   ├── SlowRequest               [client_timeout]    408: headers or body arrived too slowly
    │   └── BundleRefused             [bundle_refused]    malformed or unsupported bundle (422)
    │       └── IncompatibleBaseModel [incompatible_base_model] (409; also a ConflictError)
    ├── AdminAuthError                401/403
    │   ├── MissingAdminKey           [missing_admin_key] (401)
    │   ├── InvalidAdminKey           [invalid_admin_key] (403)
    │   └── AdminDisabled             [admin_disabled]    (403: the server has no UQSERVE_ADMIN_KEY)
    ├── NotFoundError                 404
    │   ├── BundleNotFound            [bundle_not_found]
    │   └── UnknownRequest            [unknown_request]   feedback for a request id the server lacks
    ├── ConflictError                 409
    │   ├── IncompatibleBaseModel
    │   └── DuplicateFeedback         [duplicate]
    ├── ApiKeyError                   401 (servers with client API keys)
    │   ├── MissingApiKey             [missing_api_key]
    │   └── InvalidApiKey             [invalid_api_key]
    ├── ClientClosedRequest           [client_closed_request] (499, logged by the server only)
    ├── RateLimitError                429 [rate_limited]: the reverse proxy's per-address limit
    │   ├── QueueFull                 [queue_full]        (``retry_after`` from the header)
    │   ├── ClientBudgetExhausted     [client_budget_exhausted] this client's unfinished work is at its budget
    │   ├── EngineBusy                [engine_busy]       a costly request would not finish before the timeout
    │   └── TooManyAuthFailures       [too_many_auth_failures] too many wrong keys from this address
    └── ServerError                   5xx
        ├── InternalServerError       [internal_error] (500)
        ├── Unavailable               [unavailable]   (503: starting or draining)
        ├── SlotsExhausted            [slots_exhausted] (503, ``retry_after``)
        ├── TooManyConnections        [too_many_connections] (503, ``retry_after``: the request was not run)
        └── RequestTimeout            [timeout]       (504: the server's own request timeout)
"""

from __future__ import annotations

import math
import time
from email.utils import parsedate_to_datetime

import httpx
import pydantic

from service.protocol import ErrorResponse

_BODY_PREVIEW = 200  # bytes of a non-JSON error body quoted in the message


class UqserveClientError(Exception):
    """Base of every client error; ``status`` is None when the server sent no response."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 type: str | None = None, param: str | None = None,  # "type": the wire field's name
                 response: httpx.Response | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.type = type
        self.param = param
        self.response = response
        self.retry_after = retry_after

    def __str__(self) -> str:
        head = " ".join(str(part) for part in (self.status and f"HTTP {self.status}", self.code) if part)
        tail = f" (param: {self.param})" if self.param else ""
        return f"{head}: {self.message}{tail}" if head else f"{self.message}{tail}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status={self.status!r}, code={self.code!r})"


class APIConnectionError(UqserveClientError):
    """No response: the server is unreachable, refused or dropped the connection."""


class ClientTimeout(APIConnectionError, TimeoutError):
    """The client's ``timeout`` ran out before the server answered (also caught by ``except TimeoutError``)."""


class ProtocolError(UqserveClientError):
    """A successful response whose body does not match the protocol model (client and server disagree)."""


class InvalidRequestError(UqserveClientError):
    """The server refused the request as invalid (422 and other 4xx without a more specific class)."""


class RequestValidationError(InvalidRequestError):
    """The request body failed the server's models (``param`` names the first offending field)."""


class LimitExceeded(InvalidRequestError):
    """A text or the batch is longer than the server's configured limit."""


class InvalidQuestion(InvalidRequestError):
    """A question the server's text rules refuse (the subclasses below name which rule)."""


class InvalidText(InvalidQuestion):
    """Text that is not valid Unicode (a lone surrogate) or holds a control character other than tab/newline/CR."""


class BlankText(InvalidQuestion):
    """A question or choice with no visible character (whitespace and zero-width characters do not count)."""


class DuplicateChoices(InvalidQuestion):
    """Two choices are the same text (compared NFC-normalized, trimmed of whitespace and zero-width characters)."""


class ChoiceCount(InvalidQuestion):
    """Fewer than 2 or more than 26 choices."""


class ChoicesRequired(InvalidRequestError):
    """``choices`` was omitted for a bundle without a label set."""


class ChoicesMismatch(InvalidRequestError):
    """``choices`` differ from the bundle's label set (send exactly those, in order, or omit them)."""


class InvalidBundleName(InvalidRequestError):
    """A bundle name outside letters, digits, '_', '-', '.' (or containing '..')."""


class InvalidInput(InvalidRequestError):
    """A question the engine cannot score, or a feedback index outside the request's choices."""


class GuaranteeUnavailable(InvalidInput):
    """A guarantee the bundle cannot give (base of the three below)."""


class NoCalibrationSplit(GuaranteeUnavailable):
    """The bundle was exported without a calibration split: no answer sets or risk control."""


class AlphaTooSmall(GuaranteeUnavailable):
    """alpha below 1/(n+1) for the bundle's n calibration questions."""


class ScoreUnavailable(GuaranteeUnavailable):
    """risk_score names a score the bundle's method does not define (MI of one member, FEU of an ensemble)."""


class PayloadTooLarge(InvalidRequestError):
    """413: the request body is over the server's (or a proxy's) size limit."""


class MalformedRequest(InvalidRequestError):
    """400: the server could not parse the HTTP request line or headers (or they were over its size limit)."""


class MalformedBody(InvalidRequestError):
    """The body is not JSON: malformed (422 ``invalid_json``) or undecodable (400 ``invalid_body``: not UTF-8,
    nested too deeply, a number with too many digits)."""


class UnsupportedMediaType(InvalidRequestError):
    """415: the body was not sent as ``Content-Type: application/json``."""


class MethodNotAllowed(InvalidRequestError):
    """405: the path does not serve this method (the ``Allow`` header lists those it does)."""


class SlowRequest(InvalidRequestError):
    """408: the request's headers or body did not reach the server within its header or body timeout."""


class AdminAuthError(UqserveClientError):
    """An admin endpoint refused the key (401 or 403)."""


class MissingAdminKey(AdminAuthError):
    """No admin key was sent (pass ``admin_key=`` to the client)."""


class InvalidAdminKey(AdminAuthError):
    """The admin key was wrong."""


class AdminDisabled(AdminAuthError):
    """The server runs without ``UQSERVE_ADMIN_KEY``: admin endpoints are off."""


class NotFoundError(UqserveClientError):
    """404."""


class BundleNotFound(NotFoundError):
    """The bundle is not loaded (on load: not present under the server's bundle root)."""


class UnknownRequest(NotFoundError):
    """Feedback for a request id the server never answered or no longer holds."""


class ConflictError(UqserveClientError):
    """409."""


class BundleRefused(InvalidRequestError):
    """The bundle cannot be served: malformed, unsupported method, rank or layout beyond the slots."""


class IncompatibleBaseModel(BundleRefused, ConflictError):
    """A well-formed bundle made for another base model (409)."""


class RequestTooCostly(PayloadTooLarge):
    """413: the request costs more (rows × tokens) than the server's ``max_request_cost``; split the batch."""


class ApiKeyError(UqserveClientError):
    """401 from an answer or feedback endpoint of a server that requires client API keys."""


class MissingApiKey(ApiKeyError):
    """No API key was sent (pass ``api_key=`` to the client)."""


class InvalidApiKey(ApiKeyError):
    """The API key was wrong."""


class ClientClosedRequest(UqserveClientError):
    """499: the server saw the connection close before the answer was ready and cancelled the work."""


class DuplicateFeedback(ConflictError):
    """A label was already recorded for this request id."""


class RateLimitError(UqserveClientError):
    """429; ``retry_after`` holds the server's ``Retry-After`` in seconds."""


class QueueFull(RateLimitError):
    """The server's row queue is full; the client already retried ``max_retries`` times."""


class ClientBudgetExhausted(RateLimitError):
    """This client's admitted, unfinished work is at the server's ``max_client_cost``; retried after Retry-After."""


class EngineBusy(RateLimitError):
    """The engine could not finish this costly request before its timeout behind what is admitted; retried."""


class TooManyAuthFailures(RateLimitError):
    """Too many wrong keys from this address; even a right key waits ``retry_after`` seconds."""


class ServerError(UqserveClientError):
    """5xx (including a proxy's non-JSON 502/503/504 pages)."""


class InternalServerError(ServerError):
    """500: an unexpected server error (details are in the server's log, not the response)."""


class Unavailable(ServerError):
    """503: the engine is starting or draining."""


class SlotsExhausted(ServerError):
    """503: no free LoRA slots for a bundle load; they free up as in-flight requests finish."""


class TooManyConnections(ServerError):
    """503: the server had too many open connections and refused this one before running the request."""


class RequestTimeout(ServerError):
    """504: the request did not finish within the server's own ``request_timeout_s``."""


# error.code → class; the complete set of codes the server sends (service/engine/errors.py,
# service/protocol.py, service/routes.py, service/errors.py, service/guards.py, service/server.py).
ERROR_CODES: dict[str, type[UqserveClientError]] = {
    "validation_error": RequestValidationError,
    "limit_exceeded": LimitExceeded,
    "invalid_question": InvalidQuestion,
    "invalid_text": InvalidText,
    "blank_text": BlankText,
    "duplicate_choices": DuplicateChoices,
    "choice_count": ChoiceCount,
    "invalid_json": MalformedBody,
    "invalid_body": MalformedBody,
    "unsupported_media_type": UnsupportedMediaType,
    "method_not_allowed": MethodNotAllowed,
    "not_found": NotFoundError,
    "choices_required": ChoicesRequired,
    "choices_mismatch": ChoicesMismatch,
    "invalid_bundle_name": InvalidBundleName,
    "invalid_input": InvalidInput,
    "no_calibration_split": NoCalibrationSplit,
    "alpha_too_small": AlphaTooSmall,
    "score_unavailable": ScoreUnavailable,
    "bundle_refused": BundleRefused,
    "incompatible_base_model": IncompatibleBaseModel,
    "missing_admin_key": MissingAdminKey,
    "invalid_admin_key": InvalidAdminKey,
    "admin_disabled": AdminDisabled,
    "bundle_not_found": BundleNotFound,
    "unknown_request": UnknownRequest,
    "duplicate": DuplicateFeedback,
    "queue_full": QueueFull,
    "client_budget_exhausted": ClientBudgetExhausted,
    "engine_busy": EngineBusy,
    "too_many_auth_failures": TooManyAuthFailures,
    "request_too_costly": RequestTooCostly,
    "missing_api_key": MissingApiKey,
    "invalid_api_key": InvalidApiKey,
    "client_closed_request": ClientClosedRequest,
    "internal_error": InternalServerError,
    "unavailable": Unavailable,
    "slots_exhausted": SlotsExhausted,
    "timeout": RequestTimeout,
    "body_too_large": PayloadTooLarge,
    "malformed_http": MalformedRequest,
    "client_timeout": SlowRequest,
    "too_many_connections": TooManyConnections,
    "rate_limited": RateLimitError,  # the reverse proxy's per-address limit (deploy/nginx.conf)
}

# HTTP status → class, for errors without a known code (unrouted paths, proxies, newer servers)
STATUS_CLASSES: dict[int, type[UqserveClientError]] = {
    401: AdminAuthError,
    403: AdminAuthError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLarge,
    429: RateLimitError,
}


def class_for_status(status: int) -> type[UqserveClientError]:
    if status in STATUS_CLASSES:
        return STATUS_CLASSES[status]
    if status >= 500:
        return ServerError
    if status >= 400:
        return InvalidRequestError
    return ProtocolError  # 1xx/3xx where an answer was expected


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds (a float is accepted too) or an HTTP date; None if absent
    or unreadable; never negative."""
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)


def _where(response: httpx.Response) -> str:
    try:
        return f"{response.request.method} {response.request.url}"
    except RuntimeError:  # a response built without a request
        return "the server"


def error_from_response(response: httpx.Response) -> UqserveClientError:
    """The exception for a non-2xx response: by ``error.code``, else by status; a body that is not the
    server's error schema (a proxy page, say) still names the status and quotes the body's first bytes."""
    status = response.status_code
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    try:
        info = ErrorResponse.model_validate_json(response.content).error
    except pydantic.ValidationError:
        preview = response.content[:_BODY_PREVIEW].decode("utf-8", "replace")
        more = "…" if len(response.content) > _BODY_PREVIEW else ""
        kind = response.headers.get("Content-Type", "no content type")
        message = (f"{response.reason_phrase or 'error'} from {_where(response)}, not a uqserve error body "
                   f"({kind}): {preview!r}{more}")
        return class_for_status(status)(message, status=status, response=response, retry_after=retry_after)
    cls = ERROR_CODES.get(info.code or "") or class_for_status(status)
    return cls(info.message, status=status, code=info.code, type=info.type, param=info.param,
               response=response, retry_after=retry_after)
