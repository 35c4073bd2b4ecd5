"""What the durable prediction log costs: HTTP throughput at 32 clients with the log off (answers held in
memory, lost on restart), on SQLite (WAL, synchronous=FULL: an fsync per group commit) and on PostgreSQL
(fsync on), side by side in one run.

Each configuration is its own server process on SmolLM2-135M (the same bundles, random-weight LoRA members,
r=16 on the top 8 layers, ARC-Easy questions). Rounds are interleaved (every configuration once per round,
in rotating order) and the table reports medians, so a noisy machine shifts all rows alike. PostgreSQL is
Debian's, started on loopback by the tests' harness; without it that row is left out, and said so.

    PYTHONPATH=.:tests .venv/bin/python benchmarks/bench_prediction_log.py          # CPU, ~6 min
    PYTHONPATH=.:tests .venv/bin/python benchmarks/bench_prediction_log.py --rounds 5 --members 1,5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.bench_serving import make_bundle
from core.basemodel import load_base_model
from core.datasets import load_questions

RESULTS = Path(__file__).resolve().parent / "results"


async def run_load(url: str, bundle: str, questions: list[dict[str, Any]], clients: int) -> dict[str, float]:
    """POST every question with ``clients`` concurrent clients; throughput and latency quantiles."""
    latencies: list[float] = []
    pending = list(questions)
    failures = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failures
        while pending:
            body = {**pending.pop(), "bundle": bundle}
            start = time.perf_counter()
            r = await http.post(f"{url}/v1/answer", json=body)
            latencies.append(time.perf_counter() - start)
            failures += r.status_code != 200

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    lat = sorted(latencies)
    if failures:
        raise RuntimeError(f"{failures} of {len(questions)} answers failed at {url}")
    return {"qps": len(questions) / wall, "p50_ms": 1000 * lat[len(lat) // 2],
            "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))]}


def store_capacity(url: str, writers: int, answers: int) -> dict[str, float]:
    """The log alone: ``writers`` concurrent coroutines committing ``answers`` answer records (each a
    realistic 4-choice row with texts) through the server's store; answers/s and mean commit wait."""
    from datetime import UTC, datetime

    from service.predlog import PredictionRecord, texts_hash
    from service.predlog.sql import SqlPredictionStore

    store = SqlPredictionStore(url, replica="bench")
    choices = ["a photosynthesis product", "carbon dioxide", "nitrogen gas", "water vapour"]

    def record(i: int) -> PredictionRecord:
        question = f"Which gas do plants take in from the air? (variant {i})"
        return PredictionRecord(
            request_id=f"{i:032x}", created_at=datetime.now(UTC), bundle="bench5", version="5", method="ensemble",
            base_model_hash="b" * 64, calibration_hash="c" * 16, prompt_hash="p" * 64, question=question,
            context=None, choices=choices, texts_hash=texts_hash(question, None, choices),
            probabilities=[0.1, 0.7, 0.15, 0.05], answer_index=1, max_probability=0.7, predictive_entropy=0.87,
            expected_entropy=0.8, mutual_information=0.07, feu=None,
            thresholds={"values": {"predictive_entropy": 0.9}, "sources": {"predictive_entropy": "bundle"}},
            abstained=False, abstain_reasons=[], latency_ms=1500.0)

    waits: list[float] = []

    async def scenario() -> float:
        await store.start()
        pending = list(range(answers))

        async def writer() -> None:
            while pending:
                i = pending.pop()
                start = time.perf_counter()
                await store.write([record(i)])
                waits.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(writers)))
        wall = time.perf_counter() - start
        await store.stop()
        return wall

    wall = asyncio.run(scenario())
    return {"answers_per_s": answers / wall, "mean_wait_ms": 1000 * statistics.mean(waits)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--questions", type=int, default=192, help="questions per measured load")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--members", default="1,5", help="ensemble sizes to measure, comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--store-answers", type=int, default=4000, help="answers committed in the store-only test")
    args = parser.parse_args()
    from components import postgres_server  # the tests' harness: Debian's PostgreSQL on loopback
    from replicas import Replica

    members = [int(m) for m in args.members.split(",")]
    work = Path(tempfile.mkdtemp(prefix="uqserve-bench-log-"))
    base = load_base_model()
    for m in members:
        make_bundle(work / "bundles", base, f"bench{m}", seed=m, members=m)
    del base
    arc = [q for q in load_questions("arc_easy", "test") if len(q.choices) == 4]
    questions = [{"question": q.question, "choices": list(q.choices)} for q in arc[: args.questions]]
    common = {"UQSERVE_BUNDLE_ROOT": str(work / "bundles"),
              "UQSERVE_PRELOAD_BUNDLES": ",".join(f"bench{m}" for m in members),
              "UQSERVE_TORCH_THREADS": str(args.threads), "UQSERVE_MAX_WAIT_MS": "5",
              "UQSERVE_REQUEST_TIMEOUT_S": "600"}
    configs: dict[str, dict[str, str]] = {"log off": {"UQSERVE_PREDICTION_LOG": "false"},
                                          "SQLite": {"UQSERVE_STATE_DIR": str(work / "sqlite")}}
    notes = []
    with contextlib.ExitStack() as stack:
        if not args.no_postgres:
            try:
                url = stack.enter_context(postgres_server(work / "pg"))
                configs["PostgreSQL"] = {"UQSERVE_DATABASE_URL": url}
            except BaseException as err:  # pytest.skip is a BaseException: PostgreSQL is not installed
                notes.append(f"PostgreSQL row left out: {err}")
        capacity = {}
        for name, env in configs.items():
            if name != "log off":
                url = env.get("UQSERVE_DATABASE_URL") or f"sqlite:///{work / 'capacity.db'}"
                capacity[name] = store_capacity(url, args.clients, args.store_answers)
                print(f"[bench] {name} store alone: {capacity[name]['answers_per_s']:.0f} answers/s", flush=True)
        servers = {}
        for name, env in configs.items():
            replica = Replica(name.replace(" ", "-").lower(), work / "run", {**common, **env})
            servers[name] = replica.start(timeout_s=300)
            stack.callback(replica.stop)
        print(f"[bench] servers up: {list(servers)}; {args.rounds} rounds x {len(members)} bundles", flush=True)
        runs: dict[str, dict[str, list[dict[str, float]]]] = {f"M={m}": {n: [] for n in servers} for m in members}
        for m in members:  # warm-up
            for replica in servers.values():
                asyncio.run(run_load(replica.url, f"bench{m}", questions[: args.clients], args.clients))
        for rnd in range(args.rounds):
            order = list(servers)[rnd % len(servers):] + list(servers)[: rnd % len(servers)]
            for m in members:
                for name in order:
                    result = asyncio.run(run_load(servers[name].url, f"bench{m}", questions, args.clients))
                    runs[f"M={m}"][name].append(result)
                    print(f"[bench] round {rnd + 1} M={m} {name}: {result['qps']:.2f} q/s", flush=True)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for bundle, per_config in runs.items():
        off = statistics.median(r["qps"] for r in per_config["log off"])
        table[bundle] = {}
        for name, results in per_config.items():
            qps = statistics.median(r["qps"] for r in results)
            table[bundle][name] = {"qps": qps, "ratio_to_off": qps / off,
                                   "p50_ms": statistics.median(r["p50_ms"] for r in results),
                                   "p95_ms": statistics.median(r["p95_ms"] for r in results)}
    lines = [f"Prediction log cost: SmolLM2-135M on CPU ({platform.processor() or platform.machine()}), "
             f"{args.clients} clients, {args.questions} questions per load, medians of {args.rounds} rounds", "",
             f"{'bundle':<8}{'log':<12}{'q/s':>8}{'÷ off':>8}{'p50 ms':>9}{'p95 ms':>9}"]
    for bundle, rows in table.items():
        for name, row in rows.items():
            lines.append(f"{bundle:<8}{name:<12}{row['qps']:>8.2f}{row['ratio_to_off']:>8.3f}"
                         f"{row['p50_ms']:>9.0f}{row['p95_ms']:>9.0f}")
    lines += ["", f"The log alone ({args.clients} concurrent writers, {args.store_answers} answers, group commit):"]
    slowest = min(row["qps"] for rows in table.values() for row in rows.values())
    fastest = max(row["qps"] for rows in table.values() for row in rows.values())
    for name, cap in capacity.items():
        lines.append(f"  {name:<11} {cap['answers_per_s']:>8.0f} answers/s, mean commit wait "
                     f"{cap['mean_wait_ms']:.1f} ms:"
                     f" the log's share of serving time {fastest / cap['answers_per_s']:.2%} at {fastest:.1f} q/s,"
                     f" {slowest / cap['answers_per_s']:.2%} at {slowest:.1f} q/s")
    lines += notes
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_prediction_log.json").write_text(json.dumps(
        {"clients": args.clients, "questions": args.questions, "rounds": args.rounds, "table": table, "runs": runs,
         "store_alone": capacity, "notes": notes}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
