"""Calibrate on validation and write a bundle: the one exporter every training method goes through.

:func:`calibrate` takes the *served* predictive on the validation questions (a
:class:`core.predictive.BundlePrediction`, computed on the float32 base the server loads, by the same
functions the server calls) and measures validation metrics, stores reference histograms of confidence /
entropy / MI, the no-drift distributions of the server's drift statistics (:mod:`core.drift`) and chooses
the served abstention rule;
:func:`export_bundle` writes the bundle via :func:`core.bundle.write_bundle`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from core.answers import Question
from core.basemodel import BaseModel, BaseModelInfo, load_base_model
from core.bundle import (
    AnswerSpaceSpec,
    Bundle,
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
from core.calibration import calibrate_abstention, fit_temperature_members
from core.drift import build_drift_reference
from core.metrics import finite_metrics, reference_histograms, summarize_scores
from core.predictive import BundlePrediction, ensemble_prediction

TARGET_RISK = 0.2
MIN_COVERAGE = 0.5
DEFAULT_ABSTAIN_ON = ("predictive_entropy",)
SCORE_NAMES = ("predictive_entropy", "mutual_information", "one_minus_max_probability", "one_minus_feu")


def abstention_scores(prediction: BundlePrediction) -> dict[str, torch.Tensor]:
    """The scores the server can abstain on for this prediction, by threshold name (each [N])."""
    u = prediction.scores
    out = {"predictive_entropy": u.predictive_entropy, "one_minus_max_probability": 1 - u.max_probability}
    if prediction.has_mi:
        out["mutual_information"] = u.mutual_information
    if prediction.feu is not None:
        out["one_minus_feu"] = 1 - prediction.feu
    return out


def calibrate(prediction: BundlePrediction, labels: torch.Tensor, *, temperature: float = 1.0,
              uncalibrated: BundlePrediction | None = None, target_risk: float = TARGET_RISK,
              min_coverage: float = MIN_COVERAGE, abstain_on: Sequence[str] = DEFAULT_ABSTAIN_ON,
              dtype: str | None = None) -> tuple[Calibration, Thresholds]:
    """Validation metrics, reference histograms and the served abstention rule of the *served* predictive.

    ``prediction`` is what the server returns on the validation questions (see :mod:`core.predictive`);
    ``abstain_on`` names the scores of the served rule (one primary score by default; several are chosen
    jointly, since the server abstains when any trips). labels [N]."""
    reason = prediction.notes[0] if (not prediction.has_mi and prediction.notes) else "undefined for this method"
    metrics, undefined = finite_metrics(summarize_scores(prediction.scores, labels, prediction.has_mi), reason)
    if uncalibrated is not None:
        raw = summarize_scores(uncalibrated.scores, labels, uncalibrated.has_mi)
        metrics.update({f"uncalibrated_{k}": raw[k] for k in ("acc", "nll", "ece", "brier") if math.isfinite(raw[k])})
    u = prediction.scores
    num_choices = int((u.probabilities > 0).sum(-1).max())
    histograms = {k: Histogram(edges=tuple(v["edges"]), counts=tuple(v["counts"]))
                  for k, v in reference_histograms(u, num_choices=num_choices).items()
                  if prediction.has_mi or k != "mutual_information"}
    available = abstention_scores(prediction)
    missing = [s for s in abstain_on if s not in available]
    if missing or not abstain_on:
        raise ValueError(f"cannot abstain on {missing or list(abstain_on)}: this method offers {sorted(available)}")
    correct = u.probabilities.argmax(-1) == labels
    rule = calibrate_abstention({s: available[s] for s in abstain_on}, correct, target_risk=target_risk,
                                min_coverage=min_coverage)
    served = ", ".join(rule.scores)
    target = (f"served rule on {served}: selective risk <= {target_risk} at coverage >= {min_coverage} on validation "
              f"(n={rule.n}); " + (f"met: coverage {rule.coverage:.3f}, risk {rule.risk:.3f}" if rule.met
                                   else f"not met: {rule.reason}"))
    thresholds = Thresholds(
        **{name: rule.thresholds.get(name) for name in SCORE_NAMES},
        target=target,
        rule=rule.stored(),
    )
    live = {"confidence": u.max_probability, "predictive_entropy": u.predictive_entropy}
    if prediction.has_mi:
        live["mutual_information"] = u.mutual_information
    drift = build_drift_reference(u.probabilities, labels, live)
    calibration = Calibration(temperature=temperature, validation_metrics=metrics, undefined_metrics=undefined,
                              reference_histograms=histograms, dtype=dtype, drift=drift)
    return calibration, thresholds


def export_bundle(*, out_dir: Path, name: str, method: Method, base: BaseModelInfo, lora: LoraSpec,
                  answer_space: AnswerSpaceSpec, members: Mapping[str, dict[str, torch.Tensor]],
                  seeds: Mapping[str, int | None], weights: torch.Tensor, calibration: Calibration,
                  thresholds: Thresholds, training: dict[str, Any], data_hashes: dict[str, str],
                  artifacts: dict[str, dict[str, torch.Tensor]] | None = None,
                  artifact_files: dict[str, str] | None = None,
                  method_config: dict[str, Any] | None = None) -> BundleManifest:
    """Write ``out_dir/name`` with the calibration of its served predictive (:func:`calibrate`); returns the
    manifest written."""
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


def served_base(base: BaseModel, name_or_path: str, device: str | torch.device = "cpu") -> BaseModel:
    """The base as the server loads it (float32): ``base`` itself when it already is, else a fresh float32
    load from disk (casting a bf16-loaded model up would keep its rounding)."""
    if next(base.model.parameters()).dtype == torch.float32:
        return base
    return load_base_model(name_or_path, dtype=torch.float32, device=device)


def calibrate_members(base: BaseModel, *, name: str, lora: LoraSpec, answer_space: AnswerSpaceSpec,
                      members: Mapping[str, dict[str, torch.Tensor]], weights: torch.Tensor, val: Sequence[Question],
                      fit_temperature: bool = True, **rule: Any) -> tuple[Calibration, Thresholds]:
    """Calibrate an ensemble (M ≥ 1 LoRA members) on the validation questions as the server will answer them:
    member scores on ``base`` (float32, see :func:`served_base`), one temperature for all members (mixture
    NLL), then :func:`calibrate` on the served predictive. ``rule`` goes to :func:`calibrate`."""
    from training.evaluate import bundle_member_scores

    provisional = BundleManifest(name=name, method=Method.ENSEMBLE, base_model=base_ref(base.info), lora=lora,
                                 answer_space=answer_space,
                                 members=tuple(MemberSpec(name=m, weight=float(w))
                                               for m, w in zip(members, weights.tolist(), strict=True)))
    bundle = Bundle(Path(name), provisional, dict(members), {})
    scores = bundle_member_scores(base, bundle, list(val), desc="val")  # [N, M, K]
    labels = torch.tensor([q.answer for q in val])
    w = provisional.weights()
    temperature = fit_temperature_members(scores, labels, w) if fit_temperature else 1.0
    return calibrate(ensemble_prediction(scores, temperature, w), labels, temperature=temperature,
                     uncalibrated=ensemble_prediction(scores, 1.0, w), dtype=dtype_name(base), **rule)


def dtype_name(base: BaseModel) -> str:
    return str(next(base.model.parameters()).dtype).removeprefix("torch.")
