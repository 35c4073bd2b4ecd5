"""Does the served abstention rule hold? Held-out labelled questions through a running server's HTTP API.

Posts the questions of a dataset split to ``POST /v1/answer/batch`` of a running uqserve (for example
``make serve``), counts the server's own abstentions and errors, and prints coverage and selective risk
with Wilson 95 % intervals next to what the bundle's manifest states for its rule on validation
(``GET /v1/bundles``), plus how often each score tripped. JSON goes to ``--out``.

    python benchmarks/served_rule_check.py --url http://127.0.0.1:8000 --bundle default --limit 200
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from core.datasets import load_questions


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--bundle", default="default")
    parser.add_argument("--dataset", default="arc_easy")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/served_rule_<...>.json)")
    args = parser.parse_args()
    questions = load_questions(args.dataset, args.split, args.data_dir, args.limit)
    with httpx.Client(base_url=args.url, timeout=600.0) as client:
        bundles = {b["name"]: b for b in client.get("/v1/bundles").raise_for_status().json()["bundles"]}
        info = bundles[args.bundle]
        answered = wrong = 0
        reasons: Counter[str] = Counter()
        for lo in tqdm(range(0, len(questions), args.chunk), desc="answer", unit="batch"):
            chunk = questions[lo : lo + args.chunk]
            body: dict[str, Any] = {"bundle": args.bundle, "questions": [
                {"question": q.question, "choices": list(q.choices), "context": q.context} for q in chunk]}
            results = client.post("/v1/answer/batch", json=body).raise_for_status().json()["results"]
            for q, r in zip(chunk, results, strict=True):
                reasons.update(r["abstain_reasons"])
                if not r["abstained"]:
                    answered += 1
                    wrong += int(r["answer"]["index"] != q.answer)
    n = len(questions)
    report = {
        "bundle": args.bundle, "version": info["version"], "calibration_hash": info["calibration_hash"],
        "dataset": args.dataset, "split": args.split, "n": n,
        "coverage": answered / n, "coverage_ci95": wilson(answered, n),
        "selective_risk": wrong / answered if answered else None,
        "selective_risk_ci95": wilson(wrong, answered) if answered else None,
        "abstained": n - answered, "reasons_tripped": dict(reasons),
        "thresholds": info["thresholds"], "manifest_rule": info.get("abstention_rule"),
    }
    out = Path(args.out) if args.out else (Path("benchmarks/results")
                                           / f"served_rule_{args.bundle}_{args.dataset}_{args.split}{n}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
