"""Ensemble training on the tiny model: packed scoring order, learning, the L2 prior, export → read."""

from __future__ import annotations

from pathlib import Path

import torch

from core.answers import AnswerFormat
from core.bundle import AnswerSpaceSpec, LoraSpec, Method, read_bundle
from core.scoring import ChoiceScorer
from training.ensemble import EnsembleConfig, member_scores, nll_of_scores, train_ensemble
from training.evaluate import bundle_member_scores
from training.export import export_bundle
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


def test_prior_precision_pulls_weights_toward_zero(tiny_base, tiny_questions) -> None:
    scorer = ChoiceScorer(tiny_base.model, tiny_base.tokenizer, AnswerFormat.CLOZE)
    norms = []
    for precision in (0.0, 4000.0):
        multilora, _ = train_ensemble(scorer, _config(members=1, prior_precision=precision), tiny_questions,
                                      tiny_questions[:1], log=lambda _: None)
        norms.append(sum(float(p.pow(2).sum()) for p in multilora.slot_parameters(0)))
        multilora.remove()
    assert norms[1] < 0.5 * norms[0]


def test_export_and_reload_gives_same_scores(tiny_base, tiny_questions, tmp_path: Path) -> None:
    scorer = ChoiceScorer(tiny_base.model, tiny_base.tokenizer, AnswerFormat.CLOZE)
    config = _config(epochs=2)
    multilora, _ = train_ensemble(scorer, config, tiny_questions, tiny_questions, log=lambda _: None)
    cache = TrunkCache(scorer, tiny_questions, split=multilora.layout.first_layer)
    scores = member_scores(scorer, multilora, [0, 1], cache)
    labels = torch.tensor([q.answer for q in tiny_questions])
    layout = multilora.layout
    manifest = export_bundle(
        out_dir=tmp_path, name="tiny-ens", method=Method.ENSEMBLE, base=tiny_base.info,
        lora=LoraSpec(rank=layout.rank, alpha=layout.alpha, target_modules=layout.target_modules, layers=layout.layers),
        answer_space=AnswerSpaceSpec(answer_format=AnswerFormat.CLOZE), members={
            f"member-{m}": multilora.peft_state_dict(m) for m in range(2)}, seeds={}, weights=torch.full((2,), 0.5),
        val_scores=scores, val_labels=labels, training={"config": config.model_dump(mode="json")}, data_hashes={})
    multilora.remove()
    assert manifest.calibration.temperature > 0
    assert set(manifest.calibration.reference_histograms) >= {"confidence", "predictive_entropy",
                                                              "mutual_information"}
    assert "ece" in manifest.calibration.validation_metrics
    bundle = read_bundle(tmp_path / "tiny-ens", expect_base=tiny_base.info)
    reloaded = bundle_member_scores(tiny_base, bundle, tiny_questions)
    torch.testing.assert_close(reloaded, scores)
