"""Reading a user's 100 000-question file: validate and token-count it within 60 s, in bounded memory.

Writes 100 000 realistic 4-choice questions (question 6..60 words, 30 % with a 20..200-word passage, 0.3 % with
a passage too long for the model's 768 tokens, choices 1..12 words) as CSV (MMLU layout: columns A..D, a
letter answer), Parquet (a list column, an index answer) and JSONL (a list, the answer's text) in a temp
dir. For each format, in a fresh child process (so ``ru_maxrss`` is that format's own peak):

* ``read_question_file`` without a token counter: seconds to read + validate;
* ``read_question_file`` with ``token_count`` = a batched SmolLM2 tokenizer call (prefix + every cloze
  continuation, as :func:`core.answers.encode_question` tokenizes them, one call per batch of questions)
  and ``max_tokens=768``: total seconds and the seconds spent encoding;

and, on a 5 000-question sample, one :func:`core.answers.encode_question` call per question (the
per-question cost the training data path pays). Prints a table against the 60 s target and saves
benchmarks/results/bench_datafiles.json.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_datafiles.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_S = 60.0
MAX_TOKENS = 768
SAMPLE = 5000
FORMATS = ("csv", "parquet", "jsonl")
_TEXT = ("the a of to in is that for it as was with be by on not he this are or his from at which but have an "
          "they you were their one all we can her has there been if more when will would who so no cell energy "
          "water light force mass plant animal cell planet earth sun moon rock soil heat temperature pressure "
          "volume gas liquid solid atom molecule reaction acid base salt metal electron proton neutron gravity "
          "motion speed velocity wave sound magnet circuit current voltage battery climate weather rain cloud "
          "ocean river mountain volcano fossil species evolution gene protein enzyme organ tissue blood heart "
          "lung brain muscle bone digestion nutrient photosynthesis respiration ecosystem population habitat "
          "predator prey food chain producer consumer decomposer experiment hypothesis variable observation "
          "measurement data graph result conclusion scientist student teacher class model theory law")
_WORDS = tuple(_TEXT.split())


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(_WORDS, k=rng.randint(lo, hi)))


def make_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = rng.random()
        context = _words(rng, 700, 900) if r < 0.003 else _words(rng, 20, 200) if r < 0.3 else ""
        choices: list[str] = []
        while len(choices) < 4:
            c = _words(rng, 1, 12)
            if c not in choices:
                choices.append(c)
        out.append({"id": f"q{i}", "question": _words(rng, 6, 60).capitalize() + "?", "choices": choices,
                    "answer": rng.randrange(4), "context": context})
    return out


def write_files(folder: Path, n: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = make_records(n)
    paths = {fmt: folder / f"questions.{fmt}" for fmt in FORMATS}
    with paths["csv"].open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "question", "A", "B", "C", "D", "answer", "context"])
        for r in records:
            w.writerow([r["id"], r["question"], *r["choices"], "ABCD"[r["answer"]], r["context"]])
    pq.write_table(pa.Table.from_pylist(records), paths["parquet"])
    with paths["jsonl"].open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({**r, "answer": r["choices"][r["answer"]]}) + "\n")
    return paths


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    from core.basemodel import resolve_model_dir

    return AutoTokenizer.from_pretrained(str(resolve_model_dir("smollm2-135m")))


def batched_counter(tokenizer: Any, timer: list[float]) -> Any:
    """``token_count`` for read_question_file: cloze prefix + continuations, one tokenizer call per batch."""
    from core.answers import AnswerFormat, choice_continuations, prompt_prefix

    def count(questions: list[Any]) -> list[int]:
        start = time.perf_counter()
        texts, owners = [], []
        for i, q in enumerate(questions):
            parts = [prompt_prefix(q, AnswerFormat.CLOZE), *choice_continuations(q, AnswerFormat.CLOZE)]
            texts += parts
            owners += [i] * len(parts)
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        counts = [0] * len(questions)
        for i, t in zip(owners, ids, strict=True):
            counts[i] += len(t)
        timer[0] += time.perf_counter() - start
        return counts

    return count


def child_read(fmt: str, path: Path) -> dict[str, Any]:
    from training.datafiles import Columns, read_question_file

    columns = Columns(choice_columns=("A", "B", "C", "D")) if fmt == "csv" else Columns()
    tokenizer = _tokenizer()
    baseline = _rss_mib()
    start = time.perf_counter()
    plain = read_question_file(path, columns, skip_invalid=True)
    read_s = time.perf_counter() - start
    plain_dropped = plain.dropped
    del plain  # the second read must not count the first one's questions
    timer = [0.0]
    start = time.perf_counter()
    counted = read_question_file(path, columns, skip_invalid=True, token_count=batched_counter(tokenizer, timer),
                                 max_tokens=MAX_TOKENS)
    total_s = time.perf_counter() - start
    return {"format": fmt, "rows": counted.rows, "questions": len(counted.questions), "dropped": counted.dropped,
            "dropped_without_tokens": plain_dropped, "file_mib": path.stat().st_size / 2**20,
            "read_validate_s": read_s, "read_validate_encode_s": total_s, "encode_s": timer[0],
            "rss_baseline_mib": baseline, "rss_peak_mib": _rss_mib()}


def child_sample(path: Path) -> dict[str, Any]:
    from core.answers import AnswerFormat, encode_question
    from training.datafiles import read_question_file

    tokenizer = _tokenizer()
    questions = read_question_file(path, skip_invalid=True).questions[:SAMPLE]
    start = time.perf_counter()
    for q in questions:
        encode_question(tokenizer, q, AnswerFormat.CLOZE, MAX_TOKENS)
    per_q = (time.perf_counter() - start) / len(questions)
    timer = [0.0]
    batched_counter(tokenizer, timer)(questions)
    return {"questions": len(questions), "encode_question_ms": per_q * 1e3,
            "batched_count_ms": timer[0] / len(questions) * 1e3}


def _run_child(*args: str) -> dict[str, Any]:
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False,
                          cwd=root, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, path = args.child[0], Path(args.child[1])
        print(json.dumps(child_sample(path) if kind == "sample" else child_read(kind, path)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-datafiles-") as tmp:
        start = time.perf_counter()
        paths = write_files(Path(tmp), args.rows)
        print(f"wrote {args.rows} questions x {len(paths)} formats in {time.perf_counter() - start:.1f} s")
        results = [_run_child(fmt, str(path)) for fmt, path in paths.items()]
        sample = _run_child("sample", str(paths["parquet"]))
    print(f"\n{'format':8} {'rows':>7} {'MiB':>6} {'read+validate s':>16} {'encode s':>9} {'total s':>8} "
          f"{'peak RSS MiB':>13} {'(baseline)':>10}  target {TARGET_S:.0f} s")
    for r in results:
        ok = "ok" if r["read_validate_encode_s"] <= TARGET_S else "OVER"
        print(f"{r['format']:8} {r['rows']:>7} {r['file_mib']:>6.1f} {r['read_validate_s']:>16.1f} "
              f"{r['encode_s']:>9.1f} {r['read_validate_encode_s']:>8.1f} {r['rss_peak_mib']:>13.0f} "
              f"{r['rss_baseline_mib']:>10.0f}  {ok}   dropped {r['dropped']}")
    extrapolated = sample["encode_question_ms"] * args.rows / 1e3
    print(f"\nencode_question, one call per question ({sample['questions']} sample): "
          f"{sample['encode_question_ms']:.3f} ms/question (~{extrapolated:.0f} s per {args.rows}); "
          f"batched count: {sample['batched_count_ms']:.3f} ms/question")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    payload = {"rows": args.rows, "target_s": TARGET_S, "max_tokens": MAX_TOKENS, "formats": results,
               "encode_question_sample": sample, "machine": {"platform": platform.platform(),
                                                              "python": platform.python_version()}}
    (out / "bench_datafiles.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"saved {out / 'bench_datafiles.json'}")


if __name__ == "__main__":
    main()
