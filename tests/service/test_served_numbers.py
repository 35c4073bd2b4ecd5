"""Every number true: what the server returns is what export calibrated and what ``uqserve eval`` reports.

On the tiny model, for an ensemble, a MAP (M = 1), Laplace bundles with each link (probit, mc, samples)
and a UQ4CT bundle:

- eval's per-question probabilities, entropy and MI equal the engine's answers (1e-5);
- the served abstention rule's coverage and selective risk on the validation questions, counted from
  the engine's decisions, equal what the manifest states;
- a Laplace question gets the same answer alone, beside a 5-choice question, and in another order;
- an ensemble trained on a bf16 base is calibrated on the float32 base the server loads;
- a single-member bundle serves MI as null and stores its MI metrics as undefined, with the reason.
"""

from __future__ import annotations

import asyncio
import copy
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from core.answers import Question
from core.basemodel import BaseModel
from core.bundle import read_bundle
from service.engine.types import AnswerOptions
from training.ensemble import EnsembleConfig
from training.ensemble_cli import train_and_export
from training.evaluate import bundle_prediction
from training.laplace import CurvatureConfig
from training.laplace_cli import build_bundle
from training.uq4ct import UQ4CTConfig
from training.uq4ct_cli import train_and_export as train_and_export_moe

WORDS = ["oxygen", "carbon", "water", "moon", "earth", "helium", "iron", "salt", "sun", "ice", "gold", "sand"]
ENSEMBLE = dict(rank=4, alpha=8.0, top_layers=2, epochs=6, batch_size=4, lr=3e-2, dtype="float32", row_tokens=96)
# a loose risk target the tiny model can meet at a coverage between 0 and 1, so the rule is not trivial
RULE = {"target_risk": 0.25, "min_coverage": 0.2}


def make_questions(n: int, seed: int) -> list[Question]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(2, 5)
        choices = tuple(rng.sample(WORDS, k))
        out.append(Question(f"Which one is {choices[0]} {i % 7}?", choices, answer=rng.randrange(k), id=f"s{i}"))
    return out


@pytest.fixture(scope="module")
def questions() -> list[Question]:
    return make_questions(40, seed=1)


@pytest.fixture(scope="module")
def root(tiny_base: BaseModel, questions: list[Question], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("served-numbers")
    quiet: dict[str, Any] = {"log": lambda _: None}
    train_and_export(tiny_base, EnsembleConfig(members=3, **ENSEMBLE), questions, questions, root, "ens",
                     rule=RULE, **quiet)
    train_and_export(tiny_base, EnsembleConfig(members=1, **ENSEMBLE), questions, questions, root, "map",
                     rule=RULE, **quiet)
    for link in ("probit", "mc", "samples"):
        build_bundle(tiny_base, root / "map", questions, questions, root, f"laplace-{link}", link=link,
                     config=CurvatureConfig(batch_size=8), mc_samples=16, weight_samples=3 if link == "samples" else 0,
                     rule=RULE, **quiet)
    moe = UQ4CTConfig(num_experts=3, top_k=2, rank=4, alpha=8.0, top_layers=2, epochs=3, batch_size=4, lr=2e-2,
                      dtype="float32", row_tokens=96)
    train_and_export_moe(tiny_base, moe, questions, questions, root, "uq4ct", rule=RULE, **quiet)
    return root


BUNDLES = ["ens", "map", "laplace-probit", "laplace-mc", "laplace-samples", "uq4ct"]


def serve(engine_factory: Any, root: Path, name: str, batches: list[list[Question]],
          options: AnswerOptions | None = None) -> list[list[Any]]:
    """Answer each batch of questions as one request (concurrently, so they share forwards)."""
    engine = engine_factory(root, max_wait_ms=20.0)

    async def main() -> list[list[Any]]:
        await engine.start()
        await engine.load_bundle(name)
        out = await asyncio.gather(*(engine.answer(name, b, options or AnswerOptions()) for b in batches))
        await engine.stop()
        return list(out)

    return asyncio.run(main())


@pytest.mark.parametrize("name", BUNDLES)
def test_eval_equals_serving(name: str, root: Path, tiny_base: BaseModel, questions: list[Question],
                             engine_factory: Any) -> None:
    bundle = read_bundle(root / name, expect_base=tiny_base.info)
    offline = bundle_prediction(tiny_base, bundle, questions)
    [served] = serve(engine_factory, root, name, [questions])
    for i, (q, answer) in enumerate(zip(questions, served, strict=True)):
        k = len(q.choices)
        torch.testing.assert_close(torch.tensor(answer.probabilities, dtype=torch.float64),
                                   offline.scores.probabilities[i, :k], atol=1e-5, rtol=0)
        assert answer.predictive_entropy == pytest.approx(float(offline.scores.predictive_entropy[i]), abs=1e-5)
        if offline.has_mi:
            assert answer.mutual_information == pytest.approx(float(offline.scores.mutual_information[i]), abs=1e-5)
        else:
            assert answer.mutual_information is None
        if offline.feu is not None:
            assert answer.feu == pytest.approx(float(offline.feu[i]), abs=1e-5)


@pytest.mark.parametrize("name", BUNDLES)
def test_served_rule_on_validation_is_what_the_manifest_states(name: str, root: Path, questions: list[Question],
                                                               engine_factory: Any) -> None:
    manifest = read_bundle(root / name).manifest
    rule = manifest.thresholds.rule
    assert rule is not None and rule.n == len(questions)
    [served] = serve(engine_factory, root, name, [questions])
    answered = [a for a in served if not a.abstained]
    wrong = sum(a.answer_index != q.answer for a, q in zip(served, questions, strict=True) if not a.abstained)
    assert len(answered) / len(questions) == pytest.approx(rule.coverage, abs=1e-12)
    assert (wrong / len(answered) if answered else 0.0) == pytest.approx(rule.risk, abs=1e-12)
    assert all(a.thresholds_used.rule is not None and a.thresholds_used.rule["as_calibrated"] for a in served)
    if rule.met:
        assert rule.risk <= RULE["target_risk"] and rule.coverage >= RULE["min_coverage"]
        assert rule.scores == ("predictive_entropy",)  # one primary score unless asked for more
    else:  # an unmet target serves no threshold, and says why
        assert rule.reason and all(not a.abstained for a in served)


def test_unmet_target_stores_no_threshold(tiny_base: BaseModel, questions: list[Question], tmp_path: Path) -> None:
    manifest = train_and_export(tiny_base, EnsembleConfig(members=2, **ENSEMBLE), questions, questions, tmp_path,
                                "strict", rule={"target_risk": 0.0, "min_coverage": 0.99}, log=lambda _: None)
    t = manifest.thresholds
    assert t.rule is not None and not t.rule.met and t.rule.reason
    assert (t.predictive_entropy, t.mutual_information, t.one_minus_max_probability) == (None, None, None)
    assert "not met" in t.target


def test_laplace_answer_does_not_depend_on_the_batch(root: Path, questions: list[Question],
                                                     engine_factory: Any) -> None:
    four = next(q for q in questions if len(q.choices) == 4)
    five = [q for q in questions if len(q.choices) == 5]
    two = [q for q in questions if len(q.choices) == 2]
    for name in ("laplace-probit", "laplace-mc"):
        alone, mixed, reordered = serve(engine_factory, root, name,
                                        [[four], [five[0], four, *two[:2]], [*two[:3], five[1], four]])
        ref = alone[0]
        for other in (mixed[1], reordered[4]):
            assert other.mutual_information == pytest.approx(ref.mutual_information, abs=1e-9)
            assert other.probabilities == pytest.approx(ref.probabilities, abs=1e-7)


def test_bf16_training_is_calibrated_on_the_served_float32_base(tiny_base: BaseModel, questions: list[Question],
                                                                tmp_path: Path) -> None:
    train_base = BaseModel(model=copy.deepcopy(tiny_base.model).to(torch.bfloat16), tokenizer=tiny_base.tokenizer,
                           info=tiny_base.info)
    config = EnsembleConfig(members=2, **{**ENSEMBLE, "dtype": "bfloat16"})
    manifest = train_and_export(train_base, config, questions, questions, tmp_path, "bf16", rule=RULE,
                                serve_base=tiny_base, log=lambda _: None)
    assert manifest.calibration.dtype == "float32"
    served = bundle_prediction(tiny_base, read_bundle(tmp_path / "bf16"), questions)
    labels = torch.tensor([q.answer for q in questions])
    p_y = served.scores.probabilities.gather(1, labels[:, None])[:, 0]
    assert manifest.calibration.validation_metrics["nll"] == pytest.approx(float(-p_y.log().mean()), abs=1e-9)
    assert manifest.calibration.validation_metrics["predictive_entropy"] == pytest.approx(
        float(served.scores.predictive_entropy.mean()), abs=1e-9)


def test_single_member_mi_is_undefined_not_zero(root: Path, questions: list[Question], engine_factory: Any) -> None:
    manifest = read_bundle(root / "map").manifest
    metrics, undefined = manifest.calibration.validation_metrics, manifest.calibration.undefined_metrics
    mi_metrics = {"mutual_information", "auroc_mi"}
    assert mi_metrics <= set(undefined) and not mi_metrics & set(metrics)
    assert "single-member" in undefined["auroc_mi"]
    assert "mutual_information" not in manifest.calibration.reference_histograms
    [served] = serve(engine_factory, root, "map", [questions[:3]])
    assert all(a.mutual_information is None and a.expected_entropy is None for a in served)
    assert any("single-member" in note for note in served[0].notes)


def test_http_states_the_calibrated_rule(root: Path, tiny_base: BaseModel, questions: list[Question],
                                         settings_factory: Any) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.engine.engine import UQEngine

    settings = settings_factory(root, preload_bundles=["ens"])
    engine = UQEngine(tiny_base, settings)
    rule = read_bundle(root / "ens").manifest.thresholds.rule
    assert rule is not None
    try:
        with TestClient(create_app(settings, engine=engine)) as client:
            listed = client.get("/v1/bundles")
            assert listed.status_code == 200, listed.text
            [info] = listed.json()["bundles"]
            assert info["abstention_rule"]["coverage"] == rule.coverage and info["abstention_rule"]["n"] == rule.n
            q = questions[0]
            body = {"bundle": "ens", "question": q.question, "choices": list(q.choices)}
            answer = client.post("/v1/answer", json=body).json()
            assert answer["thresholds_used"]["rule"]["as_calibrated"] is True
            assert answer["thresholds_used"]["rule"]["risk"] == rule.risk
            changed = client.post("/v1/answer", json={**body, "thresholds": {"mutual_information": 0.5}}).json()
            assert changed["thresholds_used"]["rule"]["as_calibrated"] is False
    finally:
        engine.multilora.remove()
