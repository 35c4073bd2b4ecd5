"""What text a question may hold: one definition for :class:`core.answers.Question` and the HTTP schema.

Three classes of characters matter:

* **unencodable**: lone UTF-16 surrogates (U+D800..U+DFFF) cannot be written as UTF-8, so no tokenizer,
  log or database can take them. Never allowed.
* **control**: category Cc except tab, newline and carriage return (C0, DEL, C1). A Hugging Face tokenizer
  encodes them, but they are invisible, PostgreSQL text refuses NUL, and a prompt holding them is not the
  text a person meant. Refused at the service boundary (``strict``); some shipped datasets (MMLU's
  mojibake, one ARC item) hold C1 controls, so training data keeps them.
* **blank**: whitespace (Unicode White_Space), format characters (category Cf: zero-width space, word
  joiner, BOM, bidi marks, …) and the other default-ignorable code points (Hangul fillers, variation
  selectors, …). A text made only of blank (or control) characters shows nothing and is refused.

:data:`TEXT_PATTERN` and :data:`OPTIONAL_TEXT_PATTERN` state the same rules as JSON-schema patterns
(ECMA-262 and Python ``re`` read them alike: ``\\uXXXX`` escapes, literal astral characters).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from core.errors import InvalidQuestionError

_ALLOWED_CONTROLS = "\t\n\r"
# default-ignorable code points outside category Cf (Unicode's DerivedCoreProperties), zero-width in print
_IGNORABLE_EXTRA = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x3164, 0x3164),
                    (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xE0100, 0xE01EF))


# control, whitespace and format characters all lie in planes 0, 1 and 14: scanning only those keeps import fast
_PLANES = (range(0, 0xD800), range(0xE000, 0x20000), range(0xE0000, 0xE1000))


def _code_points(keep: Callable[[str], bool]) -> list[int]:
    return [cp for plane in _PLANES for cp in plane if keep(chr(cp))]


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) == "Cc" and ch not in _ALLOWED_CONTROLS


def _is_blank(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch) == "Cf"


CONTROL_CHARS = frozenset(chr(cp) for cp in _code_points(_is_control))
BLANK_CHARS = frozenset(chr(cp) for cp in _code_points(_is_blank)).union(
    chr(cp) for lo, hi in _IGNORABLE_EXTRA for cp in range(lo, hi + 1)) - CONTROL_CHARS
_BLANK_STR = "".join(sorted(BLANK_CHARS))


def _ranges(chars: frozenset[str]) -> list[tuple[int, int]]:
    points = sorted(map(ord, chars))
    out: list[tuple[int, int]] = []
    for cp in points:
        if out and out[-1][1] == cp - 1:
            out[-1] = (out[-1][0], cp)
        else:
            out.append((cp, cp))
    return out


def _escape(cp: int) -> str:
    return f"\\u{cp:04x}" if cp <= 0xFFFF else chr(cp)  # astral: literal (no portable escape exists)


def _class_body(chars: frozenset[str]) -> str:
    return "".join(_escape(lo) if lo == hi else f"{_escape(lo)}-{_escape(hi)}" for lo, hi in _ranges(chars))


_CONTROL_BODY = _class_body(CONTROL_CHARS)
_BLANK_BODY = _class_body(BLANK_CHARS)
TEXT_PATTERN = f"^[^{_CONTROL_BODY}]*[^{_CONTROL_BODY}{_BLANK_BODY}][^{_CONTROL_BODY}]*$"
"""A required text (question, choice): no control character and at least one visible character."""
OPTIONAL_TEXT_PATTERN = f"^[^{_CONTROL_BODY}]*$"
"""An optional text (context): no control character; may be empty or blank."""

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile(f"[{_CONTROL_BODY}]")
_VISIBLE = re.compile(f"[^{_CONTROL_BODY}{_BLANK_BODY}\ud800-\udfff]")


def is_blank(text: str) -> bool:
    """True when ``text`` shows nothing: only whitespace, format/ignorable and control characters."""
    return _VISIBLE.search(text) is None


def check_text(text: str, param: str, *, required: bool, strict: bool) -> None:
    """Raise :class:`InvalidQuestionError` (with ``param``) for unencodable, blank (when ``required``) or,
    when ``strict``, control-character text."""
    found = _SURROGATE.search(text)
    if found:
        raise InvalidQuestionError(f"{param} is not valid Unicode: lone surrogate U+{ord(found.group()):04X} at "
                                   f"position {found.start()} cannot be encoded as UTF-8", param, "invalid_text")
    if strict:
        found = _CONTROL.search(text)
        if found:
            raise InvalidQuestionError(f"{param} holds control character U+{ord(found.group()):04X} at position "
                                       f"{found.start()}: only tab, newline and carriage return are allowed",
                                       param, "invalid_text")
    if required and is_blank(text):
        raise InvalidQuestionError(f"{param} is blank: it needs a visible character (whitespace and "
                                   "zero-width characters do not count)", param, "blank_text")


def choice_key(choice: str) -> str:
    """What two choices are compared by: NFC-normalized, blank characters stripped from both ends (the
    prompt strips whitespace), so choices a reader cannot tell apart compare equal."""
    return unicodedata.normalize("NFC", choice).strip(_BLANK_STR)


def check_distinct(choices: tuple[str, ...] | list[str], prefix: str = "choices") -> None:
    """Raise :class:`InvalidQuestionError` (code ``duplicate_choices``) when two choices are the same text."""
    seen: dict[str, int] = {}
    for j, choice in enumerate(choices):
        key = choice_key(choice)
        if key in seen:
            raise InvalidQuestionError(f"choice {j} repeats choice {seen[key]} ({key!r}): duplicate choices would "
                                       "split the probability of one answer", f"{prefix}.{j}", "duplicate_choices")
        seen[key] = j
