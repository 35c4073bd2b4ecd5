"""Engine errors. Each carries a stable ``code``; ``service.errors`` maps the classes to HTTP statuses."""

from __future__ import annotations

from core.errors import UqserveError


class EngineError(UqserveError):
    """Base of every error the engine raises on purpose."""

    code = "engine_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BundleNotFoundError(EngineError):
    """The named bundle is not loaded (or, on load, not present under the bundle root)."""

    code = "bundle_not_found"


class BundleRefusedError(EngineError):
    """A bundle cannot be served: malformed, unsupported method, rank or layout outside the engine's slots."""

    code = "bundle_refused"

    def __init__(self, message: str, *, reason: str = "invalid_bundle", param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.reason = reason  # bounded label for uqserve_bundle_load_failures_total


class BundleIncompatibleError(BundleRefusedError):
    """A well-formed bundle made for another base model."""

    code = "incompatible_base_model"


class CapacityError(EngineError):
    """Not enough free LoRA slots; they free up as in-flight requests on old versions finish."""

    code = "slots_exhausted"
    retry_after_s = 1


class QueueFullError(EngineError):
    """The row queue is full; the client should retry after ``retry_after_s``."""

    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(EngineError):
    """The request did not finish within the configured timeout."""

    code = "timeout"


class InvalidInputError(EngineError):
    """A question the engine cannot score (too many tokens, letters split by the tokenizer, bad label)."""

    code = "invalid_input"


class FeedbackNotFoundError(EngineError):
    """Feedback for a request id the store does not hold (never seen, or evicted)."""

    code = "unknown_request"


class DuplicateFeedbackError(EngineError):
    """A label was already recorded for this request."""

    code = "duplicate"

    def __init__(self, message: str, *, bundle: str, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.bundle = bundle


class EngineUnavailableError(EngineError):
    """The engine is starting up or draining for shutdown."""

    code = "unavailable"


class GuaranteeError(InvalidInputError):
    """A guarantee the request asks for that this bundle cannot give: no calibration split, an α below what
    its n calibration questions support, a score the method does not define (422, with a specific code)."""

    def __init__(self, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.code = code


class RequestTooCostlyError(EngineError):
    """One request costs more (rows × tokens) than ``max_request_cost``: split it (413, not worth retrying)."""

    code = "request_too_costly"


class ClientBudgetError(QueueFullError):
    """The client's admitted, unfinished work would exceed ``max_client_cost``: retry after ``retry_after_s``."""

    code = "client_budget_exhausted"


class ClientGoneError(EngineError):
    """The client closed the connection before its answer was ready; its work was cancelled."""

    code = "client_closed_request"


class EngineBusyError(QueueFullError):
    """What is already admitted would keep this costly request past the request timeout: retry later (429)."""

    code = "engine_busy"
