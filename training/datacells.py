"""Cells of a question file and the label sets and splits around it: how a cell becomes a choice list or an
answer index (:func:`resolve_answer`, precedence in :mod:`training.datafiles`), ``--labels`` /
``--labels-file`` (:func:`parse_labels`), and the seeded single-file splits (:func:`split_questions`)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from core.answers import LETTERS, MAX_CHOICES, MIN_CHOICES, Question

_INDEX = re.compile(r"\d+(?:\.0*)?")


def as_text(value: Any) -> str | None:
    """A cell as text: strings as they are, numbers (not bools) printed; None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _index(value: int, k: int) -> tuple[int | None, tuple[str, str] | None]:
    if 0 <= value < k:
        return value, None
    return None, ("answer_not_in_choices", f"answer index {value} is not one of the {k} choices (0..{k - 1})")


def resolve_answer(value: Any, choices: tuple[str, ...] | list[str], labels: list[str] | None = None,
                   ) -> tuple[int | None, tuple[str, str] | None]:
    """The 0-based index ``value`` names among ``choices``, or (None, (kind, reason)); see the module
    docstring for the precedence. ``labels`` are per-choice labels (ARC layout), if any."""
    k = len(choices)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None, ("bad_value", f"answer {value!r} is not an index, a letter or a choice text")
    if isinstance(value, float):
        if not value.is_integer():
            return None, ("bad_value", f"answer {value!r} is not a whole number")
        return _index(int(value), k)
    if isinstance(value, int):
        return _index(value, k)
    s = value.strip()
    for i, c in enumerate(choices):
        if c.strip() == s:
            return i, None
    if labels is not None and s in labels:
        return labels.index(s), None
    if len(s) == 1 and s.upper() in LETTERS:
        i = LETTERS.index(s.upper())
        if i < k:
            return i, None
    elif _INDEX.fullmatch(s):
        return _index(int(float(s)), k)
    return None, ("answer_not_in_choices", f"answer {value!r} is not one of the {k} choices")


def parse_choices(value: Any, name: str, problems: list[tuple[str, str]],
                   ) -> tuple[list[str] | None, list[str] | None]:
    """A choices cell (list, JSON list text, or {"text", "label"}) as (texts, labels); None on error."""
    labels = None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            problems.append(("bad_value", f"{name!r} is not a JSON list such as [\"a\", \"b\"]: {value[:60]!r}"))
            return None, None
    if isinstance(value, dict) and isinstance(value.get("text"), list):
        raw_labels = value.get("label")
        if isinstance(raw_labels, list) and len(raw_labels) == len(value["text"]):
            labels = [str(x).strip() for x in raw_labels]
        value = value["text"]
    if not isinstance(value, list | tuple):
        problems.append(("bad_value", f"{name!r} must be a list of choice texts, got {type(value).__name__}"))
        return None, None
    texts = [as_text(v) for v in value]
    for i, (v, t) in enumerate(zip(value, texts, strict=True)):
        if t is None and v is not None:
            problems.append(("bad_value", f"choice {i + 1} is not text: {v!r}"))
    return [t if t is not None else "" for t in texts], labels


def check_choices(choices: list[str], problems: list[tuple[str, str]]) -> None:
    if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        n = len(choices)
        problems.append(("choice_count", f"{n} choice{'s' * (n != 1)}: need {MIN_CHOICES}..{MAX_CHOICES}"))
    problems.extend(("empty_text", f"empty choice {i + 1}") for i, c in enumerate(choices) if not c.strip())


def parse_labels(text: str | None = None, file: Path | str | None = None) -> tuple[str, ...] | None:
    """A label set from ``--labels a,b,c`` or ``--labels-file`` (one per line, blank lines ignored); None
    when neither is given. Empty or duplicate labels, fewer than 2 or more than 26 are a ValueError."""
    if text is not None and file is not None:
        raise ValueError("give the labels inline or as a file, not both")
    if text is None and file is None:
        return None
    if file is not None:
        lines = Path(file).expanduser().read_text(encoding="utf-8-sig").splitlines()
        return check_labels([x.strip() for x in lines if x.strip()], f"labels file {file}")
    assert text is not None
    return check_labels([x.strip() for x in text.split(",")], f"labels {text!r}")


def check_labels(items: list[str], where: str) -> tuple[str, ...]:
    empty = [i + 1 for i, x in enumerate(items) if not x]
    if empty:
        raise ValueError(f"{where}: empty label at position(s) {', '.join(map(str, empty))}")
    dupes = sorted({x for x in items if items.count(x) > 1})
    if dupes:
        raise ValueError(f"{where}: duplicate label(s) {', '.join(map(repr, dupes))}")
    if not MIN_CHOICES <= len(items) <= MAX_CHOICES:
        raise ValueError(f"{where}: {len(items)} label(s); need {MIN_CHOICES}..{MAX_CHOICES}")
    return tuple(items)


def split_questions(questions: list[Question], *, validation: float, test: float = 0.0,
                    seed: int = 0) -> dict[str, list[Question]]:
    """Split one file's questions into train / validation (/ test when ``test`` > 0).

    Sizes are ``round(fraction * n)``; the members are drawn by a ``random.Random(seed)`` permutation of
    the indices and keep file order within each split. A split that would be empty is a ValueError.
    """
    for name, frac in (("validation", validation), ("test", test)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} fraction must be in [0, 1), got {frac}")
    n = len(questions)
    n_val, n_test = round(validation * n), round(test * n)
    sizes = {"train": n - n_val - n_test, "validation": n_val, **({"test": n_test} if test > 0 else {})}
    if any(v <= 0 for v in sizes.values()):
        shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"splitting {n} question(s) with validation={validation}, test={test} leaves an empty "
                         f"split ({shown})")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cuts = {"validation": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
    return {k: [questions[i] for i in sorted(cuts[k])] for k in sizes}
