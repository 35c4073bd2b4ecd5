"""The README's "Your own data" walkthrough, run as written (SmolLM2, a small --train-limit / --limit):
file → train → eval (bundle and zero-shot base) → serve → ``uqserve ask`` → the Python client."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"train": ["--train-limit", "60", "--val-limit", "30"], "eval": ["--limit", "40"]}

pytestmark = pytest.mark.slow


def block(marker: str) -> str:
    """The fenced code block after ``<!-- walkthrough:<marker> -->`` in the README."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(f"<!-- walkthrough:{marker} -->"):]
    start = after.index("```") + after[after.index("```"):].index("\n") + 1
    return after[start: start + after[start:].index("```")]


def commands() -> list[list[str]]:
    joined = block("bash").replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "UQSERVE_PORT": str(port), "UQSERVE_URL": url, "UQSERVE_TORCH_THREADS": "2"}
    server = None
    try:
        for argv in commands():
            assert argv[0] == "uqserve", argv
            background = argv[-1] == "&"
            argv = [sys.executable, "-m", "uqserve.cli", *argv[1:-1 if background else None]]
            if argv[3:5] == ["train", "ensemble"]:
                argv += LIMITS["train"]
            elif argv[3] == "eval":
                argv += LIMITS["eval"]
            if background:
                server = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=(tmp_path / "serve.log").open("wb"),
                                          stderr=subprocess.STDOUT)
                _wait_ready(url, server, tmp_path / "serve.log")
                continue
            done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
            expected = (0, 3) if argv[3] == "ask" else (0,)  # ask exits 3 when the bundle abstains
            assert done.returncode in expected, f"{argv}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        manifest = json.loads((tmp_path / "bundles" / "my-mcq" / "manifest.json").read_text())
        assert manifest["training"]["data"]["rows"] == {"train": 60, "validation": 15, "calibration": 15}
        assert manifest["training"]["data"]["files"]["train"]["rows"] == 400
        metrics = list((tmp_path / "runs" / "eval").glob("*/metrics.json"))
        assert {json.loads(m.read_text())["bundle"] for m in metrics} == {"my-mcq", "base-cloze"}
        script = block("python").replace("http://127.0.0.1:8000", url)
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip()
        labelled = httpx.get(f"{url}/metrics").text
        assert 'uqserve_feedback_total{bundle="my-mcq",result="joined"} 1.0' in labelled
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)


def _wait_ready(url: str, server: subprocess.Popen[bytes], log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"uqserve serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"uqserve serve not ready in {timeout_s} s:\n{log.read_text()[-3000:]}")
