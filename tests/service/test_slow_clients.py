"""Slow clients, floods and malformed HTTP against the real server (``service.server``) in a subprocess.

The server runs the contract tests' fake engine behind the guarded h11 protocol with 1 s header and body
timeouts, 8 connections at most and a 4 KiB body bound; the tests speak HTTP/1.1 over raw sockets. Every
refusal must come back in the service's error schema and close the connection.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from components import free_port, log_tail, wait_http
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service.test_api_contract import FakeEngine

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 1.0  # header_timeout_s and body_timeout_s of the server under test
SLACK_S = 1.0  # scheduling slack on a loaded 2-core machine
MAX_CONNECTIONS = 8
SETTINGS: dict[str, Any] = {"preload_bundles": [], "prediction_log": False, "header_timeout_s": TIMEOUT_S,
                            "body_timeout_s": TIMEOUT_S, "max_connections": MAX_CONNECTIONS,
                            "max_body_bytes": 4096}
SERVER = """\
import json, sys
from service.app import create_app
from service.server import run_server
from service.settings import Settings
from tests.service.test_api_contract import FakeEngine
settings = Settings(_env_file=None, **json.loads(sys.argv[1]))
run_server(create_app(settings, engine=FakeEngine()), settings, log_level="warning", access_log=False)
"""
ANSWER = json.dumps({"bundle": "default", "question": "Which gas do plants take in?",
                     "choices": ["oxygen", "carbon dioxide"]}).encode()


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    workdir = tmp_path_factory.mktemp("slow-clients")
    chosen = free_port()
    settings = {**SETTINGS, "host": "127.0.0.1", "port": chosen, "bundle_root": str(workdir)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log = workdir / "server.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(settings)], cwd=workdir, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            wait_http(f"http://127.0.0.1:{chosen}/healthz", 60)
        except TimeoutError:
            raise RuntimeError(f"the server did not start:\n{log_tail(log)}") from None
        yield chosen
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_until_closed(sock: socket.socket, limit_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (fails if it is still open after limit_s)."""
    sock.settimeout(limit_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (Content-Length framed) from a connection that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    while len(body) < int(headers.get("content-length", "0")):
        body += sock.recv(65536)
    return status, headers, body


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers


def error_of(raw: bytes, status: int) -> dict[str, Any]:
    """The error object of a complete raw response, checking status, schema and ``Connection: close``."""
    head, _, body = raw.partition(b"\r\n\r\n")
    got, headers = parse_head(head)
    assert got == status, raw
    assert headers["content-type"] == "application/json" and headers["connection"] == "close", headers
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def request(path: str = "/healthz", method: str = "GET", body: bytes = b"") -> bytes:
    length = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body else ""
    return f"{method} {path} HTTP/1.1\r\nHost: test\r\n{length}\r\n".encode() + body


def test_partial_headers_get_408_and_are_closed(port: int) -> None:
    with connect(port) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        raw = read_until_closed(sock)
        elapsed = time.monotonic() - start
    assert error_of(raw, 408)["code"] == "client_timeout"
    assert TIMEOUT_S - 0.1 <= elapsed <= TIMEOUT_S + SLACK_S, elapsed


def test_short_body_gets_408_and_is_closed(port: int) -> None:
    with connect(port) as sock:
        start = time.monotonic()
        sock.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 200\r\n\r\n" + ANSWER[:20])
        raw = read_until_closed(sock)
        elapsed = time.monotonic() - start
    error = error_of(raw, 408)
    assert error["code"] == "client_timeout" and "body" in error["message"]
    assert TIMEOUT_S - 0.1 <= elapsed <= TIMEOUT_S + SLACK_S, elapsed


def test_a_stalled_second_request_on_a_keep_alive_connection_gets_408(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(request())
        assert read_response(sock)[0] == 200
        time.sleep(TIMEOUT_S + 0.3)  # idle longer than the header timeout: still open (keep-alive is 5 s)
        sock.sendall(request())
        assert read_response(sock)[0] == 200
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        raw = read_until_closed(sock)
        elapsed = time.monotonic() - start
    assert error_of(raw, 408)["code"] == "client_timeout"
    assert elapsed <= TIMEOUT_S + SLACK_S, elapsed


def test_a_silent_connection_is_closed_without_a_response(port: int) -> None:
    with connect(port) as sock:
        start = time.monotonic()
        assert read_until_closed(sock) == b""
        assert time.monotonic() - start <= TIMEOUT_S + SLACK_S


@pytest.mark.parametrize("garbage", [b"GARBAGE\x00 / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
                                     b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 20_000],
                         ids=["request-line", "header-line", "head-over-16KiB"])
def test_malformed_http_gets_json_400(port: int, garbage: bytes) -> None:
    with connect(port) as sock:
        sock.sendall(garbage)
        raw = read_until_closed(sock, limit_s=TIMEOUT_S / 2)  # at once, not at the header timeout
    error = error_of(raw, 400)
    assert error["code"] == "malformed_http" and error["type"] == "invalid_request_error"


def test_oversized_bodies_get_413(port: int) -> None:
    with connect(port) as sock:  # announced: refused before the body is read
        sock.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: test\r\nContent-Length: 5000\r\n\r\n{")
        assert error_of(read_until_closed(sock, limit_s=TIMEOUT_S / 2), 413)["code"] == "body_too_large"
    with connect(port) as sock:  # chunked: counted as it arrives
        chunk = b"x" * 3000
        sock.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2)
        assert error_of(read_until_closed(sock, limit_s=TIMEOUT_S / 2), 413)["code"] == "body_too_large"


def test_connections_over_the_limit_get_503_and_the_others_are_served(port: int) -> None:
    with contextlib.ExitStack() as stack:
        admitted = [stack.enter_context(connect(port)) for _ in range(MAX_CONNECTIONS)]
        for sock in admitted:  # a completed request each: every one of them was accepted and admitted
            sock.sendall(request())
            assert read_response(sock)[0] == 200
        with connect(port) as extra:
            extra.sendall(request("/v1/answer", "POST", ANSWER))
            raw = read_until_closed(extra, limit_s=TIMEOUT_S / 2)
        error = error_of(raw, 503)
        assert error["code"] == "too_many_connections" and error["type"] == "capacity_error"
        assert parse_head(raw.partition(b"\r\n\r\n")[0])[1]["retry-after"] == "1"
        for sock in admitted:  # unaffected by the refusal
            sock.sendall(request("/v1/answer", "POST", ANSWER))
            status, _, body = read_response(sock)
            assert status == 200 and json.loads(body)["answer"] is not None
    time.sleep(0.2)  # the server sees the closes
    response = httpx.post(f"http://127.0.0.1:{port}/v1/answer", content=ANSWER,
                          headers={"Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 200, response.text


def test_thirty_slow_sockets_are_all_closed_after_the_timeout(port: int) -> None:
    """More slow sockets than the connection limit: the admitted and the over-limit ones alike get 408."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(connect(port)) for _ in range(30)]
        start = time.monotonic()
        for sock in socks:
            sock.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: te")
        for sock in socks:
            assert error_of(read_until_closed(sock), 408)["code"] == "client_timeout"
        elapsed = time.monotonic() - start
    assert elapsed <= TIMEOUT_S + SLACK_S, elapsed
    response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    assert response.status_code == 200


def test_the_default_body_bound_admits_the_largest_legal_batch() -> None:
    """64 questions × (4000 + 8000 + 26 × 500 characters) under the default limits: not a 413."""
    settings = Settings(_env_file=None, preload_bundles=[], prediction_log=False)  # type: ignore[call-arg]
    question = {"question": "q" * settings.max_question_chars, "context": "c" * settings.max_context_chars,
                "choices": [f"{j:02d}" + "x" * (settings.max_choice_chars - 2) for j in range(26)]}
    body = json.dumps({"bundle": "default", "questions": [question] * settings.max_batch_questions}).encode()
    assert len(body) > 1024 * 1024
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        response = client.post("/v1/answer/batch", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 200, response.text[:300]
        too_big = client.post("/v1/answer/batch", content=b" " * (settings.max_body_bytes + 1),
                              headers={"Content-Type": "application/json"})
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"
