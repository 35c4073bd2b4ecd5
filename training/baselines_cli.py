"""``uqserve train checkpoint-ensemble`` and ``uqserve train mc-dropout``: the seeds' cheap baselines
(:mod:`training.baselines`), trained, calibrated and written as ordinary ensemble bundles."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from core.answers import AnswerFormat
from core.basemodel import load_base_model
from core.bundle import BundleManifest
from training.baselines import CheckpointEnsembleConfig, McDropoutConfig, build_checkpoint_ensemble, build_mc_dropout
from training.ensemble import EnsembleConfig
from training.ensemble_cli import add_adapter_arguments, add_common_arguments, data_name, run_data
from training.export import served_base
from training.guarantees import guarantee_bundle


def _add_run_arguments(parser: argparse.ArgumentParser, defaults: EnsembleConfig) -> None:
    add_common_arguments(parser)
    add_adapter_arguments(parser, defaults)
    parser.add_argument("--prior-precision", type=float, default=defaults.prior_precision, help="λ of the L2 prior")
    parser.add_argument("--prior", default=defaults.prior, choices=["delta", "factors"],
                        help="what the L2 prior is on: the update ΔW = (α/r)·BA per layer, or the factors A and B")


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = CheckpointEnsembleConfig()
    _add_run_arguments(parser, defaults)
    parser.add_argument("--snapshots", type=int, default=defaults.snapshots,
                        help="K: members = adapter snapshots of the one run, the last after the final step")
    parser.add_argument("--snapshot-from", type=float, default=defaults.snapshot_from,
                        help="snapshots are spread evenly over the steps after this fraction of training")


def add_mc_dropout_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = McDropoutConfig()
    _add_run_arguments(parser, defaults)
    parser.add_argument("--dropout", type=float, default=defaults.lora_dropout,
                        help="p: LoRA dropout on the input of A while training (per element) and in the export masks")
    parser.add_argument("--samples", type=int, default=defaults.samples,
                        help="S: members, one fixed dropout mask (tied across token positions) each")
    parser.add_argument("--mask-seed", type=int, default=defaults.mask_seed, help="seed of the S export masks")


def _config_fields(args: argparse.Namespace, data: Any, prompt: Any, labels: Any) -> dict[str, Any]:
    return dict(dataset=data_name(args), prompt=prompt, labels=labels, base_model=args.base_model,
                answer_format=args.answer_format, rank=args.rank, alpha=args.alpha,
                target_modules=tuple(args.target_modules.split(",")), top_layers=args.top_layers, epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, prior_precision=args.prior_precision, prior=args.prior,
                seed=args.seed, train_limit=args.train_limit, val_limit=args.val_limit, threads=args.threads,
                dtype=args.dtype)


def run_baseline(args: argparse.Namespace, kind: str) -> int:
    started = time.perf_counter()
    base = load_base_model(args.base_model, dtype=getattr(torch, args.dtype), device=args.device)
    data, prompt, labels = run_data(args, base, AnswerFormat(args.answer_format))
    fields = _config_fields(args, data, prompt, labels)
    rule = {"target_risk": args.target_risk, "min_coverage": args.min_coverage,
            "abstain_on": tuple(args.abstain_on.split(","))}
    serve_base = served_base(base, args.base_model, args.device)
    out = Path(args.out)
    manifest: BundleManifest
    if kind == "checkpoint":
        checkpoint = CheckpointEnsembleConfig(**fields, snapshots=args.snapshots, snapshot_from=args.snapshot_from)
        name = args.name or f"{data_name(args)}-checkpoint{args.snapshots}"
        print(f"[train] {name}: {checkpoint.model_dump_json()}", flush=True)
        manifest = build_checkpoint_ensemble(base, checkpoint, data.train, data.validation, out, name,
                                             serve_base=serve_base, rule=rule, data=data)
    else:
        dropout = McDropoutConfig(**fields, lora_dropout=args.dropout, samples=args.samples, mask_seed=args.mask_seed)
        name = args.name or f"{data_name(args)}-mcdropout{args.samples}"
        print(f"[train] {name}: {dropout.model_dump_json()}", flush=True)
        manifest, _ = build_mc_dropout(base, dropout, data.train, data.validation, out, name,
                                       serve_base=serve_base, rule=rule, data=data)
    guarantees = guarantee_bundle(serve_base, out / name, data.calibration, args)
    print(json.dumps({"bundle": str(out / name), "method": manifest.method.value,
                      "members": [m.name for m in manifest.members], "temperature": manifest.calibration.temperature,
                      "validation": {k: round(v, 4) for k, v in manifest.calibration.validation_metrics.items()
                                     if k in ("acc", "nll", "ece", "brier", "mean_mi", "uncalibrated_nll")},
                      "abstention": manifest.thresholds.target, **guarantees,
                      "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    return 0
