"""Calibrate on validation and write a bundle: the one exporter every training method goes through.

From validation member scores ``[N, M, K]`` it fits one temperature shared by the members, measures
validation metrics before and after it, stores reference histograms of confidence / entropy / MI (the
server's label-free drift baseline) and recommended abstention thresholds, then writes the bundle via
:func:`core.bundle.write_bundle`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from core.basemodel import BaseModelInfo
from core.bundle import (
    AnswerSpaceSpec,
    BundleManifest,
    Calibration,
    Histogram,
    LoraSpec,
    MemberSpec,
    Method,
    Thresholds,
    base_ref,
    provenance,
    write_bundle,
)
from core.calibration import apply_temperature, choose_thresholds, fit_temperature_members
from core.metrics import reference_histograms, summarize
from core.uncertainty import decompose

TARGET_RISK = 0.2
MIN_COVERAGE = 0.5


def calibrate(val_scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, fit_temperature: bool = True,
              target_risk: float = TARGET_RISK) -> tuple[Calibration, Thresholds]:
    """Temperature, validation metrics, reference histograms and thresholds from val_scores [N, M, K]."""
    temperature = fit_temperature_members(val_scores, labels, weights) if fit_temperature else 1.0
    raw = summarize(apply_temperature(val_scores, 1.0), labels, weights)
    probs = apply_temperature(val_scores, temperature)
    tempered = summarize(probs, labels, weights)
    metrics = {**tempered, **{f"uncalibrated_{k}": v for k, v in raw.items() if k in ("acc", "nll", "ece", "brier")}}
    metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}  # undefined ones (e.g. AUROC, one class) left out
    scores = decompose(probs, weights)
    num_choices = int(torch.isfinite(val_scores[:, 0]).sum(-1).max())
    histograms = {k: Histogram(edges=tuple(v["edges"]), counts=tuple(v["counts"]))
                  for k, v in reference_histograms(scores, num_choices=num_choices).items()}
    correct = scores.probabilities.argmax(-1) == labels
    candidates = {"predictive_entropy": scores.predictive_entropy,
                  "one_minus_max_probability": 1 - scores.max_probability}
    if val_scores.shape[1] > 1:
        candidates["mutual_information"] = scores.mutual_information
    chosen = choose_thresholds(candidates, correct, target_risk=target_risk, min_coverage=MIN_COVERAGE)
    thresholds = Thresholds(
        predictive_entropy=chosen.get("predictive_entropy"),
        mutual_information=chosen.get("mutual_information"),
        one_minus_max_probability=chosen.get("one_minus_max_probability"),
        target=f"each score alone: risk<={target_risk} at coverage>={MIN_COVERAGE} on validation "
               f"(n={len(labels)}); abstaining when any trips is stricter",
    )
    return Calibration(temperature=temperature, validation_metrics=metrics, reference_histograms=histograms), thresholds


def export_bundle(*, out_dir: Path, name: str, method: Method, base: BaseModelInfo, lora: LoraSpec,
                  answer_space: AnswerSpaceSpec, members: Mapping[str, dict[str, torch.Tensor]],
                  seeds: Mapping[str, int | None], weights: torch.Tensor, val_scores: torch.Tensor,
                  val_labels: torch.Tensor, training: dict[str, Any], data_hashes: dict[str, str],
                  artifacts: dict[str, dict[str, torch.Tensor]] | None = None,
                  artifact_files: dict[str, str] | None = None,
                  method_config: dict[str, Any] | None = None, fit_temperature: bool = True,
                  extra_thresholds: Mapping[str, float | None] | None = None) -> BundleManifest:
    """Calibrate on validation and write ``out_dir/name``; returns the manifest written.

    ``extra_thresholds`` adds method-specific recommendations (e.g. ``one_minus_feu``) to the calibrated ones."""
    calibration, thresholds = calibrate(val_scores, val_labels, weights, fit_temperature)
    if extra_thresholds:
        thresholds = thresholds.model_copy(update=dict(extra_thresholds))
    manifest = BundleManifest(
        name=name,
        method=method,
        members=tuple(MemberSpec(name=m, weight=float(w), seed=seeds.get(m))
                      for m, w in zip(members, weights.tolist(), strict=True)),
        base_model=base_ref(base),
        answer_space=answer_space,
        lora=lora,
        training=training,
        data_hashes=data_hashes,
        calibration=calibration,
        thresholds=thresholds,
        provenance=provenance(),
        artifacts=artifact_files or {},
        method_config=method_config or {},
    )
    write_bundle(out_dir / name, manifest, dict(members), artifacts)
    return manifest
