"""Held-out evaluation of a bundle (or the zero-shot base model): metrics JSON and plots.

:func:`bundle_prediction` computes, offline, exactly what the server answers (same :mod:`core.predictive`
functions, same temperature, same per-question Laplace draws); export calibrates on it and ``uqserve eval``
reports it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from core.answers import AnswerFormat
from core.basemodel import BaseModel
from core.bundle import Bundle, Method
from core.laplace import LaplaceConfig, LaplacePosterior
from core.laplace_tap import LoraTap
from core.metrics import finite_metrics, risk_coverage, summarize_scores
from core.multilora import MultiLora
from core.predictive import (
    BundlePrediction,
    ensemble_prediction,
    laplace_outputs,
    laplace_prediction,
    moe_prediction,
    question_normals,
)
from core.prompt import PromptSpec
from core.scoring import ChoiceScorer
from training.ensemble import member_scores
from training.trunk import TrunkCache


def attach_bundle(base: BaseModel, bundle: Bundle) -> MultiLora:
    """A MultiLora on ``base`` with slot m = member m of the bundle (its own layout and scaling)."""
    lora = bundle.manifest.lora
    multilora = MultiLora(base.model, lora.layout(), num_slots=len(bundle.manifest.members))
    multilora.to(next(base.model.parameters()).device)
    for slot, member in enumerate(bundle.manifest.members):
        multilora.load_peft_state_dict(slot, bundle.members[member.name], scaling=lora.alpha / lora.rank)
    return multilora


def bundle_member_scores(base: BaseModel, bundle: Bundle, questions: list[Any], batch_size: int = 16,
                         desc: str = "eval", members: Sequence[str] | None = None) -> torch.Tensor:
    """Raw member scores [N, M, K] of a bundle's members (all, or those named) on ``questions`` (shared
    trunk below its layers)."""
    space = bundle.manifest.answer_space
    scorer = ChoiceScorer(base.model, base.tokenizer, space.answer_format, space.max_tokens, space.prompt)
    multilora = attach_bundle(base, bundle)
    names = [m.name for m in bundle.manifest.members]
    slots = range(len(names)) if members is None else [names.index(m) for m in members]
    try:
        cache = TrunkCache(scorer, questions, bundle.manifest.lora.layout().first_layer, desc=f"trunk({desc})")
        return member_scores(scorer, multilora, slots, cache, batch_size, desc=desc)
    finally:
        multilora.remove()


def laplace_outputs_of(base: BaseModel, bundle: Bundle, questions: list[Any], temperature: float,
                       prior_precision: float | None = None, batch_size: int = 8,
                       desc: str = "eval") -> torch.Tensor:
    """Raw Laplace outputs [N, 1 + S, K] (:func:`core.predictive.laplace_outputs`) of a laplace bundle's
    posterior at its λ (or ``prior_precision``) on ``questions``, with the per-question MC draws the server
    uses."""
    from training.laplace import linearized_pass

    config = LaplaceConfig.model_validate(bundle.manifest.method_config)
    structure = config.structure
    posterior = LaplacePosterior.from_tensors(bundle.artifacts[config.artifact[structure]],  # type: ignore[arg-type]
                                              config.blocks[structure], config.prior_precision[structure])
    lam = posterior.prior_precision if prior_precision is None else prior_precision
    lora = bundle.manifest.lora
    space = bundle.manifest.answer_space
    scorer = ChoiceScorer(base.model, base.tokenizer, space.answer_format, space.max_tokens, space.prompt)
    tap = LoraTap(base.model, bundle.members[config.map_member], lora.alpha / lora.rank)
    cache = TrunkCache(scorer, questions, min(lora.layers), desc=f"trunk({desc})")
    lin = linearized_pass(scorer, tap, cache, {structure: (posterior, torch.tensor([lam], dtype=torch.float64))},
                          batch_size, desc=desc)
    eps = question_normals(cache.encoded, config.seed, config.mc_samples, lin.mean.shape[-1])
    return laplace_outputs(lin.mean, lin.cov[structure][0], temperature, eps)


def bundle_predictions(base: BaseModel, bundle: Bundle, questions: list[Any],
                       desc: str = "eval") -> tuple[BundlePrediction, BundlePrediction | None]:
    """(served, uncalibrated) predictive of ``questions`` with this bundle, for every method and link: the
    served one is exactly what the server answers, computed offline by the same :mod:`core.predictive`
    functions its predictors call; the uncalibrated one (T = 1, same scores) where it comes free (ensemble
    and moe), else None."""
    manifest = bundle.manifest
    temperature = manifest.calibration.temperature
    if manifest.method == Method.MOE:
        from training.uq4ct import moe_bundle_scores

        scores, feu = moe_bundle_scores(base, bundle, questions, desc=desc)
        return moe_prediction(scores, feu, temperature), moe_prediction(scores, feu, 1.0)
    weights: torch.Tensor | None = manifest.weights()
    members = None
    if manifest.method == Method.LAPLACE:
        config = LaplaceConfig.model_validate(manifest.method_config)
        if config.link != "samples":
            outputs = laplace_outputs_of(base, bundle, questions, temperature, desc=desc)
            return laplace_prediction(outputs, config.link, f"laplace {config.structure}/{config.link}"), None
        members, weights = config.sample_members, None
    scores = bundle_member_scores(base, bundle, questions, desc=desc, members=members)
    return ensemble_prediction(scores, temperature, weights), ensemble_prediction(scores, 1.0, weights)


def bundle_prediction(base: BaseModel, bundle: Bundle, questions: list[Any], desc: str = "eval") -> BundlePrediction:
    """What the server answers for ``questions`` with this bundle (see :func:`bundle_predictions`)."""
    return bundle_predictions(base, bundle, questions, desc)[0]


def evaluate_prediction(prediction: BundlePrediction, labels: torch.Tensor, out_dir: Path | None, title: str,
                        uncalibrated: BundlePrediction | None = None, plots: bool = True) -> dict[str, Any]:
    """Metrics of the served predictive (and of the uncalibrated one, when given); metrics undefined for the
    method are null with their reason in ``undefined``. Writes metrics.json and PNGs to out_dir."""
    reason = prediction.notes[0] if (not prediction.has_mi and prediction.notes) else "undefined for this method"
    metrics, undefined = finite_metrics(summarize_scores(prediction.scores, labels, prediction.has_mi), reason)
    result: dict[str, Any] = {"title": title, "metrics": {**metrics, **dict.fromkeys(undefined)},
                              "undefined": undefined}
    if uncalibrated is not None:
        raw, _ = finite_metrics(summarize_scores(uncalibrated.scores, labels, uncalibrated.has_mi), reason)
        result["metrics_uncalibrated"] = {**raw, **dict.fromkeys(undefined)}
    if out_dir is None:
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    if plots:
        from training.plots import accuracy_coverage_curve, mi_entropy_histogram, reliability_diagram

        u = prediction.scores
        correct = u.probabilities.argmax(-1) == labels
        reliability_diagram(u.probabilities, labels, out_dir / "reliability.png", title)
        detectors = {"predictive entropy": u.predictive_entropy, "1 - max p": 1 - u.max_probability}
        if prediction.has_mi:
            detectors["mutual information"] = u.mutual_information
        if prediction.feu is not None:
            detectors["1 - FEU"] = 1 - prediction.feu
        curves = {}
        for label, score in detectors.items():
            coverage, risk = risk_coverage(score, correct)
            curves[label] = (coverage, 1 - risk)
        accuracy_coverage_curve(curves, out_dir / "accuracy_coverage.png", title)
        if prediction.has_mi:
            mi_entropy_histogram(u.predictive_entropy, u.mutual_information, correct, out_dir / "mi_vs_entropy.png",
                                 title)
    return result


def zero_shot_scores(base: BaseModel, questions: list[Any], answer_format: str, batch_size: int = 16,
                     prompt: PromptSpec | None = None) -> torch.Tensor:
    """The base model's choice scores [N, 1, K] (no adapter), with the built-in prompt or ``prompt``."""
    scorer = ChoiceScorer(base.model, base.tokenizer, AnswerFormat(answer_format), prompt=prompt)
    cache = TrunkCache(scorer, questions, scorer.num_layers, desc="trunk(zero-shot)")
    return member_scores(scorer, None, [0], cache, batch_size, desc="zero-shot")


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
