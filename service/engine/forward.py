"""The mixed multi-LoRA forward: rows of many bundles and members in one pass over the base model.

Semantics (the reference loop this vectorizes)::

    for item in items:                      # one question of one bundle
        for r, slot in enumerate(item.row_slots):
            scores[item][r] = choice_scores(base model + LoRA slot `slot`, item.question)

Implementation: questions are grouped by answer format (each group is one packed batch). Per group,
the trunk (embeddings + layers below ``split`` = the lowest adapted layer of any bundle in the group)
runs once per question; its hidden states fan out to the R rows of that question, and the upper layers
run once for all rows of all bundles with ``multilora.rows(row_slots)`` applying each row's adapter.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
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


CustomForward = Callable[[ChoiceScorer, list[RowWork]], list[torch.Tensor]]


class MixedForward:
    """Runs :class:`RowWork` items together; call only from the engine's single worker thread."""

    def __init__(self, model: Any, tokenizer: Any, multilora: MultiLora, shared_trunk: bool = True) -> None:
        self.scorer = ChoiceScorer(model, tokenizer, AnswerFormat.CLOZE)  # the format comes with each batch
        self.multilora = multilora
        self.shared_trunk = shared_trunk

    @torch.inference_mode()
    def __call__(self, items: list[RowWork]) -> list[torch.Tensor]:
        """Choice scores per item: [R_i, K_i] float32 (softmax over K_i = the row's choice distribution)."""
        out: list[torch.Tensor | None] = [None] * len(items)
        groups: dict[AnswerFormat, list[int]] = defaultdict(list)
        custom: dict[CustomForward, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            if item.custom is not None:
                custom[item.custom].append(i)
            else:
                groups[item.answer_format].append(i)
        for forward, indices in custom.items():  # method-specific forwards (see RowWork.custom)
            for i, scores in zip(indices, forward(self.scorer, [items[i] for i in indices]), strict=True):
                out[i] = scores
        for answer_format, indices in groups.items():
            group = [items[i] for i in indices]
            for i, scores in zip(indices, self._group(group, answer_format), strict=True):
                out[i] = scores
        return [s for s in out if s is not None]

    def _group(self, group: list[RowWork], answer_format: AnswerFormat) -> list[torch.Tensor]:
        device = self.scorer.device
        batch = pack_questions([item.encoded for item in group], answer_format).to(device)
        split = min(item.first_layer for item in group) if self.shared_trunk else 0
        row_question = torch.repeat_interleave(torch.arange(len(group)),
                                               torch.tensor([item.rows for item in group])).to(device)
        row_slots = torch.tensor([s for item in group for s in item.row_slots], dtype=torch.long).to(device)
        hidden = self.scorer.trunk(batch, split)  # [B, T, D], no adapter below split
        with self.multilora.rows(row_slots):
            scores = self.scorer.upper(hidden, batch, split, row_question)  # [R, K]
        scores = scores.float().cpu()
        result, start = [], 0
        for item in group:
            k = len(item.encoded.choice_ids)
            result.append(scores[start : start + item.rows, :k])
            start += item.rows
        return result
