"""Corrupt bundles, generated from one good bundle by mutations of its directory.

Every mutation is loaded twice: through :func:`core.bundle.read_bundle` (it raises a BundleError naming the
offending file, or, for a bundle that is only wrong *for this server*, reads fine) and through the real app
over HTTP with the torch engine on the tiny model (a 4xx in the one error schema, never 500, counted in
``uqserve_bundle_load_failures_total{reason}``, no LoRA slot left allocated, the good bundle still served).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import core.bundle_checks
from core.basemodel import BaseModel
from core.bundle import read_bundle
from core.errors import BundleError
from service.app import create_app
from tests.service.bundle_mutations import CASES, SERVER_CHAT, Case, corrupt_copy, edit_manifest, key
from tests.service.conftest import make_bundle, tiny_settings

ADMIN = "corrupt-admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
QUESTION = {"bundle": "good", "question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide"]}


# --- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tiny_base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One good bundle (2 members, rank 4, layers 2-3, every projection), copied for each mutation."""
    return make_bundle(tmp_path_factory.mktemp("good"), tiny_base, "good", members=2)


@dataclass
class Server:
    client: TestClient
    engine: Any
    root: Path


@pytest.fixture(scope="module")
def server(tiny_base: BaseModel, good: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real app on the torch engine (tiny model; its tokenizer has a chat template), ``good`` preloaded."""
    from service.engine.engine import UQEngine

    root = tmp_path_factory.mktemp("served") / "bundles"
    shutil.copytree(good, root / "good")
    tokenizer = copy.deepcopy(tiny_base.tokenizer)
    tokenizer.chat_template = SERVER_CHAT
    base = BaseModel(tiny_base.model, tokenizer, tiny_base.info)
    engine = UQEngine(base, tiny_settings(root, admin_key=ADMIN, preload_bundles=["good"], max_slots=8))
    try:
        with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as client:
            yield Server(client, engine, root)
    finally:
        engine.multilora.remove()
        engine.executor.shutdown(wait=False)


def failures(client: TestClient) -> dict[str, float]:
    text = client.get("/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r'uqserve_bundle_load_failures_total\{reason="(\w+)"\} (\S+)', text)}


def assert_error_schema(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return dict(body["error"])


def assert_good_answers(client: TestClient) -> None:
    response = client.post("/v1/answer", json=QUESTION)
    assert response.status_code == 200, response.text
    assert abs(sum(response.json()["probabilities"]) - 1) < 1e-6


# --- tests ------------------------------------------------------------------------------------------------------


def test_there_are_enough_mutations() -> None:
    assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)


def test_good_bundle_reads_loads_and_answers(good: Path, tiny_base: BaseModel, server: Server) -> None:
    bundle = read_bundle(good, expect_base=tiny_base.info)
    assert [m.name for m in bundle.manifest.members] == ["m0", "m1"] and set(bundle.members) == {"m0", "m1"}
    listed = server.client.get("/v1/bundles").json()
    assert [b["name"] for b in listed["bundles"]] == ["good"]
    assert_good_answers(server.client)


@pytest.mark.parametrize("item", CASES, ids=[c.name for c in CASES])
def test_reader_names_the_file(item: Case, good: Path, tiny_base: BaseModel, tmp_path: Path) -> None:
    if item.needs_non_root and os.geteuid() == 0:
        pytest.skip("permission bits do not stop root")
    path = corrupt_copy(good, tmp_path, item)
    if item.file is None:
        read_bundle(path, expect_base=tiny_base.info)  # well-formed: only the serving engine refuses it
        return
    with pytest.raises(BundleError) as caught:  # any other exception fails the test: the reader is total
        read_bundle(path, expect_base=tiny_base.info)
    assert isinstance(caught.value, item.error)
    assert item.file in str(caught.value), str(caught.value)


@pytest.mark.parametrize("item", CASES, ids=[c.name for c in CASES])
def test_server_refuses_with_4xx(item: Case, good: Path, server: Server) -> None:
    if item.needs_non_root and os.geteuid() == 0:
        pytest.skip("permission bits do not stop root")
    corrupt_copy(good, server.root, item)
    before, free = failures(server.client), server.engine.pool.free
    error = assert_error_schema(server.client.post(f"/v1/bundles/{item.name}", headers=AUTH), item.status)
    if item.file is not None:
        assert item.file in error["message"]
    after = failures(server.client)
    assert after.get(item.reason, 0) == before.get(item.reason, 0) + 1, (item.reason, after)
    assert server.engine.pool.free == free  # no slot left allocated
    assert [s.name for s in server.engine.bundles()] == ["good"]
    assert_good_answers(server.client)


def test_unreadable_manifest_is_a_bundle_error(good: Path, server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A permission error (root ignores permission bits, so it is simulated) is a problem naming the file."""
    read_raw = core.bundle_checks._read_raw

    def denied(file: Path, limit: int) -> bytes:
        if file.name == "manifest.json" and file.parent.name == "denied":
            raise PermissionError(13, "Permission denied", str(file))
        return read_raw(file, limit)

    monkeypatch.setattr(core.bundle_checks, "_read_raw", denied)
    shutil.copytree(good, server.root / "denied")
    edit_manifest(server.root / "denied", lambda m: m.update(name="denied"))
    with pytest.raises(BundleError, match=r"manifest\.json: cannot be read \(PermissionError"):
        read_bundle(server.root / "denied")
    before = failures(server.client).get("invalid_bundle", 0)
    assert_error_schema(server.client.post("/v1/bundles/denied", headers=AUTH), 422)
    assert failures(server.client)["invalid_bundle"] == before + 1


def test_failed_reload_keeps_the_loaded_version(good: Path, server: Server) -> None:
    path = server.root / "keep"
    shutil.copytree(good, path)
    edit_manifest(path, lambda m: m.update(name="keep"))
    assert server.client.post("/v1/bundles/keep", headers=AUTH).status_code == 200
    free = server.engine.pool.free
    edit_manifest(path, lambda m: m.update(version="2", members=[m["members"][0], m["members"][0]]))
    error = assert_error_schema(server.client.post("/v1/bundles/keep", headers=AUTH), 422)
    assert "more than once" in error["message"]
    assert server.engine.pool.free == free
    assert_good_answers(server.client)
    response = server.client.post("/v1/answer", json={**QUESTION, "bundle": "keep"})
    assert response.status_code == 200 and response.json()["bundle"]["version"] == "1"
    assert server.client.delete("/v1/bundles/keep", headers=AUTH).status_code == 200


def test_corrupt_preload_does_not_stop_the_server(good: Path, engine_factory: Any, tmp_path: Path) -> None:
    root = tmp_path / "bundles"
    shutil.copytree(good, root / "good")
    broken = next(c for c in CASES if c.name == "manifest_not_utf8")
    corrupt_copy(good, root, broken)
    unfit = next(c for c in CASES if c.name == "max_tokens_too_small")
    corrupt_copy(good, root, unfit)
    engine = engine_factory(root, admin_key=ADMIN, preload_bundles=[broken.name, unfit.name, "good"])
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as client:
        assert [b["name"] for b in client.get("/v1/bundles").json()["bundles"]] == ["good"]
        assert_good_answers(client)
        counted = failures(client)
        assert counted.get("invalid_bundle") == 1 and counted.get("answer_space") == 1, counted
        assert engine.pool.free == engine.pool.num_slots - 2


def test_engine_check_refuses_what_it_would_ignore(server: Server) -> None:
    """The engine's own slot check (behind the reader) names every key it would otherwise drop or misplace."""
    from core.multilora import check_peft_tensors

    tensors = {key(parent="mlp"): torch.zeros(4, 64), key(module="fc_proj"): torch.zeros(4, 64),
               key(3): torch.zeros(4, 64, dtype=torch.int32), key(3, which="B"): torch.tensor(1.0),
               "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}
    problems = check_peft_tensors(tensors, server.engine.multilora)
    assert len(problems) == len(tensors)
    for name, problem in zip(tensors, problems, strict=True):
        assert name in problem
