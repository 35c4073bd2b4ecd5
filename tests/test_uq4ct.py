"""UQ4CT on the tiny model: training lowers the loss, the bundle round-trips, and the server loads and answers
with it (alone, mixed with an ensemble bundle, over HTTP), reporting FEU and a null MI with its reason."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from core.answers import Question
from core.bundle import Method, read_bundle
from core.calibration import apply_temperature
from core.multilora import decoder_layers
from training.ensemble import EnsembleConfig
from training.ensemble_cli import train_and_export as train_and_export_ensemble
from training.uq4ct import UQ4CTConfig, moe_bundle_scores
from training.uq4ct_cli import train_and_export

CONFIG = dict(num_experts=4, top_k=2, rank=4, alpha=8.0, top_layers=2, epochs=4, batch_size=2, lr=2e-2,
              dtype="float32", row_tokens=64)


@pytest.fixture(scope="module")
def root(tiny_base, tiny_questions, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uq4ct-bundles")
    train_and_export(tiny_base, UQ4CTConfig(**CONFIG), tiny_questions, tiny_questions, root, "tiny-uq4ct",
                     log=lambda _: None)
    ens = EnsembleConfig(members=2, rank=4, alpha=8.0, top_layers=3, epochs=1, batch_size=2, lr=2e-2,
                         dtype="float32", row_tokens=64)
    train_and_export_ensemble(tiny_base, ens, tiny_questions, tiny_questions, root, "tiny-ens", log=lambda _: None)
    return root


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_beta_schedule() -> None:
    assert UQ4CTConfig(beta=0.5).beta_at(3) == 0.5
    warm = UQ4CTConfig(beta=1.0, beta_warmup_steps=50)
    assert [warm.beta_at(s) for s in (0, 25, 50, 80)] == [0.0, 0.5, 1.0, 1.0]


def test_bundle_trains_and_round_trips(root: Path, tiny_base, tiny_questions) -> None:
    bundle = read_bundle(root / "tiny-uq4ct", expect_base=tiny_base.info)
    manifest = bundle.manifest
    assert manifest.method == Method.MOE and [m.name for m in manifest.members] == ["expert-0"]
    assert manifest.artifacts == {"moe": "moe.safetensors"}
    assert manifest.method_config["num_experts"] == 4 and manifest.method_config["top_k"] == 2
    history = manifest.training["history"]
    assert history[-1]["ce"] < history[0]["ce"]
    assert 0.5 <= history[-1]["feu"] <= 1.0  # FEU ∈ [k/N, 1]
    scores, feu = moe_bundle_scores(tiny_base, bundle, tiny_questions)  # from disk, fresh hooks
    labels = torch.tensor([q.answer for q in tiny_questions])
    nll = torch.nn.functional.cross_entropy(scores, labels)
    assert float(nll) == pytest.approx(manifest.calibration.validation_metrics["uncalibrated_nll"], abs=1e-4)
    assert float(feu.mean()) == pytest.approx(manifest.method_config["validation"]["feu_mean"], abs=1e-5)


def _engine(tiny_base, root: Path):
    from service.engine.engine import UQEngine
    from service.settings import Settings

    settings = Settings(_env_file=None, bundle_root=root, preload_bundles=["tiny-uq4ct", "tiny-ens"],  # type: ignore[call-arg]
                        max_slots=4, max_lora_rank=16, max_wait_ms=30.0, torch_threads=1)
    return UQEngine(tiny_base, settings), settings


def test_engine_serves_moe_alone_and_mixed(root: Path, tiny_base, tiny_questions: list[Question]) -> None:
    from service.engine.moe_predictor import MI_NOTE
    from service.engine.types import AnswerOptions

    hooks_before = _hook_count(tiny_base.model)
    engine, _ = _engine(tiny_base, root)
    options = AnswerOptions(return_members=True)

    async def main() -> tuple[list, list, list, list, list[int], int]:
        await engine.start()
        status = await engine.load_bundle("tiny-uq4ct")
        await engine.load_bundle("tiny-ens")
        moe = await engine.answer("tiny-uq4ct", tiny_questions, options)
        ens = await engine.answer("tiny-ens", tiny_questions, options)
        moe_mixed, ens_mixed = await asyncio.gather(engine.answer("tiny-uq4ct", tiny_questions, options),
                                                    engine.answer("tiny-ens", tiny_questions, options))
        await engine.unload_bundle("tiny-uq4ct")
        await asyncio.sleep(0.2)  # the detach runs on the worker thread
        hooks = _hook_count(tiny_base.model)
        await engine.stop()
        return moe, ens, moe_mixed, ens_mixed, status.slots, hooks

    try:
        moe, ens, moe_mixed, ens_mixed, slots, hooks_after_unload = asyncio.run(main())
    finally:
        engine.multilora.remove()
    assert slots == []  # experts live in the predictor's own hooks, not in multi-LoRA slots
    bundle = read_bundle(root / "tiny-uq4ct")
    scores, feu = moe_bundle_scores(tiny_base, bundle, tiny_questions)
    want = apply_temperature(scores, bundle.manifest.calibration.temperature)
    for i, q in enumerate(tiny_questions):
        k = len(q.choices)
        got = torch.tensor(moe[i].probabilities)
        torch.testing.assert_close(got, want[i, :k], atol=1e-5, rtol=1e-5)
        assert moe[i].feu == pytest.approx(float(feu[i]), abs=1e-5) and 0.5 <= moe[i].feu <= 1.0
        assert moe[i].mutual_information is None and moe[i].expected_entropy is None and moe[i].members is None
        assert MI_NOTE in moe[i].notes and moe[i].bundle.method == "moe"
        assert moe[i].predictive_entropy == pytest.approx(float(-(got * got.log()).sum()), abs=1e-5)
        torch.testing.assert_close(torch.tensor(moe_mixed[i].probabilities), got, atol=1e-5, rtol=1e-5)
        assert moe_mixed[i].feu == pytest.approx(moe[i].feu, abs=1e-6)
        torch.testing.assert_close(torch.tensor(ens_mixed[i].probabilities), torch.tensor(ens[i].probabilities),
                                   atol=1e-5, rtol=1e-5)
        assert ens[i].feu is None and len(ens[i].members) == 2
    engine_hooks = 7 * len(decoder_layers(tiny_base.model))  # the engine's MultiLora: every projection
    assert hooks_after_unload == hooks_before + engine_hooks  # unloading removed the routers' and experts' hooks
    assert _hook_count(tiny_base.model) == hooks_before


def test_http_answer_has_feu_and_null_mi(root: Path, tiny_base) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app

    engine, settings = _engine(tiny_base, root)
    body = {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium"]}
    try:
        with TestClient(create_app(settings, engine=engine)) as client:
            moe = client.post("/v1/answer", json={**body, "bundle": "tiny-uq4ct"}).json()
            ens = client.post("/v1/answer", json={**body, "bundle": "tiny-ens"}).json()
            strict = {"thresholds": {"one_minus_feu": 0.0}}
            moe_strict = client.post("/v1/answer", json={**body, "bundle": "tiny-uq4ct", **strict}).json()
            ens_strict = client.post("/v1/answer", json={**body, "bundle": "tiny-ens", **strict}).json()
            bad = client.post("/v1/answer", json={**body, "bundle": "tiny-uq4ct", "thresholds": {"one_minus_feu": 2}})
    finally:
        engine.multilora.remove()
    assert 0 <= moe["feu"] <= 1 and moe["one_minus_feu"] == pytest.approx(1 - moe["feu"])
    assert moe["mutual_information"] is None and any("mutual_information is null" in n for n in moe["notes"])
    assert abs(sum(moe["probabilities"]) - 1) < 1e-6 and moe["bundle"]["method"] == "moe"
    assert "feu" not in ens and "one_minus_feu" not in ens and ens["mutual_information"] is not None
    # 1 − FEU is an abstention score: it trips for the routed model, and never for a method without FEU
    assert moe_strict["abstained"] and moe_strict["abstain_reasons"] == ["one_minus_feu"]
    assert moe_strict["answer"] is None and moe_strict["thresholds_used"]["sources"]["one_minus_feu"] == "request"
    assert "one_minus_feu" not in ens_strict["abstain_reasons"]
    assert bad.status_code == 422 and bad.json()["error"]["param"].endswith("one_minus_feu")
