"""The mixed multi-LoRA forward on the tiny real model: one forward for 4 bundles × 5 members equals
per-bundle and per-member forwards row by row, equals plain peft, and the shared trunk equals full depth."""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from core.answers import AnswerFormat, Question, choice_continuations, encode_question, prompt_prefix
from core.basemodel import BaseModel
from core.multilora import ATTENTION_MODULES, MLP_MODULES
from service.engine.engine import UQEngine
from service.engine.forward import ForwardPlan, MixedForward, RowWork
from service.engine.types import AnswerOptions

# (layers, modules, rank) per bundle: different splits, module subsets and ranks below the engine's max
LAYOUTS = {
    "alpha": ((2, 3), ATTENTION_MODULES + MLP_MODULES, 4),
    "beta": ((1, 2, 3), ATTENTION_MODULES, 8),
    "gamma": ((3,), MLP_MODULES, 16),
    "delta": ((0, 1, 2, 3), ("q_proj", "v_proj"), 2),
}


def _works(engine: UQEngine, bundle: str, questions: list[Question]) -> list[RowWork]:
    entry = engine.registry.get(bundle)
    return [
        RowWork(
            encode_question(engine.base.tokenizer, q, entry.answer_format, entry.max_tokens),
            entry.answer_format,
            tuple(entry.predictor.row_slots()),
            entry.predictor.first_layer,
        )
        for q in questions
    ]


def _engine(engine_factory: Any, bundle_maker: Any, root: Path) -> UQEngine:
    for seed, (name, (layers, modules, rank)) in enumerate(LAYOUTS.items()):
        bundle_maker(root, name, members=5, layers=layers, modules=modules, rank=rank, seed=seed + 1)
    bundle_maker(root, "letters", members=2, answer_format=AnswerFormat.LETTER, seed=9)
    engine = engine_factory(root)

    async def load() -> None:
        for name in [*LAYOUTS, "letters"]:
            await engine.load_bundle(name)

    asyncio.run(load())
    return engine


def test_mixed_batch_equals_per_bundle_and_per_member(
    engine_factory: Any, bundle_maker: Any, bundle_root: Path, tiny_questions: list[Question],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = _engine(engine_factory, bundle_maker, bundle_root)
    works = {name: _works(engine, name, tiny_questions) for name in LAYOUTS}
    mixed_items = [w for name in LAYOUTS for w in works[name]]
    assert sum(w.rows for w in mixed_items) == 4 * 5 * len(tiny_questions)
    calls = []
    original = ForwardPlan._group

    def spy(plan: ForwardPlan, group: list[RowWork], *args: Any) -> Any:
        calls.append(len(group))
        return original(plan, group, *args)

    monkeypatch.setattr(ForwardPlan, "_group", spy)
    mixed = engine.forward(mixed_items)  # ONE forward for every row of the 4 bundles
    assert calls == [len(mixed_items)]
    i = 0
    for name in LAYOUTS:
        alone = engine.forward(works[name])
        for scores, ref, work in zip(mixed[i : i + len(tiny_questions)], alone, works[name], strict=True):
            assert scores.shape == (5, len(work.encoded.choice_ids))
            torch.testing.assert_close(scores, ref, atol=1e-5, rtol=1e-5)
            for r, slot in enumerate(work.row_slots):  # and each member on its own
                single = RowWork(work.encoded, work.answer_format, (slot,), work.first_layer)
                torch.testing.assert_close(scores[r : r + 1], engine.forward([single])[0], atol=1e-5, rtol=1e-5)
        i += len(tiny_questions)
    # members really differ from each other and from the base model
    base_rows = RowWork(mixed_items[0].encoded, AnswerFormat.CLOZE, (-1,), 0)
    assert not torch.allclose(mixed[0][0], engine.forward([base_rows])[0][0], atol=1e-3)
    assert not torch.allclose(mixed[0][0], mixed[0][1], atol=1e-3)


def test_stepped_plan_equals_one_call(
    engine_factory: Any, bundle_maker: Any, bundle_root: Path, tiny_questions: list[Question]
) -> None:
    """A forward cut into (layer, row chunk) steps computes what the one-call forward computes."""
    engine = _engine(engine_factory, bundle_maker, bundle_root)
    items = [w for name in LAYOUTS for w in _works(engine, name, tiny_questions)]
    whole = engine.forward(items)
    longest = max(w.tokens for w in items)
    plan = engine.forward.plan(items, step_cost=2 * longest)  # two rows a step
    steps = 1
    while not plan.step():
        steps += 1
    rows = sum(w.rows for w in items)
    assert steps > engine.base.info.num_layers * rows // 4  # many bounded steps, not one
    for stepped, reference in zip(plan.result(), whole, strict=True):
        torch.testing.assert_close(stepped, reference, atol=1e-5, rtol=1e-5)


def test_shared_trunk_equals_full_depth(
    engine_factory: Any, bundle_maker: Any, bundle_root: Path, tiny_questions: list[Question]
) -> None:
    engine = _engine(engine_factory, bundle_maker, bundle_root)
    full = MixedForward(engine.base.model, engine.base.tokenizer, engine.multilora, shared_trunk=False)
    for name in ("alpha", "gamma"):  # splits at layer 2 and 3
        items = _works(engine, name, tiny_questions)
        for shared, reference in zip(engine.forward(items), full(items), strict=True):
            torch.testing.assert_close(shared, reference, atol=1e-5, rtol=1e-5)


def test_mixed_answer_formats_in_one_call(
    engine_factory: Any, bundle_maker: Any, bundle_root: Path, tiny_questions: list[Question]
) -> None:
    engine = _engine(engine_factory, bundle_maker, bundle_root)
    cloze, letters = _works(engine, "alpha", tiny_questions), _works(engine, "letters", tiny_questions)
    mixed = engine.forward([x for pair in zip(cloze, letters, strict=True) for x in pair])
    for got, ref in zip(
        mixed,
        [x for pair in zip(engine.forward(cloze), engine.forward(letters), strict=True) for x in pair],
        strict=True,
    ):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _peft_probs(model: Any, tokenizer: Any, q: Question, temperature: float) -> torch.Tensor:
    prefix = tokenizer(prompt_prefix(q, AnswerFormat.CLOZE), add_special_tokens=False)["input_ids"]
    scores = []
    for cont in choice_continuations(q, AnswerFormat.CLOZE):
        ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prefix + ids])).logits[0].double(), -1)
        scores.append(sum(float(logp[len(prefix) - 1 + j, t]) for j, t in enumerate(ids)) / len(ids))
    return torch.softmax(torch.tensor(scores, dtype=torch.float64) / temperature, -1)


@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_members_equal_plain_peft(
    engine_factory: Any,
    bundle_maker: Any,
    bundle_root: Path,
    tiny_base: BaseModel,
    tiny_questions: list[Question],
    name: str,
) -> None:
    """Bundles are peft-native: a member loaded with PeftModel.from_pretrained gives the same distribution."""
    from peft import PeftModel

    layers, modules, rank = LAYOUTS[name]
    bundle_maker(bundle_root, name, members=3, layers=layers, modules=modules, rank=rank, temperature=1.7, seed=4)
    engine = engine_factory(bundle_root)

    async def answer() -> list[Any]:
        await engine.start()
        await engine.load_bundle(name)
        out = await engine.answer(name, tiny_questions, AnswerOptions(return_members=True))
        await engine.stop()
        return out

    results = asyncio.run(answer())
    for member in (0, 2):
        peft_model = PeftModel.from_pretrained(
            copy.deepcopy(tiny_base.model), str(bundle_root / name / "members" / f"m{member}")
        ).eval()
        for q, result in zip(tiny_questions, results, strict=True):
            expected = _peft_probs(peft_model, tiny_base.tokenizer, q, temperature=1.7)
            torch.testing.assert_close(
                torch.tensor(result.members[member], dtype=torch.float64), expected, atol=1e-5, rtol=1e-4
            )


def test_engine_package_never_imports_fastapi() -> None:
    code = (
        "import sys, service.engine.engine, service.engine.batcher; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
