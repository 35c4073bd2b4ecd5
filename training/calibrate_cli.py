"""``uqserve calibrate BUNDLE``: re-choose a bundle's served abstention rule (and its validation statistics)
on labelled questions, without retraining.

The bundle's served predictive on the questions is computed exactly as the server computes it
(:func:`training.evaluate.bundle_predictions`, the bundle's own temperature), then
:func:`training.export.calibrate` chooses the rule and measures it. The manifest is rewritten with a new
version (so a loaded server hot-swaps to it and answers carry the new calibration hash); members and
artifacts are untouched. ``--out DIR`` writes a calibrated copy instead. ``--calibration-fraction`` of the
questions (default half) is held out first and, after the rule, gives the bundle its conformal sets and
risk control (:mod:`training.guarantees`); it chooses nothing else.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from core.answers import Question
from core.basemodel import load_base_model
from core.bundle import read_bundle, rewrite_manifest
from core.datasets import data_hash
from training.datacells import split_questions
from training.eval_cli import add_question_arguments, labelled_questions
from training.evaluate import bundle_predictions
from training.export import DEFAULT_ABSTAIN_ON, MIN_COVERAGE, TARGET_RISK, calibrate, dtype_name
from training.guarantees import add_guarantee_arguments, guarantee_bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory")
    add_question_arguments(parser, "validation")
    parser.add_argument("--target-risk", type=float, default=TARGET_RISK)
    parser.add_argument("--min-coverage", type=float, default=MIN_COVERAGE)
    parser.add_argument("--abstain-on", default=",".join(DEFAULT_ABSTAIN_ON))
    parser.add_argument("--out", default=None, help="write a calibrated copy here instead of rewriting the bundle")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--calibration-fraction", type=float, default=0.5,
                        help="fraction of the questions held out (seeded) for conformal sets and risk control; "
                             "the rest chooses the abstention rule; 0: no guarantees")
    parser.add_argument("--split-seed", type=int, default=0)
    add_guarantee_arguments(parser)


def next_version(version: str) -> str:
    """"3" → "4"; anything else gets ".1" appended ("1.2-rc" → "1.2-rc.1")."""
    return str(int(version) + 1) if version.isdigit() else f"{version}.1"


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base_model(args.base_model)
    source = Path(args.bundle)
    bundle = read_bundle(source, expect_base=base.info)
    questions = labelled_questions(args, base.tokenizer, bundle.manifest.answer_space)
    held_out: list[Question] = []
    if args.calibration_fraction > 0:
        try:
            parts = split_questions(questions, validation=args.calibration_fraction, seed=args.split_seed)
        except ValueError as err:
            raise SystemExit(f"uqserve calibrate: cannot hold out a calibration split: {err}") from None
        questions, held_out = parts["train"], parts["validation"]
    labels = torch.tensor([q.answer for q in questions])
    served, uncalibrated = bundle_predictions(base, bundle, questions, desc="calibrate")
    manifest = bundle.manifest
    calibration, thresholds = calibrate(
        served, labels, temperature=manifest.calibration.temperature, uncalibrated=uncalibrated,
        target_risk=args.target_risk, min_coverage=args.min_coverage, abstain_on=tuple(args.abstain_on.split(",")),
        dtype=dtype_name(base))
    updated = manifest.model_copy(update={
        "version": next_version(manifest.version), "calibration": calibration, "thresholds": thresholds,
        "data_hashes": {**manifest.data_hashes, "calibration": data_hash(questions)},
        "training": {**manifest.training, "recalibrated_on": f"{args.dataset}/{args.split} (n={len(questions)})"}})
    target = source
    if args.out:
        target = Path(args.out)
        if target.exists():
            raise SystemExit(f"uqserve calibrate: {target} exists")
        shutil.copytree(source, target)
    rewrite_manifest(target, updated)
    guarantees = guarantee_bundle(base, target, held_out, args)
    print(json.dumps({"bundle": str(target), "version": updated.version, "abstention": thresholds.target,
                      "thresholds": thresholds.model_dump(exclude={"target", "rule"}, exclude_none=True),
                      **guarantees}, indent=2))
    return 0
