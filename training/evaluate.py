"""Held-out evaluation of a bundle (or the zero-shot base model): metrics JSON and plots."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from core.basemodel import BaseModel
from core.bundle import Bundle
from core.calibration import apply_temperature
from core.metrics import risk_coverage, summarize
from core.multilora import MultiLora
from core.scoring import ChoiceScorer
from core.uncertainty import decompose
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
                         desc: str = "eval") -> torch.Tensor:
    """Raw member scores [N, M, K] of a bundle's members on ``questions`` (shared trunk below its layers)."""
    space = bundle.manifest.answer_space
    scorer = ChoiceScorer(base.model, base.tokenizer, space.answer_format, space.max_tokens)
    multilora = attach_bundle(base, bundle)
    try:
        cache = TrunkCache(scorer, questions, bundle.manifest.lora.layout().first_layer, desc=f"trunk({desc})")
        return member_scores(scorer, multilora, range(len(bundle.manifest.members)), cache, batch_size, desc=desc)
    finally:
        multilora.remove()


def evaluate_scores(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, temperature: float,
                    out_dir: Path | None, title: str, plots: bool = True) -> dict[str, Any]:
    """Metrics before/after temperature for member scores [N, M, K]; writes metrics.json and PNGs to out_dir."""
    calibrated = apply_temperature(scores, temperature)
    result: dict[str, Any] = {
        "title": title,
        "temperature": temperature,
        "metrics": summarize(calibrated, labels, weights),
        "metrics_uncalibrated": summarize(apply_temperature(scores, 1.0), labels, weights),
    }
    if out_dir is None:
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    if plots:
        from training.plots import accuracy_coverage_curve, mi_entropy_histogram, reliability_diagram

        u = decompose(calibrated, weights)
        correct = u.probabilities.argmax(-1) == labels
        reliability_diagram(u.probabilities, labels, out_dir / "reliability.png", title)
        curves = {}
        for label, score in (("predictive entropy", u.predictive_entropy), ("mutual information",
                             u.mutual_information), ("1 - max p", 1 - u.max_probability)):
            coverage, risk = risk_coverage(score, correct)
            curves[label] = (coverage, 1 - risk)
        accuracy_coverage_curve(curves, out_dir / "accuracy_coverage.png", title)
        mi_entropy_histogram(u.predictive_entropy, u.mutual_information, correct, out_dir / "mi_vs_entropy.png",
                             title)
    return result


def zero_shot_scores(base: BaseModel, questions: list[Any], answer_format: str, batch_size: int = 16) -> torch.Tensor:
    """The base model's choice scores [N, 1, K] (no adapter)."""
    scorer = ChoiceScorer(base.model, base.tokenizer, answer_format)
    cache = TrunkCache(scorer, questions, scorer.num_layers, desc="trunk(zero-shot)")
    return member_scores(scorer, None, [0], cache, batch_size, desc="zero-shot")


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
