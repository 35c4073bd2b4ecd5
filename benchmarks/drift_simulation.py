"""Drift alarms on real model scores: false alarms with no drift, detection under a dataset shift.

The model is SmolLM2-135M zero-shot (cloze) with a temperature fitted on ARC-Easy validation, as the
exporter does; its drift reference is :func:`core.drift.build_drift_reference` on ARC-Easy validation.
Answers are streamed through the server's :class:`~service.engine.monitoring.Monitor` (default windows:
500 labelled, 500 live, gauges from 50 live values), sampled with replacement from

- **no drift**: ARC-Easy test, for ``--days`` days;
- **shift**: ARC-Easy test for ``--shift-after`` hours, then ARC-Challenge test (``--runs`` runs).

Traffic: ``--per-scrape`` answers per 15 s scrape, each labelled with probability ``--label-fraction``.
Every scrape is one rule evaluation (deploy/prometheus.yml: 15 s); an alert *fires* once its condition
has held at every evaluation for 15 minutes (61 consecutive evaluations), as ``for: 15m``.

Rules, each evaluated on every scrape:

- ``new``: deploy/alerts.yml — statistic > its ``*_threshold`` gauge (the bundle's drift reference);
- ``fallback``: the same rules with the server's fallback reference (a bundle exported before drift
  references: equal-width histograms and validation ECE);
- ``old``: the previous rules — ECE > validation ECE + 0.05 with ≥ 100 labels; KS(confidence) > 0.2 on
  the equal-width histogram.

Prepare the scores (≈ 2, 9 and 4 minutes on one core), then run (≈ 10 minutes at the defaults)::

    uqserve eval base --dataset arc_easy --split validation --no-plots --threads 1 \\
        --out runs/eval/base-arc_easy-validation --save-scores runs/eval/base-arc_easy-validation/scores.safetensors
    uqserve eval base --dataset arc_easy --split test --no-plots --threads 1 \\
        --out runs/eval/base-arc_easy-test --save-scores runs/eval/base-arc_easy-test/scores.safetensors
    uqserve eval base --dataset arc_challenge --split test --data-dir ../shared/data --no-plots --threads 1 \\
        --out runs/eval/base-arc_challenge-test --save-scores runs/eval/base-arc_challenge-test/scores.safetensors
    PYTHONPATH=. .venv/bin/python benchmarks/drift_simulation.py
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from core.bundle import Calibration, Histogram
from core.calibration import fit_temperature
from core.drift import build_drift_reference
from core.metrics import ece, reference_histograms
from core.uncertainty import decompose
from service.engine.monitoring import Monitor, drift_reference
from service.engine.types import BundleMonitor
from service.predlog import LabelledAnswer

SCRAPE_S = 15
VERSION = ("1", "calibration-hash")  # the monitored window's (version, calibration hash)
FOR_EVALS = 60  # ``for: 15m`` at one evaluation per 15 s: the condition holds at 61 consecutive evaluations
DAY = 24 * 3600 // SCRAPE_S
Pool = dict[str, Any]


def load_pool(path: Path, temperature: float | None = None) -> Pool:
    """Saved served probabilities [N, K] → the pool's probabilities after temperature, labels and scores."""
    tensors = load_file(str(path))
    probs, labels = tensors["probabilities"].double(), tensors["labels"].long()
    logp = probs.log()  # −inf for absent choices: softmax(logp / T) keeps them at 0
    t = temperature if temperature is not None else fit_temperature(logp, labels)
    tempered = torch.softmax(logp / t, -1)
    u = decompose(tempered[:, None, :])
    return {"probs": tempered, "labels": labels, "temperature": t, "u": u,
            "rows": [row[: int(torch.nonzero(row).max()) + 1].tolist() for row in tempered],  # trailing pads off
            "confidence": u.max_probability.tolist(), "entropy": u.predictive_entropy.tolist()}


def conditions(snapshot: BundleMonitor, validation_ece: float, old: bool) -> dict[str, bool]:
    """Which alert conditions hold at one evaluation (deploy/alerts.yml, or the previous rules if ``old``)."""
    w, out = snapshot.window, {}
    if old:
        out["ece"] = w is not None and w.labelled >= 100 and w.ece > validation_ece + 0.05
        out["ks_confidence"] = snapshot.drift_ks.get("confidence", 0.0) > 0.2
        return out
    out["ece"] = w is not None and w.ece_threshold is not None and w.ece > w.ece_threshold
    for stat, values, thresholds in (("ks", snapshot.drift_ks, snapshot.drift_ks_threshold),
                                     ("psi", snapshot.drift_psi, snapshot.drift_psi_threshold)):
        for score, value in values.items():
            out[f"{stat}_{score}"] = score in thresholds and value > thresholds[score]
    return out


def stream(pools: list[Pool], which: Callable[[int], int], scrapes: int, monitors: dict[str, tuple[Monitor, Any]],
           validation_ece: float, per_scrape: int, label_fraction: float,
           rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    """Stream answers through every monitor; per rule set and alert, the condition at each evaluation [scrapes]."""
    for name, (monitor, reference) in monitors.items():
        monitor.start_bundle(name, VERSION, reference)
    out: dict[str, dict[str, list[bool]]] = {"new": {}, "fallback": {}, "old": {}}
    request = 0
    for t in range(scrapes):
        pool = pools[which(t)]
        for i in rng.integers(len(pool["rows"]), size=per_scrape).tolist():
            rid = str(request)
            request += 1
            scores = {"confidence": pool["confidence"][i], "predictive_entropy": pool["entropy"][i]}
            labelled = rng.random() < label_fraction
            for name, (monitor, _) in monitors.items():
                monitor.record(name, VERSION, scores)
                if labelled:
                    monitor.labelled(LabelledAnswer(rid, name, *VERSION, pool["rows"][i], int(pool["labels"][i])))
        for name, (monitor, _) in monitors.items():
            snap = monitor.snapshot(name, VERSION[0], validation_ece)
            sets = [(name, conditions(snap, validation_ece, False))]
            if name == "fallback":
                sets.append(("old", conditions(snap, validation_ece, True)))
            for rules, conds in sets:
                for alert, holds in conds.items():
                    out[rules].setdefault(alert, [False] * t).append(holds)
                for series in out[rules].values():
                    if len(series) == t:
                        series.append(False)
    return {rules: {a: np.array(s, dtype=bool) for a, s in alerts.items()} for rules, alerts in out.items()}


def firing(cond: np.ndarray, for_evals: int = FOR_EVALS) -> np.ndarray:
    """Alert firing at evaluation t: the condition held at evaluations t − for_evals … t."""
    run = np.zeros(len(cond), dtype=int)
    for t, c in enumerate(cond):
        run[t] = (run[t - 1] + 1 if t else 1) if c else 0
    return run > for_evals


def with_any(alerts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**alerts, "any": np.logical_or.reduce(list(alerts.values()))}


def monitors(reference: Any, fallback: Any) -> dict[str, tuple[Monitor, Any]]:
    return {"new": (Monitor(500, 500, 50), reference), "fallback": (Monitor(500, 500, 50), fallback)}


def summary_no_drift(rows: list[Any]) -> dict[str, Any]:
    a = np.array(rows, dtype=float)  # per day: condition rate, firing rate, firing onsets
    return {"condition_rate": round(float(a[:, 0].mean()), 5), "firing_rate": round(float(a[:, 1].mean()), 5),
            "days_with_a_firing": int((a[:, 2] > 0).sum()), "firing_onsets": int(a[:, 2].sum()), "days": len(rows)}


def summary_shift(rows: list[Any]) -> dict[str, Any]:
    delays = [d for _, d, _ in rows if d is not None]
    late = [f for _, _, f in rows if f is not None]
    return {"detected_runs": len(delays), "runs": len(rows),
            "delay_minutes": {"median": float(np.median(delays)), "max": max(delays)} if delays else None,
            "firing_rate_from_2h_after": round(float(np.mean(late)), 4) if late else None,
            "runs_with_a_false_alarm_before": int(sum(f for f, _, _ in rows))}


def variant(args: argparse.Namespace, temperature: float | None, rng: np.random.Generator) -> dict[str, Any]:
    """One model: the drift reference from ARC-E validation, then the no-drift days and the shift runs."""
    runs = Path(args.runs_dir)
    val = load_pool(runs / "base-arc_easy-validation" / "scores.safetensors", temperature)
    t = val["temperature"]
    test = load_pool(runs / "base-arc_easy-test" / "scores.safetensors", t)
    shift = load_pool(runs / "base-arc_challenge-test" / "scores.safetensors", t)
    started = time.perf_counter()
    reference = build_drift_reference(val["probs"], val["labels"], {"confidence": val["u"].max_probability,
                                                                    "predictive_entropy": val["u"].predictive_entropy},
                                      seed=args.seed)
    build_s = time.perf_counter() - started
    validation_ece = ece(val["probs"], val["labels"])
    hist = {k: Histogram(edges=tuple(v["edges"]), counts=tuple(v["counts"]))  # what an older bundle carries
            for k, v in reference_histograms(val["u"], num_choices=val["probs"].shape[1]).items()
            if k != "mutual_information"}
    fallback = drift_reference(Calibration(validation_metrics={"ece": validation_ece}, reference_histograms=hist))
    common: dict[str, Any] = {"validation_ece": validation_ece, "per_scrape": args.per_scrape,
                              "label_fraction": args.label_fraction, "rng": rng}
    no_drift: dict[str, dict[str, list[Any]]] = {}
    for _ in range(args.days):
        day = stream([test], lambda _t: 0, DAY, monitors(reference, fallback), **common)
        for rules, alerts in day.items():
            for alert, cond in with_any(alerts).items():
                fire = firing(cond)
                onsets = int((fire[1:] & ~fire[:-1]).sum() + fire[0])
                no_drift.setdefault(rules, {}).setdefault(alert, []).append((cond.mean(), fire.mean(), onsets))
    before = int(args.shift_after * 3600 / SCRAPE_S)
    total = before + int(args.shift_hours * 3600 / SCRAPE_S)
    settled = before + 2 * 3600 // SCRAPE_S  # two hours after the switch: both windows hold only ARC-C
    shifted: dict[str, dict[str, list[Any]]] = {}
    for _ in range(args.runs):
        run = stream([test, shift], lambda s: int(s >= before), total, monitors(reference, fallback), **common)
        for rules, alerts in run.items():
            for alert, cond in with_any(alerts).items():
                fire = firing(cond)
                after = np.flatnonzero(fire[before:])
                delay = float(after[0] * SCRAPE_S / 60) if len(after) else None
                late = float(fire[settled:].mean()) if total > settled else None
                shifted.setdefault(rules, {}).setdefault(alert, []).append((bool(fire[:before].any()), delay, late))
    return {
        "temperature": round(t, 4), "build_drift_reference_s": round(build_s, 2),
        "accuracy": {name: float((pool["probs"].argmax(-1) == pool["labels"]).double().mean())
                     for name, pool in (("arc_easy_validation", val), ("arc_easy_test", test),
                                        ("arc_challenge_test", shift))},
        "ece": {name: ece(pool["probs"], pool["labels"]) for name, pool in (("arc_easy_validation", val),
                                                                           ("arc_easy_test", test),
                                                                           ("arc_challenge_test", shift))},
        "thresholds_new": {str(n): {"ece": reference.ece_threshold(n),
                                    **{f"{s}_{score}": getattr(reference, f"{s}_threshold")(score, n)
                                       for s in ("ks", "psi") for score in reference.scores}}
                           for n in (50, 100, 200, 500)},
        "no_drift": {rules: {a: summary_no_drift(r) for a, r in alerts.items()} for rules, alerts in no_drift.items()},
        "shift": {rules: {a: summary_shift(r) for a, r in alerts.items()} for rules, alerts in shifted.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default="runs/eval")
    parser.add_argument("--days", type=int, default=3, help="no-drift days per model")
    parser.add_argument("--runs", type=int, default=3, help="shift runs per model")
    parser.add_argument("--shift-after", type=float, default=6.0, help="hours of ARC-E before ARC-C")
    parser.add_argument("--shift-hours", type=float, default=6.0, help="hours of ARC-C after the switch")
    parser.add_argument("--per-scrape", type=int, default=4, help="answers per 15 s scrape")
    parser.add_argument("--label-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/drift_simulation.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    result: dict[str, Any] = {"setup": {
        "model": "SmolLM2-135M zero-shot cloze (uqserve eval base --save-scores)",
        "reference": "ARC-E validation (n=570)", "no_drift_stream": "ARC-E test (n=2376), with replacement",
        "shift_stream": f"ARC-C test (n=1172), with replacement, after {args.shift_after} h of ARC-E test, "
                        f"for {args.shift_hours} h",
        "scrape_s": SCRAPE_S, "for_evaluations": FOR_EVALS + 1, "answers_per_scrape": args.per_scrape,
        "label_fraction": args.label_fraction, "windows": {"labelled": 500, "live": 500, "min_live": 50},
        "days": args.days, "runs": args.runs, "seed": args.seed,
        "measures": {"condition_rate": "fraction of rule evaluations where the alert expression is true",
                     "firing_rate": "fraction of rule evaluations where the alert fires (true for 15 min)",
                     "days_with_a_firing": "days on which the alert fired at least once",
                     "delay_minutes": "from the switch to ARC-C to the first firing"}}}
    for name, temperature in (("calibrated", None), ("raw", 1.0)):
        result[name] = variant(args, temperature, rng)
        result[name]["model"] = ("temperature fitted on ARC-E validation, as the exporter does" if temperature is None
                                 else "raw zero-shot (T = 1), as `uqserve eval base` reports it")
    result["wall_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name in ("calibrated", "raw"):
        print(name, json.dumps({k: result[name][k] for k in ("no_drift", "shift")}))


if __name__ == "__main__":
    main()
