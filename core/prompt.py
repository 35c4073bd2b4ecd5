"""The prompt a bundle carries, so training, evaluation and serving build the same tokens.

A :class:`PromptSpec` is one of

- the **built-in** prompt (no template): :func:`core.answers.prompt_prefix`, the ``mcq-v1`` layout;
- a **user template**: a Python format string (``syntax="format"``) or a Jinja template (``syntax="jinja"``,
  rendered in Jinja's sandbox) with the fields of :data:`FIELDS`;

plus, for either, an optional ``instruction`` (placed before the body, or as the system message) and
optionally the base model's own **chat template** (``chat=True``: the body becomes the user message and the
assistant turn is opened with ``add_generation_prompt``; the template text is recorded in the spec, and a
server whose tokenizer has another one refuses the bundle). The choices are scored after the rendered prefix
exactly as with the built-in prompt (``" A"`` … in letter format, ``" {choice}"`` in cloze).
"""

from __future__ import annotations

import hashlib
import json
import string
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from core.errors import InvalidQuestionError

LETTERS = string.ascii_uppercase
FIELDS = {
    "question": "the question text",
    "context": "the passage ('' when there is none)",
    "choices": "the choices as lines 'A. text'",
    "letters": "the choice letters, 'A, B, C'",
    "labels": "the choice texts, comma-separated ('billing, technical, account')",
    "num_choices": "how many choices",
}
BUILTIN_TEXT = ("[Passage: {context}\\n]Question: {question}\\n[letter format: {choices}\\n]Answer:  "
                "(uqserve's built-in mcq-v1 prompt; brackets: only when present)")


class PromptSpec(BaseModel):
    """How a question becomes the prompt prefix; part of a bundle's answer space (``manifest.answer_space``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str | None = None  # None: the built-in prompt
    syntax: Literal["format", "jinja"] = "format"
    instruction: str | None = None  # before the body, or the system message with chat=True
    chat: bool = False  # wrap in the base model's chat template (instruct models)
    chat_template: str | None = None  # the tokenizer's chat template the bundle was trained with (chat=True)

    @model_validator(mode="after")
    def _consistent(self) -> PromptSpec:
        if self.template is not None and not self.template.strip():
            raise ValueError("an empty prompt template")
        if self.template is not None:
            check_template(self.template, self.syntax)
        return self

    @property
    def builtin(self) -> bool:
        return self.template is None and not self.instruction and not self.chat

    def text(self) -> str:
        """What a reader of the manifest needs to see: the template (or the built-in's layout)."""
        return self.template if self.template is not None else BUILTIN_TEXT

    def with_tokenizer(self, tokenizer: Any) -> PromptSpec:
        """This spec with the tokenizer's chat template recorded (training does this once)."""
        if not self.chat:
            return self
        chat_template = getattr(tokenizer, "chat_template", None)
        if not chat_template:
            raise ValueError("chat=True, but the base model's tokenizer has no chat template")
        return self.model_copy(update={"chat_template": chat_template})

    def mismatch(self, tokenizer: Any) -> str | None:
        """Why this spec cannot be served with ``tokenizer`` (None when it can)."""
        if self.chat and not getattr(tokenizer, "chat_template", None):
            return "the bundle's prompt uses a chat template, but the base model's tokenizer has none"
        if self.chat and getattr(tokenizer, "chat_template", None) != self.chat_template:
            return "the base model's chat template differs from the one this bundle was trained with"
        return None

    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def _fields(question: str, context: str | None, choices: tuple[str, ...]) -> dict[str, Any]:
    return {"question": question.strip(), "context": (context or "").strip(),
            "choices": "\n".join(f"{LETTERS[i]}. {c.strip()}" for i, c in enumerate(choices)),
            "letters": ", ".join(LETTERS[: len(choices)]), "labels": ", ".join(c.strip() for c in choices),
            "num_choices": len(choices)}


@lru_cache(maxsize=64)
def _jinja(template: str) -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True).from_string(template)


def render_template(template: str, syntax: str, question: str, context: str | None, choices: tuple[str, ...]) -> str:
    values = _fields(question, context, choices)
    if syntax == "jinja":
        try:
            return str(_jinja(template).render(**values))
        except Exception as err:  # Jinja syntax, undefined-variable or sandbox errors: this question cannot be served
            raise InvalidQuestionError(f"prompt template does not render: {type(err).__name__}: {err}; fields are "
                                       f"{sorted(FIELDS)}") from None
    try:
        return template.format_map(values)
    except Exception as err:  # KeyError, IndexError, ValueError, AttributeError …: this question cannot be served
        raise InvalidQuestionError(f"prompt template: {err!r}; fields are {sorted(FIELDS)}") from None


def check_template(template: str, syntax: str) -> None:
    """Render the template once on an example, so a typo is an error at training time, not a surprise later."""
    try:
        render_template(template, syntax, "Is this an example?", "A passage.", ("yes", "no"))
    except InvalidQuestionError as err:  # includes Jinja syntax or undefined-variable errors
        raise ValueError(str(err)) from None
    except Exception as err:
        raise ValueError(f"prompt template does not render: {type(err).__name__}: {err}; fields are "
                         f"{sorted(FIELDS)}") from None


def render_prefix(spec: PromptSpec, body: str, tokenizer: Any) -> str:
    """The prefix from a rendered ``body``: the instruction first, or both inside the chat template."""
    if not spec.chat:
        return f"{spec.instruction.strip()}\n\n{body}" if spec.instruction else body
    messages = ([{"role": "system", "content": spec.instruction.strip()}] if spec.instruction else [])
    messages.append({"role": "user", "content": body})
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 chat_template=spec.chat_template)
    except Exception as err:  # no chat template, or one that refuses these messages (e.g. a system role)
        raise InvalidQuestionError(f"chat template does not render: {type(err).__name__}: {err}") from None
    return str(rendered)


def prompt_hash(payload: dict[str, Any]) -> str:
    """sha256 of a canonical JSON (what fixes a bundle's prompt tokens)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
