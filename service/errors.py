"""Errors become HTTP responses here only; every body is ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine import errors as engine_errors
from service.protocol import ErrorInfo, ErrorResponse, InvalidRequestError

log = logging.getLogger("uqserve.http")


class AdminAuthError(Exception):
    """Missing (401), wrong (403) or unconfigured (403) admin key."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


# engine error class → (HTTP status, error type); looked up along the class's MRO, most specific first
ENGINE_STATUS: dict[type[engine_errors.EngineError], tuple[int, str]] = {
    engine_errors.BundleNotFoundError: (404, "not_found_error"),
    engine_errors.BundleIncompatibleError: (409, "conflict_error"),
    engine_errors.BundleRefusedError: (422, "invalid_request_error"),
    engine_errors.InvalidInputError: (422, "invalid_request_error"),
    engine_errors.QueueFullError: (429, "rate_limit_error"),
    engine_errors.CapacityError: (503, "capacity_error"),
    engine_errors.EngineUnavailableError: (503, "unavailable_error"),
    engine_errors.RequestTimeoutError: (504, "timeout_error"),
    engine_errors.FeedbackNotFoundError: (404, "not_found_error"),
    engine_errors.DuplicateFeedbackError: (409, "conflict_error"),
}
_HTTP_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "invalid_request_error", 415: "invalid_request_error"}


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
    message = f"{'.'.join(loc) + ': ' if loc else ''}{first.get('msg', 'invalid')}{more}"
    return error_response(422, message, "invalid_request_error", ".".join(loc) or None, "validation_error")


async def _invalid_request(_request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, InvalidRequestError)
    return error_response(422, err.message, "invalid_request_error", err.param, err.code)


async def _http_error(_request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, StarletteHTTPException)
    fallback = "internal_error" if err.status_code >= 500 else "invalid_request_error"
    type_ = _HTTP_TYPES.get(err.status_code, fallback)
    return error_response(err.status_code, str(err.detail), type_, headers=getattr(err, "headers", None))


async def _auth_error(_request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, AdminAuthError)
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    type_ = "authentication_error" if err.status == 401 else "permission_error"
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
