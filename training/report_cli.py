"""``uqserve report BUNDLE... --dataset D [--shift D2 ...]``: one HTML page comparing bundles.

Each ``--dataset`` / ``--shift`` is a benchmark name (read like ``uqserve eval --dataset``, with ``--split``,
``--data-dir`` and ``--limit``) or a question file of your own (JSONL, JSON, CSV, Parquet; the column flags
of ``uqserve eval --data`` apply). See :mod:`training.report` for what is computed and cached, and
:mod:`training.report_page` for the page.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from core.answers import Question
from core.basemodel import BaseModel, load_base_model
from core.bundle import AnswerSpaceSpec, Bundle, git_sha, read_bundle
from core.datasets import load_questions
from training.data_cli import add_column_arguments, read_file, token_counter
from training.report import (
    CachedScores,
    ReportDataset,
    at_temperature_one,
    bundle_identity,
    parse_groups,
    scores_for,
    serving_cost,
    table_rows,
)
from training.report_page import DatasetSection, write_json, write_page, write_plots


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle directories to compare")
    parser.add_argument("--dataset", default="arc_easy", help="benchmark name or question file (in-distribution)")
    parser.add_argument("--shift", nargs="+", action="extend", default=[], metavar="DATASET",
                        help="benchmark names or question files evaluated as distribution shift")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N questions of every dataset")
    add_column_arguments(parser)
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--group", action="append", default=[], metavar="NAME=B1,B2,...",
                        help="a seed group shown as one row, mean ± std (repeatable); bundles by folder or name")
    parser.add_argument("--uncalibrated", action="append", default=[], metavar="BUNDLE",
                        help="also show this bundle at temperature 1 (no temperature scaling) as <name>@T1; "
                             "repeatable, named like --group members")
    parser.add_argument("--out", default="runs/report", help="output folder (index.html and PNGs)")
    parser.add_argument("--cache-dir", default=None, help="score cache (default: <out>/cache)")
    parser.add_argument("--timing-questions", type=int, default=16,
                        help="questions in the serving-cost batch (first of --dataset)")
    parser.add_argument("--no-timing", action="store_true", help="skip the serving-cost measurement")
    parser.add_argument("--retime", action="store_true", help="measure serving cost again even if memoized")
    parser.add_argument("--threads", type=int, default=0)


def load_dataset(spec: str, args: argparse.Namespace, base: BaseModel, space: AnswerSpaceSpec,
                 shift: bool) -> ReportDataset:
    """A benchmark split (``load_questions``) or, when ``spec`` is an existing file, its questions read for
    ``space`` (its labels and token budget), both cut to ``--limit``."""
    if Path(spec).is_file():
        counter = token_counter(base.tokenizer, space.answer_format, space.prompt, space.max_tokens)
        questions: list[Question] = read_file(spec, args, space.labels, counter, space.max_tokens).questions
        return ReportDataset(Path(spec).stem, "file", questions[: args.limit], shift)
    return ReportDataset(spec, args.split, load_questions(spec, args.split, args.data_dir, args.limit), shift)


def command_line(args: argparse.Namespace) -> str:
    """The exact command line (as ``uqserve ...`` when run through :func:`uqserve.cli.main`)."""
    argv = getattr(args, "_argv", None)
    return shlex.join(["uqserve", *argv]) if argv is not None else shlex.join([Path(sys.argv[0]).name,
                                                                               *sys.argv[1:]])


def _dirty() -> bool:
    """Whether the checkout this code runs from has uncommitted changes (False when git is unavailable)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
        return out.returncode == 0 and bool(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return False


def _aliases(path: str, bundle: Bundle) -> set[str]:
    p = Path(path)
    return {path, str(p), p.name, str(p.resolve()), bundle.manifest.name}


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        groups = parse_groups(args.group)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    out = Path(args.out)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    base = load_base_model(args.base_model)
    bundles: dict[str, tuple[str, Bundle]] = {}
    for path in args.bundles:
        bundle = read_bundle(path, expect_base=base.info)
        name = bundle.manifest.name
        if name in bundles:
            name = f"{name}@{Path(path).name}"
        if name in bundles:
            raise SystemExit(f"bundle {path} is given twice")
        bundles[name] = (path, bundle)
    variants: set[str] = set()  # named only by their own name (their path is the original bundle's)
    for alias in args.uncalibrated:
        hits = [n for n, (p, b) in bundles.items() if alias in _aliases(p, b) | {n}]
        if len(hits) != 1:
            raise SystemExit(f"--uncalibrated {alias!r} matches {len(hits)} of the bundles {sorted(bundles)}")
        path, bundle = bundles[hits[0]]
        raw = at_temperature_one(bundle)
        bundles[raw.manifest.name] = (path, raw)
        variants.add(raw.manifest.name)
    space = next(iter(bundles.values()))[1].manifest.answer_space
    datasets = [load_dataset(args.dataset, args, base, space, shift=False)]
    datasets += [load_dataset(spec, args, base, space, shift=True) for spec in args.shift]
    for d in datasets:
        if not d.questions:
            raise SystemExit(f"{d.title}: no questions")
    identities = {n: {**bundle_identity(b, base), "name": n} for n, (_, b) in bundles.items()}

    results: dict[str, dict[str, CachedScores]] = {d.title: {} for d in datasets}
    jobs = [(d, n) for d in datasets for n in bundles]
    reused = 0
    bar = tqdm(jobs, desc="report", unit="run")
    for d, name in bar:
        bar.set_postfix_str(f"{name} on {d.title}")
        scores, cached = scores_for(base, bundles[name][1], identities[name], d, cache_dir)
        results[d.title][name] = scores
        reused += cached
    aliases = {n: {n} if n in variants else _aliases(p, b) | {n} for n, (p, b) in bundles.items()}
    try:
        sections = [DatasetSection(d, table_rows(results[d.title], aliases, groups), results[d.title])
                    for d in datasets]
    except ValueError as err:
        raise SystemExit(str(err)) from None
    out.mkdir(parents=True, exist_ok=True)
    for section in tqdm(sections, desc="plots", unit="dataset"):
        write_plots(section, out)

    costs: dict[str, dict[str, Any]] = {}
    if not args.no_timing and args.timing_questions > 0:
        batch = datasets[0].questions[: args.timing_questions]
        timed = [n for n in bundles if n not in variants]  # a @T1 variant costs what its bundle costs
        for name in tqdm(timed, desc="serving cost", unit="bundle"):
            costs[name] = serving_cost(base, bundles[name][1], batch, identities[name], cache_dir, args.retime)

    lineage = {
        "bundle_names": list(bundles), "command": command_line(args),
        "git": git_sha() + (" (with uncommitted changes)" if _dirty() else ""),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "bundles": [{**identities[n], "path": p, "training_data_hashes": b.manifest.data_hashes or "—"}
                    for n, (p, b) in bundles.items()],
        "datasets": [(d.title + (" (shift)" if d.shift else ""), d.hash, len(d.questions)) for d in datasets],
    }
    write_json(out, sections, costs, lineage)
    page = write_page(out, sections, costs, lineage)
    print(f"[report] {page} ({len(jobs) - reused} of {len(jobs)} bundle × dataset runs computed, {reused} from the "
          f"cache {cache_dir})", flush=True)
    return 0
