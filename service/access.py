"""Who is asking: optional client API keys, the admin key, a brake on wrong keys, and cancel-on-disconnect.

- **Client keys** (``UQSERVE_API_KEYS`` / ``UQSERVE_API_KEYS_FILE``) are stored only as SHA-256 hashes
  (``name:hex``); a presented key is hashed and compared with *every* entry with
  :func:`hmac.compare_digest`, so the time taken does not depend on which entry (or how much of one)
  matched. Keys are random 256-bit tokens (``uqserve keys new``), so an unsalted hash is not guessable.
  Without keys the service is open and a client is its address.
- **Wrong keys are braked per client address** (admin and client keys alike): a token bucket of
  ``auth_failure_burst`` failures refilled one per ``auth_failure_refill_s``; once it is empty the client
  gets 429 with Retry-After before any key is compared.
- **A client that disconnects** cancels its work: :func:`unless_disconnected` races the engine call
  against the ASGI ``http.disconnect`` message.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable
from pathlib import Path
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.engine.errors import ClientGoneError
from service.errors import AdminAuthError
from service.settings import Settings

T = TypeVar("T")
KEY_PREFIX = "uqs_"
_MAX_TRACKED = 10_000  # client addresses the brake remembers (least recently failed are forgotten)


def hash_key(key: str) -> str:
    """The stored form of a key: SHA-256 hex of its UTF-8 bytes."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    """A fresh client key: 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyRing:
    """Named key hashes; :meth:`match` returns the name of the presented key, or None."""

    def __init__(self, entries: list[str]) -> None:
        self.entries: list[tuple[str, bytes]] = []
        for entry in entries:
            name, sep, digest = entry.strip().partition(":")
            digest = digest.strip().lower()
            if not sep or not name.strip() or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"API key entry {entry[:24]!r}… is not 'name:<64 hex sha256>'")
            self.entries.append((name.strip(), bytes.fromhex(digest)))

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        entries = list(settings.api_keys)
        if settings.api_keys_file is not None:
            lines = Path(settings.api_keys_file).read_text().splitlines()
            entries += [line for line in (raw.split("#", 1)[0].strip() for raw in lines) if line]
        return cls(entries)

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def match(self, presented: str) -> str | None:
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = None
        for name, stored in self.entries:  # no early exit: every entry is compared
            if hmac.compare_digest(digest, stored) and found is None:
                found = name
        return found


class AuthBrake:
    """Per-client token bucket of wrong-key attempts (see the module docstring)."""

    def __init__(self, burst: int, refill_s: float) -> None:
        self.burst, self.refill_s = burst, refill_s
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client → (tokens, at)

    def _tokens(self, client: str, now: float) -> float:
        tokens, at = self._buckets.get(client, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) / self.refill_s)

    def check(self, client: str) -> None:
        """Raise 429 while ``client`` has no wrong-key attempts left."""
        tokens = self._tokens(client, time.monotonic())
        if tokens < 1:
            wait = math.ceil((1 - tokens) * self.refill_s)
            raise AdminAuthError(429, f"too many wrong keys from this client; retry in {wait} s",
                                 "too_many_auth_failures", retry_after_s=wait)

    def failed(self, client: str) -> None:
        now = time.monotonic()
        self._buckets[client] = (self._tokens(client, now) - 1, now)
        self._buckets.move_to_end(client)
        while len(self._buckets) > _MAX_TRACKED:
            self._buckets.popitem(last=False)


def client_address(request: Request) -> str:
    """The peer's address (uvicorn applies X-Forwarded-For from trusted proxies, --forwarded-allow-ips)."""
    return request.client.host if request.client is not None else "unknown"


# named apart from the admin schemes (service/routes.py): one OpenAPI components entry each
_bearer = HTTPBearer(auto_error=False, scheme_name="ClientBearer", description="Authorization: Bearer <client key>")
_client_header = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="ClientKeyHeader",
                              description="X-API-Key: <client key> (only when the server has UQSERVE_API_KEYS)")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def client_identity(request: Request, bearer: BearerDep,
                    header: Annotated[str | None, Depends(_client_header)]) -> str:
    """Who the per-client budget and fair queue count: ``key:<name>`` with API keys, else ``addr:<ip>``."""
    keys: KeyRing = request.app.state.api_keys
    address = client_address(request)
    if not keys.enabled:
        return f"addr:{address}"
    given = header or (bearer.credentials if bearer is not None else None)
    if not given:
        raise AdminAuthError(401, "API key required: send 'X-API-Key: <key>' or 'Authorization: Bearer <key>'",
                             "missing_api_key")
    brake: AuthBrake = request.app.state.auth_brake
    brake.check(address)
    name = keys.match(given)
    if name is None:
        brake.failed(address)
        raise AdminAuthError(401, "wrong API key", "invalid_api_key")
    return f"key:{name}"


ClientDep = Annotated[str, Depends(client_identity)]


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (its queued rows leave the batcher, a running
    batch stops at its next step) and raise :class:`ClientGoneError`."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        if watch.exception() is not None:  # the server cannot tell (no disconnect seen): keep working
            return await task
        task.cancel()
        raise ClientGoneError("the client closed the connection; its work was cancelled")
    return task.result()
