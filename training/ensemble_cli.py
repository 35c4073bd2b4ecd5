"""``uqserve train ensemble``: train M LoRA members on a dataset, calibrate on validation, write a bundle."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from core.answers import AnswerFormat, Question
from core.basemodel import BaseModel, load_base_model
from core.bundle import BundleManifest, LoraSpec, Method
from core.datasets import data_hash
from core.multilora import ALL_MODULES
from core.prompt import PromptSpec
from core.scoring import DEFAULT_MAX_TOKENS, ChoiceScorer
from training.config import AdapterTrainingConfig
from training.data_cli import TrainingData, add_data_arguments, add_prompt_arguments, prompt_from_args, training_data
from training.ensemble import EnsembleConfig, train_ensemble
from training.export import (
    DEFAULT_ABSTAIN_ON,
    MIN_COVERAGE,
    TARGET_RISK,
    calibrate_members,
    export_bundle,
    served_base,
)
from training.guarantees import add_guarantee_arguments, guarantee_bundle


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments every training method shares (data, prompt, base model, output)."""
    add_data_arguments(parser)
    add_prompt_arguments(parser)
    parser.add_argument("--base-model", default="smollm2-135m", help="'smollm2-135m' or a local HF model directory")
    parser.add_argument("--answer-format", default=AnswerFormat.CLOZE.value, choices=[f.value for f in AnswerFormat])
    parser.add_argument("--out", default="bundles", help="bundle root directory")
    parser.add_argument("--name", default=None, help="bundle name (default: derived from method and data)")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--val-limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--target-risk", type=float, default=TARGET_RISK,
                        help="selective risk (error rate among answered) the served abstention rule must reach")
    parser.add_argument("--min-coverage", type=float, default=MIN_COVERAGE,
                        help="the served rule must answer at least this fraction of validation questions")
    parser.add_argument("--abstain-on", default=",".join(DEFAULT_ABSTAIN_ON),
                        help="comma-separated scores of the served abstention rule, chosen jointly: predictive_entropy,"
                        " mutual_information, one_minus_max_probability, one_minus_feu (UQ4CT)")
    add_guarantee_arguments(parser)


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
    parser.add_argument("--prior", default=defaults.prior, choices=["delta", "factors"],
                        help="what the L2 prior is on: the update ΔW = (α/r)·BA per layer, or the factors A and B")
    parser.add_argument("--init-scale-a", type=float, default=defaults.init_scale_a,
                        help="multiplier on the bound of A's Kaiming-uniform init (B starts at 0)")
    parser.add_argument("--early-stopping", action="store_true", help="keep each member's best validation NLL")
    parser.add_argument("--eval-every", type=int, default=0)


def data_name(args: argparse.Namespace) -> str:
    """What a run's data is called in bundle names and configs: the benchmark, or the --train file's stem."""
    return Path(args.train).stem if args.train else args.dataset


def run_data(args: argparse.Namespace, base: BaseModel, answer_format: AnswerFormat,
             max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[TrainingData, PromptSpec, tuple[str, ...] | None]:
    """The run's prompt (from the flags), data (checked against that prompt's token budget) and label set."""
    prompt = prompt_from_args(args, base.tokenizer)
    data, labels = training_data(args, base.tokenizer, answer_format, prompt, max_tokens)
    print(f"[data] {json.dumps(data.provenance)}", flush=True)
    return data, prompt, labels


def train_and_export(base: BaseModel, config: EnsembleConfig, train: list[Question], val: list[Question],
                     out_dir: Path, name: str, *, rule: dict[str, Any] | None = None,
                     serve_base: BaseModel | None = None, log: Any = print,
                     data: TrainingData | None = None) -> BundleManifest:
    """Train the members on ``base`` (training dtype), calibrate them on ``serve_base`` (the float32 base the
    server loads; default ``base``, which must then be float32) as served, and write ``out_dir/name``."""
    started = time.perf_counter()
    scorer = ChoiceScorer(base.model, base.tokenizer, config.answer_format, config.max_tokens, config.prompt)
    multilora, history = train_ensemble(scorer, config, train, val, log=log)
    layout = multilora.layout
    members = {f"member-{m}": {k: v.float() for k, v in multilora.peft_state_dict(m).items()}
               for m in range(config.members)}
    multilora.remove()
    lora = LoraSpec(rank=layout.rank, alpha=layout.alpha, target_modules=layout.target_modules, layers=layout.layers)
    space = config.answer_space()
    weights = torch.full((config.members,), 1.0 / config.members)
    serve_base = serve_base or base
    calibration, thresholds = calibrate_members(serve_base, name=name, lora=lora, answer_space=space, members=members,
                                                weights=weights, val=val, **(rule or {}))
    return export_bundle(
        out_dir=out_dir, name=name, method=Method.ENSEMBLE, base=serve_base.info, lora=lora, answer_space=space,
        members=members, seeds={f"member-{m}": config.seed * 1000 + m for m in range(config.members)},
        weights=weights, calibration=calibration, thresholds=thresholds,
        training={"config": config.model_dump(mode="json"), "steps": history["steps"],
                  "train_seconds": history["seconds"], "total_seconds": round(time.perf_counter() - started, 1),
                  "history": history["history"], "data": None if data is None else data.provenance},
        data_hashes=data.hashes() if data else {"train": data_hash(train), "validation": data_hash(val)},
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    base = load_base_model(args.base_model, dtype=getattr(torch, args.dtype), device=args.device)
    data, prompt, labels = run_data(args, base, AnswerFormat(args.answer_format))
    config = EnsembleConfig(
        dataset=data_name(args), prompt=prompt, labels=labels, base_model=args.base_model,
        answer_format=args.answer_format, members=args.members,
        rank=args.rank, alpha=args.alpha, target_modules=tuple(args.target_modules.split(",")),
        top_layers=args.top_layers, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        prior_precision=args.prior_precision, seed=args.seed, train_limit=args.train_limit,
        prior=args.prior, init_scale_a=args.init_scale_a,
        val_limit=args.val_limit, early_stopping=args.early_stopping, eval_every=args.eval_every,
        threads=args.threads, dtype=args.dtype)
    name = args.name or f"{data_name(args)}-{'map' if args.members == 1 else f'ensemble{args.members}'}"
    print(f"[train] {name}: {config.model_dump_json()}", flush=True)
    rule = {"target_risk": args.target_risk, "min_coverage": args.min_coverage,
            "abstain_on": tuple(args.abstain_on.split(","))}
    serve_base = served_base(base, args.base_model, args.device)
    manifest = train_and_export(base, config, data.train, data.validation, Path(args.out), name, rule=rule,
                                serve_base=serve_base, data=data)
    guarantees = guarantee_bundle(serve_base, Path(args.out) / name, data.calibration, args)
    print(json.dumps({"bundle": str(Path(args.out) / name), "temperature": manifest.calibration.temperature,
                      "validation": {k: round(v, 4) for k, v in manifest.calibration.validation_metrics.items()
                                     if k in ("acc", "nll", "ece", "brier", "uncalibrated_nll", "uncalibrated_ece")},
                      "abstention": manifest.thresholds.target, **guarantees,
                      "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    return 0
