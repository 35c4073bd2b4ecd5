"""Serving benchmark on SmolLM2-135M: multi-LoRA ensemble forwards, HTTP throughput, hot-swap.

Everything is measured side by side in one run (interleaved round-robin, medians over repeats), so the
ratios hold even on a noisy machine. Bundles are random-weight LoRA members (r=16, all 7 projections of
the top 8 layers); no training needed.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_serving.py            # CPU, ~3 min
    PYTHONPATH=. .venv/bin/python benchmarks/bench_serving.py --device cuda

Rows of the forward table (one ARC-Easy question, M=5; ``--answer-format cloze`` (default) or ``letter``):
  base_5row_full     one batched 5-row base forward, full depth (no LoRA)
  base_5row_trunk8   same, trunk once + top 8 layers for the 5 rows (no LoRA)
  ens_shared         our M=5 ensemble question: shared trunk (22 layers once) + 5 LoRA rows in the top 8
  ens_full           our M=5 ensemble question at full depth (5 rows through all 30 layers)
  peft_loop          naive peft: set_adapter(m) and a 1-row forward, for each of the 5 members
  peft_mixed         peft mixed batch: one 5-row forward with adapter_names=[m0..m4]
  head_5row          the answer head alone (final norm + vocabulary log-softmax at the scored tokens) for 5 rows:
                     a cost every variant pays in full (cloze: ~40 scored tokens x 49k vocabulary per row), so
                     the "excluding head" ratios show what batching and the shared trunk do to the layers
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core.answers import AnswerFormat, Question, encode_question
from core.basemodel import BaseModel, load_base_model
from core.bundle import (
    AnswerSpaceSpec,
    BundleManifest,
    Calibration,
    LoraSpec,
    MemberSpec,
    Method,
    base_ref,
    write_bundle,
)
from core.datasets import load_questions
from core.multilora import ALL_MODULES, LoraLayout, MultiLora
from core.scoring import ChoiceScorer
from service.engine.engine import UQEngine
from service.engine.forward import MixedForward, RowWork
from service.settings import Settings

MEMBERS, RANK, TOP = 5, 16, 8
FMT = AnswerFormat.CLOZE  # set from --answer-format
ADMIN = "bench-admin-key"


def make_bundle(root: Path, base: BaseModel, name: str, seed: int, members: int | None = None,
                answer_format: AnswerFormat | None = None) -> Path:
    """Random-weight ensemble: ``members`` (default MEMBERS) members, rank RANK on every projection of the
    top TOP layers, in ``answer_format`` (default the --answer-format of this run)."""
    members = members or MEMBERS
    layers = tuple(range(base.info.num_layers - TOP, base.info.num_layers))
    layout = LoraLayout(ALL_MODULES, layers, RANK, 2.0 * RANK)
    multilora = MultiLora(base.model, layout, num_slots=members)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in multilora.factors.values():
            f.lora_A.copy_(torch.randn(f.lora_A.shape, generator=gen) * 0.02)
            f.lora_B.copy_(torch.randn(f.lora_B.shape, generator=gen) * 0.02)
    tensors = {f"m{i}": {k: v.cpu() for k, v in multilora.peft_state_dict(i).items()} for i in range(members)}
    multilora.remove()
    manifest = BundleManifest(
        name=name, version=str(seed), method=Method.ENSEMBLE,
        members=tuple(MemberSpec(name=f"m{i}", weight=1.0) for i in range(members)),
        base_model=base_ref(base.info), answer_space=AnswerSpaceSpec(answer_format=answer_format or FMT),
        lora=LoraSpec(rank=RANK, alpha=2.0 * RANK, target_modules=ALL_MODULES, layers=layers),
        calibration=Calibration(temperature=1.3, validation_metrics={"ece": 0.05}))
    return write_bundle(root / name, manifest, tensors)


def sync(x: torch.Tensor | list[torch.Tensor]) -> None:
    first = x[0] if isinstance(x, list) else x
    if first.is_cuda:
        torch.cuda.synchronize()


def round_robin(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Time every function once per round (after one warm-up round); returns seconds per call."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rnd in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            sync(fn())
            if rnd:
                times[name].append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def forward_table(base: BaseModel, engine: UQEngine, question: Question, bundle_dir: Path,
                  repeats: int) -> dict[str, Any]:
    from peft import PeftModel

    entry = engine.registry.get("bench")
    enc = encode_question(base.tokenizer, question, FMT, 768)
    item = RowWork(enc, FMT, tuple(entry.predictor.row_slots()), entry.predictor.first_layer)
    full = MixedForward(base.model, base.tokenizer, engine.multilora, shared_trunk=False)

    plain = copy.deepcopy(base.model)  # no hooks: the honest base forward
    for hook_owner in plain.modules():
        hook_owner._forward_hooks.clear()
    plain_scorer = ChoiceScorer(plain, base.tokenizer, FMT)
    batch = plain_scorer.pack([question])
    five = torch.zeros(MEMBERS, dtype=torch.long, device=batch.input_ids.device)
    split = base.info.num_layers - TOP

    members = bundle_dir / "members"
    peft_model = PeftModel.from_pretrained(copy.deepcopy(plain), str(members / "m0"), adapter_name="m0")
    peft_model.eval()
    for i in range(1, MEMBERS):
        peft_model.load_adapter(str(members / f"m{i}"), adapter_name=f"m{i}")
    peft_scorer = ChoiceScorer(peft_model.base_model.model, base.tokenizer, FMT)
    names = [f"m{i}" for i in range(MEMBERS)]

    def peft_loop() -> torch.Tensor:
        rows = []
        for name in names:
            peft_model.set_adapter(name)
            rows.append(peft_scorer.scores(batch))
        return torch.cat(rows)

    def peft_mixed() -> torch.Tensor:
        with peft_model.base_model._enable_peft_forward_hooks(adapter_names=names):
            return peft_scorer.scores(batch, row_question=five)

    upper_rows = plain_scorer.run_layers(plain_scorer.trunk(batch, split)[five], batch, split,
                                         base.info.num_layers, five)
    fns: dict[str, Callable[[], Any]] = {
        "base_5row_full": lambda: plain_scorer.scores(batch, row_question=five),
        "base_5row_trunk8": lambda: plain_scorer.scores(batch, row_question=five, split=split),
        "ens_shared": lambda: engine.forward([item]),
        "ens_full": lambda: full([item]),
        "peft_loop": peft_loop,
        "peft_mixed": peft_mixed,
        "head_5row": lambda: plain_scorer.head(upper_rows, batch, five),
    }
    ours = engine.forward([item])[0]
    check = {"peft_loop_max_abs_diff": float((peft_loop().float().cpu() - ours).abs().max()),
             "peft_mixed_max_abs_diff": float((peft_mixed().float().cpu() - ours).abs().max()),
             "full_vs_shared_max_abs_diff": float((full([item])[0] - ours).abs().max())}
    times = round_robin(fns, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s": med, "samples_s": times, "equivalence": check}


def offline_throughput(engine: UQEngine, questions: list[Question], batch_rows: int, repeats: int) -> float:
    """Questions per second when the engine's forward is fed full batches directly (no HTTP, no asyncio)."""
    entry = engine.registry.get("bench")
    slots, first = tuple(entry.predictor.row_slots()), entry.predictor.first_layer
    items = [RowWork(encode_question(engine.base.tokenizer, q, FMT, 768), FMT,
                     slots, first) for q in questions]
    per_batch = max(1, batch_rows // len(slots))
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for lo in range(0, len(items), per_batch):
            entry.predictor.combine(torch.stack(engine.forward(items[lo : lo + per_batch])))  # [Q, M, K]
        rates.append(len(items) / (time.perf_counter() - start))
    return statistics.median(rates)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http_load(url: str, questions: list[Question], clients: int,
                    swap_at: float | None) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    queue = list(enumerate(questions))
    swap_seconds: list[float] = []  # client wall time of the admin request
    server_swap_seconds: list[float] = []  # the server's own measure (load, validate, fill, install)

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            _, q = queue.pop()
            body = {"bundle": "bench", "question": q.question, "choices": list(q.choices)}
            start = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/answer", json=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as err:
                errors.append(repr(err))
            latencies.append(time.perf_counter() - start)

    async def swapper(http: httpx.AsyncClient) -> None:
        assert swap_at is not None
        await asyncio.sleep(swap_at)
        start = time.perf_counter()
        r = await http.post(f"{url}/v1/bundles/bench", headers={"X-Admin-Key": ADMIN})
        swap_seconds.append(time.perf_counter() - start)
        if r.status_code != 200:
            errors.append(f"swap {r.status_code}: {r.text[:200]}")
        else:
            server_swap_seconds.append(r.json()["seconds"])

    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=900, limits=limits) as http:  # > server timeout: count server errors
        start = time.perf_counter()
        tasks = [client(http) for _ in range(clients)] + ([swapper(http)] if swap_at is not None else [])
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {"questions": len(questions), "wall_s": wall, "throughput_qps": len(questions) / wall,
            "p50_s": lat[len(lat) // 2], "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            "errors": len(errors), "error_samples": errors[:3], "swap_under_load_s": swap_seconds,
            "swap_under_load_server_s": server_swap_seconds}


async def idle_swaps(url: str, count: int) -> list[float]:
    import httpx

    out = []
    async with httpx.AsyncClient(timeout=60) as http:
        for _ in range(count):
            start = time.perf_counter()
            r = await http.post(f"{url}/v1/bundles/bench", headers={"X-Admin-Key": ADMIN})
            if r.status_code != 200:
                print(f"[bench] swap failed: {r.status_code} {r.text[:300]}", flush=True)
                continue
            out.append(time.perf_counter() - start)
    return out


def serve_and_measure(engine: UQEngine, settings: Settings, questions: list[Question], clients: int,
                      swaps: int) -> dict[str, Any]:
    import uvicorn

    from service.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, engine), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(http_load(url, questions[:clients], clients, None))  # warm-up
        load = asyncio.run(http_load(url, questions, clients, None))
        swapping = asyncio.run(http_load(url, questions, clients, swap_at=load["wall_s"] / 3))
        idle = asyncio.run(idle_swaps(url, swaps))
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    return {"load": load, "load_with_swap": swapping, "idle_swap_s": idle}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--questions", type=int, default=128, help="questions sent in the HTTP load test")
    parser.add_argument("--max-batch-rows", type=int, default=64)
    parser.add_argument("--answer-format", default="cloze", choices=[f.value for f in AnswerFormat],
                        help="cloze scores every choice token over the vocabulary; letter reads K logits")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    logging.getLogger("uqserve.engine").setLevel(logging.INFO)  # prints each (re)load with its duration
    global FMT
    FMT = AnswerFormat(args.answer_format)

    base = load_base_model(device=args.device)
    settings = Settings(_env_file=None, preload_bundles=["bench"], admin_key=ADMIN,  # type: ignore[call-arg]
                        bundle_root=Path(tempfile.mkdtemp(prefix="uqserve-bench-")), max_slots=2 * MEMBERS,
                        max_batch_rows=args.max_batch_rows, max_wait_ms=5.0, device=args.device,
                        torch_threads=args.threads, request_timeout_s=300)
    bundle_dir = make_bundle(settings.bundle_root, base, "bench", seed=1)
    engine = UQEngine(base, settings)
    asyncio.run(engine.load_bundle("bench"))
    arc = load_questions("arc_easy", "test")
    question = arc[0]
    pool = [q for q in arc if len(q.choices) == 4][: args.questions]
    print(f"[bench] device={args.device} torch_threads={torch.get_num_threads()} cpu_count={os.cpu_count()}",
          flush=True)

    fwd = forward_table(base, engine, question, bundle_dir, args.repeats)
    med = fwd["median_s"]
    print("[bench] forward medians (ms):", {k: round(1000 * v, 1) for k, v in med.items()}, flush=True)
    offline = offline_throughput(engine, pool, args.max_batch_rows, max(1, args.repeats // 3))
    print(f"[bench] offline throughput {offline:.3f} q/s", flush=True)
    http = serve_and_measure(engine, settings, pool, args.clients, swaps=5)

    ratios = {
        "ens_shared / base_5row_full": med["ens_shared"] / med["base_5row_full"],
        "ens_full / base_5row_full": med["ens_full"] / med["base_5row_full"],
        "ens_shared / base_5row_trunk8": med["ens_shared"] / med["base_5row_trunk8"],
        "peft_loop / ens_shared": med["peft_loop"] / med["ens_shared"],
        "peft_mixed / ens_shared": med["peft_mixed"] / med["ens_shared"],
        "ens_full / ens_shared": med["ens_full"] / med["ens_shared"],
        "http_qps / offline_qps": http["load"]["throughput_qps"] / offline,
        "peft_loop / ens_shared, excluding head": (med["peft_loop"] - med["head_5row"])
        / (med["ens_shared"] - med["head_5row"]),
        "ens_full / ens_shared, excluding head": (med["ens_full"] - med["head_5row"])
        / (med["ens_shared"] - med["head_5row"]),
    }
    lines = ["", f"SmolLM2-135M, {args.device}, {FMT.value} format, torch threads {torch.get_num_threads()}, "
             f"M={MEMBERS} r={RANK} top-{TOP} layers, medians of {args.repeats}", "",
             f"{'forward (1 question)':<24}{'median ms':>12}"]
    lines += [f"{name:<24}{1000 * s:>12.1f}" for name, s in med.items()]
    lines += ["", f"{'ratio':<32}{'value':>8}   target"]
    targets = {"ens_shared / base_5row_full": "<= 1.10", "peft_loop / ens_shared": ">= 2.5",
               "ens_full / ens_shared": ">= 2.0", "http_qps / offline_qps": ">= 0.85"}
    lines += [f"{name:<32}{value:>8.2f}   {targets.get(name, '')}" for name, value in ratios.items()]
    load = http["load"]
    lines += ["", f"offline engine throughput     {offline:8.2f} q/s (batches of {args.max_batch_rows} rows)",
              f"HTTP, {args.clients} clients             {load['throughput_qps']:8.2f} q/s  p50 "
              f"{1000 * load['p50_s']:.0f} ms  p95 {1000 * load['p95_s']:.0f} ms  errors {load['errors']}",
              f"HTTP with a hot-swap mid-load {http['load_with_swap']['throughput_qps']:8.2f} q/s  errors "
              f"{http['load_with_swap']['errors']}  swap: server {http['load_with_swap']['swap_under_load_server_s']} s"
              f", client wall {http['load_with_swap']['swap_under_load_s']} s",
              f"hot-swap idle (median of {len(http['idle_swap_s'])})  "
              f"{statistics.median(http['idle_swap_s'] or [float('nan')]):.3f} s   target <= 0.5 s",
              f"equivalence max |Δscore|: {fwd['equivalence']}"]
    print("\n".join(lines), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_serving-{args.device}-{FMT.value}.json"
    path.write_text(json.dumps({"device": args.device, "torch_threads": torch.get_num_threads(),
                                "platform": platform.platform(), "cpu_count": os.cpu_count(),
                                "forward": fwd, "ratios": ratios, "offline_qps": offline, "http": http,
                                "table": lines}, indent=2))
    print(f"[bench] wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
