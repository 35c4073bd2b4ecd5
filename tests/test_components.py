"""Smoke tests of tests/components.py: real PostgreSQL, nginx and Prometheus processes on loopback.

Each skips (with the package to install) when its binary is absent; see .ci/run for the Debian packages.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import components
import httpx
import pytest
from components import (
    nginx_config,
    nginx_proxy,
    postgres_server,
    prometheus_query,
    prometheus_server,
    wait_for_targets_up,
    wait_http,
)


def test_two_postgres_servers_at_once(tmp_path: Path) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    text = sqlalchemy.text
    with postgres_server(tmp_path / "a") as url_a, postgres_server(tmp_path / "b") as url_b:
        assert url_a.startswith("postgresql+psycopg://postgres@127.0.0.1:") and url_a.endswith("/uqserve")
        assert url_a != url_b
        engine_a, engine_b = sqlalchemy.create_engine(url_a), sqlalchemy.create_engine(url_b)
        try:
            with engine_a.begin() as conn:
                conn.execute(text("CREATE TABLE feedback (request_id text PRIMARY KEY, correct int NOT NULL)"))
                rows = [{"r": "ab\u00e9", "c": 1}, {"r": "x", "c": 0}]
                conn.execute(text("INSERT INTO feedback VALUES (:r, :c)"), rows)
            with engine_a.connect() as conn:
                rows = conn.execute(text("SELECT request_id, correct FROM feedback ORDER BY request_id")).all()
                assert [tuple(r) for r in rows] == [("ab\u00e9", 1), ("x", 0)]
                assert conn.execute(text("SHOW server_encoding")).scalar() == "UTF8"
                assert conn.execute(text("SHOW fsync")).scalar() == "on"
            with engine_b.connect() as conn:  # a separate cluster: no such table there
                assert conn.execute(text("SELECT to_regclass('feedback')")).scalar() is None
        finally:
            engine_a.dispose()
            engine_b.dispose()
    assert (tmp_path / "a" / "postgres.log").exists()


@contextlib.contextmanager
def named_server(name: str) -> Iterator[ThreadingHTTPServer]:
    """An HTTP server on a free loopback port answering ``<name> <X-Request-Id it got>`` to every GET."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"{name} {self.headers.get('X-Request-Id', '-')}".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_nginx_config_renders_the_deploy_template(tmp_path: Path) -> None:
    text = nginx_config(["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"], 4242, tmp_path)
    assert "listen 127.0.0.1:4242;" in text and "listen 8080" not in text
    for port in (9001, 9002, 9003):
        assert f"server 127.0.0.1:{port} max_fails=1 fail_timeout=2s;" in text
    assert "uqserve-1" not in text and "/var/" not in text
    assert f'pid "{tmp_path}/nginx.pid";' in text and "daemon off;" in text and "worker_processes 1;" in text


def test_nginx_round_robin_and_failover(tmp_path: Path) -> None:
    with named_server("a") as a, named_server("b") as b:
        upstreams = [f"127.0.0.1:{s.server_address[1]}" for s in (a, b)]
        with nginx_proxy(tmp_path / "nginx", upstreams) as port, httpx.Client(timeout=10.0) as client:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/nginx-healthz", 10)
            names = [client.get(f"{base}/v1/x").text.split()[0] for _ in range(6)]
            assert names in (["a", "b"] * 3, ["b", "a"] * 3)

            response = client.get(f"{base}/v1/x", headers={"X-Request-Id": "req-123"})
            assert response.text.split()[1] == "req-123" and response.headers["X-Request-Id"] == "req-123"
            generated = client.get(f"{base}/v1/x")
            request_id = generated.text.split()[1]
            assert len(request_id) == 32 and generated.headers["X-Request-Id"] == request_id

            b.shutdown()
            b.server_close()  # refused connections from now on: nginx retries on a
            answers = [client.get(f"{base}/v1/x") for _ in range(6)]
            assert [(r.status_code, r.text.split()[0]) for r in answers] == [(200, "a")] * 6

            a.shutdown()
            a.server_close()
            down = client.get(f"{base}/v1/x")
            assert down.status_code == 502 and down.json()["error"]["code"] == "bad_gateway"
            too_big = client.post(f"{base}/v1/x", content=b"x" * (8 * 1024 * 1024 + 1))  # client_max_body_size 8m
            assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "invalid_request_error"
    assert '"upstream_status"' in (tmp_path / "nginx" / "access.log").read_text()


def test_prometheus_scrapes_and_evaluates_rules(tmp_path: Path) -> None:
    prom = pytest.importorskip("prometheus_client")
    registry = prom.CollectorRegistry()
    counter = prom.Counter("uqserve_smoke_events", "Events counted by the smoke test.", registry=registry)
    counter.inc(3)
    target_port = components.free_port()
    httpd, _thread = prom.start_http_server(target_port, addr="127.0.0.1", registry=registry)
    rules = tmp_path / "rules.yml"
    rules.write_text("groups:\n  - name: smoke\n    rules:\n"
                     "      - record: job:uqserve_smoke_events:sum\n"
                     "        expr: sum by (job) (uqserve_smoke_events_total)\n")
    try:
        with prometheus_server(tmp_path / "prom", [f"127.0.0.1:{target_port}"], [rules], 0.5) as url:
            targets = wait_for_targets_up(url, 1, timeout_s=20)
            assert targets[0]["labels"]["job"] == "uqserve"
            assert wait_value(url, "uqserve_smoke_events_total") == 3.0
            counter.inc(2)
            assert wait_value(url, 'job:uqserve_smoke_events:sum{job="uqserve"}', expect=5.0) == 5.0
            assert prometheus_query(url, "1 + 1")[0]["value"][1] == "2"
            with pytest.raises(RuntimeError, match="failed"):
                prometheus_query(url, "sum(")
    finally:
        httpd.shutdown()
        httpd.server_close()


def wait_value(url: str, expr: str, expect: float | None = None, timeout_s: float = 20.0) -> float:
    """Poll until ``expr`` has exactly one series (with value ``expect`` if given); return its value."""
    import time

    deadline, result = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        result = prometheus_query(url, expr)
        if len(result) == 1 and (expect is None or float(result[0]["value"][1]) == expect):
            return float(result[0]["value"][1])
        time.sleep(0.2)
    raise AssertionError(f"{expr}: {result} after {timeout_s} s")


@pytest.mark.parametrize(("start", "message"), [
    (lambda d: postgres_server(d), "PostgreSQL not available: .*apt-get install postgresql"),
    (lambda d: nginx_proxy(d, ["127.0.0.1:1"]), "nginx not available: .*apt-get install nginx"),
    (lambda d: prometheus_server(d, [], []), "Prometheus not available: .*apt-get install prometheus"),
], ids=["postgres", "nginx", "prometheus"])
def test_missing_binary_skips_with_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start, message) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for name in ("PG_BIN_GLOBS", "NGINX_PATHS", "PROMETHEUS_PATHS"):
        monkeypatch.setattr(components, name, [])
    with pytest.raises(pytest.skip.Exception, match=message), start(tmp_path):
        pass
