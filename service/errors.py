"""Errors become HTTP responses here only; every body is ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.contract import allowed_methods
from service.engine import errors as engine_errors
from service.protocol import ErrorInfo, ErrorResponse, InvalidRequestError

log = logging.getLogger("uqserve.http")


class AdminAuthError(Exception):
    """Missing (401), wrong (403) or unconfigured (403) admin key; a missing or wrong client API key (401);
    too many wrong keys from one client (429, with ``retry_after_s``)."""

    def __init__(self, status: int, message: str, code: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.retry_after_s = retry_after_s


# engine error class → (HTTP status, error type); looked up along the class's MRO, most specific first
ENGINE_STATUS: dict[type[engine_errors.EngineError], tuple[int, str]] = {
    engine_errors.BundleNotFoundError: (404, "not_found_error"),
    engine_errors.BundleIncompatibleError: (409, "conflict_error"),
    engine_errors.BundleRefusedError: (422, "invalid_request_error"),
    engine_errors.InvalidInputError: (422, "invalid_request_error"),
    engine_errors.QueueFullError: (429, "rate_limit_error"),
    engine_errors.RequestTooCostlyError: (413, "invalid_request_error"),
    engine_errors.ClientGoneError: (499, "client_closed_request"),
    engine_errors.CapacityError: (503, "capacity_error"),
    engine_errors.EngineUnavailableError: (503, "unavailable_error"),
    engine_errors.RequestTimeoutError: (504, "timeout_error"),
    engine_errors.FeedbackNotFoundError: (404, "not_found_error"),
    engine_errors.DuplicateFeedbackError: (409, "conflict_error"),
}
_HTTP_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "invalid_request_error", 415: "invalid_request_error"}
_HTTP_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 415: "unsupported_media_type"}


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def status_of(err: engine_errors.EngineError) -> tuple[int, str]:
    for cls in type(err).__mro__:
        if cls in ENGINE_STATUS:
            return ENGINE_STATUS[cls]  # type: ignore[index]
    return 500, "internal_error"


async def _engine_error(_request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, engine_errors.EngineError)
    status, type_ = status_of(err)
    headers = None
    if isinstance(err, engine_errors.QueueFullError | engine_errors.CapacityError):
        headers = {"Retry-After": str(err.retry_after_s)}
    return error_response(status, err.message, type_, err.param, err.code, headers)


async def _validation_error(_request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, RequestValidationError)
    errors = err.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "path", "query")]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if first.get("type") == "json_invalid":  # FastAPI's JSON decode error: loc is the character offset
        ctx = first.get("ctx")
        error = ctx.get("error", "") if isinstance(ctx, dict) else ""
        return error_response(422, f"malformed JSON at character {loc[0] if loc else '?'}: {error}".rstrip(": "),
                              "invalid_request_error", None, "invalid_json")
    message = f"{'.'.join(loc) + ': ' if loc else ''}{first.get('msg', 'invalid')}{more}"
    # a lone surrogate (JSON "\udc00") is refused by pydantic before core.text sees it: same code as there
    code = "invalid_text" if first.get("type") == "string_unicode" else "validation_error"
    return error_response(422, message, "invalid_request_error", ".".join(loc) or None, code)


def _undecodable(cause: BaseException | None) -> str:
    """Why FastAPI could not read a body (its 400 'There was an error parsing the body')."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid UTF-8 (byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "the request body's JSON is nested too deeply"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):  # sys.get_int_max_str_digits()
        return "the request body's JSON holds a number with too many digits"
    return "the request body cannot be read"


async def _invalid_request(_request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, InvalidRequestError)
    return error_response(422, err.message, "invalid_request_error", err.param, err.code)


async def _http_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, StarletteHTTPException)
    fallback = "internal_error" if err.status_code >= 500 else "invalid_request_error"
    type_ = _HTTP_TYPES.get(err.status_code, fallback)
    headers = dict(getattr(err, "headers", None) or {})
    message = str(err.detail)
    if err.status_code == 405:  # every route on the path, not just the first one Starlette tried
        methods = allowed_methods(request)
        headers["Allow"] = ", ".join(methods)
        message = f"method {request.method} not allowed here; allowed: {', '.join(methods)}"
    elif err.status_code == 400 and message == "There was an error parsing the body":
        message = _undecodable(err.__cause__)
    return error_response(err.status_code, message, type_, code=_HTTP_CODES.get(err.status_code),
                          headers=headers or None)


async def _auth_error(_request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, AdminAuthError)
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    type_ = {401: "authentication_error", 429: "rate_limit_error"}.get(err.status, "permission_error")
    if err.retry_after_s is not None:
        headers = {"Retry-After": str(err.retry_after_s)}
    return error_response(err.status, err.message, type_, None, err.code, headers)


async def _unexpected(_request: Request, err: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=err)
    return error_response(500, "internal server error", "internal_error", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(engine_errors.EngineError, _engine_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(InvalidRequestError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(AdminAuthError, _auth_error)
    app.add_exception_handler(Exception, _unexpected)
