"""The "Your own data" path end to end on two datasets that are not vendored, as a user would run it:

- **SciQ** (4 choices), exported to CSV under other column names (``query``, ``opt1`` … ``opt4``, the answer as
  the *text* of the correct option in ``right``; options shuffled per question with a fixed seed, since SciQ
  lists the correct one first); trained on its validation file (a validation split taken off it), tested on
  its test file.
- **BoolQ** as a ``no,yes`` label set with the passage as context (CSV columns ``passage_text``, ``query``,
  ``gold``); the staged val file is shuffled (seed 0) into a training file and a test file.

Each is trained with ``uqserve train ensemble`` (M = 3), evaluated with ``uqserve eval`` against the zero-shot
base with the same prompt, then served and asked through ``uqserve.client`` (BoolQ without choices).

    PYTHONPATH=.:tests .venv/bin/python benchmarks/own_data_runs.py --data-dir ../shared/data   # CPU, ~30 min
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("acc", "nll", "ece", "brier", "auroc_entropy", "auroc_mi", "aurc")


def export_sciq(data: Path, out: Path) -> dict[str, Path]:
    files = {}
    for split, name in (("valid", "train"), ("test", "test")):
        rows = json.loads((data / "sciq" / f"{split}.json").read_text())
        path = out / f"sciq-{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["query", "opt1", "opt2", "opt3", "opt4", "right"])
            for i, row in enumerate(rows):
                options = [row["correct_answer"], row["distractor1"], row["distractor2"], row["distractor3"]]
                random.Random(f"{split}-{i}").shuffle(options)
                writer.writerow([row["question"], *options, row["correct_answer"]])
        files[name] = path
    return files


def export_boolq(data: Path, out: Path, test: int = 1000) -> dict[str, Path]:
    rows = [json.loads(line) for line in (data / "boolq" / "val.jsonl").read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(rows)
    files = {}
    for name, part in (("test", rows[:test]), ("train", rows[test:])):
        path = out / f"boolq-{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["passage_text", "query", "gold"])
            for row in part:
                writer.writerow([row["passage"], row["question"], "yes" if row["label"] else "no"])
        files[name] = path
    return files


TASKS: dict[str, dict[str, Any]] = {
    "sciq": {"export": export_sciq, "columns": ["--question-column", "query", "--choice-columns",
                                                 "opt1,opt2,opt3,opt4", "--answer-column", "right"],
             "train": ["--validation-fraction", "0.3"]},
    # --skip-invalid: a few passages do not fit the model's 768 tokens; they are dropped and recorded, as a user
    # would after the first run listed them
    "boolq": {"export": export_boolq, "columns": ["--question-column", "query", "--context-column", "passage_text",
                                                   "--answer-column", "gold", "--labels", "no,yes", "--skip-invalid"],
              "train": []},
}


def uqserve(*argv: str, cwd: Path) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "uqserve.cli", *argv], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"uqserve {' '.join(argv)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f"[own-data] uqserve {argv[0]} {argv[1]}: {time.perf_counter() - started:.0f} s", flush=True)
    return {"seconds": round(time.perf_counter() - started, 1), "stdout": done.stdout}


def ask_through_the_client(work: Path, bundle: str, test_csv: Path, n: int) -> dict[str, Any]:
    """Serve the bundle and answer ``n`` test questions with the typed client (no choices: the label set)."""
    from components import free_port, wait_http

    from uqserve.client import Client

    port = free_port()
    env = {**os.environ, "UQSERVE_PORT": str(port), "UQSERVE_PRELOAD_BUNDLES": bundle}
    server = subprocess.Popen([sys.executable, "-m", "uqserve.cli", "serve"], cwd=work, env=env,
                              stdout=(work / "serve.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", 300)
        with test_csv.open(encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))[:n]
        right = abstained = 0
        with Client(f"http://127.0.0.1:{port}", timeout=120) as client:
            for row in rows:
                answer = client.answer(bundle, row["query"], context=row["passage_text"])
                truth = ["no", "yes"].index(row["gold"])
                right += answer.probabilities.index(max(answer.probabilities)) == truth
                abstained += answer.abstained
                client.feedback(answer.request_id, truth)
        return {"asked": len(rows), "accuracy": right / len(rows), "abstained": abstained,
                "prompt_hash": answer.bundle.prompt_hash}
    finally:
        server.terminate()
        server.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--tasks", default="sciq,boolq")
    parser.add_argument("--members", default="3")
    parser.add_argument("--epochs", default="2")
    parser.add_argument("--train-limit", default="800")
    parser.add_argument("--test-limit", default="500")
    parser.add_argument("--ask", type=int, default=50, help="BoolQ test questions asked through the client")
    args = parser.parse_args()
    data = Path(args.data_dir).resolve()
    work = Path(tempfile.mkdtemp(prefix="uqserve-own-data-"))
    results: dict[str, Any] = {}
    for task in args.tasks.split(","):
        spec = TASKS[task]
        files = spec["export"](data, work)
        name = f"{task}-own"
        train = uqserve("train", "ensemble", "--train", str(files["train"]), *spec["columns"], *spec["train"],
                        "--members", args.members, "--epochs", args.epochs, "--train-limit", args.train_limit,
                        "--name", name, cwd=work)
        manifest = json.loads((work / "bundles" / name / "manifest.json").read_text())
        evals = {}
        for who in (f"bundles/{name}", "base"):
            out = work / "eval" / f"{task}-{who.replace('/', '-')}"
            uqserve("eval", who, "--data", str(files["test"]), *spec["columns"], "--limit", args.test_limit,
                    "--no-plots", "--out", str(out), cwd=work)
            evals["bundle" if who != "base" else "zero-shot base"] = json.loads((out / "metrics.json").read_text())
        results[task] = {
            "train_seconds": train["seconds"], "data": manifest["training"]["data"],
            "temperature": manifest["calibration"]["temperature"],
            "served_rule": manifest["thresholds"].get("target"),
            "test": {who: {k: e["metrics"].get(k) for k in KEYS} | {"n": e["n"]} for who, e in evals.items()}}
        if task == "boolq" and args.ask:
            results[task]["client"] = ask_through_the_client(work, name, files["test"], args.ask)
        print(json.dumps(results[task]["test"], indent=2), flush=True)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "own_data_runs.json").write_text(json.dumps(results, indent=2))
    lines = ["| task | model | n | acc | NLL | ECE | Brier | AUROC(entropy) | AUROC(MI) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, result in results.items():
        for who, m in result["test"].items():
            cells = [f"{m[k]:.3f}" if isinstance(m.get(k), float) else "–" for k in
                     ("acc", "nll", "ece", "brier", "auroc_entropy", "auroc_mi")]
            lines.append(f"| {task} | {who} | {m['n']} | " + " | ".join(cells) + " |")
    (RESULTS / "own_data_runs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
