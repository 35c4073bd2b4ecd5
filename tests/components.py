"""Real components on loopback for the tests: PostgreSQL, nginx and Prometheus, each a context manager.

Each finds its binary and calls ``pytest.skip`` (with the package to install) when it is absent; a component
that is installed but fails to start raises, with the tail of its log, since that is a real failure. Every
process logs to a file in the given work dir and is stopped on exit, also when the body raises. Ports come
from ``free_port`` (the OS's choice), so several of each can run at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
NGINX_TEMPLATE = REPO / "deploy" / "nginx.conf"
# Where each binary is looked for after PATH (tests blank these to exercise the skips).
PG_BIN_GLOBS = ["/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin"]
NGINX_PATHS = ["/usr/sbin/nginx", "/usr/local/nginx/sbin/nginx"]
PROMETHEUS_PATHS = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def wait_http(url: str, timeout_s: float = 30.0, *, any_status: bool = False) -> httpx.Response:
    """Poll ``GET url`` until it answers 2xx (or anything at all with ``any_status``); returns that response.

    Raises ``TimeoutError`` naming the last status or connection error.
    """
    deadline, last = time.monotonic() + timeout_s, "no attempt"
    while True:
        try:
            response = httpx.get(url, timeout=2.0)
            if any_status or response.is_success:
                return response
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as err:
            last = f"{type(err).__name__}: {err}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not answering after {timeout_s:.0f} s; last: {last}")
        time.sleep(0.1)


def log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, or a note that there is none."""
    if not path.exists():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or f"(empty log {path})"


def _wait_started(what: str, proc: subprocess.Popen, ready: Callable[[], bool], log: Path,
                  timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until ``ready()``; raise with the log tail if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} on startup; {log}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout_s:.0f} s; {log}:\n{log_tail(log)}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
    """Send ``sig``, wait up to ``grace_s`` for the exit, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)


def _find(name: str, fallbacks: list[str]) -> str | None:
    """``name`` on PATH, else the first existing executable among ``fallbacks``."""
    found = shutil.which(name)
    if found:
        return found
    return next((p for p in fallbacks if os.access(p, os.X_OK)), None)


# --- PostgreSQL -------------------------------------------------------------------------------------------

def _pg_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl: PATH first, then the newest of ``PG_BIN_GLOBS``."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    dirs = [Path(d) for pattern in PG_BIN_GLOBS for d in Path("/").glob(pattern.lstrip("/"))]
    dirs = [d for d in dirs if (d / "initdb").exists() and (d / "pg_ctl").exists()]
    return max(dirs, key=lambda d: [int(x) for x in re.findall(r"\d+", d.parent.name)] or [0], default=None)


def _as_postgres() -> tuple[list[str], pwd.struct_passwd | None]:
    """Command prefix to run PostgreSQL's tools, and the account it runs them as (None: ourselves).

    PostgreSQL refuses to run as root, so as root the tools run as the ``postgres`` system user.
    """
    if os.geteuid() != 0:
        return [], None
    try:
        account = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("PostgreSQL not available: running as root and there is no 'postgres' user to run it as; "
                    "apt-get install postgresql (creates it)")
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--"], account
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups", "--"], account
    pytest.skip("PostgreSQL not available: running as root and neither runuser nor setpriv to drop to 'postgres'")


def _pg_root(workdir: Path, prefix: list[str]) -> tuple[Path, bool]:
    """Where the data dir and socket go: ``workdir/pg`` when the server's account can reach it and the socket
    path stays under the 107-byte limit; otherwise a private dir in the system temp dir (second item True:
    remove it afterwards). As root, pytest's base temp dir (mode 0700) is out of the postgres user's reach."""
    root = workdir / "pg"
    reachable = not prefix or subprocess.run([*prefix, "test", "-x", str(workdir)], check=False).returncode == 0
    if reachable and len(str(root / "sock" / ".s.PGSQL.65535")) < 100:
        root.mkdir(parents=True, exist_ok=True)
        return root, False
    return Path(tempfile.mkdtemp(prefix="uqserve-pg-")), True


@contextlib.contextmanager
def postgres_server(workdir: Path) -> Iterator[str]:
    """A fresh PostgreSQL cluster on 127.0.0.1:<free port> with a database ``uqserve``; yields its SQLAlchemy URL
    ``postgresql+psycopg://postgres@127.0.0.1:<port>/uqserve`` (trust auth, superuser ``postgres``).

    initdb -E UTF8 with trust auth for local and loopback, fsync left on, the unix socket in the data root,
    ``pg_ctl -w start``, then ``pg_ctl -m fast stop`` on exit. Logs: ``workdir/initdb.log`` and
    ``workdir/postgres.log``. Skips when PostgreSQL or psycopg is not installed.
    """
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL not available: no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin; "
                    "apt-get install postgresql")
    psycopg = pytest.importorskip("psycopg", reason="psycopg (3) not installed: pip install 'psycopg[binary]'")
    prefix, account = _as_postgres()
    workdir.mkdir(parents=True, exist_ok=True)
    root, private = _pg_root(workdir, prefix)
    data, sock, port = root / "data", root / "sock", free_port()
    for path in (root, sock):
        path.mkdir(exist_ok=True)
        if account is not None:
            os.chown(path, account.pw_uid, account.pw_gid)
    init_log, server_log = workdir / "initdb.log", workdir / "postgres.log"
    pg_ctl = [*prefix, str(bindir / "pg_ctl"), "-D", str(data)]

    def run(cmd: list[str], log: BinaryIO) -> int:
        return subprocess.run(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, check=False,
                              timeout=START_TIMEOUT_S + 30).returncode

    started = False
    try:
        with init_log.open("wb") as log:
            if run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                    "--locale=C", "--auth-local=trust", "--auth-host=trust"], log):
                raise RuntimeError(f"initdb failed; {init_log}:\n{log_tail(init_log)}")
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(f"\n# tests/components.py\nlisten_addresses = '127.0.0.1'\nport = {port}\n"
                       f"unix_socket_directories = '{sock}'\nfsync = on\n")
        with server_log.open("ab") as log:  # the server keeps pg_ctl's stdout: this file, opened by us
            started = True
            if run([*pg_ctl, "-w", "-t", str(int(START_TIMEOUT_S)), "start"], log):
                raise RuntimeError(f"pg_ctl start failed; {server_log}:\n{log_tail(server_log)}")
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE uqserve")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/uqserve"
    finally:
        if started:
            with server_log.open("ab") as log:
                run([*pg_ctl, "-m", "fast", "-w", "stop"], log)
        if private:
            shutil.rmtree(root, ignore_errors=True)


# --- nginx ------------------------------------------------------------------------------------------------

def nginx_config(upstreams: list[str], port: int, workdir: Path) -> str:
    """``deploy/nginx.conf`` rendered for a loopback proxy: ``listen 127.0.0.1:<port>``, one ``server`` line per
    ``host:port`` upstream (same parameters as the template's), one worker, in the foreground, and every path
    (pid, logs, temp dirs) inside ``workdir``. Raises if the template no longer has what it rewrites."""
    if not upstreams:
        raise ValueError("nginx_config needs at least one upstream")
    text = NGINX_TEMPLATE.read_text()

    def servers(match: re.Match[str]) -> str:
        indent, params = match.group(1), match.group(2)
        return "".join(f"{indent}server {upstream}{params};\n" for upstream in upstreams)

    rewrites = [
        (r"^worker_processes\s+\S+;", lambda _m: "worker_processes 1;"),
        (r"^([ \t]+)listen[ \t]+8080;", lambda m: f"{m.group(1)}listen 127.0.0.1:{port};"),
        (r"^([ \t]+)server[ \t]+uqserve-1:8000([^;\n]*);\n(?:[ \t]+server[ \t]+uqserve-\d+:8000[^;\n]*;\n)*",
         servers),
        (r"/var/(?:run|log/nginx|cache/nginx)/", lambda _m: f"{workdir}/"),
    ]
    for pattern, replace in rewrites:
        text, n = re.subn(pattern, replace, text, flags=re.MULTILINE)
        if n == 0:
            raise ValueError(f"{NGINX_TEMPLATE}: nothing matches {pattern!r}; update tests/components.py")
    if any("/var/" in line.split("#")[0] for line in text.splitlines()):
        raise ValueError(f"{NGINX_TEMPLATE}: a /var/ path the harness does not move into the work dir")
    return f"# rendered from {NGINX_TEMPLATE} by tests/components.py\ndaemon off;\nmaster_process on;\n{text}"


@contextlib.contextmanager
def nginx_proxy(workdir: Path, upstreams: list[str]) -> Iterator[int]:
    """nginx on 127.0.0.1:<free port> proxying round-robin to ``upstreams`` (``host:port`` each), configured by
    ``nginx_config``; yields the port once it accepts connections; SIGQUIT (graceful) on exit, then SIGKILL.

    Logs: ``workdir/error.log``, ``workdir/access.log`` (JSON lines), ``workdir/nginx.out``. Skips when nginx is
    not installed. As root the workers run as nginx's default unprivileged user, which proxying allows.
    """
    exe = _find("nginx", NGINX_PATHS)
    if exe is None:
        pytest.skip("nginx not available: not on PATH nor in /usr/sbin; apt-get install nginx-light (or nginx)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_config(upstreams, port, workdir))
    out = workdir / "nginx.out"
    with out.open("ab") as log:
        proc = subprocess.Popen([exe, "-c", str(conf), "-p", f"{workdir}/", "-e", str(workdir / "error.log")],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        try:
            _wait_started("nginx", proc, lambda: port_open(port), out)
        except RuntimeError as err:
            raise RuntimeError(f"{err}\n{workdir / 'error.log'}:\n{log_tail(workdir / 'error.log')}") from None
        yield port
    finally:
        _stop(proc, signal.SIGQUIT)


# --- Prometheus -------------------------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    """Seconds as a Prometheus duration in milliseconds (``1.5`` → ``1500ms``)."""
    return f"{max(1, round(seconds * 1000))}ms"


@contextlib.contextmanager
def prometheus_server(workdir: Path, targets: list[str], rule_files: list[Path],
                      scrape_interval_s: float = 1.0) -> Iterator[str]:
    """Prometheus on 127.0.0.1:<free port> scraping ``targets`` (``host:port``, job ``uqserve``, path /metrics)
    every ``scrape_interval_s`` and evaluating ``rule_files`` as often; yields ``http://127.0.0.1:<port>`` once
    ``/-/ready`` answers; SIGTERM on exit. Config ``workdir/prometheus.yml``, TSDB ``workdir/tsdb``, log
    ``workdir/prometheus.log``. Skips when the prometheus binary is not installed."""
    exe = _find("prometheus", PROMETHEUS_PATHS)
    if exe is None:
        pytest.skip("Prometheus not available: no prometheus on PATH nor in /usr/bin; apt-get install prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    interval = _duration(scrape_interval_s)
    config = {  # JSON is YAML
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [{"job_name": "uqserve", "static_configs": [{"targets": list(targets)}]}],
    }
    conf = workdir / "prometheus.yml"
    conf.write_text(json.dumps(config, indent=2) + "\n")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = workdir / "prometheus.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([exe, f"--config.file={conf}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir)
    try:
        _wait_started("prometheus", proc, lambda: _answers(f"{base_url}/-/ready"), log_path)
        yield base_url
    finally:
        _stop(proc)


def _answers(url: str) -> bool:
    """Whether ``GET url`` answers 2xx right now."""
    try:
        return httpx.get(url, timeout=1.0).is_success
    except httpx.HTTPError:
        return False


def prometheus_query(base_url: str, expr: str) -> list[dict]:
    """Instant query ``expr``; the result list (vector: ``[{"metric": {...}, "value": [ts, "v"]}, ...]``; a scalar
    or string comes back as one such item with empty labels). Raises on HTTP or query errors."""
    response = httpx.get(f"{base_url}/api/v1/query", params={"query": expr}, timeout=10.0)
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    if not response.is_success or body.get("status") != "success":
        raise RuntimeError(f"query {expr!r} failed: HTTP {response.status_code}: {response.text[:500]}")
    data = body["data"]
    if data["resultType"] in ("scalar", "string"):
        return [{"metric": {}, "value": data["result"]}]
    return data["result"]


def wait_for_targets_up(base_url: str, n: int, timeout_s: float = 30.0) -> list[dict]:
    """Wait until at least ``n`` active scrape targets report health ``up``; returns the active targets.
    Raises ``TimeoutError`` listing each target's health and last scrape error."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = httpx.get(f"{base_url}/api/v1/targets", params={"state": "active"}, timeout=10.0)
        response.raise_for_status()
        active = response.json()["data"]["activeTargets"]
        if sum(t["health"] == "up" for t in active) >= n:
            return active
        if time.monotonic() > deadline:
            states = "; ".join(f"{t['scrapeUrl']}: {t['health']} {t.get('lastError', '')}".strip() for t in active)
            raise TimeoutError(f"{n} targets not up after {timeout_s:.0f} s: {states or 'no active targets'}")
        time.sleep(0.2)
