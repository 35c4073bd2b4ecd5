"""Which Gaussian prior for LoRA ensemble members: on the factors A, B or on the update ΔW = (α/r)·BA.

Every variant is trained through the normal CLI path (``python -m uqserve.cli train ensemble``) with the
same budget (members, epochs, lr, train subset, seed) and only ``--prior`` / ``--init-scale-a`` changed,
then scored on the test split with ``python -m uqserve.cli eval … --no-plots`` (its metrics.json).
Commands run one after another; the JSON and the markdown table are rewritten after every variant, so
the first dataset's numbers can be read while the second trains. Finished variants are skipped on
rerun (delete the eval folder to redo one).

    nohup .venv/bin/python benchmarks/compare_priors.py --arc-train-limit 600 --obqa-train-limit 600 \
        --arc-test-limit 1000 > runs/priors/compare_priors.log 2>&1 &   # the committed results' sizes
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def portable_path(value: object) -> object:
    """A path inside (or beside) the repository as the repository-relative form committed results use."""
    text = str(value)
    if text.startswith(str(ROOT) + "/"):
        return text[len(str(ROOT)) + 1 :]
    if text.startswith(str(ROOT.parent) + "/"):
        return "../" + text[len(str(ROOT.parent)) + 1 :]
    return value


def portable(cmd: list[str]) -> str:
    """A command line without machine paths: ``python`` for the interpreter, repository-relative paths."""
    return shlex.join(["python" if c == sys.executable else str(portable_path(c)) for c in cmd])
NOTES = "\n## Reading"  # the markdown from this heading on is written by hand and survives reruns
COLUMNS = [("acc", "acc"), ("nll", "NLL"), ("ece", "ECE"), ("auroc_mi", "AUROC(MI)"),
           ("mutual_information", "mean MI"), ("auroc_entropy", "AUROC(H)")]


def variant_name(dataset: str, prior: str, scale: float) -> str:
    return f"{dataset}-{prior}" + ("" if scale == 1.0 else f"-a{scale:g}")


def adapter_norms(bundle: Path) -> dict[str, float]:
    """How far the members moved: mean over members × modules of ‖A‖_F / E‖A₀‖_F (peft init, bound 1/√in) and of
    ‖ΔW‖_F = ‖(α/r)·B A‖_F, from the bundle's peft safetensors."""
    import torch
    from safetensors.torch import load_file

    manifest = json.loads((bundle / "manifest.json").read_text())
    scaling = manifest["lora"]["alpha"] / manifest["lora"]["rank"]
    ratios, deltas = [], []
    for member in manifest["members"]:
        tensors = load_file(bundle / "members" / member["name"] / "adapter_model.safetensors")
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            ratios.append(float(a.norm()) / math.sqrt(a.numel() / (3 * a.shape[1])))
            deltas.append(float(torch.linalg.matrix_norm(scaling * b.double() @ a.double())))
    return {"a_norm_over_init": sum(ratios) / len(ratios), "delta_w_norm": sum(deltas) / len(deltas)}


def run_logged(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` from the repository root with stdout+stderr to ``log``; returns wall seconds."""
    print(f"$ {shlex.join(cmd)}  > {log}", flush=True)
    start = time.perf_counter()
    with log.open("w") as fh:
        subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def run_variant(args: argparse.Namespace, dataset: str, prior: str, scale: float) -> dict[str, Any]:
    name = variant_name(dataset, prior, scale)
    out = Path(args.out)
    eval_dir = out / "eval" / name
    data = [] if dataset == "arc_easy" else ["--data-dir", args.data_dir]
    limit, test_limit = args.train_limit.get(dataset), args.test_limit.get(dataset)
    train = [sys.executable, "-m", "uqserve.cli", "train", "ensemble", "--dataset", dataset, *data,
             "--members", str(args.members), "--epochs", f"{args.epochs:g}", "--lr", f"{args.lr:g}",
             "--seed", str(args.seed), "--threads", str(args.threads), "--prior", prior,
             "--init-scale-a", f"{scale:g}", "--out", str(out), "--name", name,
             *([] if limit is None else ["--train-limit", str(limit)])]
    evaluate = [sys.executable, "-m", "uqserve.cli", "eval", str(out / name), "--dataset", dataset, *data,
                "--split", "test", "--no-plots", "--threads", str(args.threads), "--out", str(eval_dir),
                *([] if test_limit is None else ["--limit", str(test_limit)])]
    record: dict[str, Any] = {"name": name, "dataset": dataset, "prior": prior, "init_scale_a": scale,
                              "train_command": portable(train), "eval_command": portable(evaluate)}
    if (eval_dir / "metrics.json").exists():
        print(f"[priors] {name}: already evaluated, reusing {eval_dir / 'metrics.json'}", flush=True)
    else:
        record["train_wall_s"] = round(run_logged(train, out / f"{name}.train.log"), 1)
        record["eval_wall_s"] = round(run_logged(evaluate, out / f"{name}.eval.log"), 1)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    manifest = json.loads((out / name / "manifest.json").read_text())
    training = manifest.get("training", {})
    config = training.get("config", {})
    record.update(
        n_test=metrics["n"], temperature=metrics["temperature"],
        n_train=config.get("train_limit"), members=config.get("members"), epochs=config.get("epochs"),
        lr=config.get("lr"), steps=training.get("steps"), train_seconds=training.get("train_seconds"),
        metrics={k: metrics["metrics"][k] for k, _ in COLUMNS},
        metrics_uncalibrated={k: metrics["metrics_uncalibrated"][k] for k, _ in COLUMNS},
        adapters=adapter_norms(out / name),
    )
    return record


def markdown(records: list[dict[str, Any]], args: argparse.Namespace, pending: list[str]) -> str:
    lines = ["# Ensemble member prior: factors ‖A‖² + ‖B‖² vs update ‖ΔW‖² = ‖(α/r)·BA‖²", "",
             f"SmolLM2-135M, cloze, LoRA r = 16, α = 32 on the top 8 layers, M = {args.members} members, "
             f"{args.epochs:g} epochs, lr {args.lr:g}, batch 8, λ = 2, seed {args.seed}, 1 torch thread on the "
             "2-core CPU. Only `--prior` (and `--init-scale-a`) differ within a dataset. Metrics on the test "
             "split; NLL / ECE (15 bins) after the bundle's validation-fitted temperature, raw values in "
             "brackets. AUROC(MI) / AUROC(H): mutual information / predictive entropy as detectors of wrong "
             "answers. ‖A‖/‖A₀‖: A's Frobenius norm after training over its expected init norm, ‖ΔW‖: "
             "‖(α/r)·BA‖_F, both averaged over members and adapted modules. Written by "
             "`benchmarks/compare_priors.py`; commands in `compare_priors.json`.", ""]
    header = "| dataset (train N / test N) | prior | A init scale | " + " | ".join(h for _, h in COLUMNS) \
        + " | ‖A‖/‖A₀‖ | ‖ΔW‖ | T | train min |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in records:
        m, u = r["metrics"], r["metrics_uncalibrated"]
        cells = []
        for key, _ in COLUMNS:
            cell = f"{m[key]:.3f}" if key != "mutual_information" else f"{m[key]:.4f}"
            if key in ("nll", "ece"):
                cell += f" ({u[key]:.3f})"
            cells.append(cell)
        train_n = r["n_train"] if r["n_train"] is not None else "all"
        minutes = f"{r['train_seconds'] / 60:.1f}" if r.get("train_seconds") else "–"
        norms = r.get("adapters", {})
        lines.append(f"| {r['dataset']} ({train_n} / {int(r['n_test'])}) | {r['prior']} | {r['init_scale_a']:g} | "
                     + " | ".join(cells) + f" | {norms.get('a_norm_over_init', math.nan):.2f} | "
                     f"{norms.get('delta_w_norm', math.nan):.2f} | {r['temperature']:.2f} | {minutes} |")
    if pending:
        lines += ["", "Still running or queued: " + ", ".join(pending) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="arc_easy,openbookqa")
    parser.add_argument("--variants", default="factors:1,delta:1",
                        help="comma-separated prior:init_scale_a pairs, run in this order per dataset")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arc-train-limit", type=int, default=None)
    parser.add_argument("--obqa-train-limit", type=int, default=1500)
    parser.add_argument("--arc-test-limit", type=int, default=None, help="first N test questions (default all)")
    parser.add_argument("--obqa-test-limit", type=int, default=None)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", default="runs/priors")
    parser.add_argument("--results", default="benchmarks/results/compare_priors")
    args = parser.parse_args()
    args.train_limit = {"arc_easy": args.arc_train_limit, "openbookqa": args.obqa_train_limit}
    args.test_limit = {"arc_easy": args.arc_test_limit, "openbookqa": args.obqa_test_limit}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    plan = [(d, p, float(s)) for d in args.datasets.split(",")
            for p, s in (v.split(":") for v in args.variants.split(","))]
    results = ROOT / args.results
    previous = {}
    if results.with_suffix(".json").exists():  # keep variants run by an earlier invocation
        previous = {r["name"]: r for r in json.loads(results.with_suffix(".json").read_text())["runs"]}
    records: dict[str, dict[str, Any]] = dict(previous)
    for i, (dataset, prior, scale) in enumerate(plan):
        name = variant_name(dataset, prior, scale)
        record = run_variant(args, dataset, prior, scale)
        if name in previous:  # keep the wall times measured when it actually ran
            record = {**{k: v for k, v in previous[name].items() if k.endswith("wall_s")}, **record}
        records[name] = record
        pending = [variant_name(*step) for step in plan[i + 1 :]]
        payload = {"args": {k: portable_path(v) for k, v in vars(args).items()}, "runs": list(records.values())}
        results.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
        md = results.with_suffix(".md")
        notes = md.read_text().partition(NOTES)[2] if md.exists() else ""  # hand-written reading, kept
        md.write_text(markdown(list(records.values()), args, pending) + (NOTES + notes if notes else ""))
        print(f"[priors] {name}: {json.dumps(record['metrics'])}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
