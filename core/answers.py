"""The answer space: one question type, one prompt template, two answer formats.

Training, evaluation and serving all build prompts and choice targets here, so a bundle trained with
``PROMPT_VERSION`` scores exactly the same token sequences when it is served.

Formats
-------
``letter``  The prompt lists the choices as ``A. …``; the K choice probabilities are the softmax over
            the logits of the K letter tokens (`` A``, `` B`` …) at the last prompt position.
``cloze``   The prompt holds only the question; choice k's score is the mean log-likelihood of its text
            (`` {choice}``) as the continuation, and the K probabilities are the softmax over the K
            scores. All K continuations are packed after the shared prefix in one sequence (see
            :func:`pack_questions`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

from core.errors import InvalidQuestionError

PROMPT_VERSION = "mcq-v1"
MIN_CHOICES = 2
MAX_CHOICES = 26
LETTERS = string.ascii_uppercase


class AnswerFormat(StrEnum):
    """How a member turns a forward pass into K choice probabilities."""

    LETTER = "letter"
    """Softmax over the choice-letter logits at the last prompt position (the seeds' format)."""
    CLOZE = "cloze"
    """Softmax over length-normalized log-likelihoods of each choice text (better for small models)."""


DEFAULT_ANSWER_FORMAT = AnswerFormat.CLOZE


@dataclass(frozen=True)
class Question:
    """A multiple-choice question; ``answer`` is the index of the correct choice when known."""

    question: str
    choices: tuple[str, ...]
    answer: int | None = None
    context: str | None = None
    id: str = ""
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        validate_question(self.question, self.choices, self.context)
        if self.answer is not None and not 0 <= self.answer < len(self.choices):
            raise InvalidQuestionError(f"answer index {self.answer} outside 0..{len(self.choices) - 1}")


def validate_question(question: str, choices: tuple[str, ...] | list[str], context: str | None) -> None:
    if not question.strip():
        raise InvalidQuestionError("question text is empty")
    if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        raise InvalidQuestionError(f"need {MIN_CHOICES}..{MAX_CHOICES} choices, got {len(choices)}")
    if any(not c.strip() for c in choices):
        raise InvalidQuestionError("every choice needs non-empty text")


def prompt_prefix(q: Question, answer_format: AnswerFormat) -> str:
    """The shared prompt: optional passage, the question, (letter format) the lettered choices, ``Answer:``."""
    parts = []
    if q.context:
        parts.append(f"Passage: {q.context.strip()}\n")
    parts.append(f"Question: {q.question.strip()}\n")
    if answer_format == AnswerFormat.LETTER:
        parts.extend(f"{LETTERS[i]}. {c.strip()}\n" for i, c in enumerate(q.choices))
    parts.append("Answer:")
    return "".join(parts)


def choice_continuations(q: Question, answer_format: AnswerFormat) -> list[str]:
    """What each choice adds after the prefix: `` A`` … in letter format, `` {text}`` in cloze."""
    if answer_format == AnswerFormat.LETTER:
        return [f" {LETTERS[i]}" for i in range(len(q.choices))]
    return [f" {c.strip()}" for c in q.choices]


@dataclass(frozen=True)
class EncodedQuestion:
    prefix_ids: list[int]
    choice_ids: list[list[int]]  # K lists; one token each in letter format


def encode_question(tokenizer: Any, q: Question, answer_format: AnswerFormat, max_tokens: int) -> EncodedQuestion:
    """Tokenize prefix and continuations separately, so the choices share the prefix's tokens exactly."""
    prefix = tokenizer(prompt_prefix(q, answer_format), add_special_tokens=False)["input_ids"]
    conts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choice_continuations(q, answer_format)]
    if answer_format == AnswerFormat.LETTER:
        if any(len(c) != 1 for c in conts):
            raise InvalidQuestionError("the tokenizer splits a choice letter into several tokens")
        total = len(prefix)
    else:
        total = len(prefix) + sum(len(c) for c in conts)
    if any(len(c) == 0 for c in conts):
        raise InvalidQuestionError("a choice tokenizes to nothing")
    if total > max_tokens:
        # Keep the end of the prefix (question and "Answer:"), drop the start of a long passage.
        overflow = total - max_tokens
        if overflow >= len(prefix) - 8:
            raise InvalidQuestionError(f"question needs {total} tokens, limit is {max_tokens}")
        prefix = prefix[overflow:]
    return EncodedQuestion(prefix_ids=list(prefix), choice_ids=[list(c) for c in conts])


@dataclass
class PackedBatch:
    """B questions packed for one forward; shapes use T = longest packed row, K = most choices, L = longest choice.

    input_ids     [B, T]        prefix then (cloze) every choice's tokens, right-padded with 0
    position_ids  [B, T]        0..P-1 over the prefix, restarting at P for every choice
    attention     [B, 1, T, T]  bool, True = may attend: causal in the prefix, a choice sees the prefix and
                                its own earlier tokens, padding sees only itself
    score_pos     [B, K, L]     position whose next-token logits score token l of choice k
    score_tgt     [B, K, L]     the token id being scored there (letter format: L = 1, the letter id)
    score_mask    [B, K, L]     bool, real (choice, token) pairs
    choice_mask   [B, K]        bool, real choices
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention: torch.Tensor
    score_pos: torch.Tensor
    score_tgt: torch.Tensor
    score_mask: torch.Tensor
    choice_mask: torch.Tensor
    answer_format: AnswerFormat

    @property
    def num_questions(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return PackedBatch(**moved, answer_format=self.answer_format)


def pack_questions(encoded: list[EncodedQuestion], answer_format: AnswerFormat) -> PackedBatch:
    """Pack encoded questions into one right-padded batch with block attention (see :class:`PackedBatch`)."""
    cloze = answer_format == AnswerFormat.CLOZE
    lengths = [len(e.prefix_ids) + (sum(map(len, e.choice_ids)) if cloze else 0) for e in encoded]
    b, t = len(encoded), max(lengths)
    k = max(len(e.choice_ids) for e in encoded)
    ell = max(len(c) for e in encoded for c in e.choice_ids) if cloze else 1
    input_ids = torch.zeros(b, t, dtype=torch.long)
    position_ids = torch.zeros(b, t, dtype=torch.long)
    segment = torch.full((b, t), -2, dtype=torch.long)  # -1 prefix, k choice k, -2 padding
    score_pos = torch.zeros(b, k, ell, dtype=torch.long)
    score_tgt = torch.zeros(b, k, ell, dtype=torch.long)
    score_mask = torch.zeros(b, k, ell, dtype=torch.bool)
    choice_mask = torch.zeros(b, k, dtype=torch.bool)
    for i, enc in enumerate(encoded):
        p = len(enc.prefix_ids)
        input_ids[i, :p] = torch.tensor(enc.prefix_ids)
        position_ids[i, :p] = torch.arange(p)
        segment[i, :p] = -1
        choice_mask[i, : len(enc.choice_ids)] = True
        cursor = p
        for j, ids in enumerate(enc.choice_ids):
            if not cloze:
                score_pos[i, j, 0], score_tgt[i, j, 0], score_mask[i, j, 0] = p - 1, ids[0], True
                continue
            n = len(ids)
            input_ids[i, cursor : cursor + n] = torch.tensor(ids)
            position_ids[i, cursor : cursor + n] = torch.arange(p, p + n)
            segment[i, cursor : cursor + n] = j
            # token 0 is predicted from the prefix's last position, token l from the choice's token l-1
            score_pos[i, j, 0] = p - 1
            score_pos[i, j, 1:n] = torch.arange(cursor, cursor + n - 1)
            score_tgt[i, j, :n] = torch.tensor(ids)
            score_mask[i, j, :n] = True
            cursor += n
        position_ids[i, cursor:] = torch.arange(t - cursor) + (int(position_ids[i, cursor - 1]) + 1 if cursor else 0)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    sees_prefix = (segment[:, :, None] >= 0) & (segment[:, None, :] == -1)
    attention = causal & (same | sees_prefix)
    pad = segment == -2
    eye = torch.eye(t, dtype=torch.bool)
    attention = torch.where(pad[:, :, None], eye, attention)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention=attention[:, None],
        score_pos=score_pos,
        score_tgt=score_tgt,
        score_mask=score_mask,
        choice_mask=choice_mask,
        answer_format=answer_format,
    )


def choice_scores(token_logprobs: torch.Tensor, batch_rows: PackedBatch, row_question: torch.Tensor) -> torch.Tensor:
    """Per-choice scores whose softmax is the choice distribution.

    token_logprobs [R, K, L]: log p(score_tgt | prefix, earlier choice tokens) for each row (cloze), or the
    letter logits (letter, L = 1). row_question [R]: which packed question each row belongs to.
    Returns [R, K]: mean over real tokens (length-normalized log-likelihood), -inf for absent choices.
    """
    mask = batch_rows.score_mask[row_question].to(token_logprobs.dtype)
    total = (token_logprobs * mask).sum(-1)
    count = mask.sum(-1).clamp_min(1.0)
    scores = total / count
    return scores.masked_fill(~batch_rows.choice_mask[row_question], float("-inf"))
