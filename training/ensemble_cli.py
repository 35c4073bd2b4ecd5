"""``uqserve train ensemble``: train M LoRA members on a dataset, calibrate on validation, write a bundle."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from core.answers import AnswerFormat
from core.basemodel import load_base_model
from core.bundle import AnswerSpaceSpec, LoraSpec, Method
from core.datasets import data_hash, load_questions
from core.multilora import ALL_MODULES
from core.scoring import ChoiceScorer
from training.config import AdapterTrainingConfig
from training.ensemble import EnsembleConfig, member_scores, train_ensemble
from training.export import export_bundle
from training.trunk import TrunkCache


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments every training method shares (dataset, base model, output)."""
    parser.add_argument("--dataset", default="arc_easy")
    parser.add_argument("--data-dir", default=None, help="folder laid out like shared/data (default: vendored ARC-E)")
    parser.add_argument("--base-model", default="smollm2-135m", help="'smollm2-135m' or a local HF model directory")
    parser.add_argument("--answer-format", default=AnswerFormat.CLOZE.value, choices=[f.value for f in AnswerFormat])
    parser.add_argument("--out", default="bundles", help="bundle root directory")
    parser.add_argument("--name", default=None, help="bundle name (default: derived from method and dataset)")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--val-limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_adapter_arguments(parser: argparse.ArgumentParser, defaults: AdapterTrainingConfig) -> None:
    """Adapter shape, layers, optimizer budget and dtype, defaulting to the recipe's config."""
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--alpha", type=float, default=defaults.alpha)
    parser.add_argument("--target-modules", default=",".join(ALL_MODULES))
    parser.add_argument("--top-layers", type=int, default=defaults.top_layers,
                        help="adapters on the top k layers with a shared frozen trunk (0 = full depth)")
    parser.add_argument("--epochs", type=float, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16"],
                        help="compute dtype of the frozen base while training")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    defaults = EnsembleConfig()
    add_adapter_arguments(parser, defaults)
    parser.add_argument("--members", type=int, default=defaults.members, help="M (1 = MAP LoRA baseline)")
    parser.add_argument("--prior-precision", type=float, default=defaults.prior_precision, help="λ of the L2 prior")
    parser.add_argument("--early-stopping", action="store_true", help="keep each member's best validation NLL")
    parser.add_argument("--eval-every", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    config = EnsembleConfig(
        dataset=args.dataset, base_model=args.base_model, answer_format=args.answer_format, members=args.members,
        rank=args.rank, alpha=args.alpha, target_modules=tuple(args.target_modules.split(",")),
        top_layers=args.top_layers, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        prior_precision=args.prior_precision, seed=args.seed, train_limit=args.train_limit,
        val_limit=args.val_limit, early_stopping=args.early_stopping, eval_every=args.eval_every,
        threads=args.threads, dtype=args.dtype)
    name = args.name or f"{args.dataset}-{'map' if args.members == 1 else f'ensemble{args.members}'}"
    print(f"[train] {name}: {config.model_dump_json()}", flush=True)
    train = load_questions(args.dataset, "train", args.data_dir, args.train_limit)
    val = load_questions(args.dataset, "validation", args.data_dir, args.val_limit)
    started = time.perf_counter()
    base = load_base_model(args.base_model, dtype=getattr(torch, config.dtype), device=args.device)
    scorer = ChoiceScorer(base.model, base.tokenizer, config.answer_format, config.max_tokens)
    multilora, log = train_ensemble(scorer, config, train, val)
    # Calibrate in float32, the serving dtype.
    base.model.float()
    multilora.float()
    scorer = ChoiceScorer(base.model, base.tokenizer, config.answer_format, config.max_tokens)
    val_cache = TrunkCache(scorer, val, multilora.layout.first_layer, desc="trunk(val fp32)")
    val_scores = member_scores(scorer, multilora, range(config.members), val_cache, desc="val")
    labels = torch.tensor([q.answer for q in val])
    layout = multilora.layout
    members = {f"member-{m}": multilora.peft_state_dict(m) for m in range(config.members)}
    manifest = export_bundle(
        out_dir=Path(args.out), name=name, method=Method.ENSEMBLE, base=base.info,
        lora=LoraSpec(rank=layout.rank, alpha=layout.alpha, target_modules=layout.target_modules,
                      layers=layout.layers),
        answer_space=AnswerSpaceSpec(answer_format=config.answer_format, max_tokens=config.max_tokens),
        members=members, seeds={f"member-{m}": config.seed * 1000 + m for m in range(config.members)},
        weights=torch.full((config.members,), 1.0 / config.members), val_scores=val_scores, val_labels=labels,
        training={"config": config.model_dump(mode="json"), "steps": log["steps"], "train_seconds": log["seconds"],
                  "total_seconds": round(time.perf_counter() - started, 1), "history": log["history"]},
        data_hashes={"train": data_hash(train), "validation": data_hash(val)},
    )
    print(json.dumps({"bundle": str(Path(args.out) / name), "temperature": manifest.calibration.temperature,
                      "validation": {k: round(v, 4) for k, v in manifest.calibration.validation_metrics.items()
                                     if k in ("acc", "nll", "ece", "brier", "uncalibrated_nll", "uncalibrated_ece")},
                      "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    return 0
