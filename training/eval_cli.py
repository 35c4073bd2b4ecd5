"""``uqserve eval``: evaluate a bundle (or the zero-shot base model) on a dataset split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from core.answers import AnswerFormat, Question
from core.basemodel import load_base_model
from core.bundle import AnswerSpaceSpec, read_bundle
from core.datasets import load_questions
from core.predictive import ensemble_prediction
from training.data_cli import (
    add_column_arguments,
    add_prompt_arguments,
    labels_from_args,
    prompt_from_args,
    read_file,
    token_counter,
)
from training.evaluate import bundle_predictions, evaluate_prediction, zero_shot_scores


def add_question_arguments(parser: argparse.ArgumentParser, split: str) -> None:
    """The labelled questions a bundle is run on (a benchmark split or a file of your own) and the base model."""
    parser.add_argument("--dataset", default="arc_easy")
    parser.add_argument("--split", default=split, choices=["train", "validation", "test"])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="your labelled questions (JSONL, JSON, CSV, Parquet) instead of --dataset/--split")
    add_column_arguments(parser)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--base-model", default="smollm2-135m")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory, or 'base' for the zero-shot base model")
    add_question_arguments(parser, "test")
    parser.add_argument("--answer-format", default=AnswerFormat.CLOZE.value, choices=[f.value for f in AnswerFormat],
                        help="only for 'base' (a bundle records its own)")
    add_prompt_arguments(parser)  # only for 'base': a bundle records its own prompt
    parser.add_argument("--out", default=None, help="output folder (default: runs/eval/<bundle>-<dataset>-<split>)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--save-scores", default=None, metavar="FILE",
                        help="also write the served probabilities [N, K], member probabilities [N, S, K] (if any) "
                             "and labels [N] as safetensors")


def labelled_questions(args: argparse.Namespace, tokenizer: Any, space: AnswerSpaceSpec) -> list[Question]:
    """``--data FILE`` read for ``space`` (its labels, its prompt's token budget), else the benchmark split. A
    file names the run: ``args.dataset`` becomes its stem and ``args.split`` "file"."""
    if not args.data:
        return load_questions(args.dataset, args.split, args.data_dir, args.limit)
    counter = token_counter(tokenizer, space.answer_format, space.prompt, space.max_tokens)
    questions = read_file(args.data, args, space.labels, counter, space.max_tokens).questions[: args.limit]
    args.dataset, args.split = Path(args.data).stem, "file"
    return questions


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base_model(args.base_model)
    bundle = None if args.bundle == "base" else read_bundle(args.bundle, expect_base=base.info)
    if bundle is None:
        space = AnswerSpaceSpec(answer_format=args.answer_format, prompt=prompt_from_args(args, base.tokenizer),
                                labels=labels_from_args(args))
    else:
        space = bundle.manifest.answer_space
    questions = labelled_questions(args, base.tokenizer, space)
    labels = torch.tensor([q.answer for q in questions])
    if bundle is None:
        label = f"base-{args.answer_format}"
        scores = zero_shot_scores(base, questions, args.answer_format, prompt=space.prompt)
        served, uncalibrated = ensemble_prediction(scores, 1.0, None), None
    else:
        label = bundle.manifest.name
        served, uncalibrated = bundle_predictions(base, bundle, questions)
    out = Path(args.out) if args.out else Path("runs") / "eval" / f"{label}-{args.dataset}-{args.split}"
    result = evaluate_prediction(served, labels, out, f"{label} on {args.dataset}/{args.split}",
                                 uncalibrated=uncalibrated, plots=not args.no_plots)
    result.update(bundle=label, dataset=args.dataset, split=args.split, n=len(questions),
                  temperature=1.0 if bundle is None else bundle.manifest.calibration.temperature)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    if args.save_scores:
        _save_scores(Path(args.save_scores), served, labels,
                     {"bundle": label, "dataset": args.dataset, "split": args.split,
                      "temperature": str(result["temperature"])})
    keys = ("acc", "nll", "ece", "brier", "auroc_mi", "auroc_entropy", "aurc", "mutual_information")

    def rounded(metrics: dict[str, float | None], names: tuple[str, ...]) -> dict[str, float | None]:
        return {k: None if metrics.get(k) is None else round(float(metrics[k]), 4) for k in names}  # type: ignore[arg-type]

    summary = {"bundle": label, "dataset": args.dataset, "split": args.split, "n": len(questions),
               "temperature": round(result["temperature"], 4), "metrics": rounded(result["metrics"], keys),
               "undefined": result["undefined"], "out": str(out)}
    if "metrics_uncalibrated" in result:
        summary["uncalibrated"] = rounded(result["metrics_uncalibrated"], keys[:4])
    print(json.dumps(summary, indent=2))
    return 0


def _save_scores(path: Path, served: Any, labels: torch.Tensor, metadata: dict[str, str]) -> None:
    """``--save-scores FILE``: the served per-question ``probabilities`` [N, K] (zeros for absent choices),
    ``member_probabilities`` [N, S, K] when the method has members, and ``labels`` [N], as safetensors."""
    from safetensors.torch import save_file

    tensors = {"probabilities": served.scores.probabilities.double().contiguous(),
               "labels": labels.long().contiguous()}
    if served.member_probs is not None:
        tensors["member_probabilities"] = served.member_probs.double().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={**metadata, "has_mi": str(bool(served.has_mi))})
