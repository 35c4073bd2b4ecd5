"""Shared-trunk cache: the frozen layers' hidden states, computed once and reused by every member and epoch.

With LoRA only on layers ``≥ split``, the output of layers ``< split`` does not depend on any trainable
weight. :class:`TrunkCache` runs them once per question (batched, no grad) and keeps each question's
hidden states ``[T_i, D]``; :meth:`TrunkCache.batch` re-pads any subset into ``[B, T, D]`` next to the
matching :class:`~core.answers.PackedBatch`. ``split = 0`` stores the token embeddings (full depth).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from core.answers import (
    EncodedQuestion,
    PackedBatch,
    Question,
    encode_question,
    pack_questions,
    pack_rows,
    packed_length,
)
from core.scoring import ChoiceScorer


class TrunkCache:
    """Per-question trunk outputs for a fixed question list. hidden[i]: [T_i, D] (``store_dtype``)."""

    def __init__(self, scorer: ChoiceScorer, questions: Sequence[Question], split: int, batch_size: int = 16,
                 store_dtype: torch.dtype = torch.float32, desc: str = "trunk") -> None:
        self.scorer = scorer
        self.questions = list(questions)
        self.split = split
        self.encoded: list[EncodedQuestion] = [
            encode_question(scorer.tokenizer, q, scorer.answer_format, scorer.max_tokens, scorer.prompt)
            for q in self.questions
        ]
        self.hidden: list[torch.Tensor] = [torch.empty(0)] * len(self.questions)
        order = sorted(range(len(self.questions)), key=lambda i: self._length(i))  # similar lengths per batch
        with torch.no_grad():
            for lo in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
                idx = order[lo : lo + batch_size]
                batch = self._pack(idx)
                out = scorer.trunk(batch, split)
                for row, i in enumerate(idx):
                    self.hidden[i] = out[row, : self._length(i)].to(store_dtype).clone()

    def _length(self, i: int) -> int:
        return packed_length(self.encoded[i], self.scorer.answer_format)

    def _pack(self, idx: Sequence[int]) -> PackedBatch:
        return pack_questions([self.encoded[i] for i in idx], self.scorer.answer_format).to(self.scorer.device)

    def batch(self, idx: Sequence[int]) -> tuple[torch.Tensor, PackedBatch, torch.Tensor]:
        """(hidden [B, T, D] in the model dtype, packed batch, labels [B]) for questions ``idx`` (repeats allowed)."""
        packed = self._pack(idx)
        t = packed.input_ids.shape[1]
        dim = self.hidden[idx[0]].shape[-1]
        hidden = torch.zeros(len(idx), t, dim, dtype=self.scorer.dtype, device=self.scorer.device)
        for row, i in enumerate(idx):
            h = self.hidden[i]
            hidden[row, : h.shape[0]] = h.to(hidden.dtype)
        labels = torch.tensor([self.questions[i].answer if self.questions[i].answer is not None else -1 for i in idx],
                              device=self.scorer.device)
        return hidden, packed, labels

    def packed_batch(self, groups: Sequence[Sequence[int]], capacity: int = 256
                     ) -> tuple[torch.Tensor, PackedBatch, list[int], torch.Tensor]:
        """Pack each group's questions into the same number of rows, several questions per row.

        Questions of group g (e.g. ensemble member g's mini-batch) are spread over R rows by longest-first
        assignment to the shortest row, R = the most rows any group needs at ``capacity`` tokens per row.
        Returns hidden [G·R, T, D], the packed batch, the cache index of each packed question [Q] (group-major;
        within a group the order differs from the input) and the group of each row [G·R]; rows of group g are
        contiguous, so LoRA factors are gathered once per group. Labels: :meth:`labels`.
        """
        lengths = [[self._length(i) for i in group] for group in groups]
        cap = max(capacity, max(max(ls) for ls in lengths))
        n_rows = max(-(-sum(ls) // cap) for ls in lengths)
        rows: list[list[int]] = []
        for group, ls in zip(groups, lengths, strict=True):
            bins: list[list[int]] = [[] for _ in range(n_rows)]
            fill = [0] * n_rows
            for j in sorted(range(len(group)), key=lambda j: -ls[j]):
                target = min(range(n_rows), key=fill.__getitem__)
                bins[target].append(group[j])
                fill[target] += ls[j]
            rows.extend(bins)
        rows = [r if r else [rows[0][0]] for r in rows]  # a group with fewer questions than rows repeats one
        packed = pack_rows([[self.encoded[i] for i in r] for r in rows], self.scorer.answer_format)
        packed = packed.to(self.scorer.device)
        hidden = torch.zeros(len(rows), packed.input_ids.shape[1], self.hidden[rows[0][0]].shape[-1],
                             dtype=self.scorer.dtype, device=self.scorer.device)
        for r, row in enumerate(rows):
            cursor = 0
            for i in row:
                h = self.hidden[i]
                hidden[r, cursor : cursor + h.shape[0]] = h.to(hidden.dtype)
                cursor += h.shape[0]
        order = [i for r in rows for i in r]
        row_group = torch.arange(len(groups), device=self.scorer.device).repeat_interleave(n_rows)
        return hidden, packed, order, row_group

    def labels(self, idx: Sequence[int]) -> torch.Tensor:
        """Answer indices [len(idx)] (-1 where unknown)."""
        return torch.tensor([self.questions[i].answer if self.questions[i].answer is not None else -1 for i in idx],
                            device=self.scorer.device)

    def __len__(self) -> int:
        return len(self.questions)
