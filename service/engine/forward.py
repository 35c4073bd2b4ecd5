"""The mixed multi-LoRA forward: rows of many bundles and members in one pass over the base model.

Semantics (the reference loop this vectorizes)::

    for item in items:                      # one question of one bundle
        for r, slot in enumerate(item.row_slots):
            scores[item][r] = choice_scores(base model + LoRA slot `slot`, item.question)

Implementation: questions are grouped by answer format (each group is one packed batch). Per group,
the trunk (embeddings + layers below ``split`` = the lowest adapted layer of any bundle in the group)
runs once per question; its hidden states fan out to the R rows of that question, and the upper layers
run once for all rows of all bundles with ``multilora.rows(row_slots)`` applying each row's adapter.

A forward can also run as a :class:`ForwardPlan` of bounded **steps** (one decoder layer for a chunk of
rows, or one chunk of the answer head), so the batcher can stop between steps and run a short question
first: a maximal batch then delays a small question by one step, not by the whole forward. The steps
compute exactly what the one-call forward computes, row by row.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from core.answers import AnswerFormat, EncodedQuestion, pack_questions
from core.multilora import MultiLora
from core.scoring import ChoiceScorer


@dataclass(frozen=True)
class RowWork:
    """One question of one bundle: its encoding and the LoRA slot of each of its R rows."""

    encoded: EncodedQuestion
    answer_format: AnswerFormat
    row_slots: tuple[int, ...]  # [R], -1 = base model
    first_layer: int  # lowest layer the bundle adapts; layers below can be shared across its rows
    # Method-specific forward (e.g. Laplace: MAP forward + Jacobians, which needs autograd). None = the shared
    # no-grad multi-LoRA forward below. Items with the same callable run together in one call, which returns
    # one tensor per item (its rows need not match row_slots; the bundle's predictor reads them back).
    custom: CustomForward | None = None

    @property
    def rows(self) -> int:
        return len(self.row_slots)

    @property
    def tokens(self) -> int:
        """Tokens of this question's packed row (prefix, then every choice in cloze format)."""
        enc = self.encoded
        if self.answer_format == AnswerFormat.LETTER:
            return len(enc.prefix_ids)
        return len(enc.prefix_ids) + sum(len(c) for c in enc.choice_ids)

    @property
    def cost(self) -> int:
        """What admission and batching count: rows × tokens (the layers' work grows with both)."""
        return self.rows * max(1, self.tokens)


CustomForward = Callable[[ChoiceScorer, list[RowWork]], list[torch.Tensor]]


class MixedForward:
    """Runs :class:`RowWork` items together; call only from the engine's single worker thread."""

    def __init__(self, model: Any, tokenizer: Any, multilora: MultiLora, shared_trunk: bool = True) -> None:
        self.scorer = ChoiceScorer(model, tokenizer, AnswerFormat.CLOZE)  # the format comes with each batch
        self.multilora = multilora
        self.shared_trunk = shared_trunk

    def __call__(self, items: list[RowWork]) -> list[torch.Tensor]:
        """Choice scores per item: [R_i, K_i] float32 (softmax over K_i = the row's choice distribution)."""
        return self.plan(items, step_cost=None).run()

    def plan(self, items: list[RowWork], step_cost: int | None) -> ForwardPlan:
        """The same forward as :meth:`__call__`, as steps of about ``step_cost`` row-tokens per layer
        (None: one step per group)."""
        return ForwardPlan(self, items, step_cost)


class ForwardPlan:
    """One batch's forward, advanced by :meth:`step` on the worker thread until :attr:`done`."""

    def __init__(self, forward: MixedForward, items: list[RowWork], step_cost: int | None) -> None:
        self.forward = forward
        self.items = items
        self.step_cost = step_cost
        self.outputs: list[torch.Tensor | None] = [None] * len(items)
        self.done = False
        self._steps = self._all_steps()

    def step(self) -> bool:
        """Run the next step; True when the whole forward is done (then :meth:`result` holds the scores)."""
        with torch.inference_mode():
            try:
                next(self._steps)
            except StopIteration:
                self.done = True
        return self.done

    def run(self) -> list[torch.Tensor]:
        while not self.step():
            pass
        return self.result()

    def result(self) -> list[torch.Tensor]:
        return [s for s in self.outputs if s is not None]

    def _all_steps(self) -> Iterator[None]:
        groups: dict[AnswerFormat, list[int]] = defaultdict(list)
        custom: dict[CustomForward, list[int]] = defaultdict(list)
        for i, item in enumerate(self.items):
            if item.custom is not None:
                custom[item.custom].append(i)
            else:
                groups[item.answer_format].append(i)
        scorer = self.forward.scorer
        for run_custom, indices in custom.items():  # method-specific forwards (see RowWork.custom): one step each
            for i, scores in zip(indices, run_custom(scorer, [self.items[i] for i in indices]), strict=True):
                self.outputs[i] = scores
            yield
        for answer_format, indices in groups.items():
            yield from self._group([self.items[i] for i in indices], indices, answer_format)

    def _chunks(self, count: int, tokens: int) -> list[slice]:
        """Slices of ``count`` rows of ``tokens`` each, about ``step_cost`` row-tokens a chunk."""
        size = count if self.step_cost is None else max(1, self.step_cost // max(1, tokens))
        return [slice(lo, min(count, lo + size)) for lo in range(0, count, size)]

    def _group(self, group: list[RowWork], indices: list[int], answer_format: AnswerFormat) -> Iterator[None]:
        scorer, _multilora = self.forward.scorer, self.forward.multilora
        device = scorer.device
        batch = pack_questions([item.encoded for item in group], answer_format).to(device)
        split = min(item.first_layer for item in group) if self.forward.shared_trunk else 0
        row_question = torch.repeat_interleave(torch.arange(len(group)),
                                               torch.tensor([item.rows for item in group])).to(device)
        row_slots = torch.tensor([s for item in group for s in item.row_slots], dtype=torch.long).to(device)
        hidden = scorer.model.model.embed_tokens(batch.input_ids)  # [B, T, D], no adapter below split
        yield from self._layers(hidden, batch, 0, split, None, None)
        rows = hidden[row_question]  # [R, T, D]
        yield from self._layers(rows, batch, split, scorer.num_layers, row_question, row_slots)
        # a scored token costs a vocabulary-wide log-softmax, ~8 times a token's pass through one layer
        head_tokens = 512 if self.step_cost is None else max(16, self.step_cost // 8)
        scores = (yield from scorer.head_steps(rows, batch, row_question, head_tokens)).float().cpu()  # [R, K]
        start = 0
        for i, item in zip(indices, group, strict=True):
            k = len(item.encoded.choice_ids)
            self.outputs[i] = scores[start : start + item.rows, :k]
            start += item.rows

    def _layers(self, hidden: torch.Tensor, batch: Any, start: int, stop: int, row_question: torch.Tensor | None,
                row_slots: torch.Tensor | None) -> Iterator[None]:
        """Decoder layers ``start..stop-1`` over ``hidden`` [N, T, D] in place, one (layer, row chunk) a step.
        ``row_question`` [N] maps rows to packed questions (None: one row per question); ``row_slots`` [N]
        are the rows' LoRA slots (None: no adapter)."""
        if start >= stop:
            return
        scorer, multilora = self.forward.scorer, self.forward.multilora
        positions = batch.position_ids if row_question is None else batch.position_ids[row_question]
        attention = batch.attention if row_question is None else batch.attention[row_question]
        mask = scorer._additive_mask(attention)
        cos, sin = scorer.model.model.rotary_emb(hidden, position_ids=positions)
        chunks = self._chunks(hidden.shape[0], hidden.shape[1])
        for layer in scorer.layers[start:stop]:
            for chunk in chunks:
                with multilora.rows(None if row_slots is None else row_slots[chunk]):
                    hidden[chunk] = layer(hidden[chunk], attention_mask=mask[chunk], position_ids=positions[chunk],
                                          position_embeddings=(cos[chunk], sin[chunk]))
                if len(chunks) > 1:
                    yield
            if len(chunks) == 1:
                yield
