"""Choice scoring: one packed forward of a Llama-family model → per-row K choice scores.

The forward is split at a layer ``k`` so that a frozen **trunk** (layers ``< k``, no adapter there) runs
once per question and its hidden states fan out to the R adapter rows (ensemble members, bundles)
that run the **upper** layers ``k..L-1``. With ``k = 0`` it is the plain full-depth forward.
Training caches the trunk's output for the whole training set; serving computes it per batch.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch

from core.answers import AnswerFormat, PackedBatch, Question, choice_scores, encode_question, pack_questions
from core.multilora import decoder_layers
from core.prompt import PromptSpec

DEFAULT_MAX_TOKENS = 768


class ChoiceScorer:
    """Scores multiple-choice questions with a frozen causal LM (plus whatever LoRA hooks are active)."""

    def __init__(self, model: Any, tokenizer: Any, answer_format: AnswerFormat,
                 max_tokens: int = DEFAULT_MAX_TOKENS, prompt: PromptSpec | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.answer_format = AnswerFormat(answer_format)
        self.max_tokens = max_tokens
        self.prompt = prompt
        self.layers = decoder_layers(model)
        self.num_layers = len(self.layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def pack(self, questions: list[Question]) -> PackedBatch:
        encoded = [encode_question(self.tokenizer, q, self.answer_format, self.max_tokens, self.prompt)
                   for q in questions]
        return pack_questions(encoded, self.answer_format).to(self.device)

    def _additive_mask(self, attention: torch.Tensor) -> torch.Tensor:
        """bool [B, 1, T, T] (True = attend) → additive float mask in the model's dtype."""
        zero = torch.zeros((), dtype=self.dtype, device=attention.device)
        return torch.where(attention, zero, torch.finfo(self.dtype).min)

    def run_layers(self, hidden: torch.Tensor, batch: PackedBatch, start: int, stop: int,
                   row_question: torch.Tensor | None = None) -> torch.Tensor:
        """Run decoder layers ``start..stop-1``. hidden [R, T, D]; row_question [R] maps rows to packed questions."""
        if start >= stop:
            return hidden
        positions = batch.position_ids if row_question is None else batch.position_ids[row_question]
        attention = batch.attention if row_question is None else batch.attention[row_question]
        mask = self._additive_mask(attention)
        rotary = self.model.model.rotary_emb(hidden, position_ids=positions)
        for layer in self.layers[start:stop]:
            hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
        return hidden

    def trunk(self, batch: PackedBatch, stop: int) -> torch.Tensor:
        """Embeddings and layers ``0..stop-1``: [B, T, D], one row per question."""
        hidden = self.model.model.embed_tokens(batch.input_ids)
        return self.run_layers(hidden, batch, 0, stop)

    def upper(self, hidden: torch.Tensor, batch: PackedBatch, start: int,
              row_question: torch.Tensor) -> torch.Tensor:
        """Layers ``start..L-1`` and the answer head for R rows. hidden [B, T, D] (per question) → scores [R, K]."""
        rows = hidden[row_question]
        rows = self.run_layers(rows, batch, start, self.num_layers, row_question)
        return self.head(rows, batch, row_question)

    def head(self, hidden: torch.Tensor, batch: PackedBatch, row_question: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm + LM head at the scored positions only → choice scores.

        With ``row_question`` [R] (one question per packed row): hidden row i holds question
        ``row_question[i]``; returns [R, K]. Without it: hidden [B, T, D] are the packed rows themselves
        and the result is [Q, K] for all Q packed questions (rows holding several questions).
        """
        steps = self.head_steps(hidden, batch, row_question)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    def head_steps(self, hidden: torch.Tensor, batch: PackedBatch, row_question: torch.Tensor | None = None,
                   tokens_per_step: int = 512) -> Generator[None, None, torch.Tensor]:
        """:meth:`head` as a generator that yields after every ``tokens_per_step`` scored tokens (each costs a
        vocabulary-wide log-softmax) and returns the scores; lets a scheduler stop between chunks."""
        if row_question is None:
            questions, source_rows = torch.arange(batch.num_questions, device=hidden.device), batch.question_row
        else:
            questions, source_rows = row_question, torch.arange(hidden.shape[0], device=hidden.device)
        pos = batch.score_pos[questions]  # [N, K, L]
        tgt = batch.score_tgt[questions]
        score_mask = batch.score_mask[questions]
        n, k, ell = pos.shape
        flat_index = (source_rows[:, None] * hidden.shape[1] + pos.reshape(n, k * ell)).reshape(-1)
        normed = self.model.model.norm(hidden.reshape(-1, hidden.shape[-1])[flat_index])  # [N·K·L, D]
        weight = self.model.lm_head.weight  # [V, D]
        targets = tgt.reshape(-1)
        if batch.answer_format == AnswerFormat.LETTER:
            token_scores = (normed * weight[targets]).sum(-1).float()
        else:
            mask = score_mask.reshape(-1)
            real_h, real_t = normed[mask], targets[mask]  # real (choice, token) pairs only
            parts = []
            step = max(1, tokens_per_step)
            for lo in range(0, real_h.shape[0], step):
                logp = torch.log_softmax((real_h[lo : lo + step] @ weight.T).float(), dim=-1)
                parts.append(logp.gather(1, real_t[lo : lo + step, None])[:, 0])
                yield
            token_scores = torch.zeros(mask.shape[0], dtype=torch.float32, device=hidden.device)
            token_scores = token_scores.masked_scatter(mask, torch.cat(parts))
        return choice_scores(token_scores.reshape(n, k, ell), score_mask, batch.choice_mask[questions])

    def scores(self, batch: PackedBatch, row_question: torch.Tensor | None = None, split: int = 0) -> torch.Tensor:
        """Full forward: choice scores [R, K] (rows default to one per question)."""
        if row_question is None:
            row_question = torch.arange(batch.num_questions, device=batch.input_ids.device)
        return self.upper(self.trunk(batch, split), batch, split, row_question)

    @torch.no_grad()
    def probabilities(self, questions: list[Question]) -> list[torch.Tensor]:
        """Base-model (or active-hook) choice probabilities, one [K_i] tensor per question."""
        batch = self.pack(questions)
        probs = torch.softmax(self.scores(batch), dim=-1)
        return [probs[i, : len(q.choices)] for i, q in enumerate(questions)]
