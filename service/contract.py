"""The HTTP contract beyond the wire models: content type, methods and slashes, and the OpenAPI document.

* A body is JSON: ``Content-Type: application/json`` (or ``application/*+json``) else **415**.
* A method a path does not serve is **405** with an ``Allow`` header listing every method of every route
  on that path (Starlette lists only the first route's); ``OPTIONS`` is not served, so it is a 405 too.
* No slash redirects: ``/v1/answer/`` is a JSON **404**, not a bodiless 307.
* The OpenAPI document lists, for every operation, every status the server can send, each with the one
  error schema ``ErrorResponse``, and states the app's configured limits (text lengths, batch size) as
  ``maxLength`` / ``maxItems``; it is built per app, since the app is built from its :class:`Settings`.
"""

from __future__ import annotations

import email.message
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.protocol import ErrorResponse
from service.settings import Settings

JSON_MEDIA_TYPES = "application/json (or application/*+json)"


def require_json(request: Request) -> None:
    """Dependency of every operation with a JSON body: any other ``Content-Type`` is 415."""
    value = request.headers.get("content-type")
    if value is not None:
        message = email.message.Message()
        message["content-type"] = value
        subtype = message.get_content_subtype()
        if message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json")):
            return
    raise StarletteHTTPException(415, f"Content-Type must be {JSON_MEDIA_TYPES}, got {value or 'none'}")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path, sorted."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= set(route_methods)
    return sorted(methods)


# --- the OpenAPI document ----------------------------------------------------------------------------------

_DESCRIPTIONS = {
    400: "The body could not be decoded: not UTF-8, nested too deeply or a number too long to read "
         "(code invalid_body).",
    401: "Missing credentials (WWW-Authenticate: Bearer).",
    403: "Wrong credentials, or this kind of access is disabled or over its budget.",
    404: "Not found: the bundle is not loaded, the bundle directory or the request id is unknown.",
    405: "The path does not serve this method (OPTIONS included); Allow lists the methods it serves.",
    408: "The request body did not arrive in time (code client_timeout); the connection is closed.",
    409: "Conflict: a bundle for another base model, or feedback already given for this request.",
    413: "The request body is larger than max_body_bytes (code body_too_large); the connection is closed.",
    415: f"The body is not declared as JSON: send Content-Type {JSON_MEDIA_TYPES}.",
    422: "Invalid request: malformed JSON (invalid_json), a schema violation (validation_error), a configured "
         "limit (limit_exceeded), text rules (invalid_text, blank_text, duplicate_choices) or an engine refusal.",
    429: "Too many requests: the queue is full or a client budget is spent; retry after Retry-After seconds.",
    500: "Internal error (nothing internal is leaked).",
    503: "Unavailable: starting, draining, no free LoRA slots or too many open connections.",
    504: "The engine did not answer within request_timeout_s.",
}
_EVERY = (405, 408, 413, 500, 503)  # any request: wrong method, slow or large body, a bug, overload
_BODY = (400, 415, 422)  # a JSON body
_CLIENT = (401, 403, 429)  # client API keys and cost budgets
_OPERATION_STATUSES: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/v1/answer"): (*_BODY, *_CLIENT, 404, 504),
    ("post", "/v1/answer/batch"): (*_BODY, *_CLIENT, 404, 504),
    ("post", "/v1/feedback"): (*_BODY, *_CLIENT, 404, 409),
    ("post", "/v1/bundles/{name}"): (401, 403, 404, 409, 422, 429),  # 429: too many wrong admin keys
    ("delete", "/v1/bundles/{name}"): (401, 403, 404, 422, 429),
}
_CLIENT_KEY_OPERATIONS = {("post", "/v1/answer"), ("post", "/v1/answer/batch"), ("post", "/v1/feedback")}
_HEADERS = {
    405: {"Allow": {"description": "the methods this path serves", "required": True,
                    "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}},
    503: {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}},
}
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def statuses(method: str, path: str) -> tuple[int, ...]:
    """The error statuses the operation ``method path`` can answer with."""
    return tuple(sorted({*_EVERY, *_OPERATION_STATUSES.get((method, path), ())}))


def _set_text_limits(schema: dict[str, Any], settings: Settings) -> None:
    """maxLength on question, context and choice texts from ``settings`` (the models cannot know them)."""
    props = schema.get("properties", {})
    if "question" in props:
        props["question"]["maxLength"] = settings.max_question_chars
    for variant in props.get("context", {}).get("anyOf", ()):
        if variant.get("type") == "string":
            variant["maxLength"] = settings.max_context_chars
    for variant in props.get("choices", {}).get("anyOf", ()):
        if variant.get("type") == "array":
            variant["items"]["maxLength"] = settings.max_choice_chars


def document(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Complete FastAPI's generated ``schema`` in place: error responses and configured limits; without
    client API keys the answering operations are open, so their security requirement is made optional."""
    open_service = not getattr(settings, "api_keys", None) and not getattr(settings, "api_keys_file", None)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    if "ErrorResponse" not in components:
        error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(error_schema.pop("$defs", {}))
        components["ErrorResponse"] = error_schema
    for name in ("AnswerRequest", "QuestionIn"):
        if name in components:
            _set_text_limits(components[name], settings)
    if "BatchAnswerRequest" in components:
        components["BatchAnswerRequest"]["properties"]["questions"]["maxItems"] = settings.max_batch_questions
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            if open_service and (method, path) in _CLIENT_KEY_OPERATIONS and operation.get("security"):
                operation["security"] = [*operation["security"], {}]  # {}: no credentials needed
            responses = operation.setdefault("responses", {})
            for status in statuses(method, path):
                response: dict[str, Any] = {"description": _DESCRIPTIONS[status],
                                            "content": {"application/json": {"schema": _ERROR_REF}}}
                if status in _HEADERS:
                    response["headers"] = _HEADERS[status]
                responses[str(status)] = response
            operation["responses"] = dict(sorted(responses.items()))
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


def install_contract(app: FastAPI, settings: Settings) -> None:
    """No slash redirects, and an OpenAPI document completed by :func:`document` for ``settings``."""
    app.router.redirect_slashes = False

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(FastAPI.openapi(app), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
