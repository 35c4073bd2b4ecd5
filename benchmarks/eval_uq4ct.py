"""UQ4CT evaluation: train variants with shared trunk caches, export each bundle, evaluate bundles on a split.

One process loads the base twice (bf16 for training, float32 for calibration and evaluation, as served),
computes the frozen trunk of the train / validation / evaluation questions once, then for every ``--run``
trains, exports (:func:`training.uq4ct_cli.train_and_export`) and evaluates the bundle; ``--bundle``
evaluates existing bundles (e.g. the ensemble engineer's MAP) on the same cached trunk. One JSON line per
bundle goes to ``--results``; ``--table`` prints the markdown table of a results file.

``--run NAME:key=value,…`` sets UQ4CTConfig fields (beta, top_k, num_experts, rank, alpha, epochs,
train_limit, …). ``lora=1`` trains a plain LoRA through the same loop (one expert, top-1: the gate is
always 1, L_b constant, FEU ≡ 1; β forced to 0) and exports it as a 1-member ``ensemble`` bundle (MAP).

    PYTHONPATH=. python benchmarks/eval_uq4ct.py --run arc_easy-uq4ct:beta=1 --run arc_easy-mixlora:beta=0
    PYTHONPATH=. python benchmarks/eval_uq4ct.py --bundle runs/bundles/arc_easy-map
    PYTHONPATH=. python benchmarks/eval_uq4ct.py --table runs/uq4ct/results.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from core.basemodel import BaseModel, load_base_model
from core.bundle import AnswerSpaceSpec, LoraSpec, Method, read_bundle
from core.calibration import apply_temperature
from core.datasets import data_hash, load_questions
from core.metrics import auroc, summarize
from core.scoring import ChoiceScorer
from training.ensemble import member_scores
from training.evaluate import attach_bundle
from training.export import calibrate_members, export_bundle
from training.trunk import TrunkCache
from training.uq4ct import UQ4CTConfig, attach_moe_bundle, moe_scores, train_uq4ct
from training.uq4ct_cli import feu_summary, train_and_export


def parse_run(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = spec.partition(":")
    fields: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        fields[key] = json.loads(value) if value[:1].isdigit() or value[:1] in "-[{" else value
    return name, fields


def subset(cache: TrunkCache, limit: int | None) -> TrunkCache:
    """The cache of the first ``limit`` questions (load_questions' train_limit takes the same prefix)."""
    if limit is None or limit >= len(cache):
        return cache
    out = copy.copy(cache)
    out.questions, out.encoded, out.hidden = cache.questions[:limit], cache.encoded[:limit], cache.hidden[:limit]
    return out


class Caches:
    """Trunk caches keyed by split layer, built on first use."""

    def __init__(self, scorer: ChoiceScorer, questions: list[Any], label: str) -> None:
        self.scorer, self.questions, self.label, self.by_split = scorer, questions, label, {}

    def get(self, split: int) -> TrunkCache:
        if split not in self.by_split:
            t0 = time.perf_counter()
            self.by_split[split] = TrunkCache(self.scorer, self.questions, split, desc=f"trunk({self.label})")
            print(f"[trunk] {self.label}: {len(self.questions)} questions to layer {split} in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        return self.by_split[split]


def train_lora(train_base: BaseModel, eval_base: BaseModel, config: UQ4CTConfig, cache: TrunkCache,
               val_cache: TrunkCache, out: Path, name: str) -> None:
    """Plain LoRA (N = 1, top-1) through the UQ4CT loop, exported as a 1-member ensemble (MAP) bundle."""
    config = config.model_copy(update={"num_experts": 1, "top_k": 1, "beta": 0.0})
    scorer = ChoiceScorer(train_base.model, train_base.tokenizer, config.answer_format, config.max_tokens)
    moe, log = train_uq4ct(scorer, config, cache.questions, [], train_cache=cache)
    member, layout = moe.expert_peft_state_dict(0), moe.layout
    moe.remove()
    lora = LoraSpec(rank=layout.rank, alpha=layout.alpha, target_modules=layout.target_modules, layers=layout.layers)
    space = AnswerSpaceSpec(answer_format=config.answer_format, max_tokens=config.max_tokens)
    calibration, thresholds = calibrate_members(eval_base, name=name, lora=lora, answer_space=space,
                                                members={"member-0": member}, weights=torch.ones(1),
                                                val=val_cache.questions)
    export_bundle(out_dir=out, name=name, method=Method.ENSEMBLE, base=eval_base.info, lora=lora, answer_space=space,
                  members={"member-0": member}, seeds={"member-0": config.seed}, weights=torch.ones(1),
                  calibration=calibration, thresholds=thresholds,
                  training={"config": config.model_dump(mode="json"), "steps": log["steps"],
                            "train_seconds": log["seconds"], "history": log["history"], "trained_as": "lora=1"},
                  data_hashes={"train": data_hash(cache.questions), "validation": data_hash(val_cache.questions)})


def evaluate(eval_base: BaseModel, path: Path, caches: Caches) -> dict[str, Any]:
    """Metrics of one bundle on the cached evaluation questions (raw T = 1 and with its temperature)."""
    bundle = read_bundle(path, expect_base=eval_base.info)
    manifest = bundle.manifest
    scorer = caches.scorer
    cache = caches.get(min(manifest.lora.layers))
    labels = torch.tensor([q.answer for q in cache.questions])
    feu = None
    if manifest.method == Method.MOE:
        moe = attach_moe_bundle(eval_base.model, bundle)
        try:
            scores, feu = moe_scores(scorer, moe, cache, desc=f"eval {manifest.name}")
        finally:
            moe.remove()
        scores = scores[:, None, :]
    else:
        multilora = attach_bundle(eval_base, bundle)
        try:
            scores = member_scores(scorer, multilora, range(len(manifest.members)), cache, desc=f"eval {manifest.name}")
        finally:
            multilora.remove()
    weights, temperature = manifest.weights(), manifest.calibration.temperature
    raw = summarize(apply_temperature(scores, 1.0), labels, weights)
    cal = summarize(apply_temperature(scores, temperature), labels, weights)
    result: dict[str, Any] = {
        "bundle": manifest.name, "method": manifest.method.value, "n": len(labels), "temperature": temperature,
        "config": manifest.training.get("config", {}), "train_seconds": manifest.training.get("train_seconds"),
        "raw": {k: raw[k] for k in ("acc", "ece", "nll", "brier", "auroc_entropy", "auroc_one_minus_max_prob")},
        "calibrated": {k: cal[k] for k in ("acc", "ece", "nll", "brier")},
    }
    if feu is not None:
        result["feu"] = feu_summary(scores[:, 0], feu, labels)
        result["feu"]["auroc_one_minus_feu"] = auroc(1 - feu, scores[:, 0].argmax(-1) != labels)
    return result


def table(results_file: Path) -> str:
    rows = [json.loads(line) for line in results_file.read_text().splitlines() if line.strip()]
    head = ("| bundle | method | N | top-k | β | train q | acc | ECE (T=1) | NLL (T=1) | ECE (T) | NLL (T) | T | "
            "AUROC 1-maxp | FEU mean | AUROC 1-FEU | train s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        c, raw, cal, feu = r["config"], r["raw"], r["calibrated"], r.get("feu", {})
        moe = r["method"] == "moe"
        pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
        lines.append(
            f"| {r['bundle']} | {r['method']} | {c.get('num_experts', 1) if moe else 1} | "
            f"{c.get('top_k', '-') if moe else '-'} | {c.get('beta', '-') if moe else '-'} | "
            f"{c.get('train_limit') or 'all'} | {pct(raw['acc'])} | {pct(raw['ece'])} | {raw['nll']:.3f} | "
            f"{pct(cal['ece'])} | {cal['nll']:.3f} | {r['temperature']:.2f} | {raw['auroc_one_minus_max_prob']:.3f} | "
            f"{feu.get('feu_mean', math.nan):.3f} | {feu.get('auroc_one_minus_feu', math.nan):.3f} | "
            f"{r.get('train_seconds') or '-'} |")
    return "\n".join(lines)


def seed_table(results_file: Path) -> str:
    """Mean ± sample sd over seeds of the runs named ``<variant>`` (seed 0) and ``<variant>-s<k>`` (seed k)."""
    import re
    import statistics

    rows = [json.loads(line) for line in results_file.read_text().splitlines() if line.strip()]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(re.sub(r"-s\d+$", "", r["bundle"]), []).append(r)
    keys = [("acc", "raw"), ("ece", "raw"), ("nll", "raw"), ("brier", "raw"), ("ece", "calibrated"),
            ("nll", "calibrated"), ("auroc_one_minus_max_prob", "raw")]
    head = "| variant | seeds | acc | ECE (T=1) | NLL (T=1) | Brier | ECE (T) | NLL (T) | AUROC 1-maxp | AUROC 1-FEU |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, rs in groups.items():
        if len(rs) < 2:
            continue

        def cell(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
            mean, sd = statistics.mean(values) * scale, statistics.stdev(values) * scale
            return f"{mean:.{digits}f} ± {sd:.{digits}f}"

        cells = [cell([r[part][key] for r in rs], *((100.0, 1) if key in ("acc", "ece") else (1.0, 3)))
                 for key, part in keys]
        feu = [r["feu"]["auroc_one_minus_feu"] for r in rs if r.get("feu")]
        cells.append(cell(feu) if len(feu) > 1 else "–")
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], help="NAME:key=value,… (UQ4CTConfig fields)")
    parser.add_argument("--bundle", action="append", default=[], help="existing bundle directory to evaluate")
    parser.add_argument("--dataset", default="arc_easy")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N questions")
    parser.add_argument("--out", default="runs/bundles")
    parser.add_argument("--results", default="runs/uq4ct/results.jsonl")
    parser.add_argument("--table", default=None, help="print the markdown table of a results file and exit")
    parser.add_argument("--seed-table", default=None, help="print mean ± sd over seeds of a results file and exit")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.table:
        print(table(Path(args.table)))
        return 0
    if args.seed_table:
        print(seed_table(Path(args.seed_table)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    eval_base = load_base_model("smollm2-135m")
    questions = load_questions(args.dataset, args.split, args.data_dir, args.limit)
    default = UQ4CTConfig(dataset=args.dataset)
    eval_scorer = ChoiceScorer(eval_base.model, eval_base.tokenizer, default.answer_format, default.max_tokens)
    evals = Caches(eval_scorer, questions, args.split)
    paths = [Path(b) for b in args.bundle]
    if args.run:
        train_base = load_base_model("smollm2-135m", dtype=getattr(torch, default.dtype))
        specs = [parse_run(spec) for spec in args.run]
        limits = [fields.get("train_limit") for _, fields in specs]
        needed = None if None in limits else max(limits)  # the shared cache holds the longest prefix needed
        train_q = load_questions(args.dataset, "train", args.data_dir, needed)
        val_q = load_questions(args.dataset, "validation", args.data_dir)
        train_scorer = ChoiceScorer(train_base.model, train_base.tokenizer, default.answer_format, default.max_tokens)
        trains = Caches(train_scorer, train_q, "train")
        vals = evals if args.split == "validation" and args.limit is None else Caches(eval_scorer, val_q, "validation")
        for name, fields in specs:
            lora = bool(fields.pop("lora", 0))
            config = UQ4CTConfig(dataset=args.dataset, **fields)
            split = config.layout(train_scorer.num_layers).first_layer
            cache = subset(trains.get(split), config.train_limit)
            print(f"[run] {name}: {config.model_dump_json()}", flush=True)
            if lora:
                train_lora(train_base, eval_base, config, cache, vals.get(split), Path(args.out), name)
            else:
                train_and_export(train_base, config, cache.questions, val_q, Path(args.out), name, train_cache=cache,
                                 eval_base=eval_base, val_cache=vals.get(split))
            result = evaluate(eval_base, Path(args.out) / name, evals)
            with results.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps({k: result[k] for k in ("bundle", "raw", "calibrated")} | {"feu": result.get("feu")}),
                  flush=True)
    for path in paths:
        result = evaluate(eval_base, path, evals)
        with results.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps({k: result[k] for k in ("bundle", "raw", "calibrated")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
