"""Slow or oversized request bodies, and raw error responses in the service's one error schema.

:class:`BodyGuard` is a pure ASGI middleware, the outermost of the app: it reads the whole request body
before the app sees the request, answering **413** (``body_too_large``) as soon as ``Content-Length`` or the
bytes received exceed ``max_body_bytes``, and **408** (``client_timeout``) when the body has not arrived in
full ``body_timeout_s`` after the request's headers. Both close the connection (``Connection: close``), so a
client that announced more than it sends cannot hold it. The app then reads the buffered body at once.

:func:`error_body` and :func:`raw_error_response` build the ``{"error": {...}}`` body (and a complete
HTTP/1.1 response for the protocol layer in :mod:`service.server`, which answers before any ASGI app runs).
"""

from __future__ import annotations

import asyncio
import http
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from service.protocol import ErrorInfo, ErrorResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON = b"application/json"


def error_body(message: str, type_: str, code: str, param: str | None = None) -> bytes:
    """The service's error schema as compact JSON bytes (the same model the exception handlers use)."""
    body = ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code))
    return body.model_dump_json().encode()


def raw_error_response(status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """A complete ``HTTP/1.1`` response with a JSON body and ``Connection: close`` (for the protocol layer)."""
    head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode()]
    head += [name + b": " + value for name, value in (
        *headers, (b"content-type", JSON), (b"content-length", str(len(body)).encode()), (b"connection", b"close"))]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def send_error(send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Send a JSON error response through ASGI, asking the server to close the connection afterwards."""
    await send({"type": "http.response.start", "status": status, "headers": [
        *headers, (b"content-type", JSON), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def content_length(scope: Scope) -> int | None:
    """The request's ``Content-Length`` (None when absent or unreadable: the body is then counted)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodyGuard:
    """Pure ASGI middleware: the body within ``max_body_bytes`` (else 413) and ``body_timeout_s`` (else 408)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    def too_large(self) -> bytes:
        return error_body(f"request body over {self.max_body_bytes} bytes (max_body_bytes)",
                          "invalid_request_error", code="body_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        announced = content_length(scope)
        if announced is not None and announced > self.max_body_bytes:
            await send_error(send, 413, self.too_large())  # before reading: no 100-continue is sent
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                body = error_body(f"the request body did not arrive within {self.body_timeout_s:g} s "
                                  "(body_timeout_s)", "timeout_error", code="client_timeout")
                await send_error(send, 408, body)
                return
            if message["type"] != "http.request":  # http.disconnect: nobody left to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await send_error(send, 413, self.too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the buffered body once, then defers to the server's (disconnect events)."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
