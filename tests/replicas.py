"""uqserve replicas as real server processes for the restart and fleet tests: the tiny random model saved as
a local Hugging Face directory, bundles made for it, and :class:`Replica` (start, ``kill -9``, restart)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from components import free_port, log_tail, wait_http

from core.basemodel import BaseModel, load_base_model
from tests.conftest import build_tiny_model, build_tiny_tokenizer
from tests.service.conftest import make_bundle

REPO = Path(__file__).resolve().parent.parent


def tiny_model_dir(root: Path) -> tuple[Path, BaseModel]:
    """The tiny model written as a local HF directory (safetensors), and the base as a server loads it."""
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(str(root), safe_serialization=True)
    tokenizer.save_pretrained(str(root))
    return root, load_base_model(str(root))


def bundles_for(base: BaseModel, root: Path, names: tuple[str, ...] = ("b",)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        make_bundle(root, base, name, members=3, scale=0.4, seed=i)
    return root


@dataclass
class Replica:
    """One ``python -m service`` process on 127.0.0.1; ``env`` holds its UQSERVE_* settings."""

    name: str
    workdir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self, timeout_s: float = 120.0) -> Replica:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "UQSERVE_PORT": str(self.port), "UQSERVE_HOST": "127.0.0.1",
               "UQSERVE_REPLICA_ID": self.name, "UQSERVE_TORCH_THREADS": "1", "UQSERVE_MAX_WAIT_MS": "2",
               **self.env}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "service", "--log-level", "warning"], cwd=self.workdir,
                                         env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(f"{self.url}/readyz", timeout_s)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"replica {self.name} did not become ready:\n{log_tail(self.log)}") from None
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def question(i: int, bundle: str = "b") -> dict[str, Any]:
    k = 2 + i % 3
    return {"bundle": bundle, "question": f"Load question {i}: which one?",
            "choices": [f"option {j}" for j in range(k)]}


async def load(url: str, clients: int, stop: asyncio.Event, acknowledged: dict[str, dict[str, Any]],
               errors: list[str]) -> None:
    """``clients`` concurrent loops POSTing questions to ``url`` until ``stop``; every 200 answer goes into
    ``acknowledged`` (request id → answer), anything else (refused connections included) into ``errors``."""

    async def one(worker: int) -> None:
        async with httpx.AsyncClient(timeout=30.0) as client:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    r = await client.post(f"{url}/v1/answer", json=question(worker * 100_000 + i))
                except httpx.HTTPError as err:
                    errors.append(type(err).__name__)
                    await asyncio.sleep(0.05)
                    continue
                if r.status_code == 200:
                    answer = r.json()
                    acknowledged[answer["request_id"]] = answer
                else:
                    errors.append(str(r.status_code))

    await asyncio.gather(*(one(w) for w in range(clients)))
