"""Torch engine vs vLLM engine, same bundles, same questions, side by side in one run; plus vLLM alone.

For M = 1 and M = 5 (random-weight LoRA bundles from bench_serving: rank 16 on every projection of the top 8 layers) and
1, 8 and 32 concurrent HTTP clients, each engine is started as a real ``uqserve serve`` subprocess and
measured: throughput (questions/s), p50 and p99 latency, and the peak resident memory of the server's
whole process tree (vLLM runs its engine core in child processes). "vLLM alone" scores the same
requests (same token ids, same adapters, same sampling parameters the engine builds) directly on
``AsyncLLM`` with the same number of questions in flight, so ``uqserve_vllm / vllm_alone`` is our
layer's overhead.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_engines.py                 # CPU, tens of minutes
    PYTHONPATH=. .venv/bin/python benchmarks/bench_engines.py --questions 8 --levels 1,8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import torch

from benchmarks.bench_serving import free_port, make_bundle
from core.answers import AnswerFormat, Question, encode_question
from core.basemodel import load_base_model
from core.bundle import read_bundle
from core.datasets import load_questions


class PeakMemory:
    """Samples the RSS of a process and all its descendants every 0.2 s; ``peak_mib`` is the maximum."""

    def __init__(self, pid: int) -> None:
        self.process, self.peak_mib, self._stop = psutil.Process(pid), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.process, *self.process.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs if p.is_running())
                self.peak_mib = max(self.peak_mib, rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.2)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mib


async def http_load(url: str, bundle: str, questions: list[Question], clients: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    queue = list(questions)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while queue:
            q = queue.pop()
            start = time.perf_counter()
            r = await http.post(f"{url}/v1/answer", json={"bundle": bundle, "question": q.question,
                                                          "choices": list(q.choices)})
            latencies.append(time.perf_counter() - start)
            errors += r.status_code != 200

    async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=clients + 1)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    return summary(latencies, wall, errors)


def summary(latencies: list[float], wall: float, errors: int) -> dict[str, Any]:
    lat = sorted(latencies)
    return {"questions": len(lat), "wall_s": round(wall, 3), "throughput_qps": len(lat) / wall,
            "p50_s": lat[len(lat) // 2], "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))], "errors": errors}


def serve(engine: str, root: Path, bundles: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "UQSERVE_BUNDLE_ROOT": str(root), "UQSERVE_PRELOAD_BUNDLES": ",".join(bundles),
           "UQSERVE_ENGINE": engine, "UQSERVE_REQUEST_TIMEOUT_S": "1800", "UQSERVE_MAX_QUEUE_ROWS": "100000"}
    proc = subprocess.Popen([sys.executable, "-m", "uqserve.cli", "serve", "--port", str(port), "--log-level",
                             "warning"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{engine} server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{engine} server not ready in 600 s")
        time.sleep(1)


def measure_engine(engine: str, root: Path, cases: dict[str, str], questions: list[Question],
                   levels: list[int], per_level: int, log_dir: Path) -> dict[str, Any]:
    proc, url = serve(engine, root, list(cases.values()), log_dir / f"{engine}.log")
    memory = PeakMemory(proc.pid)
    out: dict[str, Any] = {}
    try:
        for case, bundle in cases.items():
            asyncio.run(http_load(url, bundle, questions[:2], 1))  # warm-up
            for clients in levels:
                n = max(per_level, clients)
                result = asyncio.run(http_load(url, bundle, questions[:n], clients))
                out[f"{case}/c{clients}"] = result
                print(f"  {engine:5s} {case} c={clients:2d}: {result['throughput_qps']:.2f} q/s, "
                      f"p50 {result['p50_s']:.2f} s, p99 {result['p99_s']:.2f} s, errors {result['errors']}",
                      flush=True)
    finally:
        out["peak_rss_mib"] = memory.stop()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)
    return out


async def vllm_alone(root: Path, cases: dict[str, str], questions: list[Question], levels: list[int],
                     per_level: int) -> dict[str, Any]:
    """The same scoring requests straight on AsyncLLM, ``clients`` questions in flight at a time."""
    from service.engine.forward import RowWork
    from service.engine.predictors import predictor_for
    from service.engine.vllm_engine import VllmEngine
    from service.settings import Settings

    engine = await asyncio.to_thread(VllmEngine.from_settings, Settings(engine="vllm", bundle_root=root))
    out: dict[str, Any] = {}
    try:
        for case, name in cases.items():
            bundle = read_bundle(root / name)
            predictor = predictor_for(bundle)
            ids = await engine._place(predictor, predictor.slot_loads())  # writes and adds the vLLM adapters
            fmt = bundle.manifest.answer_space.answer_format
            works = [RowWork(encode_question(engine.tokenizer, q, fmt, 768), fmt, tuple(ids), 0) for q in questions]

            async def one(work: RowWork) -> float:
                start = time.perf_counter()
                await asyncio.gather(*(engine._row(work, lora_id) for lora_id in work.row_slots))
                return time.perf_counter() - start

            await one(works[0])
            for clients in levels:
                queue = list(works[: max(per_level, clients)])
                latencies: list[float] = []

                async def client(queue: list[RowWork] = queue, latencies: list[float] = latencies) -> None:
                    while queue:
                        latencies.append(await one(queue.pop()))

                start = time.perf_counter()
                await asyncio.gather(*(client() for _ in range(clients)))
                out[f"{case}/c{clients}"] = summary(latencies, time.perf_counter() - start, 0)
                r = out[f"{case}/c{clients}"]
                print(f"  alone {case} c={clients:2d}: {r['throughput_qps']:.2f} q/s, p50 {r['p50_s']:.2f} s",
                      flush=True)
    finally:
        await engine.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answer-format", default="cloze", choices=["cloze", "letter"])
    parser.add_argument("--levels", default="1,8,32", help="concurrent HTTP clients")
    parser.add_argument("--questions", type=int, default=16, help="questions per level (at least the level)")
    parser.add_argument("--out", default="benchmarks/results/bench_engines.json")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    fmt = AnswerFormat(args.answer_format)
    questions = load_questions("arc_easy", "test", None, max(args.questions, *levels) + 2)
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        root = Path(tmp)
        base = load_base_model()
        cases = {"M1": "bench-m1", "M5": "bench-m5"}
        make_bundle(root, base, "bench-m1", 1, members=1, answer_format=fmt)
        make_bundle(root, base, "bench-m5", 5, members=5, answer_format=fmt)
        del base
        results: dict[str, Any] = {}
        for engine in ("torch", "vllm"):
            print(f"[bench] {engine} engine over HTTP", flush=True)
            results[engine] = measure_engine(engine, root, cases, questions, levels, args.questions, root)
        print("[bench] vLLM alone (AsyncLLM, same requests)", flush=True)
        results["vllm_alone"] = asyncio.run(vllm_alone(root, cases, questions, levels, args.questions))
    ratios = {}
    for key in results["torch"]:
        if key == "peak_rss_mib":
            continue
        t, v, a = results["torch"][key], results["vllm"][key], results["vllm_alone"][key]
        ratios[key] = {"vllm_over_torch_throughput": v["throughput_qps"] / t["throughput_qps"],
                       "uqserve_vllm_over_vllm_alone_throughput": v["throughput_qps"] / a["throughput_qps"]}
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "cuda": torch.cuda.is_available()},
              "answer_format": fmt.value, "levels": levels, "questions_per_level": args.questions,
              "results": results, "ratios": ratios}
    print(f"\n{'case':8s} {'torch q/s':>10s} {'vllm q/s':>10s} {'alone q/s':>10s} {'v/t':>6s} {'v/alone':>8s}")
    for key, r in ratios.items():
        t, v, a = (results[e][key]["throughput_qps"] for e in ("torch", "vllm", "vllm_alone"))
        print(f"{key:8s} {t:10.2f} {v:10.2f} {a:10.2f} {r['vllm_over_torch_throughput']:6.2f} "
              f"{r['uqserve_vllm_over_vllm_alone_throughput']:8.2f}")
    print(f"peak RSS (MiB): torch {results['torch']['peak_rss_mib']:.0f}, vllm {results['vllm']['peak_rss_mib']:.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
