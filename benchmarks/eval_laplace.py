"""Laplace-LoRA evaluation table: MAP, temperature-scaled MAP, LLLA, diagonal and KFAC Laplace, the ensemble.

Every Laplace row uses the MAP adapter of the ``laplace`` bundle and its stored posteriors and prior
precisions (no refitting): one linearized pass over the test questions gives the MAP scores μ and
``J Σ Jᵀ`` for each structure. ACC/ECE/NLL/Brier come from the served probabilities (probit unless the row
says MC), AUROC(MI) from S joint MC samples of the linearized scores (errors as positives; MAP has no MI).
The serving cost per question is measured through the engine's MixedForward on the same base model:
a MAP forward (1 LoRA row), the 5-member ensemble (5 rows, shared trunk) and the Laplace forward.

    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/eval_laplace.py \\
        --laplace runs/bundles/arc_easy-laplace --ensemble runs/bundles/arc_easy-ensemble5 \\
        --dataset arc_easy --split test --out runs/laplace/eval_arc_easy.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from core.answers import encode_question
from core.basemodel import load_base_model
from core.bundle import read_bundle
from core.calibration import apply_temperature
from core.datasets import load_questions
from core.laplace import LaplaceConfig, LaplacePosterior, mc_logits, probit
from core.laplace_tap import LoraTap
from core.metrics import accuracy, auroc, brier, ece, nll
from core.multilora import MultiLora
from core.predictive import question_normals
from core.scoring import ChoiceScorer
from core.uncertainty import decompose
from service.engine.forward import MixedForward, RowWork
from service.engine.laplace_predictor import LaplacePredictor
from training.evaluate import bundle_member_scores
from training.laplace import linearized_pass
from training.trunk import TrunkCache


def row(probs: torch.Tensor, labels: torch.Tensor, member_probs: torch.Tensor | None = None) -> dict[str, float]:
    """ACC, ECE, NLL, Brier of probs [N, K]; AUROC of MI / entropy from member_probs [N, M, K] when given."""
    correct = probs.argmax(-1) == labels
    out = {"acc": accuracy(probs, labels), "ece": ece(probs, labels), "nll": nll(probs, labels),
           "brier": brier(probs, labels)}
    ent = -(probs.clamp_min(1e-30).log() * probs).sum(-1)
    out["auroc_entropy"] = auroc(ent, ~correct)
    if member_probs is not None and member_probs.shape[1] > 1:
        u = decompose(member_probs.double())
        out["auroc_mi"] = auroc(u.mutual_information, ~correct)
        out["mean_mi"] = float(u.mutual_information.mean())
    else:
        out["auroc_mi"] = math.nan
    return out


def posteriors_of(bundle: Any) -> dict[str, LaplacePosterior]:
    config = LaplaceConfig.model_validate(bundle.manifest.method_config)
    out = {}
    for structure in ("llla", "diag", "kron"):
        role = config.artifact[structure]
        out[structure] = LaplacePosterior.from_tensors(bundle.artifacts[role], config.blocks[structure],
                                                       config.prior_precision[structure])
    return out


def serving_cost(base: Any, lap_bundle: Any, ens_bundle: Any | None, questions: list[Any], batch: int,
                 repeats: int) -> dict[str, float]:
    """Median seconds per question of one batched forward: MAP, ensemble (all members), Laplace."""
    manifest = lap_bundle.manifest
    lora = manifest.lora
    slots = 1 + (len(ens_bundle.manifest.members) if ens_bundle is not None else 0)
    multilora = MultiLora(base.model, lora.layout(), slots)
    multilora.load_peft_state_dict(0, lap_bundle.members["map"], lora.alpha / lora.rank)
    if ens_bundle is not None:
        for s, member in enumerate(ens_bundle.manifest.members, start=1):
            multilora.load_peft_state_dict(s, ens_bundle.members[member.name], lora.alpha / lora.rank)
    forward = MixedForward(base.model, base.tokenizer, multilora)
    predictor = LaplacePredictor(lap_bundle)
    space = manifest.answer_space
    encoded = [encode_question(base.tokenizer, q, space.answer_format, space.max_tokens) for q in questions[:batch]]
    first = min(lora.layers)
    kinds = {"map_forward": [RowWork(e, space.answer_format, (0,), first) for e in encoded],
             f"laplace_{predictor.config.structure}": [RowWork(e, space.answer_format, (0,), first,
                                                               custom=predictor.forward) for e in encoded]}
    if ens_bundle is not None:
        members = tuple(range(1, slots))
        kinds[f"ensemble{len(members)}"] = [RowWork(e, space.answer_format, members, first) for e in encoded]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for items in kinds.values():  # warm-up
        forward(items)
    for _ in range(repeats):  # interleaved, so load changes hit every kind alike
        for k, items in kinds.items():
            start = time.perf_counter()
            forward(items)
            times[k].append((time.perf_counter() - start) / len(items))
    multilora.remove()
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--laplace", required=True, help="laplace bundle directory")
    parser.add_argument("--map", default=None, help="MAP bundle (for its validation temperature; default: the "
                        "laplace bundle's training.map_bundle)")
    parser.add_argument("--ensemble", default=None)
    parser.add_argument("--ensemble-metrics", default=None, help="metrics.json of `uqserve eval` for the ensemble on "
                        "the same split (same metric code; skips rescoring it)")
    parser.add_argument("--dataset", default="arc_easy")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--mc-samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timing-batch", type=int, default=8)
    parser.add_argument("--timing-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = load_base_model("smollm2-135m", dtype=torch.float32)
    lap = read_bundle(args.laplace, expect_base=base.info)
    map_path = args.map or lap.manifest.training["map_bundle"]
    map_bundle = read_bundle(map_path, expect_base=base.info)
    questions = load_questions(args.dataset, args.split, args.data_dir, args.limit)
    labels = torch.tensor([q.answer for q in questions])
    lora, space = lap.manifest.lora, lap.manifest.answer_space
    scorer = ChoiceScorer(base.model, base.tokenizer, space.answer_format, space.max_tokens, space.prompt)
    tap = LoraTap(base.model, lap.members["map"], lora.alpha / lora.rank)
    posts = posteriors_of(lap)
    cache = TrunkCache(scorer, questions, min(lora.layers), desc="trunk(test)")
    t0 = time.perf_counter()
    # each structure at its bundle λ and at the other selection rule's λ (marglik vs validation-NLL grid)
    evidence = lap.manifest.method_config.get("evidence", {})
    lams = {k: [p.prior_precision] + [evidence.get(k, {}).get(f"{rule}_prior_precision", p.prior_precision)
                                      for rule in ("marglik", "val_nll")] for k, p in posts.items()}
    lin = linearized_pass(scorer, tap, cache, {k: (p, torch.tensor(lams[k])) for k, p in posts.items()},
                          args.batch_size, desc="linearize(test)")
    linearize_s = time.perf_counter() - t0
    seed = LaplaceConfig.model_validate(lap.manifest.method_config).seed
    eps = question_normals(cache.encoded, seed, args.mc_samples, lin.mean.shape[-1])  # the server's draws
    table: dict[str, dict[str, float]] = {}
    table["MAP"] = row(torch.softmax(lin.mean, -1), labels)
    t_map = map_bundle.manifest.calibration.temperature
    table[f"MAP + temperature (T={t_map:.3f})"] = row(apply_temperature(lin.mean, t_map), labels)
    for name, key in (("LLLA (KFAC, last layer)", "llla"), ("Laplace diag", "diag"), ("Laplace KFAC", "kron")):
        for g, rule in ((1, "marglik"), (2, "val-NLL")):
            cov = lin.cov[key][g]
            members = torch.softmax(mc_logits(lin.mean, cov, eps), -1)  # [N, S, K]
            lam = lams[key][g]
            table[f"{name} probit, λ={lam:.3g} ({rule})"] = row(probit(lin.mean, cov), labels, members)
            if key == "kron":
                table[f"{name} joint MC S={args.mc_samples}, λ={lam:.3g} ({rule})"] = row(members.mean(1), labels,
                                                                                          members)
    ens = read_bundle(args.ensemble, expect_base=base.info) if args.ensemble else None
    if ens is not None and args.ensemble_metrics:
        done = json.loads(Path(args.ensemble_metrics).read_text())
        assert done["n"] == len(questions) and done["split"] == args.split, "ensemble metrics of another split"
        m = len(ens.manifest.members)
        keys = ("acc", "ece", "nll", "brier", "auroc_mi", "auroc_entropy")
        table[f"ensemble M={m}"] = {k: done["metrics_uncalibrated"].get(k, math.nan) for k in keys}
        table[f"ensemble + temperature (T={done['temperature']:.3f}) M={m}"] = {k: done["metrics"][k] for k in keys}
    elif ens is not None:
        scores = bundle_member_scores(base, ens, questions)
        weights = ens.manifest.weights()
        t_ens = ens.manifest.calibration.temperature
        for label, t in (("ensemble", 1.0), (f"ensemble + temperature (T={t_ens:.3f})", t_ens)):
            member_probs = apply_temperature(scores, t)
            table[f"{label} M={scores.shape[1]}"] = row(decompose(member_probs, weights).probabilities, labels,
                                                         member_probs)
    cost = serving_cost(base, lap, ens, questions, args.timing_batch, args.timing_repeats)
    result = {"dataset": args.dataset, "split": args.split, "n": len(questions), "laplace_bundle": args.laplace,
              "map_bundle": str(map_path), "ensemble_bundle": args.ensemble, "table": table,
              "serving_seconds_per_question": cost, "linearize_test_seconds": round(linearize_s, 1),
              "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 1)}
    header = "| method | ACC | ECE | NLL | Brier | AUROC(MI) | AUROC(H) |\n|---|---|---|---|---|---|---|"

    def fmt(x: float) -> str:
        return "—" if math.isnan(x) else f"{x:.4f}"

    lines = [header] + [f"| {k} | " + " | ".join(fmt(v[m]) for m in ("acc", "ece", "nll", "brier", "auroc_mi",
                                                                       "auroc_entropy")) + " |"
                        for k, v in table.items()]
    result["markdown"] = "\n".join(lines)
    print(result["markdown"])
    print(json.dumps({"serving_seconds_per_question": cost, "n": len(questions)}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
