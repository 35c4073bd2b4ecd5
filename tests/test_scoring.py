"""Packed scoring equals K separate forwards; the split trunk/upper forward equals the full forward."""

from __future__ import annotations

import pytest
import torch

from core.answers import AnswerFormat, choice_continuations, prompt_prefix
from core.scoring import ChoiceScorer


def _reference_scores(model, tokenizer, q, fmt):
    prefix = tokenizer(prompt_prefix(q, fmt), add_special_tokens=False)["input_ids"]
    out = []
    for cont in choice_continuations(q, fmt):
        ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prefix + ids])).logits[0].double()
        if fmt == AnswerFormat.LETTER:
            out.append(float(logits[len(prefix) - 1, ids[0]]))
        else:
            logp = torch.log_softmax(logits, -1)
            out.append(sum(float(logp[len(prefix) - 1 + j, t]) for j, t in enumerate(ids)) / len(ids))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("fmt", list(AnswerFormat))
def test_packed_batch_matches_separate_forwards(tiny_base, tiny_questions, fmt) -> None:
    scorer = ChoiceScorer(tiny_base.model, tiny_base.tokenizer, fmt)
    with torch.no_grad():
        scores = scorer.scores(scorer.pack(tiny_questions))
    for i, q in enumerate(tiny_questions):
        ref = _reference_scores(tiny_base.model, tiny_base.tokenizer, q, fmt)
        k = len(q.choices)
        torch.testing.assert_close(scores[i, :k].double(), ref, atol=1e-4, rtol=1e-4)
        assert torch.isinf(scores[i, k:]).all()


@pytest.mark.parametrize("split", [1, 2, 3])
def test_trunk_split_equals_full_forward(tiny_base, tiny_questions, split) -> None:
    scorer = ChoiceScorer(tiny_base.model, tiny_base.tokenizer, AnswerFormat.CLOZE)
    batch = scorer.pack(tiny_questions)
    with torch.no_grad():
        full = scorer.scores(batch, split=0)
        rows = torch.tensor([0, 0, 1, 2, 3, 3])
        fanned = scorer.upper(scorer.trunk(batch, split), batch, split, rows)
    torch.testing.assert_close(fanned, full[rows])


@pytest.mark.parametrize("fmt", list(AnswerFormat))
def test_several_questions_per_row_match_one_per_row(tiny_base, tiny_questions, fmt) -> None:
    from core.answers import encode_question, pack_rows

    scorer = ChoiceScorer(tiny_base.model, tiny_base.tokenizer, fmt)
    encoded = [encode_question(tiny_base.tokenizer, q, fmt, 512) for q in tiny_questions]
    packed = pack_rows([[encoded[2], encoded[0]], [encoded[3], encoded[1]]], fmt)
    with torch.no_grad():
        one_per_row = scorer.scores(scorer.pack(tiny_questions))
        hidden = scorer.run_layers(tiny_base.model.model.embed_tokens(packed.input_ids), packed, 0, scorer.num_layers)
        several = scorer.head(hidden, packed)
    torch.testing.assert_close(several, one_per_row[[2, 0, 3, 1]], atol=1e-5, rtol=1e-5)
