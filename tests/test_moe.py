"""Mixture-of-LoRA-experts math (core.moe): routing vs a reference loop, identical experts = one LoRA, FEU
bounds, the load-balance loss on hand-computed cases, and the calibration term's gradient into the routers."""

from __future__ import annotations

import pytest
import torch

from core.answers import AnswerFormat, encode_question, pack_rows, packed_length
from core.moe import (
    MixLora,
    MoeLayout,
    calibration_loss,
    feu_per_question,
    load_balance_loss,
    mixture_delta,
    question_token_owner,
    route,
)
from core.multilora import ALL_MODULES, LoraLayout, MultiLora
from core.scoring import ChoiceScorer


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_route_matches_reference_loop(top_k: int) -> None:
    logits = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(top_k)) * 2
    routing = route(logits, top_k)
    for idx in torch.cartesian_prod(torch.arange(3), torch.arange(5)):
        p = torch.softmax(logits[idx[0], idx[1]].double(), -1).tolist()
        ranked = sorted(range(6), key=lambda i: -p[i])[:top_k]
        mass = sum(p[i] for i in ranked)
        want = [p[i] / mass if i in ranked else 0.0 for i in range(6)]
        torch.testing.assert_close(routing.gates[idx[0], idx[1]].double(), torch.tensor(want, dtype=torch.float64))
        assert abs(float(routing.kept_mass[idx[0], idx[1]]) - mass) < 1e-6
        assert int(routing.top1[idx[0], idx[1]]) == ranked[0]
    torch.testing.assert_close(routing.gates.sum(-1), torch.ones(3, 5))  # renormalized


def test_mixture_delta_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    x, a, b = torch.randn(2, 3, 5, generator=g), torch.randn(4, 2, 5, generator=g), torch.randn(4, 7, 2, generator=g)
    gates = route(torch.randn(2, 3, 4, generator=g), 2).gates
    out = mixture_delta(x, a, b, gates, scaling=1.5)
    for r in range(2):
        for t in range(3):
            want = sum(gates[r, t, i] * 1.5 * (b[i] @ (a[i] @ x[r, t])) for i in range(4))
            torch.testing.assert_close(out[r, t], want, atol=1e-5, rtol=1e-5)


def _layout(**kw) -> MoeLayout:
    return MoeLayout(**{"target_modules": ALL_MODULES, "layers": (2, 3), "num_experts": 4, "rank": 3, "alpha": 6.0,
                        "top_k": 2, **kw})


def test_identical_experts_equal_single_lora(tiny_base, tiny_questions) -> None:
    scorer = ChoiceScorer(tiny_base.model, tiny_base.tokenizer, AnswerFormat.CLOZE)
    layout = _layout()
    single = MultiLora(tiny_base.model, LoraLayout(ALL_MODULES, layout.layers, layout.rank, layout.alpha), 1)
    moe = MixLora(tiny_base.model, layout)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, factors in single.factors.items():
            layer, name = key.split("_", 1)
            experts = moe.factors(int(layer), name)
            a = torch.randn(experts.lora_A.shape[1:], generator=g) * 0.3
            b = torch.randn(experts.lora_B.shape[1:], generator=g) * 0.3
            factors.lora_A[0].copy_(a)
            factors.lora_B[0].copy_(b)
            factors.scaling[0], factors.present[0] = layout.scaling, True
            experts.lora_A.copy_(a.expand_as(experts.lora_A))
            experts.lora_B.copy_(b.expand_as(experts.lora_B))
        for layer in layout.layers:
            moe.router(layer).copy_(torch.randn(moe.router(layer).shape, generator=g))  # any routing
    batch = scorer.pack(tiny_questions)
    try:
        with torch.no_grad():
            base = scorer.scores(batch)
            with single.rows(torch.zeros(len(tiny_questions), dtype=torch.long)):
                lora = scorer.scores(batch)
            with moe.active():
                mixed = scorer.scores(batch)
        assert not torch.allclose(lora, base)
        torch.testing.assert_close(mixed, lora, atol=1e-5, rtol=1e-5)
    finally:
        single.remove()
        moe.remove()


def test_question_token_owner_and_feu_bounds(tiny_base, tiny_questions) -> None:
    for fmt in AnswerFormat:
        encoded = [encode_question(tiny_base.tokenizer, q, fmt, 256) for q in tiny_questions]
        batch = pack_rows([encoded[:3], encoded[3:]], fmt)  # several questions per row, then padding
        owner = question_token_owner(batch)
        lengths = [packed_length(e, fmt) for e in encoded]
        want = torch.full_like(owner, -1)
        want[0, : sum(lengths[:3])] = torch.tensor([q for q in range(3) for _ in range(lengths[q])])
        want[1, : lengths[3]] = 3
        assert torch.equal(owner, want)
    # FEU ∈ [k/N, 1]: exactly k/N for uniform routers, → 1 for one-hot routers, in between otherwise
    n, k = 8, 2
    uniform = route(torch.zeros(2, owner.shape[1], n), k).kept_mass
    peaked = route(torch.randn(2, owner.shape[1], n) * 1e4, k).kept_mass
    random = route(torch.randn(2, owner.shape[1], n) * 3, k).kept_mass
    torch.testing.assert_close(feu_per_question([uniform, uniform], owner, 4), torch.full((4,), k / n))
    torch.testing.assert_close(feu_per_question([peaked], owner, 4), torch.ones(4))
    feu = feu_per_question([random, uniform, peaked], owner, 4)
    assert bool(((feu >= k / n) & (feu <= 1)).all())
    # padding never counts: changing the padded tokens' routing leaves FEU unchanged
    changed = random.clone()
    changed[owner < 0] = 1.0
    torch.testing.assert_close(feu_per_question([changed], owner, 4), feu_per_question([random], owner, 4))


def test_load_balance_loss_hand_computed() -> None:
    a = 0.01
    # perfect balance: F = P = 1/N → a · N · N · (1/N²) = a
    uniform = torch.full((4, 4), 0.25)
    assert float(load_balance_loss(uniform, torch.arange(4), a)) == pytest.approx(a)
    # collapse: every token on expert 0 with probability 1 → a · N
    onehot = torch.zeros(5, 4)
    onehot[:, 0] = 1
    assert float(load_balance_loss(onehot, torch.zeros(5, dtype=torch.long), a)) == pytest.approx(4 * a)
    # N = 2, three tokens: F = (2/3, 1/3), P = (0.7, 0.3) → 0.02 · (0.4667 + 0.1) = 0.011333
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6]])
    assert float(load_balance_loss(probs, probs.argmax(-1), a)) == pytest.approx(0.02 * (2 / 3 * 0.7 + 1 / 3 * 0.3))


def test_calibration_term_gradient_reaches_routers(tiny_base, tiny_questions) -> None:
    scorer = ChoiceScorer(tiny_base.model, tiny_base.tokenizer, AnswerFormat.CLOZE)
    moe = MixLora(tiny_base.model, _layout())
    moe.init_for_training(torch.Generator().manual_seed(0))  # B = 0: CE alone cannot move the routers yet
    for p in moe.trainable():
        p.requires_grad_(True)
    batch = scorer.pack(tiny_questions)
    labels = torch.tensor([q.answer for q in tiny_questions])
    try:
        for term in ("ce", "cal"):
            owner = question_token_owner(batch)
            with moe.active(record=True) as record:
                hidden = scorer.run_layers(scorer.trunk(batch, 2), batch, 2, scorer.num_layers)
            scores = scorer.head(hidden, batch)
            assert record is not None
            feu = record.feu(owner, len(tiny_questions))
            loss = torch.nn.functional.cross_entropy(scores, labels) if term == "ce" else \
                calibration_loss(scores, labels, feu)
            grads = torch.autograd.grad(loss, [moe.router(layer) for layer in (2, 3)])
            norm = sum(float(g.abs().sum()) for g in grads)
            assert (norm > 1e-6) if term == "cal" else (norm == 0.0), (term, norm)
    finally:
        moe.remove()


def test_artifact_round_trip_and_shape_check(tiny_base) -> None:
    layout = _layout(layers=(3,), target_modules=("q_proj", "down_proj"))
    moe = MixLora(tiny_base.model, layout)
    moe.init_for_training(torch.Generator().manual_seed(3))
    tensors = moe.artifact_tensors()
    other = MixLora(tiny_base.model, layout)
    try:
        other.load_artifact(tensors)
        for key, value in other.artifact_tensors().items():
            assert torch.equal(value, tensors[key])
        bad = dict(tensors)
        bad["layers.3.router.weight"] = torch.zeros(4, 65)
        del bad["layers.3.mlp.down_proj.experts.lora_B"]
        problems = other.check_tensors({**bad, "extra": torch.zeros(1)})
        assert len(problems) == 3 and any("65" in p for p in problems)
        assert set(moe.expert_peft_state_dict(1)) == {
            f"base_model.model.model.layers.3.{p}.lora_{w}.weight" for p in ("self_attn.q_proj", "mlp.down_proj")
            for w in "AB"}
    finally:
        moe.remove()
        other.remove()
