"""Where training and evaluation get their questions and prompt from the command line.

Questions come from a built-in benchmark (``--dataset arc_easy``) or the user's own files
(``--train FILE [--validation FILE] [--test FILE]``, any of JSONL, JSON, CSV, Parquet; see
:mod:`training.datafiles`). Given only ``--train``, validation (and test, with ``--test-fraction``) are split
off deterministically with ``--split-seed``. Rows a file cannot use fail the run with every problem listed,
or with ``--skip-invalid`` are dropped, printed and recorded in the manifest. The prompt is the built-in one
unless ``--prompt-template`` / ``--prompt-template-file`` / ``--instruction`` / ``--chat-template`` say
otherwise; it is checked against every question's token budget before any training starts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.answers import AnswerFormat, Question, encode_question
from core.datasets import data_hash, load_questions
from core.errors import InvalidQuestionError
from core.prompt import PromptSpec
from training.datafiles import Columns, QuestionFile, parse_labels, read_question_file, split_questions

TOO_LONG = 1 << 30  # what token_count reports for a question the prompt cannot encode within the budget


def add_column_arguments(parser: argparse.ArgumentParser) -> None:
    """How a file's columns map to the default schema (question, choices, answer, context, id)."""
    group = parser.add_argument_group("question files (JSONL, JSON, CSV, Parquet)")
    group.add_argument("--question-column", default="question")
    group.add_argument("--choices-column", default="choices", help="a list column (CSV: a JSON list text)")
    group.add_argument("--choice-columns", default=None, help="one column per choice, e.g. A,B,C,D")
    group.add_argument("--answer-column", default="answer", help="an index (0-based), a letter or a choice's text")
    group.add_argument("--context-column", default="context")
    group.add_argument("--id-column", default="id")
    group.add_argument("--labels", default=None, help="a label set for classification, e.g. billing,technical,"
                                                      "account: every question gets these choices, in order")
    group.add_argument("--labels-file", default=None, help="the label set, one per line")
    group.add_argument("--skip-invalid", action="store_true",
                       help="drop rows that cannot be used (printed and recorded) instead of failing")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Training data: a built-in benchmark, or the user's files."""
    parser.add_argument("--dataset", default="arc_easy", help="a built-in benchmark (ignored with --train)")
    parser.add_argument("--data-dir", default=None, help="folder laid out like shared/data (default: vendored ARC-E)")
    parser.add_argument("--train", default=None, metavar="FILE", help="your training questions")
    parser.add_argument("--validation", default=None, metavar="FILE", help="your validation questions "
                        "(default: --validation-fraction of --train)")
    parser.add_argument("--test", default=None, metavar="FILE", help="your test questions (recorded, not trained on)")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.0, help="also split a test set off --train")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help="your held-out calibration questions for conformal sets and risk control (default: "
                             "--calibration-fraction of the validation split)")
    parser.add_argument("--calibration-fraction", type=float, default=0.5,
                        help="fraction of the validation split held out as the calibration split, which fits "
                             "nothing else (not the temperature, the abstention rule or early stopping); 0: none")
    add_column_arguments(parser)


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("prompt (recorded in the bundle; the server uses the same)")
    group.add_argument("--prompt-template", default=None,
                       help="a format string with {question}, {context}, {choices}, {letters}, {labels}, "
                            "{num_choices}, e.g. 'Ticket: {question}\\nTeam:'")
    group.add_argument("--prompt-template-file", default=None, help="the template from a file (.jinja: Jinja)")
    group.add_argument("--instruction", default=None, help="text before the question (the system message with "
                                                            "--chat-template)")
    group.add_argument("--chat-template", action="store_true",
                       help="wrap the prompt in the base model's own chat template (instruct models)")


def forward_flags(args: argparse.Namespace) -> list[str]:
    """The data and prompt flags of ``args`` as argv, to hand a run's data to another command (Laplace trains
    its MAP bundle through ``uqserve train ensemble``)."""
    probe = argparse.ArgumentParser(add_help=False)
    add_data_arguments(probe)
    add_prompt_arguments(probe)
    argv: list[str] = []
    for action in probe._actions:
        value = getattr(args, action.dest, None)
        if value is None or value == action.default or not action.option_strings:
            continue
        flag = action.option_strings[0]
        argv += [flag] if isinstance(value, bool) else [flag, str(value)]
    for flag, dest in (("--train-limit", "train_limit"), ("--val-limit", "val_limit")):
        if getattr(args, dest, None) is not None:
            argv += [flag, str(getattr(args, dest))]
    return argv


def prompt_from_args(args: argparse.Namespace, tokenizer: Any) -> PromptSpec:
    """The prompt the flags describe, with the tokenizer's chat template recorded when asked."""
    if args.prompt_template is not None and args.prompt_template_file is not None:
        raise SystemExit("give --prompt-template or --prompt-template-file, not both")
    template, syntax = args.prompt_template, "format"
    if args.prompt_template_file is not None:
        path = Path(args.prompt_template_file)
        template, syntax = path.read_text(encoding="utf-8"), "jinja" if path.suffix == ".jinja" else "format"
    try:
        spec = PromptSpec(template=template, syntax=syntax, instruction=args.instruction, chat=args.chat_template)
        return spec.with_tokenizer(tokenizer)
    except ValueError as err:
        raise SystemExit(f"prompt: {err}") from None


def columns_from_args(args: argparse.Namespace) -> Columns:
    choice_columns = tuple(c.strip() for c in args.choice_columns.split(",")) if args.choice_columns else None
    return Columns(question=args.question_column, choices=None if choice_columns else args.choices_column,
                   choice_columns=choice_columns, answer=args.answer_column, context=args.context_column,
                   id=args.id_column)


def labels_from_args(args: argparse.Namespace) -> tuple[str, ...] | None:
    try:
        return parse_labels(args.labels, args.labels_file)
    except ValueError as err:
        raise SystemExit(f"labels: {err}") from None


def token_counter(tokenizer: Any, answer_format: AnswerFormat, prompt: PromptSpec,
                  max_tokens: int) -> Any:
    """token_count for :func:`read_question_file`: the tokens a question needs with this prompt (the exact
    encoder training and serving use; a question it refuses counts as too long)."""

    def count(questions: list[Question]) -> list[int]:
        out = []
        for q in questions:
            try:
                enc = encode_question(tokenizer, q, answer_format, 1 << 30, prompt)
            except InvalidQuestionError:
                out.append(TOO_LONG)
                continue
            choices = 0 if answer_format == AnswerFormat.LETTER else sum(len(c) for c in enc.choice_ids)
            out.append(len(enc.prefix_ids) + choices)
        return out

    return count


@dataclass
class TrainingData:
    """The splits a run trains, calibrates and (optionally) tests on, and where they came from."""

    train: list[Question]
    validation: list[Question]
    test: list[Question] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)  # manifest training["data"]
    calibration: list[Question] = field(default_factory=list)  # held out for conformal sets and risk control

    def hashes(self) -> dict[str, str]:
        splits = {"train": self.train, "validation": self.validation, "test": self.test,
                  "calibration": self.calibration}
        return {name: data_hash(qs) for name, qs in splits.items() if qs}


def read_file(path: str, args: argparse.Namespace, labels: tuple[str, ...] | None, counter: Any,
              max_tokens: int, require_answer: bool = True) -> QuestionFile:
    """One question file, its problems printed (and the run stopped unless --skip-invalid)."""
    try:
        loaded = read_question_file(path, columns_from_args(args), labels=labels, skip_invalid=args.skip_invalid,
                                    require_answer=require_answer, token_count=counter, max_tokens=max_tokens)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(str(err)) from None
    if loaded.dropped:
        print(f"[data] {path}: dropped {sum(loaded.dropped.values())} of {loaded.rows} rows "
              f"({', '.join(f'{k}: {n}' for k, n in sorted(loaded.dropped.items()))}):", flush=True)
        for problem in loaded.problems[:20]:
            print(f"  row {problem.row}: {problem.reason}", flush=True)
    return loaded


def _record(loaded: QuestionFile) -> dict[str, Any]:
    return {"file": loaded.path.name, "sha256": loaded.sha256, "rows": loaded.rows, "kept": len(loaded.questions),
            "dropped": dict(loaded.dropped)}


def training_data(args: argparse.Namespace, tokenizer: Any, answer_format: AnswerFormat, prompt: PromptSpec,
                  max_tokens: int) -> tuple[TrainingData, tuple[str, ...] | None]:
    """The run's splits from ``--train`` files or ``--dataset``, and the label set (None for a benchmark)."""
    if args.train is None:
        for flag in ("validation", "test", "labels", "labels_file"):
            if getattr(args, flag, None):
                raise SystemExit(f"--{flag.replace('_', '-')} needs --train FILE")
        data = TrainingData(load_questions(args.dataset, "train", args.data_dir, args.train_limit),
                            load_questions(args.dataset, "validation", args.data_dir, args.val_limit))
        data.provenance = {"dataset": args.dataset}
        return hold_out_calibration(data, args, None, tokenizer, answer_format, prompt, max_tokens), None
    labels = labels_from_args(args)
    counter = token_counter(tokenizer, answer_format, prompt, max_tokens)
    files = {"train": read_file(args.train, args, labels, counter, max_tokens)}
    for split in ("validation", "test"):
        if getattr(args, split):
            files[split] = read_file(getattr(args, split), args, labels, counter, max_tokens)
    splits = {name: loaded.questions for name, loaded in files.items()}
    split_off: dict[str, Any] = {}
    if "validation" not in files or (args.test_fraction > 0 and "test" not in files):
        validation = 0.0 if "validation" in files else args.validation_fraction
        test = args.test_fraction if "test" not in files else 0.0
        try:
            parts = split_questions(splits["train"], validation=validation, test=test, seed=args.split_seed)
        except ValueError as err:
            raise SystemExit(f"cannot split {args.train}: {err}") from None
        splits.update(parts)
        split_off = {"from": Path(args.train).name, "seed": args.split_seed, "validation_fraction": validation,
                     "test_fraction": test}
    limit = {"train": args.train_limit, "validation": args.val_limit}
    splits = {k: v[: limit[k]] if limit.get(k) is not None else v for k, v in splits.items()}
    data = TrainingData(splits["train"], splits.get("validation", []), splits.get("test", []))
    data.provenance = {"files": {name: _record(loaded) for name, loaded in files.items()},
                       "split_off": split_off or None, "labels": None if labels is None else list(labels)}
    return hold_out_calibration(data, args, labels, tokenizer, answer_format, prompt, max_tokens), labels


def hold_out_calibration(data: TrainingData, args: argparse.Namespace, labels: tuple[str, ...] | None,
                         tokenizer: Any, answer_format: AnswerFormat, prompt: PromptSpec,
                         max_tokens: int) -> TrainingData:
    """The calibration split: ``--calibration FILE``, else ``--calibration-fraction`` of the validation split
    (a seeded draw, ``--split-seed``); what is drawn leaves validation, so it fits nothing."""
    calibration_file = getattr(args, "calibration", None)
    fraction = getattr(args, "calibration_fraction", 0.0)
    if calibration_file:
        counter = token_counter(tokenizer, answer_format, prompt, max_tokens)
        loaded = read_file(calibration_file, args, labels, counter, max_tokens)
        data.calibration = loaded.questions
        data.provenance.setdefault("files", {})["calibration"] = _record(loaded)
    elif fraction > 0:
        try:
            parts = split_questions(data.validation, validation=fraction, seed=args.split_seed)
        except ValueError as err:
            raise SystemExit(f"cannot hold out a calibration split from validation: {err}") from None
        data.validation, data.calibration = parts["train"], parts["validation"]
        data.provenance["calibration_split"] = {"from": "validation", "fraction": fraction, "seed": args.split_seed}
    data.provenance["rows"] = {name: len(qs) for name, qs in (("train", data.train), ("validation", data.validation),
                                                              ("test", data.test), ("calibration", data.calibration))
                               if qs}
    return data
