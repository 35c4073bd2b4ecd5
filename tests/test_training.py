"""Ensemble training on the tiny model: packed scoring order, learning, the L2 prior, export → read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.answers import AnswerFormat
from core.bundle import read_bundle
from core.multilora import ALL_MODULES, LoraLayout, MultiLora
from core.scoring import ChoiceScorer
from training.ensemble import EnsembleConfig, member_scores, nll_of_scores, prior_sq_norms, train_ensemble
from training.ensemble_cli import train_and_export
from training.evaluate import bundle_member_scores
from training.trunk import TrunkCache


def _config(**overrides) -> EnsembleConfig:
    base = dict(members=2, rank=4, alpha=8.0, top_layers=2, epochs=6, batch_size=2, lr=2e-2, dtype="float32",
                row_tokens=64)
    return EnsembleConfig(**{**base, **overrides})


def test_member_scores_match_direct_scoring(tiny_base, tiny_questions) -> None:
    scorer = ChoiceScorer(tiny_base.model, tiny_base.tokenizer, AnswerFormat.CLOZE)
    multilora, _ = train_ensemble(scorer, _config(epochs=1), tiny_questions, tiny_questions[:2], log=lambda _: None)
    cache = TrunkCache(scorer, tiny_questions, split=2)
    packed_scores = member_scores(scorer, multilora, [0, 1], cache, batch_size=3)  # [N, M, K], rows hold several
    batch = scorer.pack(tiny_questions)
    for slot in (0, 1):
        with torch.no_grad(), multilora.rows(torch.full((len(tiny_questions),), slot)):
            direct = scorer.scores(batch)
        k = direct.shape[1]
        torch.testing.assert_close(packed_scores[:, slot, :k], direct, atol=1e-5, rtol=1e-5)
    multilora.remove()


def test_training_lowers_nll_and_members_differ(tiny_base, tiny_questions) -> None:
    scorer = ChoiceScorer(tiny_base.model, tiny_base.tokenizer, AnswerFormat.CLOZE)
    cache = TrunkCache(scorer, tiny_questions, split=2)
    labels = torch.tensor([q.answer for q in tiny_questions])
    before = nll_of_scores(member_scores(scorer, None, [0], cache), labels)
    multilora, log = train_ensemble(scorer, _config(), tiny_questions, tiny_questions, log=lambda _: None)
    after = nll_of_scores(member_scores(scorer, multilora, [0, 1], cache), labels)
    assert (after < before[0] - 0.1).all(), (before, after)
    a0, a1 = (torch.cat([p.flatten() for p in multilora.slot_parameters(m)]) for m in (0, 1))
    assert not torch.allclose(a0, a1)
    assert log["steps"] == 12
    multilora.remove()


@pytest.mark.parametrize("prior", ["factors", "delta"])
def test_prior_precision_pulls_weights_toward_zero(tiny_base, tiny_questions, prior) -> None:
    scorer = ChoiceScorer(tiny_base.model, tiny_base.tokenizer, AnswerFormat.CLOZE)
    norms = []
    for precision in (0.0, 4000.0):
        multilora, _ = train_ensemble(scorer, _config(members=1, prior_precision=precision, prior=prior),
                                      tiny_questions, tiny_questions[:1], log=lambda _: None)
        norms.append(float(prior_sq_norms(multilora, prior)[0]))  # the norm that prior penalizes
        multilora.remove()
    assert norms[1] < 0.5 * norms[0]


def _random_slots(tiny_base, num_slots: int = 3, rank: int = 4) -> MultiLora:
    """Layers 2-3 of the tiny model, every projection, random non-zero A and B in every slot."""
    multilora = MultiLora(tiny_base.model, LoraLayout(ALL_MODULES, (2, 3), rank, 8.0), num_slots=num_slots)
    generator = torch.Generator().manual_seed(7)
    for slot in range(num_slots):
        multilora.init_for_training(slot, generator)
    with torch.no_grad():
        for factors in multilora.factor_map.values():
            factors.lora_B.normal_(generator=generator)
            factors.scaling[1] = 0.5  # slots may carry different scalings
    return multilora


def test_prior_sq_norms_match_naive_reference(tiny_base) -> None:
    multilora = _random_slots(tiny_base)
    try:
        delta = torch.zeros(3, dtype=torch.float64)
        factors_ref = torch.zeros(3, dtype=torch.float64)
        for factors in multilora.factor_map.values():  # materialize every module's ΔW = scaling · B A
            for slot in range(3):
                a, b = factors.lora_A[slot].double(), factors.lora_B[slot].double()
                delta[slot] += (float(factors.scaling[slot]) * b @ a).pow(2).sum()
                factors_ref[slot] += a.pow(2).sum() + b.pow(2).sum()
        torch.testing.assert_close(prior_sq_norms(multilora, "delta").double(), delta, rtol=1e-5, atol=0.0)
        torch.testing.assert_close(prior_sq_norms(multilora, "factors").double(), factors_ref, rtol=1e-6, atol=0.0)
        slot_params = sum(float(p.double().pow(2).sum()) for p in multilora.slot_parameters(2))
        assert abs(float(factors_ref[2]) - slot_params) < 1e-6 * slot_params  # the old per-slot form
    finally:
        multilora.remove()


def test_delta_prior_leaves_a_alone_while_b_is_zero(tiny_base) -> None:
    multilora = MultiLora(tiny_base.model, LoraLayout(ALL_MODULES, (2, 3), 4, 8.0), num_slots=2)
    try:
        for slot in range(2):
            multilora.init_for_training(slot, torch.Generator().manual_seed(slot), scale_a=3.0)  # B = 0
        params = [p for f in multilora.factor_map.values() for p in (f.lora_A, f.lora_B)]
        for prior, a_moves in (("delta", False), ("factors", True)):
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            prior_sq_norms(multilora, prior).sum().backward()
            for factors in multilora.factor_map.values():
                assert factors.lora_A.grad is not None and factors.lora_B.grad is not None
                assert bool((factors.lora_B.grad == 0).all())  # ∂/∂B is 0 at B = 0 for both priors
                assert bool((factors.lora_A.grad != 0).any()) is a_moves, prior
    finally:
        for p in params:
            p.requires_grad_(False)
        multilora.remove()


def test_init_scale_a_scales_the_bound(tiny_base) -> None:
    multilora = MultiLora(tiny_base.model, LoraLayout(ALL_MODULES, (3,), 4, 8.0), num_slots=2)
    try:
        multilora.init_for_training(0, torch.Generator().manual_seed(0))
        multilora.init_for_training(1, torch.Generator().manual_seed(0), scale_a=4.0)
        for factors in multilora.factor_map.values():
            torch.testing.assert_close(factors.lora_A[1], 4.0 * factors.lora_A[0])
            assert bool((factors.lora_B == 0).all())
        with pytest.raises(ValueError):
            multilora.init_for_training(0, torch.Generator(), scale_a=0.0)
    finally:
        multilora.remove()


def test_export_and_reload_gives_same_scores(tiny_base, tiny_questions, tmp_path: Path) -> None:
    config = _config(epochs=2)
    manifest = train_and_export(tiny_base, config, tiny_questions, tiny_questions, tmp_path, "tiny-ens",
                                log=lambda _: None)
    assert manifest.calibration.temperature > 0 and manifest.calibration.dtype == "float32"
    assert set(manifest.calibration.reference_histograms) >= {"confidence", "predictive_entropy",
                                                              "mutual_information"}
    assert "ece" in manifest.calibration.validation_metrics
    bundle = read_bundle(tmp_path / "tiny-ens", expect_base=tiny_base.info)
    # the reloaded members give the scores the exporter calibrated on: the stored validation NLL is theirs
    reloaded = bundle_member_scores(tiny_base, bundle, tiny_questions)
    labels = torch.tensor([q.answer for q in tiny_questions])
    probs = torch.softmax(reloaded.double() / manifest.calibration.temperature, -1).mean(1)
    nll = float(-probs.gather(1, labels[:, None]).log().mean())
    assert manifest.calibration.validation_metrics["nll"] == pytest.approx(nll, abs=1e-6)
