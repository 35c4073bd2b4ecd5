"""The HTTP server: uvicorn on its h11 protocol, extended against slow clients and connection floods.

uvicorn has no header read timeout: a client that sends half a request line keeps its connection forever.
:class:`GuardedH11Protocol` (pinned with ``Config(http=...)``, so the httptools implementation is never
picked) adds, per connection:

- **header timeout**: a timer armed when the connection opens and after every response, cancelled when a
  request's headers are complete. When it fires, a connection that sent part of a request gets **408**
  (``client_timeout``) and is closed; one that sent nothing since it opened is closed quietly; an idle
  keep-alive connection is left to uvicorn's own ``timeout_keep_alive`` (5 s).
- **connection limit**: a connection accepted while ``max_connections`` are already open is refused
  politely: its first request (whose headers still fall under the header timeout) gets **503**
  (``too_many_connections``) with ``Retry-After: 1`` and the connection is closed. Connections admitted
  before are unaffected. uvicorn's ``limit_concurrency`` is left off: it answers every connection with a
  plain-text 503 once the total is over the limit, the admitted ones included.
- **malformed HTTP** gets a JSON **400** (``malformed_http``) in the service's error schema instead of
  uvicorn's plain text, then the connection is closed (also a request head over h11's 16 KiB limit).

The body's size and read deadline are enforced by :class:`service.guards.BodyGuard` in the app itself.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.guards import Receive, Scope, Send, error_body, raw_error_response, send_error
from service.settings import Settings

log = logging.getLogger("uqserve.http")
RETRY_AFTER_S = 1


async def too_many_connections(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI app an over-limit connection is served by: 503 with Retry-After, then close."""
    body = error_body("too many open connections to this server; retry shortly", "capacity_error",
                      code="too_many_connections")
    await send_error(send, 503, body, [(b"retry-after", str(RETRY_AFTER_S).encode())])


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout, a polite connection limit and JSON 400s.

    Configure it through :func:`protocol_class`, which sets the class attributes below on a subclass.
    """

    header_timeout_s: float = 10.0
    max_connections: int | None = 256
    last_refusal_log = float("-inf")  # loop time of the last "connection limit" warning (shared)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timer: asyncio.TimerHandle | None = None
        self.armed_cycle: object = None  # the request cycle current when the timer was armed
        self.partial = False  # bytes arrived since the timer was armed

    # --- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            now = self.loop.time()
            if now - GuardedH11Protocol.last_refusal_log >= 10.0:  # one line per 10 s during a flood
                GuardedH11Protocol.last_refusal_log = now
                log.warning("%d connections open (max_connections %d): answering 503 to the newest",
                            len(self.connections), self.max_connections)
            self.app = too_many_connections  # type: ignore[assignment]
        self.arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.header_timer is not None:
            self.partial = True
        super().data_received(data)
        self.check_headers_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm_header_timer()
        super().connection_lost(exc)

    # --- uvicorn hooks ------------------------------------------------------------------------------

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self.arm_header_timer()  # before super(): it may start a pipelined request at once
        super().on_response_complete()
        self.check_headers_done()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse: JSON 400 (when no response is under way), then close."""
        self.disarm_header_timer()
        if not self.transport.is_closing() and (self.cycle is None or not self.cycle.response_started
                                                or self.cycle.response_complete):
            body = error_body("malformed HTTP request: the request line or headers could not be parsed (or the "
                              "headers are over 16 KiB)", "invalid_request_error", code="malformed_http")
            self.transport.write(raw_error_response(400, body, self.server_state.default_headers))
        self.transport.close()

    # --- the header timer ---------------------------------------------------------------------------

    def arm_header_timer(self) -> None:
        self.disarm_header_timer()
        self.armed_cycle, self.partial = self.cycle, False
        self.header_timer = self.loop.call_later(self.header_timeout_s, self.header_timeout)

    def disarm_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def check_headers_done(self) -> None:
        """uvicorn starts a new request cycle once a request's headers are parsed: stop the clock then."""
        if self.header_timer is not None and self.cycle is not self.armed_cycle:
            self.disarm_header_timer()

    def header_timeout(self) -> None:
        self.header_timer = None
        if self.transport.is_closing():
            return
        if self.partial:
            body = error_body(f"the request headers did not arrive within {self.header_timeout_s:g} s "
                              "(header_timeout_s)", "timeout_error", code="client_timeout")
            self.transport.write(raw_error_response(408, body, self.server_state.default_headers))
        elif self.cycle is not None and self.timeout_keep_alive_task is not None:
            return  # an idle keep-alive connection: uvicorn's keep-alive timeout closes it
        self.transport.close()


def protocol_class(settings: Settings) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass carrying ``settings``' header timeout and connection limit."""
    attrs = {"header_timeout_s": settings.header_timeout_s, "max_connections": settings.max_connections}
    return type("UqserveH11Protocol", (GuardedH11Protocol,), attrs)


def server_config(app: Any, settings: Settings, log_level: str = "info", **overrides: Any) -> uvicorn.Config:
    """uvicorn's config for ``app`` on ``settings.host:port`` with the guarded protocol pinned.

    On SIGTERM/SIGINT uvicorn stops accepting, waits for in-flight requests (at most the request timeout
    plus 5 s), then the app's lifespan drains the engine's queue.
    """
    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_level": log_level, "http": protocol_class(settings),
        "limit_concurrency": None, "timeout_graceful_shutdown": int(settings.request_timeout_s) + 5,
        **overrides}
    return uvicorn.Config(app, **options)


def run_server(app: Any, settings: Settings, log_level: str = "info", **overrides: Any) -> None:
    """Serve ``app`` until SIGTERM/SIGINT (blocking)."""
    uvicorn.Server(server_config(app, settings, log_level, **overrides)).run()
