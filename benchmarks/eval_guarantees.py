"""Do the served guarantees hold? Conformal coverage and set size, Learn-then-Test selective risk, online alarms.

For each bundle (its calibration split and references as exported, nothing refitted here) and each test set
(in distribution, and under shift), the served predictive is computed exactly as the server computes it
(:func:`training.evaluate.bundle_prediction`; cached per bundle calibration hash and test set), then:

- coverage and mean size of the answer sets at α ∈ {0.05, 0.1, 0.2} (the bundle's own q̂ at each α);
- for ε ∈ {0.1, 0.2, 0.3} at the bundle's δ: the Learn-then-Test threshold on the bundle's risk score and its
  realized coverage and selective risk on the test set (or "not certified");
- the online replay: the test set in file order as labelled traffic through the server's own
  :class:`service.engine.guarantee_watch.GuaranteeWatch` (risk watched at ε = 0.2), reporting the label count
  at which each alarm's anytime-valid bound first crosses (None: never).

Plots: realized vs nominal coverage over α, and the set-size distribution at α = 0.1.

    B=runs/conformal/bundles
    PYTHONPATH=. python benchmarks/eval_guarantees.py --bundles $B/arc_easy-{map,laplace,uq4ct,ensemble5} \\
        --dataset arc_easy --shift arc_challenge --data-dir ../shared/data --limit 500
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.basemodel import load_base_model
from core.bundle import read_bundle
from core.datasets import load_questions
from core.predictive import BundlePrediction
from service.engine.guarantee_watch import GuaranteeWatch
from service.predlog import LabelledAnswer
from training.evaluate import bundle_prediction
from training.export import abstention_scores

ALPHAS = (0.05, 0.1, 0.2)
EPSILONS = (0.1, 0.2, 0.3)
WATCH_EPSILON = 0.2


def served_scores(base: Any, bundle: Any, dataset: str, data_dir: str | None, limit: int | None,
                  cache: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(probs [N, K], labels [N], abstention scores name → [N]) of the served predictive, cached."""
    manifest = bundle.manifest
    file = cache / f"{manifest.name}-{manifest.calibration_hash()}-{dataset}-{limit}.safetensors"
    if file.exists():
        tensors = load_file(str(file))
        scores = {k.removeprefix("score."): v for k, v in tensors.items() if k.startswith("score.")}
        return tensors["probabilities"], tensors["labels"], scores
    questions = load_questions(dataset, "test", data_dir, limit)
    prediction: BundlePrediction = bundle_prediction(base, bundle, questions, desc=f"{manifest.name} on {dataset}")
    probs = prediction.scores.probabilities.double()
    labels = torch.tensor([q.answer for q in questions])
    scores = {k: v.double() for k, v in abstention_scores(prediction).items()}
    cache.mkdir(parents=True, exist_ok=True)
    save_file({"probabilities": probs.contiguous(), "labels": labels,
               **{f"score.{k}": v.contiguous() for k, v in scores.items()}}, str(file))
    return probs, labels, scores


def evaluate(bundle: Any, probs: torch.Tensor, labels: torch.Tensor, scores: dict[str, torch.Tensor]) -> dict[str, Any]:
    conformal, risk = bundle.manifest.calibration.conformal, bundle.manifest.calibration.risk
    out: dict[str, Any] = {"n": int(labels.numel()), "accuracy": float((probs.argmax(-1) == labels).double().mean()),
                           "sets": {}, "risk": {}}
    for alpha in ALPHAS:
        sets = conformal.sets(probs, alpha)
        out["sets"][str(alpha)] = {"coverage": float(sets[torch.arange(len(labels)), labels].double().mean()),
                                   "mean_size": float(sets.sum(-1).double().mean()),
                                   "qhat": conformal.qhat(alpha)}
    correct = probs.argmax(-1) == labels
    for epsilon in EPSILONS:
        cert = risk.certify(risk.score, epsilon, risk.delta)
        row: dict[str, Any] = {"certified": cert.certified, "threshold": cert.threshold, "delta": risk.delta,
                               "score": risk.score, "calibration_coverage": cert.calibration_coverage}
        if cert.certified:
            answered = scores[risk.score] <= cert.threshold
            kept = int(answered.sum())
            row.update(coverage=kept / len(labels),
                       risk=float((~correct[answered]).double().mean()) if kept else 0.0)
        out["risk"][str(epsilon)] = row
    return out


def replay(bundle: Any, probs: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """The test set as labelled traffic through the server's watch; when does each alarm fire?"""
    manifest = bundle.manifest
    calibration = manifest.calibration
    risk = calibration.risk.model_copy(update={"target_risk": WATCH_EPSILON})
    watched = calibration.model_copy(update={"risk": risk})
    watch = GuaranteeWatch(window=500, level=0.05)
    key = (manifest.version, manifest.calibration_hash())
    watch.start_bundle(manifest.name, key, watched)
    fired: dict[str, int | None] = {"coverage": None, "risk": None}
    for t, (p, y) in enumerate(zip(probs.tolist(), labels.tolist(), strict=True), 1):
        watch.labelled(LabelledAnswer(f"r{t}", manifest.name, key[0], key[1], p, int(y)))
        stats = watch.stats(manifest.name)
        assert stats is not None and stats.alpha is not None
        if fired["coverage"] is None and (stats.miscoverage_lower or 0.0) > stats.alpha:
            fired["coverage"] = t
        if fired["risk"] is None and stats.target_risk is not None and (stats.risk_lower or 0.0) > stats.target_risk:
            fired["risk"] = t
    final = watch.stats(manifest.name)
    assert final is not None
    return {"alpha": final.alpha, "labelled": final.labelled, "coverage_alarm_at": fired["coverage"],
            "risk_target": WATCH_EPSILON, "risk_alarm_at": fired["risk"], "answered": final.answered,
            "miscoverage_lower": final.miscoverage_lower, "risk_lower": final.risk_lower}


def plot(results: dict[str, Any], cached: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.linspace(0.02, 0.5, 25).tolist()
    fig, axes = plt.subplots(1, len(cached), figsize=(5.5 * len(cached), 4.6), squeeze=False)
    for ax, (dataset, per_bundle) in zip(axes[0], cached.items(), strict=True):
        for name, (bundle, probs, labels) in per_bundle.items():
            conformal = bundle.manifest.calibration.conformal
            alphas = [a for a in grid if a >= 1 / (conformal.n + 1)]
            realized = [float(conformal.sets(probs, a)[torch.arange(len(labels)), labels].double().mean())
                        for a in alphas]
            ax.plot([1 - a for a in alphas], realized, marker=".", label=name)
        ax.plot([0.5, 0.98], [0.5, 0.98], "k--", lw=1, label="nominal")
        ax.set(title=f"coverage on {dataset}", xlabel="nominal 1 − α", ylabel="realized coverage")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "coverage.png", dpi=110)
    fig, axes = plt.subplots(1, len(cached), figsize=(5.5 * len(cached), 4.2), squeeze=False)
    for ax, (dataset, per_bundle) in zip(axes[0], cached.items(), strict=True):
        k = max(p.shape[-1] for _, p, _ in per_bundle.values())
        width = 0.8 / max(len(per_bundle), 1)
        for i, (name, (bundle, probs, _)) in enumerate(per_bundle.items()):
            sizes = bundle.manifest.calibration.conformal.sets(probs, 0.1).sum(-1)
            counts = torch.bincount(sizes, minlength=k + 1)[: k + 1].double() / len(sizes)
            ax.bar(torch.arange(k + 1).double() + i * width, counts.tolist(), width=width, label=name)
        ax.set(title=f"set size at α = 0.1 on {dataset}", xlabel="choices in the set", ylabel="fraction")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "set_sizes.png", dpi=110)
    plt.close("all")


def markdown(results: dict[str, Any]) -> str:
    lines = ["| bundle | test set | n | acc | " + " | ".join(f"cov/size α={a}" for a in ALPHAS) + " | "
             + " | ".join(f"ε={e}: cov, risk" for e in EPSILONS) + " | coverage alarm | risk alarm (ε=0.2) |",
             "|---" * (6 + len(ALPHAS) + len(EPSILONS)) + "|"]
    for name, per_set in results.items():
        for dataset, r in per_set.items():
            sets = " | ".join(f"{r['sets'][str(a)]['coverage']:.3f} / {r['sets'][str(a)]['mean_size']:.2f}"
                              for a in ALPHAS)
            risk = " | ".join(f"{r['risk'][str(e)]['coverage']:.2f}, {r['risk'][str(e)]['risk']:.3f}"
                              if r["risk"][str(e)]["certified"] else "not certified" for e in EPSILONS)
            rp = r["replay"]
            lines.append(f"| {name} | {dataset} | {r['n']} | {r['accuracy']:.3f} | {sets} | {risk} | "
                         f"{rp['coverage_alarm_at'] or 'never'} | {rp['risk_alarm_at'] or 'never'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundles", nargs="+", required=True)
    parser.add_argument("--dataset", required=True, help="in-distribution test set")
    parser.add_argument("--shift", nargs="*", default=[], help="shifted test sets")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--cache", default="runs/conformal/cache")
    parser.add_argument("--out", default="benchmarks/results/guarantees")
    args = parser.parse_args()
    started = time.perf_counter()
    base = load_base_model(args.base_model)
    out = Path(args.out) / args.dataset
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    cached: dict[str, Any] = {}
    for path in args.bundles:
        if not Path(path).is_dir():
            print(f"[skip] {path}: not trained (yet)")
            continue
        bundle = read_bundle(path, expect_base=base.info)
        name = bundle.manifest.name
        results[name] = {}
        for dataset in (args.dataset, *args.shift):
            probs, labels, scores = served_scores(base, bundle, dataset, args.data_dir, args.limit, Path(args.cache))
            row = evaluate(bundle, probs, labels, scores)
            row["replay"] = replay(bundle, probs, labels)
            label = dataset if dataset == args.dataset else f"{args.dataset} → {dataset}"
            results[name][label] = row
            cached.setdefault(label, {})[name] = (bundle, probs, labels)
            print(f"[{name}] {label}: {json.dumps(row['sets'])} {json.dumps(row['risk'])} {row['replay']}", flush=True)
        results[name]["_calibration"] = {"n": bundle.manifest.calibration.conformal.n,
                                         "score": bundle.manifest.calibration.conformal.score,
                                         "delta": bundle.manifest.calibration.risk.delta,
                                         "calibration_hash": bundle.manifest.calibration_hash()}
    table = {k: {d: r for d, r in v.items() if not d.startswith("_")} for k, v in results.items()}
    text = markdown(table)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results,
                                                  "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    (out / "results.md").write_text(text + "\n")
    if cached:
        plot(table, cached, out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
