"""Overload benchmark: small questions while one client floods maximal batches, before and after admission
control (fair per-client queue, preemptible forward steps, per-request and per-client cost budgets).

Each phase starts a real server (``python -m service``, uvicorn with the project's protocol) on loopback
with SmolLM2-135M-Instruct and a random-weight M = 5 ensemble (rank 16 on every projection of the top 8
layers, the default recipe's shape; no training needed), two client API keys ("prober", "flood"):

  idle         the prober alone: one small question (4 short choices) at a time
  flood        the same prober while the flooder keeps ``--flood-connections`` maximal batches in flight
               (``--flood-questions`` questions of 26 choices of ~80 characters each, the most one request may
               cost under the default ``max_request_cost``), resending after Retry-After on 429

in two configurations, run side by side in one invocation:

  before       main as landed before admission control (``--before-ref``, unpacked with ``git archive``):
               one FIFO queue, forwards run whole, no budgets (API keys are ignored there)
  after        this checkout with its defaults

It reports the prober's p50/p99 per phase, the ratio flood p99 / idle p99 per configuration (target: ≤ 2
after), and what the flooder got (answered questions, 429s, 413s, 5xx). Results go to
``benchmarks/results/overload/`` (JSON, Markdown, and a latency plot).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_overload.py            # ~6 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import MEMBERS, free_port, make_bundle

from core.answers import AnswerFormat, Question, encode_question
from core.basemodel import load_base_model
from service.access import hash_key
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "overload"
KEYS = {"prober": "bench-prober-key", "flood": "bench-flood-key"}
SMALL = {"question": "Which gas do plants absorb from the air for photosynthesis?",
         "choices": ["oxygen", "carbon dioxide", "nitrogen", "helium"]}
FILLER = "the process by which green plants use sunlight to make their food from carbon dioxide and water in leaves"
BEFORE_REF = "c401983"  # main as landed before admission control (issue 14)


def flood_question(i: int) -> dict[str, Any]:
    """26 distinct choices of ~80 characters: the costliest kind of question the limits allow."""
    return {"question": f"Which of these statements about sample {i} is the most accurate one?",
            "choices": [f"statement {i}-{k}: " + FILLER[: 80 - len(f'statement {i}-{k}: ')] for k in range(26)]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Server:
    """``python -m service`` in a subprocess on a free loopback port."""

    def __init__(self, tree: Path, bundle_root: Path, state: Path, threads: int) -> None:
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(tree), "UQSERVE_BUNDLE_ROOT": str(bundle_root),
               "UQSERVE_PRELOAD_BUNDLES": "bench", "UQSERVE_STATE_DIR": str(state),
               "UQSERVE_TORCH_THREADS": str(threads),
               "UQSERVE_API_KEYS": ",".join(f"{n}:{hash_key(k)}" for n, k in KEYS.items())}
        self.process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(self.port),
                                         "--log-level", "warning"], env=env, cwd=tree)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError("the server exited during startup")
            time.sleep(0.5)
        raise RuntimeError("the server did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)


async def prober(url: str, seconds: float, warmup: int = 3) -> dict[str, Any]:
    latencies, statuses = [], []
    headers = {"X-API-Key": KEYS["prober"]}
    async with httpx.AsyncClient(timeout=120, headers=headers) as http:
        for _ in range(warmup):
            await http.post(f"{url}/v1/answer", json={"bundle": "bench", **SMALL})
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            r = await http.post(f"{url}/v1/answer", json={"bundle": "bench", **SMALL})
            statuses.append(r.status_code)
            if r.status_code == 200:
                latencies.append(time.perf_counter() - start)
    return {"n": len(latencies), "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
            "max_s": max(latencies, default=float("nan")), "errors": {str(s): statuses.count(s) for s in
                                                                        set(statuses) if s != 200},
            "latencies_s": latencies}


async def flooder(url: str, stop: asyncio.Event, connections: int, questions: int) -> dict[str, Any]:
    counts: dict[str, int] = {}
    answered = 0
    headers = {"X-API-Key": KEYS["flood"]}
    body = {"bundle": "bench", "questions": [flood_question(i) for i in range(questions)]}

    async def loop(http: httpx.AsyncClient) -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                r = await http.post(f"{url}/v1/answer/batch", json=body)
            except httpx.HTTPError as err:
                counts[type(err).__name__] = counts.get(type(err).__name__, 0) + 1
                continue
            counts[str(r.status_code)] = counts.get(str(r.status_code), 0) + 1
            if r.status_code == 200:
                answered += questions
            elif r.status_code == 429:  # throttled: wait as told
                await asyncio.sleep(min(float(r.headers.get("Retry-After", "1")), 10.0))
            elif r.status_code == 413:
                await asyncio.sleep(1.0)

    async with httpx.AsyncClient(timeout=300, headers=headers) as http:
        started = time.perf_counter()
        await asyncio.gather(*(loop(http) for _ in range(connections)))
        wall = time.perf_counter() - started
    return {"statuses": counts, "questions_answered": answered, "questions_per_s": answered / wall}


async def flood_phase(url: str, seconds: float, connections: int, questions: int) -> dict[str, Any]:
    stop = asyncio.Event()
    flood = asyncio.create_task(flooder(url, stop, connections, questions))
    await asyncio.sleep(3.0)  # the flood is queued before the prober starts
    probe = await prober(url, seconds, warmup=0)
    stop.set()
    return {"prober": probe, "flood": await flood}


async def issue_example(url: str) -> dict[str, Any]:
    """The issue's request: 64 questions × 26 choices of ~80 characters."""
    body = {"bundle": "bench", "questions": [flood_question(i) for i in range(64)]}
    async with httpx.AsyncClient(timeout=300, headers={"X-API-Key": KEYS["flood"]}) as http:
        start = time.perf_counter()
        r = await http.post(f"{url}/v1/answer/batch", json=body)
        return {"status": r.status_code, "seconds": time.perf_counter() - start,
                "code": r.json().get("error", {}).get("code") if r.status_code != 200 else None}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for config, phases in results["configs"].items():
        for phase, style in (("idle", ":"), ("flood", "-")):
            lat = sorted(phases[phase]["prober"]["latencies_s"] if phase == "flood" else phases[phase]["latencies_s"])
            if lat:
                ax.plot([1000 * x for x in lat], [(i + 1) / len(lat) for i in range(len(lat))], style,
                        label=f"{config}: {phase}")
    notes = [f"{config}: flood: {phases['flood']['prober']['n']} answered, errors {phases['flood']['prober']['errors']}"
             for config, phases in results["configs"].items() if phases["flood"]["prober"]["errors"]]
    if notes:  # questions that never got an answer have no latency to draw
        ax.text(0.02, 0.97, "\n".join(notes), transform=ax.transAxes, va="top", fontsize=8, color="tab:red")
    ax.set_xscale("log")
    ax.set_xlabel("small-question latency (ms, log scale)")
    ax.set_ylabel("fraction of questions")
    ax.set_title("Small questions while one client floods maximal batches")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--flood-seconds", type=float, default=60.0)
    parser.add_argument("--flood-connections", type=int, default=4)
    parser.add_argument("--flood-questions", type=int, default=None, help="questions per flood batch (default: "
                        "the most whose cost fits the default max_request_cost)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before-ref", default=BEFORE_REF, help="the commit served as 'before' (default: main as "
                        "landed before admission control); 'after' is this checkout")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the saved results.json")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        plot(json.loads((OUT / "results.json").read_text()), OUT / "latency.png")
        return 0
    base = load_base_model("smollm2-135m", dtype=torch.float32)  # caches the de-quantized model for the servers
    results: dict[str, Any] = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                           "torch": torch.__version__}, "args": vars(args), "configs": {}}
    results["after_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                             capture_output=True, text=True).stdout.strip()
    if args.flood_questions is None:  # as many as the default max_request_cost admits (rows × tokens each)
        budget, total, args.flood_questions = Settings.model_fields["max_request_cost"].default, 0, 0
        while True:
            question = flood_question(args.flood_questions)
            one = encode_question(base.tokenizer, Question(question["question"], tuple(question["choices"])),
                                  AnswerFormat.CLOZE, 768)
            cost = MEMBERS * (len(one.prefix_ids) + sum(len(c) for c in one.choice_ids))
            if total + cost > budget:
                break
            total += cost
            args.flood_questions += 1
        print(f"[overload] a flood batch: {args.flood_questions} questions costing {total} of {budget}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bundles"
        make_bundle(root, base, "bench", seed=1)
        del base
        before = Path(tmp) / "before"  # the landed code, as a user had it
        before.mkdir()
        subprocess.run(f"git -C '{ROOT}' archive {args.before_ref} | tar -x -C '{before}'", shell=True, check=True)
        for config, tree in (("before", before), ("after", ROOT)):
            print(f"[overload] {config}: starting the server", flush=True)
            server = Server(tree, root, Path(tmp) / f"state-{config}", args.threads)
            try:
                idle = asyncio.run(prober(server.url, args.idle_seconds))
                print(f"[overload] {config} idle: p50 {idle['p50_s']:.3f} s, p99 {idle['p99_s']:.3f} s "
                      f"(n={idle['n']})", flush=True)
                flood = asyncio.run(flood_phase(server.url, args.flood_seconds, args.flood_connections,
                                                args.flood_questions))
                probe = flood["prober"]
                print(f"[overload] {config} flood: p50 {probe['p50_s']:.3f} s, p99 {probe['p99_s']:.3f} s "
                      f"(n={probe['n']}, errors {probe['errors']}); flooder {flood['flood']}", flush=True)
                example = asyncio.run(issue_example(server.url))
            finally:
                server.stop()
            results["configs"][config] = {"idle": idle, "flood": flood, "issue_example": example,
                                          "p99_ratio": probe["p99_s"] / idle["p99_s"]}
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| config | idle p50 / p99 (s) | flood p50 / p99 (s) | p99 flood / idle | prober errors | "
             "flood answered q/s | flood statuses |", "|---|---|---|---|---|---|---|"]
    for config, r in results["configs"].items():
        idle, probe, flood = r["idle"], r["flood"]["prober"], r["flood"]["flood"]
        lines.append(f"| {config} | {idle['p50_s']:.3f} / {idle['p99_s']:.3f} | {probe['p50_s']:.3f} / "
                     f"{probe['p99_s']:.3f} | {r['p99_ratio']:.2f}× | {probe['errors'] or 'none'} | "
                     f"{flood['questions_per_s']:.2f} | {flood['statuses']} |")
    for config, r in results["configs"].items():
        example = r["issue_example"]
        lines.append(f"\nThe issue's request (64 questions × 26 choices of ~80 characters), {config}: HTTP "
                     f"{example['status']} {example['code'] or ''} in {example['seconds']:.2f} s.")
    text = "\n".join(lines)
    (OUT / "results.md").write_text(text + "\n")
    plot(results, OUT / "latency.png")
    print(text)
    ratio = statistics.fmean([results["configs"]["after"]["p99_ratio"]])
    print(f"[overload] after: flood p99 / idle p99 = {ratio:.2f} (target ≤ 2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
