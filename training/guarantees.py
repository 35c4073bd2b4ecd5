"""Guarantees at export: conformal answer sets and Learn-then-Test risk control from the calibration split.

Every training method writes its bundle first (:func:`training.export.export_bundle`); then
:func:`attach_guarantees` runs the *written* bundle on the held-out calibration questions exactly as the
server answers them (:func:`training.evaluate.bundle_predictions`: same predictive, same temperature, the
float32 base), stores the sorted nonconformity scores (:class:`core.conformal.ConformalReference`) and the
abstention scores with correctness (:class:`core.risk_control.RiskReference`) in
``manifest.calibration``, and rewrites the manifest. The calibration split fit nothing before: not the
weights, the temperature, the abstention rule or early stopping (see :func:`training.data_cli.hold_out_calibration`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from core.basemodel import BaseModel
from core.bundle import BundleManifest, read_bundle, rewrite_manifest
from core.conformal import SCORES, conformal_reference
from core.datasets import data_hash
from core.predictive import BundlePrediction
from core.risk_control import SCORE_RANGES, risk_reference

DEFAULT_ALPHA = 0.1
DEFAULT_DELTA = 0.05


def add_guarantee_arguments(parser: argparse.ArgumentParser) -> None:
    """How the calibration split is turned into guarantees (the split itself: ``--calibration-fraction``)."""
    group = parser.add_argument_group("guarantees (from the held-out calibration split)")
    group.add_argument("--conformal-score", default="lac", choices=list(SCORES),
                       help="nonconformity score of the answer sets: lac (1 - p_y, smallest sets), aps, raps")
    group.add_argument("--conformal-alpha", type=float, default=DEFAULT_ALPHA,
                       help="the bundle's default miscoverage: sets hold the answer with probability >= 1 - alpha")
    group.add_argument("--risk-delta", type=float, default=DEFAULT_DELTA,
                       help="default delta of risk control: the risk bound holds with probability >= 1 - delta")
    group.add_argument("--risk-score", default="one_minus_max_probability", choices=sorted(SCORE_RANGES),
                       help="default score that risk-controlled abstention thresholds")
    group.add_argument("--certified-risk", type=float, default=None, metavar="EPSILON",
                       help="serve risk control on every request by default: selective risk <= EPSILON (default: "
                            "only requests that ask with target_risk)")


def guarantee_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"score": args.conformal_score, "alpha": args.conformal_alpha, "delta": args.risk_delta,
            "risk_score": args.risk_score, "target_risk": args.certified_risk}


def guarantee_calibration(prediction: BundlePrediction, labels: torch.Tensor, digest: str, *, score: str = "lac",
                          alpha: float = DEFAULT_ALPHA, delta: float = DEFAULT_DELTA,
                          risk_score: str = "one_minus_max_probability",
                          target_risk: float | None = None) -> dict[str, Any]:
    """``{"conformal": ConformalReference, "risk": RiskReference}`` of the served predictive on the
    calibration questions (labels [n])."""
    from training.export import abstention_scores

    probs = prediction.scores.probabilities
    available = abstention_scores(prediction)
    if risk_score not in available:
        raise SystemExit(f"--risk-score {risk_score}: this method offers {sorted(available)}")
    correct = probs.argmax(-1) == labels
    return {"conformal": conformal_reference(probs, labels, digest, score=score, alpha=alpha),
            "risk": risk_reference(available, correct, digest, delta=delta, score=risk_score,
                                   target_risk=target_risk)}


def attach_guarantees(base: BaseModel, path: Path, questions: list[Any], **options: Any) -> BundleManifest:
    """Calibrate the bundle at ``path`` on ``questions`` (see the module docstring); returns its new manifest."""
    from training.evaluate import bundle_predictions

    bundle = read_bundle(path, expect_base=base.info)
    served, _ = bundle_predictions(base, bundle, questions, desc="calibration split")
    labels = torch.tensor([q.answer for q in questions])
    digest = data_hash(questions)
    manifest = bundle.manifest
    guarantees = guarantee_calibration(served, labels, digest, **options)
    updated = manifest.model_copy(update={
        "calibration": manifest.calibration.model_copy(update=guarantees),
        "data_hashes": {**manifest.data_hashes, "conformal": digest}})
    updated = BundleManifest.model_validate(updated.model_dump())  # re-validate the nested references
    rewrite_manifest(path, updated)
    return updated


def describe(manifest: BundleManifest) -> dict[str, Any] | None:
    """One line of what the bundle guarantees (printed by the training commands)."""
    conformal, risk = manifest.calibration.conformal, manifest.calibration.risk
    if conformal is None or risk is None:
        return None
    out: dict[str, Any] = {"n_calibration": conformal.n, "score": conformal.score, "alpha": conformal.alpha,
                           "qhat": round(conformal.qhat(conformal.alpha), 4)}
    for epsilon in (0.1, 0.2, 0.3):
        cert = risk.certify(risk.score, epsilon, risk.delta)
        out[f"risk<={epsilon}"] = (f"{risk.score} <= {cert.threshold:.3f} (coverage {cert.calibration_coverage:.2f})"
                                   if cert.certified else "not certified")
    return out


def guarantee_bundle(base: BaseModel, path: Path, calibration: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """What every training command does after writing its bundle: attach the guarantees when a calibration
    split was held out, and say what they are (or that there are none)."""
    if not calibration:
        return {"guarantees": "none: no calibration split was held out (--calibration-fraction 0)"}
    needed = math.ceil(1 / args.conformal_alpha - 1 - 1e-9)
    if len(calibration) < needed:
        return {"guarantees": f"none: the calibration split has {len(calibration)} questions, alpha "
                              f"{args.conformal_alpha:g} needs at least {needed}"}
    manifest = attach_guarantees(base, path, calibration, **guarantee_options(args))
    return {"guarantees": describe(manifest)}
