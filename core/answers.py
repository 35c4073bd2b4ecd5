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
from core.prompt import PromptSpec, render_prefix, render_template
from core.text import check_distinct, check_text

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


def validate_question(question: str, choices: tuple[str, ...] | list[str], context: str | None, *,
                      strict: bool = False) -> None:
    """Raise :class:`InvalidQuestionError` (with ``param`` and ``code``) for a question no tokenizer can take:
    text that is not valid Unicode, a blank question or choice (whitespace or zero-width characters only), a
    choice count outside 2..26. ``strict`` (the service boundary) also refuses control characters and
    duplicate choices, which some shipped datasets hold (see :mod:`core.text`)."""
    check_text(question, "question", required=True, strict=strict)
    if context is not None:
        check_text(context, "context", required=False, strict=strict)
    if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        raise InvalidQuestionError(f"need {MIN_CHOICES}..{MAX_CHOICES} choices, got {len(choices)}", "choices",
                                   "choice_count")
    for j, choice in enumerate(choices):
        check_text(choice, f"choices.{j}", required=True, strict=strict)
    if strict:
        check_distinct(choices)


def prompt_prefix(q: Question, answer_format: AnswerFormat, prompt: PromptSpec | None = None,
                  tokenizer: Any = None) -> str:
    """The shared prompt. Built-in: optional passage, the question, (letter format) the lettered choices,
    ``Answer:``. A bundle's own :class:`~core.prompt.PromptSpec` renders its template (or the built-in body)
    and adds its instruction or chat template (which needs ``tokenizer``)."""
    if prompt is not None and not prompt.builtin:
        body = (builtin_prefix(q, answer_format) if prompt.template is None else
                render_template(prompt.template, prompt.syntax, q.question, q.context, q.choices))
        return render_prefix(prompt, body, tokenizer)
    return builtin_prefix(q, answer_format)


def builtin_prefix(q: Question, answer_format: AnswerFormat) -> str:
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


def encode_question(tokenizer: Any, q: Question, answer_format: AnswerFormat, max_tokens: int,
                    prompt: PromptSpec | None = None) -> EncodedQuestion:
    """Tokenize prefix and continuations separately, so the choices share the prefix's tokens exactly.

    Over ``max_tokens``, the built-in prompt drops the start of a long passage; a bundle's own prompt
    (template, instruction, chat template) is never cut: the question is refused instead."""
    custom = prompt is not None and not prompt.builtin
    prefix = tokenizer(prompt_prefix(q, answer_format, prompt, tokenizer), add_special_tokens=False)["input_ids"]
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
        if custom or overflow >= len(prefix) - 8:
            raise InvalidQuestionError(f"question needs {total} tokens, limit is {max_tokens}")
        prefix = prefix[overflow:]
    return EncodedQuestion(prefix_ids=list(prefix), choice_ids=[list(c) for c in conts])


@dataclass
class PackedBatch:
    """Questions packed into rows for one forward. Q questions in B rows (usually one question per row;
    training packs several short questions into one row to avoid padding). T = longest row, K = most
    choices, L = longest choice.

    input_ids     [B, T]        per question: prefix then (cloze) every choice's tokens; right-padded with 0
    position_ids  [B, T]        0..P-1 over a prefix, restarting at P for every choice and at 0 per question
    attention     [B, 1, T, T]  bool, True = may attend: causal within a prefix; a choice sees its question's
                                prefix and its own earlier tokens; nothing crosses questions; padding sees itself
    question_row  [Q]           the row holding each question
    score_pos     [Q, K, L]     position (in its row) whose next-token logits score token l of choice k
    score_tgt     [Q, K, L]     the token id scored there (letter format: L = 1, the letter id)
    score_mask    [Q, K, L]     bool, real (choice, token) pairs
    choice_mask   [Q, K]        bool, real choices
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention: torch.Tensor
    question_row: torch.Tensor
    score_pos: torch.Tensor
    score_tgt: torch.Tensor
    score_mask: torch.Tensor
    choice_mask: torch.Tensor
    answer_format: AnswerFormat

    @property
    def num_questions(self) -> int:
        return int(self.question_row.shape[0])

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return PackedBatch(**moved, answer_format=self.answer_format)


def packed_length(enc: EncodedQuestion, answer_format: AnswerFormat) -> int:
    """Tokens a question occupies in a packed row."""
    extra = sum(map(len, enc.choice_ids)) if answer_format == AnswerFormat.CLOZE else 0
    return len(enc.prefix_ids) + extra


def pack_questions(encoded: list[EncodedQuestion], answer_format: AnswerFormat) -> PackedBatch:
    """One question per row (see :class:`PackedBatch`); question i is row i."""
    return pack_rows([[e] for e in encoded], answer_format)


def pack_rows(rows: list[list[EncodedQuestion]], answer_format: AnswerFormat) -> PackedBatch:
    """Pack questions into rows, several per row allowed, with block attention (see :class:`PackedBatch`)."""
    cloze = answer_format == AnswerFormat.CLOZE
    flat = [e for row in rows for e in row]
    b = len(rows)
    t = max(sum(packed_length(e, answer_format) for e in row) for row in rows)
    k = max(len(e.choice_ids) for e in flat)
    ell = max(len(c) for e in flat for c in e.choice_ids) if cloze else 1
    q = len(flat)
    input_ids = torch.zeros(b, t, dtype=torch.long)
    position_ids = torch.zeros(b, t, dtype=torch.long)
    owner = torch.full((b, t), -1, dtype=torch.long)  # question index within the row, -1 = padding
    segment = torch.full((b, t), -2, dtype=torch.long)  # -1 prefix, j = choice j, -2 padding
    question_row = torch.zeros(q, dtype=torch.long)
    score_pos = torch.zeros(q, k, ell, dtype=torch.long)
    score_tgt = torch.zeros(q, k, ell, dtype=torch.long)
    score_mask = torch.zeros(q, k, ell, dtype=torch.bool)
    choice_mask = torch.zeros(q, k, dtype=torch.bool)
    qi = 0
    for r, row in enumerate(rows):
        cursor = 0
        for slot, enc in enumerate(row):
            p = len(enc.prefix_ids)
            start = cursor
            input_ids[r, start : start + p] = torch.tensor(enc.prefix_ids)
            position_ids[r, start : start + p] = torch.arange(p)
            owner[r, start : start + p] = slot
            segment[r, start : start + p] = -1
            question_row[qi] = r
            choice_mask[qi, : len(enc.choice_ids)] = True
            cursor = start + p
            for j, ids in enumerate(enc.choice_ids):
                if not cloze:
                    score_pos[qi, j, 0], score_tgt[qi, j, 0], score_mask[qi, j, 0] = start + p - 1, ids[0], True
                    continue
                n = len(ids)
                input_ids[r, cursor : cursor + n] = torch.tensor(ids)
                position_ids[r, cursor : cursor + n] = torch.arange(p, p + n)
                owner[r, cursor : cursor + n] = slot
                segment[r, cursor : cursor + n] = j
                # token 0 is predicted from the prefix's last position, token l from the choice's token l-1
                score_pos[qi, j, 0] = start + p - 1
                score_pos[qi, j, 1:n] = torch.arange(cursor, cursor + n - 1)
                score_tgt[qi, j, :n] = torch.tensor(ids)
                score_mask[qi, j, :n] = True
                cursor += n
            qi += 1
        position_ids[r, cursor:] = torch.arange(t - cursor)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same_question = (owner[:, :, None] == owner[:, None, :]) & (owner[:, :, None] >= 0)
    same_segment = segment[:, :, None] == segment[:, None, :]
    sees_prefix = (segment[:, :, None] >= 0) & (segment[:, None, :] == -1)
    attention = causal & same_question & (same_segment | sees_prefix)
    pad = owner < 0
    attention = torch.where(pad[:, :, None], torch.eye(t, dtype=torch.bool), attention)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention=attention[:, None],
        question_row=question_row,
        score_pos=score_pos,
        score_tgt=score_tgt,
        score_mask=score_mask,
        choice_mask=choice_mask,
        answer_format=answer_format,
    )


def choice_scores(token_logprobs: torch.Tensor, score_mask: torch.Tensor, choice_mask: torch.Tensor) -> torch.Tensor:
    """Per-choice scores whose softmax is the choice distribution.

    token_logprobs [N, K, L]: log p(scored token | prefix, earlier choice tokens) (cloze), or the letter
    logits (letter, L = 1); score_mask [N, K, L] and choice_mask [N, K] for the same N questions.
    Returns [N, K]: mean over real tokens (length-normalized log-likelihood), -inf for absent choices.
    """
    mask = score_mask.to(token_logprobs.dtype)
    scores = (token_logprobs * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
    return scores.masked_fill(~choice_mask, float("-inf"))
