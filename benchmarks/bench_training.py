"""Training-step cost of the ways to train a 5-member LoRA ensemble on SmolLM2, measured side by side.

Each variant runs the same real ARC-E mini-batches (batch 8 per member, r = 16, all 7 projections) and
reports the median seconds per optimizer step over ``--repeats`` steps after one warm-up step:

- full-depth, members one after another (the seeds' setting: 5 × a full forward/backward per step)
- full-depth, all members in one forward (stacked LoRA slots)
- shared trunk (LoRA on the top k layers; the frozen trunk's hidden states cached), one forward
- the same with several questions packed per row, in fp32 and in bf16 (the default)

Usage: ``python benchmarks/bench_training.py [--repeats 5] [--top-layers 8]``; prints a table of
seconds per step and ratios against the full-depth sequential baseline, and saves JSON under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from core.answers import AnswerFormat
from core.basemodel import load_base_model
from core.datasets import load_questions
from core.multilora import ALL_MODULES, LoraLayout, MultiLora
from core.scoring import ChoiceScorer
from training.trunk import TrunkCache

MEMBERS, BATCH = 5, 8


def _multilora(model: torch.nn.Module, layers: tuple[int, ...]) -> tuple[MultiLora, torch.optim.Optimizer]:
    multilora = MultiLora(model, LoraLayout(ALL_MODULES, layers, 16, 32.0), MEMBERS)
    for m in range(MEMBERS):
        multilora.init_for_training(m, torch.Generator().manual_seed(m))
    params = [p for f in multilora.factor_map.values() for p in (f.lora_A, f.lora_B)]
    for p in params:
        p.requires_grad_(True)
    return multilora, torch.optim.AdamW(params, lr=1e-4)


def _time(step: Callable[[int], None], repeats: int) -> float:
    step(0)  # warm-up
    times = []
    for i in range(1, repeats + 1):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _batches(i: int) -> list[list[int]]:
    lo = i * MEMBERS * BATCH
    return [list(range(lo + m * BATCH, lo + (m + 1) * BATCH)) for m in range(MEMBERS)]


def _step(scorer: ChoiceScorer, multilora: MultiLora, optimizer: torch.optim.Optimizer, cache: TrunkCache,
          row_tokens: int | None, sequential: bool, i: int) -> None:
    """One optimizer step of all members on mini-batch i (``row_tokens`` None = one question per row)."""
    groups = _batches(i)
    chunks = [[g] for g in groups] if sequential else [groups]
    optimizer.zero_grad()
    for offset, chunk in enumerate(chunks):
        if row_tokens is None:
            flat = [q for g in chunk for q in g]
            hidden, packed, order, _ = cache.packed_batch([[q] for q in flat], capacity=1)
            row_slots = torch.tensor([offset if sequential else j // BATCH for j in range(len(flat))])
        else:
            hidden, packed, order, row_group = cache.packed_batch(chunk, row_tokens)
            row_slots = row_group + offset if sequential else row_group
        with multilora.rows(row_slots):
            hidden = scorer.run_layers(hidden, packed, cache.split, scorer.num_layers)
        loss = torch.nn.functional.cross_entropy(scorer.head(hidden, packed), cache.labels(order))
        loss.backward()
    optimizer.step()


def _measure(scorer: ChoiceScorer, layers: tuple[int, ...], cache: TrunkCache, row_tokens: int | None,
             sequential: bool, repeats: int) -> float:
    multilora, optimizer = _multilora(scorer.model, layers)
    try:
        return _time(partial(_step, scorer, multilora, optimizer, cache, row_tokens, sequential), repeats)
    finally:
        multilora.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top-layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = load_questions("arc_easy", "train", limit=MEMBERS * BATCH * (args.repeats + 1))
    results: dict[str, float] = {}
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        base = load_base_model(dtype=dtype)
        scorer = ChoiceScorer(base.model, base.tokenizer, AnswerFormat.CLOZE)
        n = scorer.num_layers
        top = tuple(range(n - args.top_layers, n))
        if dtype == torch.float32:
            full = TrunkCache(scorer, questions, 0, desc="embed")
            every = tuple(range(n))
            results["full-depth, members one after another, fp32"] = _measure(scorer, every, full, None, True,
                                                                              args.repeats)
            results["full-depth, members in one forward, fp32"] = _measure(scorer, every, full, None, False,
                                                                           args.repeats)
        cache = TrunkCache(scorer, questions, n - args.top_layers, desc="trunk")
        if dtype == torch.float32:
            results["shared trunk, one forward, fp32"] = _measure(scorer, top, cache, None, False, args.repeats)
        results[f"shared trunk, packed rows, {label}"] = _measure(scorer, top, cache, 256, False, args.repeats)
    baseline = results["full-depth, members one after another, fp32"]
    print(f"\n5-member ensemble, batch {BATCH}/member, r=16, top {args.top_layers} layers, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} steps")
    print(f"{'variant':48s} {'s/step':>8s} {'speed-up':>9s}")
    for name, seconds in results.items():
        print(f"{name:48s} {seconds:8.2f} {baseline / seconds:8.1f}x")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "bench_training.json").write_text(json.dumps({"seconds_per_step": results, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
