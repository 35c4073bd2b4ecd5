"""The seeds' baselines on the tiny model: checkpoint ensemble and MC dropout trained for a few steps,
exported by the normal path, read back, checked against naive references and served over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from torch_threads import one_torch_thread

from core.answers import AnswerFormat, Question
from core.bundle import Method, read_bundle
from core.multilora import decoder_layers, parent_name, peft_key_parts
from core.scoring import ChoiceScorer
from training.baselines import (
    CheckpointEnsembleConfig,
    McDropoutConfig,
    build_checkpoint_ensemble,
    build_mc_dropout,
    dropout_masks,
    snapshot_steps,
)
from training.ensemble import EnsembleConfig, train_ensemble
from training.evaluate import bundle_prediction

TINY = dict(rank=4, alpha=8.0, top_layers=2, epochs=6, batch_size=2, lr=2e-2, dtype="float32", row_tokens=64)
P, SAMPLES, MASK_SEED = 0.3, 3, 5


@pytest.fixture(scope="module")
def built(tiny_base: Any, tiny_questions: list[Question], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both baselines trained on the tiny questions (4 questions, batch 2, 6 epochs: 12 steps) and exported."""
    root = tmp_path_factory.mktemp("bundles")
    quiet = dict(log=lambda _: None)
    with one_torch_thread():
        checkpoint = build_checkpoint_ensemble(
            tiny_base, CheckpointEnsembleConfig(**TINY, snapshots=3, snapshot_from=0.5), tiny_questions,
            tiny_questions, root, "tiny-ckpt", **quiet)
        dropout, adapter = build_mc_dropout(
            tiny_base, McDropoutConfig(**TINY, lora_dropout=P, samples=SAMPLES, mask_seed=MASK_SEED), tiny_questions,
            tiny_questions, root, "tiny-mcd", **quiet)
    return {"root": root, "checkpoint": checkpoint, "dropout": dropout, "adapter": adapter}


def test_snapshot_steps_are_evenly_spread_over_the_last_part() -> None:
    assert snapshot_steps(100, 5, 0.5) == [60, 70, 80, 90, 100]
    assert snapshot_steps(12, 3, 0.5) == [8, 10, 12]
    assert snapshot_steps(10, 2, 0.0) == [5, 10]
    with pytest.raises(ValueError, match="repeat"):
        snapshot_steps(4, 5, 0.5)
    with pytest.raises(ValueError):
        CheckpointEnsembleConfig(members=2)
    with pytest.raises(ValueError):
        McDropoutConfig(lora_dropout=0.0)


def test_checkpoint_ensemble_members_are_snapshots_of_one_run(tiny_base: Any, tiny_questions: list[Question],
                                                              built: dict[str, Any]) -> None:
    bundle = read_bundle(built["root"] / "tiny-ckpt", expect_base=tiny_base.info)
    manifest = bundle.manifest
    assert manifest.method == Method.CHECKPOINT_ENSEMBLE
    assert [m.name for m in manifest.members] == ["snapshot-0", "snapshot-1", "snapshot-2"]
    assert manifest.method_config["snapshot_steps"] == [8, 10, 12] and manifest.method_config["total_steps"] == 12
    assert len({m.seed for m in manifest.members}) == 1  # one run, one seed
    assert manifest.calibration.temperature > 0 and "mutual_information" in manifest.calibration.reference_histograms
    # the same run again (same seed and data order, no dropout): its final adapter is the last member
    scorer = ChoiceScorer(tiny_base.model, tiny_base.tokenizer, AnswerFormat.CLOZE)
    with one_torch_thread():
        multilora, _ = train_ensemble(scorer, EnsembleConfig(**TINY, members=1), tiny_questions, tiny_questions,
                                      log=lambda _: None)
    final = multilora.peft_state_dict(0)
    multilora.remove()
    last, first = bundle.members["snapshot-2"], bundle.members["snapshot-0"]
    assert set(final) == set(last)
    for key, value in final.items():
        torch.testing.assert_close(last[key], value.float(), atol=1e-6, rtol=1e-6)
    assert any(not torch.allclose(first[k], last[k]) for k in last)  # members differ


def _masked_scores(tiny_base: Any, adapter: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], scaling: float,
                   questions: list[Question]) -> torch.Tensor:
    """Naive reference: the MAP adapter's forward with the tied mask multiplied into the LoRA input x of every
    adapted projection, W0 x + s · B A (x ⊙ m / (1 − p)), by hand-written hooks. → choice scores [Q, K]."""
    layers = decoder_layers(tiny_base.model)
    handles = []
    for key, a in adapter.items():
        parts = peft_key_parts(key)
        assert parts is not None
        layer, _, name, which = parts
        if which != "A":
            continue
        b = adapter[key.replace("lora_A", "lora_B")]
        mask = masks[key]
        module = getattr(getattr(layers[layer], parent_name(name)), name)

        def hook(_m: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, a: torch.Tensor = a,
                 b: torch.Tensor = b, mask: torch.Tensor = mask) -> torch.Tensor:
            x = inputs[0] * mask / (1 - P)  # the same mask at every token position
            return output + scaling * (x @ a.T) @ b.T

        handles.append(module.register_forward_hook(hook))
    try:
        scorer = ChoiceScorer(tiny_base.model, tiny_base.tokenizer, AnswerFormat.CLOZE)
        with torch.no_grad():
            return scorer.scores(scorer.pack(questions))
    finally:
        for handle in handles:
            handle.remove()


def _ask(client: TestClient, bundle: str, q: Question) -> dict[str, Any]:
    r = client.post("/v1/answer", json={"bundle": bundle, "question": q.question, "choices": list(q.choices),
                                        "context": q.context, "return_members": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_both_baselines_are_served_over_http_and_mc_members_match_the_naive_masked_forward(
        tiny_base: Any, tiny_questions: list[Question], built: dict[str, Any]) -> None:
    from service.app import create_app
    from service.engine.engine import UQEngine
    from service.settings import Settings

    root: Path = built["root"]
    bundle = read_bundle(root / "tiny-mcd", expect_base=tiny_base.info)
    manifest = bundle.manifest
    assert manifest.method == Method.MC_DROPOUT and [m.name for m in manifest.members] == ["sample-0", "sample-1",
                                                                                           "sample-2"]
    assert {k: manifest.method_config[k] for k in ("dropout", "samples", "mask_seed")} == {
        "dropout": P, "samples": SAMPLES, "mask_seed": MASK_SEED}
    assert "tied across token positions" in manifest.method_config["masks"]
    assert manifest.training["config"]["lora_dropout"] == P
    adapter: dict[str, torch.Tensor] = built["adapter"]
    masks = dropout_masks(adapter, P, SAMPLES, MASK_SEED)
    for mine, again in zip(masks, dropout_masks(adapter, P, SAMPLES, MASK_SEED), strict=True):  # seeded
        assert mine.keys() == again.keys() and all(torch.equal(mine[k], again[k]) for k in mine)
    for s, member in enumerate(manifest.members):  # A_s = A diag(m_s) / (1 - p), B unchanged
        for key, value in bundle.members[member.name].items():
            expected = adapter[key] * masks[s][key] / (1 - P) if key in masks[s] else adapter[key]
            torch.testing.assert_close(value, expected)
    assert not torch.equal(torch.cat([m.flatten() for m in masks[0].values()]),
                           torch.cat([m.flatten() for m in masks[1].values()]))

    settings = Settings(_env_file=None, bundle_root=root, preload_bundles=["tiny-ckpt", "tiny-mcd"],  # type: ignore[call-arg]
                        max_slots=16, max_lora_rank=16, max_wait_ms=2.0, torch_threads=1,
                        state_dir=root.parent / "state")
    engine = UQEngine(tiny_base, settings)
    try:
        with one_torch_thread(), TestClient(create_app(settings, engine)) as client:
            listed = {b["name"]: b for b in client.get("/v1/bundles").json()["bundles"]}
            assert listed["tiny-ckpt"]["method"] == "checkpoint_ensemble"
            assert listed["tiny-mcd"]["method"] == "mc_dropout"
            for name, m in (("tiny-ckpt", 3), ("tiny-mcd", SAMPLES)):
                for q in tiny_questions:
                    first, again = _ask(client, name, q), _ask(client, name, q)
                    assert first["probabilities"] == again["probabilities"]  # same request, same answer
                    assert first["members"] == again["members"]
                    assert len(first["members"]) == m and all(len(p) == len(q.choices) for p in first["members"])
                    assert first["mutual_information"] is not None
            temperature = manifest.calibration.temperature
            scaling = manifest.lora.alpha / manifest.lora.rank
            unmasked = _masked_scores(tiny_base, adapter, {k: torch.full_like(v, 1 - P) for k, v in masks[0].items()},
                                      scaling, tiny_questions)  # the MAP adapter itself
            for s in range(SAMPLES):
                naive = _masked_scores(tiny_base, adapter, masks[s], scaling, tiny_questions)
                assert (naive - unmasked).nan_to_num().abs().max() > 1e-3  # the mask matters at this tolerance
                for i, q in enumerate(tiny_questions):
                    k = len(q.choices)
                    expected = torch.softmax(naive[i, :k].double() / temperature, -1)
                    served = torch.tensor(_ask(client, "tiny-mcd", q)["members"][s], dtype=torch.float64)
                    torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)
            for name in ("tiny-ckpt", "tiny-mcd"):  # `uqserve eval` gives the served numbers
                offline = bundle_prediction(tiny_base, read_bundle(root / name), tiny_questions).scores.probabilities
                for i, q in enumerate(tiny_questions):
                    served = torch.tensor(_ask(client, name, q)["probabilities"], dtype=torch.float64)
                    torch.testing.assert_close(served, offline[i, : len(q.choices)], atol=1e-5, rtol=0)
    finally:
        engine.multilora.remove()


def test_the_two_commands_write_served_bundles(tmp_path: Path) -> None:
    import json
    import random

    from replicas import tiny_model_dir

    from uqserve.cli import main

    model_dir, _ = tiny_model_dir(tmp_path / "model")
    rng = random.Random(0)
    teams = ("billing", "login", "shipping")
    rows = [{"text": f"ticket {i} on {teams[t]}", "team": teams[t]}
            for i, t in enumerate(rng.randrange(3) for _ in range(40))]
    train = tmp_path / "tickets.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--train", str(train), "--question-column", "text", "--answer-column", "team", "--labels",
              ",".join(teams), "--base-model", str(model_dir), "--epochs", "1", "--top-layers", "2", "--rank", "4",
              "--dtype", "float32", "--out", str(tmp_path / "b"), "--min-coverage", "0.05",
              "--conformal-alpha", "0.5"]  # the tiny calibration split supports alpha >= 1/(n + 1)
    with one_torch_thread():
        assert main(["train", "checkpoint-ensemble", *common, "--snapshots", "3", "--snapshot-from", "0.5",
                     "--name", "ckpt"]) == 0
        assert main(["train", "mc-dropout", *common, "--dropout", "0.2", "--samples", "3", "--mask-seed", "7",
                     "--name", "mcd"]) == 0
    ckpt = read_bundle(tmp_path / "b" / "ckpt").manifest
    mcd = read_bundle(tmp_path / "b" / "mcd").manifest
    assert ckpt.method == Method.CHECKPOINT_ENSEMBLE and len(ckpt.members) == 3
    assert ckpt.method_config["snapshot_steps"][-1] == ckpt.method_config["total_steps"] == ckpt.training["steps"]
    assert mcd.method == Method.MC_DROPOUT and len(mcd.members) == 3 and mcd.method_config["mask_seed"] == 7
    for manifest in (ckpt, mcd):  # the held-out calibration split gave the guarantees, as for any bundle
        assert manifest.calibration.conformal is not None and manifest.calibration.risk is not None
