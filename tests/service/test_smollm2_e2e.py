"""End to end on the real SmolLM2-135M: random 2-member ensemble on the top 2 layers, one ARC question."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient


@pytest.mark.slow
def test_real_smollm2_answer(tmp_path: Path, bundle_maker: Any, settings_factory: Any) -> None:
    from core.basemodel import load_base_model
    from core.datasets import load_questions
    from service.app import create_app
    from service.engine.engine import UQEngine

    base = load_base_model()
    top = base.info.num_layers
    bundle_maker(tmp_path, "smol", base=base, members=2, layers=(top - 2, top - 1), rank=8, alpha=16.0, scale=0.02)
    settings = settings_factory(tmp_path, preload_bundles=["smol"], max_slots=4, torch_threads=None)
    engine = UQEngine(base, settings)
    q = load_questions("arc_easy", "test", limit=1)[0]
    body: dict[str, Any] = {
        "bundle": "smol",
        "question": q.question,
        "choices": list(q.choices),
        "return_members": True,
    }
    with TestClient(create_app(settings, engine)) as client:
        r = client.post("/v1/answer", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
    assert len(data["probabilities"]) == len(q.choices)
    assert abs(sum(data["probabilities"]) - 1.0) < 1e-6
    assert len(data["members"]) == 2 and all(abs(sum(m) - 1.0) < 1e-6 for m in data["members"])
    assert 0.0 <= data["mutual_information"] <= data["predictive_entropy"] + 1e-9
    assert data["bundle"]["base_model_hash"] == base.info.weight_hash
    assert data["answer"]["text"] == q.choices[data["answer"]["index"]]
    assert data["bundle"]["name"] == "smol" and data["request_id"]
