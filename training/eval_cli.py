"""``uqserve eval``: evaluate a bundle (or the zero-shot base model) on a dataset split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from core.answers import AnswerFormat
from core.basemodel import load_base_model
from core.bundle import Method, read_bundle
from core.datasets import load_questions
from training.evaluate import bundle_member_scores, evaluate_scores, zero_shot_scores


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory, or 'base' for the zero-shot base model")
    parser.add_argument("--dataset", default="arc_easy")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--answer-format", default=AnswerFormat.CLOZE.value, choices=[f.value for f in AnswerFormat],
                        help="only for 'base' (a bundle records its own)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/eval/<bundle>-<dataset>-<split>)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--threads", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = load_questions(args.dataset, args.split, args.data_dir, args.limit)
    labels = torch.tensor([q.answer for q in questions])
    base = load_base_model(args.base_model)
    if args.bundle == "base":
        label = f"base-{args.answer_format}"
        scores, weights, temperature = zero_shot_scores(base, questions, args.answer_format), torch.ones(1), 1.0
    else:
        bundle = read_bundle(args.bundle, expect_base=base.info)
        label = bundle.manifest.name
        if bundle.manifest.method == Method.MOE:  # UQ4CT: score the routed mixture, not its placeholder member
            from training.uq4ct import moe_bundle_scores

            scores = moe_bundle_scores(base, bundle, questions)[0][:, None, :]
        else:
            scores = bundle_member_scores(base, bundle, questions)
        weights, temperature = bundle.manifest.weights(), bundle.manifest.calibration.temperature
    out = Path(args.out) if args.out else Path("runs") / "eval" / f"{label}-{args.dataset}-{args.split}"
    result = evaluate_scores(scores, labels, weights, temperature, out, f"{label} on {args.dataset}/{args.split}",
                             plots=not args.no_plots)
    result.update(bundle=label, dataset=args.dataset, split=args.split, n=len(questions))
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    keys = ("acc", "nll", "ece", "brier", "auroc_mi", "auroc_entropy", "aurc", "mutual_information")
    print(json.dumps({"bundle": label, "dataset": args.dataset, "split": args.split, "n": len(questions),
                      "temperature": round(temperature, 4),
                      "metrics": {k: round(result["metrics"][k], 4) for k in keys},
                      "uncalibrated": {k: round(result["metrics_uncalibrated"][k], 4) for k in keys[:4]},
                      "out": str(out)}, indent=2))
    return 0
