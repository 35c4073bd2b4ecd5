"""The real SmolLM2 end to end: train 2 members a few steps on 32 ARC-E questions → bundle → reload →
evaluate → serve → answer. This is the CI test of the whole product path on the embedded default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.bundle import read_bundle
from uqserve.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundles")
    code = main(["train", "ensemble", "--dataset", "arc_easy", "--train-limit", "32", "--val-limit", "16",
                 "--members", "2", "--epochs", "1", "--batch-size", "8", "--top-layers", "2",
                 "--out", str(root), "--name", "e2e"])
    assert code == 0
    return root / "e2e"


def test_bundle_reloads_and_evaluates(trained_bundle: Path, tmp_path: Path) -> None:
    bundle = read_bundle(trained_bundle)
    assert [m.name for m in bundle.manifest.members] == ["member-0", "member-1"]
    assert bundle.manifest.base_model.num_layers == 30 and bundle.manifest.lora.layers == (28, 29)
    assert bundle.manifest.training["steps"] == 4
    out = tmp_path / "eval"
    assert main(["eval", str(trained_bundle), "--dataset", "arc_easy", "--split", "test", "--limit", "24",
                 "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    metrics = result["metrics"]
    assert result["n"] == 24 and 0.0 <= metrics["acc"] <= 1.0 and metrics["nll"] > 0
    assert 0.0 <= metrics["mutual_information"] <= metrics["predictive_entropy"]
    assert {p.name for p in out.glob("*.png")} == {"reliability.png", "accuracy_coverage.png", "mi_vs_entropy.png"}


def test_trained_bundle_is_served(trained_bundle: Path) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(bundle_root=trained_bundle.parent, preload_bundles=["e2e"], admin_key="test-admin-key")
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/answer", json={
            "question": "Which gas do plants absorb from the air for photosynthesis?",
            "choices": ["oxygen", "carbon dioxide", "nitrogen", "helium"], "bundle": "e2e", "return_members": True})
        assert response.status_code == 200, response.text
        body = response.json()
        assert abs(sum(body["probabilities"]) - 1) < 1e-5
        assert len(body["members"]) == 2 and all(len(row) == 4 for row in body["members"])
        assert 0 <= body["mutual_information"] <= body["predictive_entropy"] + 1e-6
        assert body["bundle"]["name"] == "e2e" and body["bundle"]["method"] == "ensemble"
        assert body["abstained"] == (body["answer"] is None)
