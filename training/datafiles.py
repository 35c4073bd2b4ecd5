"""Users' own question files (JSONL, JSON, CSV, Parquet) read into validated :class:`~core.answers.Question` s.

The format is chosen by extension (``.jsonl``/``.ndjson``, ``.json``, ``.csv``, ``.parquet``/``.pq``); the file
is read with Hugging Face ``datasets`` from the local path only (``HF_DATASETS_OFFLINE=1``; the Arrow cache
goes to a temporary folder unless ``cache_dir`` is given). :class:`Columns` maps columns; by default a record
is ``{"id": "q1", "question": "…", "choices": ["…", "…"], "answer": 1, "context": "…"}``.

In CSV every cell is read as text (``NA``, ``None`` stay text; only an empty cell is missing) and a
``choices`` cell holds a JSON list such as ``["a", "b"]``; or name one column per choice with
``Columns(choice_columns=("A", "B", "C", "D"))`` (trailing empty cells mean fewer choices).

Answers (see :func:`resolve_answer`): an int (or an integral float such as ``2.0``) is a 0-based index.
A string is tried, in this order, as (1) the exact text of a choice (both stripped; the first match
wins), (2) a choice label when the choices carry labels (``{"text": [...], "label": [...]}``, the
Hugging Face ARC layout), (3) a single letter ``A``..``Z`` (or ``a``..``z``) within range, (4) a digit
string (``"2"``, ``"2.0"``) as a 0-based index.

Every problem of every row is collected (a row may have several) and, by default, raised at once in one
:class:`DataFileError`; with ``skip_invalid=True`` those rows are dropped and returned, counted per kind,
so the caller can print and record them. Nothing is dropped silently.

The file is read in Arrow batches; only one :class:`Question` per row is built, never a second Python
copy of all rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.answers import Question
from core.errors import InvalidQuestionError
from training.datacells import (
    as_text,
    check_choices,
    check_labels,
    parse_choices,
    parse_labels,
    resolve_answer,
    split_questions,
)

FORMATS: dict[str, str] = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv",
                           ".parquet": "parquet", ".pq": "parquet"}
KINDS = ("missing_field", "answer_not_in_choices", "choice_count", "empty_text", "duplicate_id", "too_long",
         "bad_value")
READ_BATCH = 4096
TOKEN_BATCH = 2048
MAX_LISTED = 50


@dataclass(frozen=True)
class Columns:
    """Which column holds what; the defaults are the default schema.

    ``choice_columns`` (one column per choice) takes precedence over ``choices`` (one list column).
    ``context`` and ``id`` are used when the file has them; renamed away from their defaults, they must exist.
    """

    question: str = "question"
    choices: str | None = "choices"
    choice_columns: tuple[str, ...] | None = None
    answer: str = "answer"
    context: str | None = "context"
    id: str | None = "id"


@dataclass(frozen=True)
class RowProblem:
    """One problem of one record. ``row`` is the 1-based record number: in CSV the header is not a record
    (and a quoted cell may span lines); in JSONL blank lines are not records."""

    row: int
    reason: str
    kind: str  # one of KINDS


def _summary(path: Path, problems: list[RowProblem], rows: int | None) -> str:
    counts = Counter(p.kind for p in problems)
    bad_rows = len({p.row for p in problems})
    of = f" of {rows}" if rows is not None else ""
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items()))
    lines = [f"{path}: {len(problems)} problem(s) in {bad_rows}{of} row(s) ({kinds}):"]
    lines += [f"  row {p.row}: {p.reason} [{p.kind}]" for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more (counts per kind above)")
    return "\n".join(lines)


class DataFileError(ValueError):
    """A question file cannot be used; the message names the file and lists every problem found."""

    def __init__(self, path: Path | str, problems: list[RowProblem] | None = None, message: str | None = None,
                 *, rows: int | None = None) -> None:
        self.path = Path(path)
        self.problems = list(problems or [])
        super().__init__(message if message is not None else _summary(self.path, self.problems, rows))


@dataclass(frozen=True)
class QuestionFile:
    """A file's valid questions, in file order. ``dropped`` counts the dropped rows per kind, each row once,
    under the kind of its first problem (so the counts sum to :attr:`rows_dropped`); ``problems`` has them all."""

    path: Path
    questions: list[Question]
    rows: int  # records read
    sha256: str  # of the file's bytes
    dropped: dict[str, int] = field(default_factory=dict)  # kind -> rows dropped (only with skip_invalid)
    problems: list[RowProblem] = field(default_factory=list)  # the dropped rows' problems (skip_invalid)

    @property
    def rows_dropped(self) -> int:
        return self.rows - len(self.questions)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class _Plan:
    """What to read from a file, decided once from its column names (None: the file has no such column)."""

    question: str
    choices: str | tuple[str, ...] | None  # a list column, one column per choice, or none (labels)
    answer: str | None
    context: str | None
    id: str | None
    labels: tuple[str, ...] | None
    require_answer: bool
    stem: str

    def needed(self) -> list[str]:
        names = [self.question, *(self.choices if isinstance(self.choices, tuple) else [self.choices])]
        return list(dict.fromkeys(n for n in (*names, self.answer, self.context, self.id) if n))


def _plan(path: Path, names: list[str], columns: Columns, labels: tuple[str, ...] | None,
          require_answer: bool, hint: str = "") -> _Plan:
    have = set(names)
    missing: list[str] = []
    if columns.question not in have:
        missing.append(columns.question)
    source: str | tuple[str, ...] | None = None
    if columns.choice_columns:
        absent = [n for n in columns.choice_columns if n not in have]
        if not absent:
            source = tuple(columns.choice_columns)
        elif labels is None or len(absent) < len(columns.choice_columns):
            missing += absent
    elif columns.choices and columns.choices in have:
        source = columns.choices
    elif labels is None:
        missing.append(columns.choices or "choices")
    if require_answer and columns.answer not in have:
        missing.append(columns.answer)
    defaults = Columns()
    for f in ("context", "id"):
        name = getattr(columns, f)
        if name and name != getattr(defaults, f) and name not in have:
            missing.append(name)
    if missing:
        raise DataFileError(path, message=(
            f"{path}: column(s) {', '.join(map(repr, missing))} not in the file; its columns are "
            f"{', '.join(map(repr, names)) or '(none)'}{hint}"))
    def used(name: str | None) -> str | None:
        return name if name and name in have else None

    return _Plan(columns.question, source, used(columns.answer), used(columns.context), used(columns.id), labels,
                 require_answer, path.stem)


def _row(plan: _Plan, row: int, rec: dict[str, Any], seen_ids: dict[str, int],
         ) -> tuple[Question | None, list[tuple[str, str]]]:
    """One record -> (Question or None, [(kind, reason), ...])."""
    problems: list[tuple[str, str]] = []
    text = rec[plan.question]
    if text is None:
        problems.append(("missing_field", f"missing field {plan.question!r}"))
    elif not isinstance(text, str):
        problems.append(("bad_value", f"question must be text, got {type(text).__name__} {text!r}"))
    elif not text.strip():
        problems.append(("empty_text", "empty question text"))
    choices: list[str] | None = None
    choice_labels: list[str] | None = None
    if isinstance(plan.choices, tuple):
        texts = []
        for name in plan.choices:
            t = as_text(rec[name])
            if t is None and rec[name] is not None:
                problems.append(("bad_value", f"choice column {name!r} is not text: {rec[name]!r}"))
            texts.append(t or "")
        while texts and not texts[-1].strip():  # trailing empty cells: fewer choices
            texts.pop()
        choices = texts if texts or plan.labels is None else None  # with labels, all empty = not given
    elif plan.choices is not None:
        value = rec[plan.choices]
        if value is not None:
            choices, choice_labels = parse_choices(value, plan.choices, problems)
        elif plan.labels is None:
            problems.append(("missing_field", f"missing field {plan.choices!r}"))
    if plan.labels is not None:
        if choices is not None and [t.strip() for t in choices] != list(plan.labels):
            problems.append(("bad_value", f"choices {choices} differ from the labels {list(plan.labels)}"))
        choices, choice_labels = list(plan.labels), None
    elif choices is not None:
        check_choices(choices, problems)
    answer: int | None = None
    value = rec[plan.answer] if plan.answer else None
    if value is None or (isinstance(value, str) and not value.strip()):
        if plan.require_answer:
            problems.append(("missing_field", f"missing field {plan.answer!r}"))
    elif choices is not None:
        answer, problem = resolve_answer(value, choices, choice_labels)
        if problem:
            problems.append(problem)
    context = rec[plan.context] if plan.context else None
    if context is not None and not isinstance(context, str):
        problems.append(("bad_value", f"context must be text, got {type(context).__name__}"))
    raw_id = rec[plan.id] if plan.id else None
    qid = as_text(raw_id)
    if raw_id is not None and qid is None:
        problems.append(("bad_value", f"id must be text or a number, got {raw_id!r}"))
    qid = qid.strip() if qid and qid.strip() else f"{plan.stem}-{row}"
    if qid in seen_ids:
        problems.append(("duplicate_id", f"duplicate id {qid!r} (first at row {seen_ids[qid]})"))
    else:
        seen_ids[qid] = row
    if problems or choices is None or not isinstance(text, str):
        return None, problems
    try:
        q = Question(question=text, choices=tuple(choices), answer=answer,
                     context=context if context and context.strip() else None, id=qid,
                     meta={"dataset": plan.stem, "row": str(row)})
    except InvalidQuestionError as e:  # the checks above should have caught it
        return None, [("bad_value", str(e))]
    return q, []


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """Import ``datasets`` offline, with its progress bars off for the duration."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('reading question files needs Hugging Face datasets: pip install "datasets>=3"') from e
    was_on, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach the caller as DataFileError
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if was_on:
            datasets.enable_progress_bars()


def _load(datasets: Any, path: Path, fmt: str, cache: str, tmp: str) -> Any:
    kwargs: dict[str, Any] = {}
    if fmt == "csv":
        import csv

        try:
            with path.open(encoding="utf-8-sig", newline="") as f:
                reader = csv.reader(f)
                header, first = next(reader, None), next(reader, None)
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataFileError(path, message=f"{path}: cannot read it as UTF-8 CSV: {e}") from e
        if not header or first is None:
            raise DataFileError(path, message=f"{path}: the file has no records (a CSV needs a header and rows)")
        # Every cell as text: pandas would read "NA"/"None" as missing and numeric choice columns as floats.
        kwargs = {"features": datasets.Features({n: datasets.Value("string") for n in header}),
                  "keep_default_na": False, "na_values": [""], "index_col": False}
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            empty = pq.ParquetFile(path).metadata.num_rows == 0
        except Exception:  # unreadable: load_dataset below says why
            empty = False
        if empty:
            raise DataFileError(path, message=f"{path}: the file has no records")
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=cache, **kwargs)
    except Exception as e:
        cause = e.__cause__ or e
        if "corresponds to no data" in str(e) or isinstance(e, StopIteration):
            raise DataFileError(path, message=f"{path}: the file has no records") from e
        if fmt == "json" and path.suffix != ".json":  # datasets trips on blank lines + mixed-type columns
            clean, blank = Path(tmp) / f"{path.stem}.nonblank.jsonl", 0
            with path.open("rb") as src, clean.open("wb") as dst:
                for line in src:
                    if line.strip():
                        dst.write(line)
                    else:
                        blank += 1
            if blank:
                with contextlib.suppress(Exception):
                    return datasets.load_dataset(fmt, data_files=str(clean), split="train", cache_dir=cache)
        what = {"json": "JSON Lines" if path.suffix != ".json" else "JSON (a list of records)",
                "csv": "CSV", "parquet": "Parquet"}[fmt]
        detail = f"{type(cause).__name__}: {str(cause).strip()}"
        raise DataFileError(path, message=f"{path}: cannot read it as {what}: {detail}") from e


def read_question_file(path: Path | str, columns: Columns = Columns(), *, labels: tuple[str, ...] | None = None,
                       skip_invalid: bool = False, require_answer: bool = True,
                       token_count: Callable[[list[Question]], list[int]] | None = None,
                       max_tokens: int | None = None, cache_dir: Path | str | None = None) -> QuestionFile:
    """Read, map and validate every record of a question file (see the module docstring).

    ``labels``: a label set (classification); every question's choices are exactly ``labels``; a choices
    column is optional and, where a row has one, it must equal the labels. ``require_answer=False`` allows
    rows without an answer (``Question.answer`` None). ``token_count`` (with ``max_tokens``) is called on
    batches of up to :data:`TOKEN_BATCH` valid questions and rows needing more than ``max_tokens`` are
    ``too_long``. ``cache_dir`` keeps datasets' Arrow cache (default: a temporary folder, removed after
    reading). Raises FileNotFoundError, ValueError (unknown extension, bad arguments) or
    :class:`DataFileError` (unreadable file, missing column, no records, or, unless ``skip_invalid``,
    invalid rows: all of them at once).
    """
    path = Path(path).expanduser()
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown extension {path.suffix!r}; use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    if (token_count is None) != (max_tokens is None):
        raise ValueError("token_count and max_tokens go together: pass both or neither")
    if labels is not None:
        labels = check_labels([str(x).strip() for x in labels], "labels")
    if path.stat().st_size == 0:
        raise DataFileError(path, message=f"{path}: the file is empty")
    sha = file_sha256(path)
    questions: list[Question] = []
    problems: list[RowProblem] = []
    pending: list[tuple[int, Question]] = []

    def flush() -> None:
        if token_count is None or max_tokens is None or not pending:
            return
        counts = token_count([q for _, q in pending])
        if len(counts) != len(pending):
            raise ValueError(f"token_count returned {len(counts)} counts for {len(pending)} questions")
        for (row, q), n in zip(pending, counts, strict=True):
            if n > max_tokens:
                problems.append(RowProblem(row, f"the prompt needs {n} tokens, more than the model's {max_tokens}",
                                           "too_long"))
            else:
                questions.append(q)
        pending.clear()

    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="uqserve-datafile-") as tmp:
        ds = _load(datasets, path, fmt, str(cache_dir) if cache_dir is not None else tmp, tmp)
        hint = " (a JSON file holds a list of records, or one record per line)" if fmt == "json" else ""
        plan = _plan(path, list(ds.column_names), columns, labels, require_answer, hint)
        ds = ds.select_columns(plan.needed())
        rows = len(ds)
        if rows == 0:
            raise DataFileError(path, message=f"{path}: the file has no records")
        seen_ids: dict[str, int] = {}
        row = 0
        for batch in ds.iter(batch_size=READ_BATCH):
            names = list(batch)
            for values in zip(*(batch[n] for n in names), strict=True):
                row += 1
                q, found = _row(plan, row, dict(zip(names, values, strict=True)), seen_ids)
                if q is None:
                    problems += [RowProblem(row, reason, kind) for kind, reason in found]
                elif token_count is not None:
                    pending.append((row, q))
                    if len(pending) >= TOKEN_BATCH:
                        flush()
                else:
                    questions.append(q)
        flush()
        del ds
    problems.sort(key=lambda p: p.row)  # stable: a row's problems keep their order
    if problems and not skip_invalid:
        raise DataFileError(path, problems, rows=rows)
    dropped = Counter({p.row: p.kind for p in reversed(problems)}.values())  # each row under its first kind
    return QuestionFile(path=path, questions=questions, rows=rows, sha256=sha,
                        dropped={k: dropped[k] for k in KINDS if dropped[k]}, problems=problems)


__all__ = ["FORMATS", "KINDS", "Columns", "DataFileError", "QuestionFile", "RowProblem", "file_sha256",
           "parse_labels", "read_question_file", "resolve_answer", "split_questions"]
