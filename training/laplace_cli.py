"""``uqserve train laplace``: Laplace-LoRA over a MAP LoRA bundle (or one trained first), exported as a bundle.

Steps: curvature over the training set (KFAC + diagonal GGN of the K-choice likelihood) → prior precision
per structure (kron, diag, llla) by the log marginal likelihood and by a validation-NLL grid, the chosen
one by ``--prior`` → validation predictive → bundle: the MAP adapter as member ``map`` (peft format),
the Kronecker factors and the diagonal as safetensors artifacts, the predictive settings, λ and the
evidence in ``method_config`` (see :class:`core.laplace.LaplaceConfig`), optionally S weight samples as
extra members.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core.answers import Question
from core.basemodel import BaseModel, load_base_model
from core.bundle import Method, read_bundle
from core.calibration import apply_temperature
from core.datasets import data_hash
from core.laplace import LaplaceConfig
from core.laplace_tap import LoraTap
from core.predictive import laplace_outputs, laplace_prediction, question_normals
from core.scoring import ChoiceScorer
from training.data_cli import forward_flags, training_data
from training.ensemble_cli import add_common_arguments, data_name
from training.export import calibrate, calibrate_members, dtype_name, export_bundle
from training.guarantees import guarantee_bundle
from training.laplace import (
    CurvatureConfig,
    fit_curvature,
    last_layer_keys,
    linearized_pass,
    predictive_nll,
    prior_grid,
)
from training.trunk import TrunkCache

ARTIFACTS = {"kfac": "laplace_kfac.safetensors", "diag": "laplace_diag.safetensors"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--map-bundle", default=None, help="1-member bundle holding the MAP LoRA "
                        "(default: <out>/<dataset>-map)")
    parser.add_argument("--from-scratch", action="store_true", help="train the MAP LoRA first (ensemble "
                        "defaults, 1 member)")
    defaults = CurvatureConfig()
    parser.add_argument("--tokens", default=defaults.tokens, choices=["reduce", "expand"],
                        help="KFAC over a question's tokens: reduce (sequence-level, default) or expand")
    parser.add_argument("--max-factor-dim", type=int, default=defaults.max_factor_dim,
                        help="Kronecker factors wider than this keep only --low-rank eigenpairs")
    parser.add_argument("--low-rank", type=int, default=defaults.low_rank)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--curvature-limit", type=int, default=None,
                        help="fit the curvature on a random subset of this many training questions, scaled to all")
    parser.add_argument("--prior", default="val-nll", choices=["marglik", "val-nll"],
                        help="prior precision: validation-NLL grid over ±4 decades around the marginal-likelihood "
                        "optimum (default), or the marginal-likelihood optimum itself (the seed paper's default; on "
                        "ARC-E it over-disperses an already calibrated MAP: val NLL 0.925 → 1.011)")
    parser.add_argument("--structure", default="kron", choices=["kron", "diag", "llla"], help="served posterior")
    parser.add_argument("--link", default="probit", choices=["probit", "mc", "samples"], help="served predictive")
    parser.add_argument("--mc-samples", type=int, default=32)
    parser.add_argument("--weight-samples", type=int, default=0, help="S weight samples as extra members")


def _train_map(args: argparse.Namespace) -> Path:
    from training import ensemble_cli

    parser = argparse.ArgumentParser()
    ensemble_cli.add_arguments(parser)
    name = f"{ensemble_cli.data_name(args)}-map"
    argv = ["--members", "1", "--out", args.out, "--name", name, "--base-model", args.base_model,
            "--answer-format", args.answer_format, "--seed", str(args.seed), "--device", args.device,
            *forward_flags(args)]
    ensemble_cli.run(parser.parse_args(argv))
    return Path(args.out) / name


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    stem = data_name(args)
    map_path = Path(args.map_bundle) if args.map_bundle else Path(args.out) / f"{stem}-map"
    if args.from_scratch:
        map_path = _train_map(args)
    base = load_base_model(args.base_model, dtype=torch.float32, device=args.device)
    space = read_bundle(map_path, expect_base=base.info).manifest.answer_space  # the MAP's prompt and labels
    data, _ = training_data(args, base.tokenizer, space.answer_format, space.prompt, space.max_tokens)
    train, val = data.train, data.validation
    config = CurvatureConfig(tokens=args.tokens, max_factor_dim=args.max_factor_dim, low_rank=args.low_rank,
                             batch_size=args.batch_size)
    summary = build_bundle(base, map_path, train, val, Path(args.out), args.name or f"{stem}-laplace",
                           config=config, prior=args.prior, structure=args.structure, link=args.link,
                           mc_samples=args.mc_samples, weight_samples=args.weight_samples, seed=args.seed,
                           curvature_limit=args.curvature_limit,
                           rule={"target_risk": args.target_risk, "min_coverage": args.min_coverage,
                                 "abstain_on": tuple(args.abstain_on.split(","))})
    summary.update(guarantee_bundle(base, Path(summary["bundle"]), data.calibration, args))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary, indent=2))
    return 0


def build_bundle(base: BaseModel, map_path: Path, train: list[Question], val: list[Question], out: Path,
                 name: str, *, config: CurvatureConfig, prior: str = "val-nll", structure: str = "kron",
                 link: str = "probit", mc_samples: int = 32, weight_samples: int = 0, seed: int = 0,
                 curvature_limit: int | None = None, log: Callable[[str], Any] = print,
                 rule: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit Laplace over the MAP bundle at ``map_path`` and write ``out/name``; returns a summary."""
    started = time.perf_counter()
    map_bundle = read_bundle(map_path, expect_base=base.info)
    manifest = map_bundle.manifest
    if len(manifest.members) != 1:
        raise ValueError(f"{map_path} has {len(manifest.members)} members; Laplace needs a MAP bundle")
    map_tensors = map_bundle.members[manifest.members[0].name]
    space, lora = manifest.answer_space, manifest.lora
    scorer = ChoiceScorer(base.model, base.tokenizer, space.answer_format, space.max_tokens, space.prompt)
    tap = LoraTap(base.model, map_tensors, lora.alpha / lora.rank)
    split = min(lora.layers)
    log(f"[laplace] {name}: MAP {map_path}, {len(train)} train / {len(val)} val, {config.model_dump_json()}")
    t0 = time.perf_counter()
    subset = list(train)
    if curvature_limit is not None and curvature_limit < len(train):
        subset = random.Random(seed).sample(subset, curvature_limit)
    curv = fit_curvature(scorer, tap, TrunkCache(scorer, subset, split, desc="trunk(train)"), config, log)
    curv.rescale(len(train))
    curvature_s = time.perf_counter() - t0
    kron = curv.kron()
    posteriors = {"kron": kron, "diag": curv.diagonal(), "llla": kron.subset(last_layer_keys(kron))}
    weights = tap.weights()
    evidence: dict[str, dict[str, float]] = {}
    for key, post in posteriors.items():
        sq_norm = sum(float(weights[k].double().pow(2).sum()) for k in post.blocks)
        lam, log_ev = post.optimize_prior_precision(curv.nll_sum, sq_norm)
        evidence[key] = {"marglik_prior_precision": lam, "log_marginal_likelihood": log_ev,
                         "num_params": post.num_params}
        log(f"[laplace] {key}: {post.num_params} params, marglik λ = {lam:.4g} (log evidence {log_ev:.2f})")
    # validation: NLL of the probit predictive over a λ grid around each marglik optimum (the optimum last)
    grids = {k: torch.cat([prior_grid(evidence[k]["marglik_prior_precision"]),
                           torch.tensor([evidence[k]["marglik_prior_precision"]], dtype=torch.float64)])
             for k in posteriors}
    val_cache = TrunkCache(scorer, val, split, desc="trunk(val)")
    lin = linearized_pass(scorer, tap, val_cache, {k: (p, grids[k]) for k, p in posteriors.items()},
                          config.batch_size, desc="val")
    labels = torch.tensor([q.answer for q in val])
    eps = question_normals(val_cache.encoded, seed, mc_samples, lin.mean.shape[-1])  # the server's draws
    chosen: dict[str, float] = {}
    chosen_index: dict[str, int] = {}
    for key in posteriors:
        # λ by the validation NLL of the predictive that is served (samples: its linearized MC proxy)
        nlls = predictive_nll(lin.mean, lin.cov[key], labels, link if key == structure else "probit", eps)
        best = int(nlls[:-1].argmin())
        evidence[key].update(val_nll_prior_precision=float(grids[key][best]), val_nll_at_val_best=float(nlls[best]),
                             val_nll_at_marglik=float(nlls[-1]), val_nll_link=link if key == structure else "probit")
        chosen_index[key] = -1 if prior == "marglik" else best
        chosen[key] = float(grids[key][chosen_index[key]])
        posteriors[key].prior_precision = chosen[key]
    cov = lin.cov[structure][chosen_index[structure]]  # [N, K, K]
    map_val = _map_metrics(lin.mean, labels)
    # members: the MAP adapter, then optional weight samples (ensemble-compatible)
    members = {"map": map_tensors}
    generator = torch.Generator().manual_seed(seed + 1)
    for s, drawn in enumerate(posteriors[structure].sample(weights, weight_samples, generator)):
        members[f"sample-{s}"] = {k: v.cpu() for k, v in drawn.items()}
    sample_names = [m for m in members if m != "map"]
    space_spec = space  # the MAP bundle's format, prompt and labels
    rule = rule or {}
    # calibration of exactly the served predictive of the chosen link
    if link == "samples":
        calibration, thresholds = calibrate_members(
            base, name=name, lora=lora, answer_space=space_spec, members={m: members[m] for m in sample_names},
            weights=torch.ones(len(sample_names)), val=val, fit_temperature=False, **rule)
    else:
        served = laplace_prediction(laplace_outputs(lin.mean, cov, 1.0, eps), link, f"laplace {structure}/{link}")
        calibration, thresholds = calibrate(served, labels, dtype=dtype_name(base), **rule)
    log(f"[laplace] served {structure}/{link} λ = {chosen[structure]:.4g}: val NLL MAP {map_val['nll']:.4f} → "
        f"{calibration.validation_metrics['nll']:.4f}; abstention: {thresholds.target}")
    kron_tensors, kron_table = posteriors["kron"].to_tensors()
    diag_tensors, diag_table = posteriors["diag"].to_tensors()
    method_config = LaplaceConfig(
        structure=structure, link=link, mc_samples=mc_samples, seed=seed, prior_precision=chosen,  # type: ignore[arg-type]
        map_member="map", sample_members=sample_names,
        blocks={"kron": kron_table, "diag": diag_table, "llla": {k: kron_table[k] for k in posteriors["llla"].blocks}},
    ).model_dump(mode="json")
    method_config.update(prior_method=prior, evidence=evidence, curvature=config.model_dump(mode="json"),
                         nll_sum_train=curv.nll_sum, num_data=curv.num_data, curvature_questions=len(subset))
    written = export_bundle(
        out_dir=out, name=name, method=Method.LAPLACE, base=base.info, lora=lora, answer_space=space_spec,
        members=members, seeds={m: None for m in members}, weights=torch.full((len(members),), 1.0 / len(members)),
        calibration=calibration, thresholds=thresholds,
        training={"map_bundle": str(map_path), "map_training": manifest.training.get("config", {}),
                  "curvature_seconds": round(curvature_s, 1), "total_seconds": round(time.perf_counter() - started, 1)},
        data_hashes={"train": data_hash(train), "validation": data_hash(val)},
        artifacts={"kfac": kron_tensors, "diag": diag_tensors}, artifact_files=ARTIFACTS, method_config=method_config)
    read_bundle(out / name, expect_base=base.info)  # validates what was written
    metrics = written.calibration.validation_metrics
    return {"bundle": str(out / name), "structure": structure, "link": link, "prior_precision": chosen,
            "evidence": evidence, "curvature_seconds": round(curvature_s, 1),
            "val": {k: round(v, 4) for k, v in metrics.items() if k in ("acc", "nll", "ece", "brier", "auroc_mi")},
            "abstention": written.thresholds.target,
            "map_val_uncalibrated": {k: round(float(v), 4) for k, v in map_val.items()}}


def _map_metrics(mean: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    from core.metrics import brier, ece, nll

    p = apply_temperature(mean, 1.0)
    return {"acc": float((p.argmax(-1) == labels).double().mean()), "nll": nll(p, labels), "ece": ece(p, labels),
            "brier": brier(p, labels)}

