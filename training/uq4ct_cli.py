"""``uqserve train uq4ct``: train a mixture of LoRA experts with UQ4CT's calibration loss, write a ``moe`` bundle.

The bundle: ``moe.safetensors`` (artifact role ``moe``) holds every router and expert; the one member
``expert-0`` is expert 0 as a plain peft LoRA, present only because a bundle needs a member (see
:func:`core.moe.method_config`). Temperature, validation metrics and thresholds come from
:func:`training.export.calibrate` on the served predictive of the MoE on validation (float32 base).
"""

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
from core.calibration import fit_temperature
from core.datasets import data_hash
from core.metrics import auroc, reliability_bins
from core.moe import ARTIFACT_FILE, ARTIFACT_ROLE, MixLora, method_config
from core.predictive import moe_prediction
from core.scoring import ChoiceScorer
from training.ensemble_cli import add_adapter_arguments, add_common_arguments, data_name, run_data
from training.export import calibrate, dtype_name, export_bundle
from training.guarantees import guarantee_bundle
from training.trunk import TrunkCache
from training.uq4ct import UQ4CTConfig, moe_scores, train_uq4ct


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    d = UQ4CTConfig()
    parser.add_argument("--experts", type=int, default=d.num_experts, help="N LoRA experts per adapted linear")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="experts kept per token by each router")
    add_adapter_arguments(parser, d)
    parser.add_argument("--beta", type=float, default=d.beta, help="weight of L_cal (0 = plain MixLoRA)")
    parser.add_argument("--beta-warmup-steps", type=int, default=d.beta_warmup_steps,
                        help="incremental β: min(1, step / w) · β (paper: 50); 0 = constant β")
    parser.add_argument("--aux-weight", type=float, default=d.aux_weight, help="α, weight of the load-balance loss")
    parser.add_argument("--load-balance-coef", type=float, default=d.load_balance_coef, help="a inside L_b")


def config_from_args(args: argparse.Namespace, **data: Any) -> UQ4CTConfig:
    """The recipe from the flags; ``data`` sets dataset, prompt and labels (see :func:`run`)."""
    return UQ4CTConfig(
        **{"dataset": args.dataset, **data}, base_model=args.base_model, answer_format=args.answer_format,
        num_experts=args.experts, top_k=args.top_k, rank=args.rank, alpha=args.alpha,
        target_modules=tuple(args.target_modules.split(",")), top_layers=args.top_layers, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, beta=args.beta, beta_warmup_steps=args.beta_warmup_steps,
        aux_weight=args.aux_weight, load_balance_coef=args.load_balance_coef, seed=args.seed,
        train_limit=args.train_limit, val_limit=args.val_limit, threads=args.threads, dtype=args.dtype)


def feu_summary(scores: torch.Tensor, feu: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """How well FEU tracks correctness: mean (overall, on correct, on wrong answers), ECE of FEU read as
    P(correct) (what L_cal targets), AUROC of 1 − FEU for errors, and an abstention threshold on 1 − FEU
    chosen like the bundle's other thresholds. scores [N, K], feu [N], labels [N]."""
    correct = scores.argmax(-1) == labels
    one_minus = 1.0 - feu
    bins = reliability_bins(feu, correct)
    filled = bins.count > 0
    feu_ece = float((bins.count[filled] / len(feu) * (bins.accuracy[filled] - bins.confidence[filled]).abs()).sum())
    return {"feu_mean": float(feu.mean()), "feu_mean_correct": float(feu[correct].mean()) if correct.any() else 0.0,
            "feu_mean_wrong": float(feu[~correct].mean()) if (~correct).any() else 0.0,
            "feu_ece": feu_ece, "auroc_one_minus_feu": auroc(one_minus, ~correct)}


def train_and_export(base: BaseModel, config: UQ4CTConfig, train: list[Question], val: list[Question],
                     out_dir: Path, name: str, log: Any = print, train_cache: TrunkCache | None = None,
                     eval_base: BaseModel | None = None, val_cache: TrunkCache | None = None,
                     rule: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None,
                     hashes: dict[str, str] | None = None) -> BundleManifest:
    """Train the mixture on ``base`` (in the training dtype), calibrate on validation, write the bundle.

    Calibration runs on ``eval_base`` (the float32 base the server loads; default: ``base`` cast to
    float32), so temperature and thresholds fit exactly what is served. Sweeps pass prebuilt trunk caches:
    ``train_cache`` of ``base``, ``val_cache`` of ``eval_base``. ``rule`` goes to
    :func:`training.export.calibrate` (target risk, coverage, scores of the served abstention rule)."""
    started = time.perf_counter()
    scorer = ChoiceScorer(base.model, base.tokenizer, config.answer_format, config.max_tokens, config.prompt)
    moe, history = train_uq4ct(scorer, config, train, val, log=log, train_cache=train_cache)
    tensors, layout = moe.artifact_tensors(), moe.layout
    moe.remove()
    if eval_base is None:
        base.model.float()
        eval_base = base
    scorer = ChoiceScorer(eval_base.model, eval_base.tokenizer, config.answer_format, config.max_tokens, config.prompt)
    moe = MixLora(eval_base.model, layout).to(scorer.device)
    moe.load_artifact(tensors)
    try:
        if val_cache is None or val_cache.split != layout.first_layer:
            val_cache = TrunkCache(scorer, val, layout.first_layer, desc="trunk(val fp32)")
        val_scores, val_feu = moe_scores(scorer, moe, val_cache, desc="val")
        labels = torch.tensor([q.answer for q in val])
        summary = feu_summary(val_scores, val_feu, labels)
        temperature = fit_temperature(val_scores, labels)
        calibration, thresholds = calibrate(
            moe_prediction(val_scores, val_feu, temperature), labels, temperature=temperature,
            uncalibrated=moe_prediction(val_scores, val_feu, 1.0), dtype=dtype_name(eval_base), **(rule or {}))
        return export_bundle(
            out_dir=out_dir, name=name, method=Method.MOE, base=eval_base.info,
            lora=LoraSpec(rank=layout.rank, alpha=layout.alpha, target_modules=layout.target_modules,
                          layers=layout.layers),
            answer_space=config.answer_space(),
            members={"expert-0": moe.expert_peft_state_dict(0)}, seeds={"expert-0": config.seed},
            weights=torch.ones(1), calibration=calibration, thresholds=thresholds,
            training={"config": config.model_dump(mode="json"), "steps": history["steps"],
                      "train_seconds": history["seconds"], "total_seconds": round(time.perf_counter() - started, 1),
                      "history": history["history"], "data": provenance},
            data_hashes={"train": data_hash(train), "validation": data_hash(val), **(hashes or {})},
            artifacts={ARTIFACT_ROLE: tensors}, artifact_files={ARTIFACT_ROLE: ARTIFACT_FILE},
            method_config=method_config(layout, validation=summary),
        )
    finally:
        moe.remove()


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    base = load_base_model(args.base_model, dtype=getattr(torch, args.dtype), device=args.device)
    data, prompt, labels = run_data(args, base, AnswerFormat(args.answer_format))
    config = config_from_args(args, dataset=data_name(args), prompt=prompt, labels=labels)
    name = args.name or f"{data_name(args)}-{'uq4ct' if config.beta > 0 else 'mixlora'}"
    print(f"[train] {name}: {config.model_dump_json()}", flush=True)
    train, val = data.train, data.validation
    eval_base = None if config.dtype == "float32" else load_base_model(args.base_model, device=args.device)
    rule = {"target_risk": args.target_risk, "min_coverage": args.min_coverage,
            "abstain_on": tuple(args.abstain_on.split(","))}
    manifest = train_and_export(base, config, train, val, Path(args.out), name, eval_base=eval_base, rule=rule,
                                provenance=data.provenance, hashes=data.hashes())
    guarantees = guarantee_bundle(eval_base or base, Path(args.out) / name, data.calibration, args)
    metrics = manifest.calibration.validation_metrics
    print(json.dumps({"bundle": str(Path(args.out) / name), "temperature": manifest.calibration.temperature,
                      "validation": {k: round(v, 4) for k, v in metrics.items()
                                     if k in ("acc", "nll", "ece", "brier", "uncalibrated_nll", "uncalibrated_ece")},
                      "feu": {k: round(v, 4) for k, v in manifest.method_config["validation"].items()},
                      **guarantees,
                      "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    return 0
