"""``uqserve report`` on the tiny model: the page's numbers are core.metrics on the served predictions, seed
groups get ±, plots are local files, the score cache skips the model, ``--limit`` cuts every dataset."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch

import training.report
from core.answers import Question
from core.bundle import read_bundle
from core.metrics import accuracy, accuracy_at_coverage, aurc, auroc, brier, ece, nll
from tests.service.conftest import make_bundle
from training.evaluate import bundle_member_scores, bundle_prediction
from training.report import COLUMNS
from uqserve.cli import main

IN_DIST = [
    ("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium"], 1),
    ("What is the boiling point of water?", ["100 degrees", "0 degrees"], 0),
    ("Is the moon a planet", ["yes", "no"], 1),
    ("Pick the letter", ["choice A", "choice B", "choice C", "choice D", "choice E"], 3),
    ("Which is a gas at room temperature?", ["iron", "oxygen", "salt", "wood"], 1),
    ("Water freezes at", ["0 degrees", "100 degrees", "50 degrees"], 0),
    ("Plants need light to", ["grow", "sleep"], 0),
    ("Which answer is true", ["true", "false"], 0),
]
SHIFT = [
    ("Passage: the earth is round. Question: is the earth flat", ["no", "yes"], 0),
    ("What do plants give off?", ["oxygen", "helium", "carbon dioxide"], 0),
    ("Pick B", ["A", "B", "C"], 1),
    ("Is ice cold", ["yes", "no"], 0),
    ("Which one is a letter", ["choice 1", "choice B"], 1),
]


def _write(path: Path, rows: list[tuple[str, list[str], int]]) -> list[Question]:
    path.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in rows))
    return [Question(q, tuple(c), answer=a) for q, c, a in rows]


class _Page(HTMLParser):
    """Tables of class metrics as rows of cell texts, every img src and a href."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self._cell: list[str] | None = None
        self._in_metrics = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._in_metrics = a.get("class") == "metrics"
            if self._in_metrics:
                self.tables.append([])
        elif tag == "tr" and self._in_metrics:
            self.tables[-1].append([])
        elif tag in ("td", "th") and self._in_metrics:
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append("\n")
        elif tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "a":
            self.links.append(a.get("href") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._in_metrics = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _reference(base: Any, bundle_dir: Path, questions: list[Question]) -> dict[str, float]:
    """The table's metrics computed directly from core.metrics on bundle_prediction (nan = undefined)."""
    pred = bundle_prediction(base, read_bundle(bundle_dir, expect_base=base.info), questions)
    u, labels = pred.scores, torch.tensor([q.answer for q in questions])
    correct = u.probabilities.argmax(-1) == labels
    mi = auroc(u.mutual_information, ~correct) if pred.has_mi else math.nan
    return {"acc": accuracy(u.probabilities, labels), "nll": nll(u.probabilities, labels),
            "ece": ece(u.probabilities, labels), "brier": brier(u.probabilities, labels),
            "auroc_one_minus_max_prob": auroc(1 - u.max_probability, ~correct),
            "auroc_entropy": auroc(u.predictive_entropy, ~correct), "auroc_mi": mi,
            "auroc_one_minus_feu": math.nan, "aurc": aurc(u.predictive_entropy, correct),
            "acc_at_80_coverage": accuracy_at_coverage(u.predictive_entropy, correct, 0.8)}


@pytest.fixture
def setup(tiny_base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    root = tmp_path / "bundles"
    paths = {"ens-s0": make_bundle(root, tiny_base, "ens-s0", members=3, seed=0, scale=0.3),
             "ens-s1": make_bundle(root, tiny_base, "ens-s1", members=3, seed=1, scale=0.3),
             "map": make_bundle(root, tiny_base, "map", members=1, seed=2, scale=0.3, temperature=1.5)}
    data = {"in": _write(tmp_path / "indist.jsonl", IN_DIST), "shift": _write(tmp_path / "shifted.jsonl", SHIFT)}
    monkeypatch.setattr("training.report_cli.load_base_model", lambda name: tiny_base)
    calls: list[int] = []
    real = training.report.bundle_prediction

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(training.report, "bundle_prediction", counting)
    out = tmp_path / "report"
    argv = ["report", *(str(p) for p in paths.values()), "--dataset", str(tmp_path / "indist.jsonl"),
            "--shift", str(tmp_path / "shifted.jsonl"), "--group", "ens=ens-s0,ens-s1", "--out", str(out),
            "--timing-questions", "3"]
    return {"paths": paths, "data": data, "calls": calls, "out": out, "argv": argv}


def _value(text: str) -> tuple[float, float | None]:
    mean, _, std = text.partition("±")
    return float(mean), float(std) if std.strip() else None


def test_report_page_numbers_cache_and_limit(tiny_base, setup: dict[str, Any]) -> None:
    out, calls = setup["out"], setup["calls"]
    assert main(setup["argv"]) == 0
    assert len(calls) == 6 + 3 * 2  # 3 bundles × 2 datasets, then timing (warm-up + batch) per bundle
    html_text = (out / "index.html").read_text()
    assert "http://" not in html_text and "https://" not in html_text
    page = _Page(html_text)
    assert page.images and all((out / src).is_file() and (out / src).stat().st_size > 1000 for src in page.images)
    assert all(not src.startswith(("/", "file:")) for src in page.images)
    assert all(link.startswith("#") for link in page.links)
    assert any(src.startswith("mi-ens-") for src in page.images) and not any("mi-map" in s for s in page.images)

    assert len(page.tables) == 2  # in-distribution and shift
    for table, key in zip(page.tables, ("in", "shift"), strict=True):
        header, *rows = table
        assert header[1:] == [f"{label} {'↑' if hi else '↓'}" for _, label, hi in COLUMNS]
        assert [r[0].split()[0] for r in rows] == ["ens", "map"]  # the group, then the ungrouped bundle
        assert "2 seeds: ens-s0, ens-s1" in rows[0][0]
        refs = {n: _reference(tiny_base, setup["paths"][n], setup["data"][key]) for n in ("ens-s0", "ens-s1", "map")}
        for row, members in zip(rows, (["ens-s0", "ens-s1"], ["map"]), strict=True):
            for text, (metric, _, _) in zip(row[1:], COLUMNS, strict=True):
                ref = [refs[m][metric] for m in members]
                if not all(math.isfinite(r) for r in ref):
                    assert text.startswith("—"), (metric, text)
                    continue
                mean, std = _value(text)
                assert math.isfinite(mean) and abs(mean - statistics.fmean(ref)) <= 6e-4, (key, metric, text, ref)
                if len(members) > 1:
                    assert std is not None and abs(std - statistics.stdev(ref)) <= 6e-4, (metric, text, ref)
                else:
                    assert std is None
        assert rows[1][1 + [c for c, _, _ in COLUMNS].index("auroc_mi")].startswith("—")  # MAP: MI undefined
    assert "single-member bundle" in html_text and "FEU is defined only" in html_text
    assert "ms / question" in html_text and "torch threads" in html_text
    assert "ens-s0" in html_text and "calibration_hash" in html_text and "--group ens=ens-s0,ens-s1" in html_text

    calls.clear()  # same inputs: everything from the cache (scores and the memoized timing), no model run
    assert main(setup["argv"]) == 0
    assert calls == []
    assert (out / "index.html").read_text().count("<tr>") == html_text.count("<tr>")

    assert main([*setup["argv"], "--limit", "3", "--no-timing"]) == 0  # a new question set: recomputed
    assert calls == [3] * 6
    limited = (out / "index.html").read_text()
    assert limited.count("N = 3") == 2 and "--no-timing" in limited


def test_uncalibrated_row_and_json(tiny_base, setup: dict[str, Any]) -> None:
    """``--uncalibrated map`` adds ``map@T1``: the same member scores through a softmax at temperature 1 (a
    naive reference from the member logits), cached apart from the calibrated bundle; report.json holds the
    rows the page shows."""
    out = setup["out"]
    assert main([*setup["argv"], "--uncalibrated", "map", "--no-timing"]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert [d["shift"] for d in doc["datasets"]] == [False, True]
    assert [c["key"] for c in doc["columns"]] == [k for k, _, _ in COLUMNS]
    for d, key in zip(doc["datasets"], ("in", "shift"), strict=True):
        rows = {r["name"]: r for r in d["rows"]}
        assert list(rows) == ["ens", "map", "map@T1"] and rows["ens"]["bundles"] == ["ens-s0", "ens-s1"]
        questions = setup["data"][key]
        bundle = read_bundle(setup["paths"]["map"], expect_base=tiny_base.info)
        logits = bundle_member_scores(tiny_base, bundle, questions)[:, 0].double()  # [N, K], one member
        labels = torch.tensor([q.answer for q in questions])
        raw_nll = float(-torch.log_softmax(logits, -1)[torch.arange(len(labels)), labels].mean())
        scaled_nll = float(-torch.log_softmax(logits / 1.5, -1)[torch.arange(len(labels)), labels].mean())
        assert abs(rows["map@T1"]["mean"]["nll"] - raw_nll) < 1e-4
        assert abs(rows["map"]["mean"]["nll"] - scaled_nll) < 1e-4 and abs(raw_nll - scaled_nll) > 1e-3
        assert rows["map@T1"]["std"]["nll"] is None and "auroc_mi" in rows["map@T1"]["undefined"]
        assert rows["ens"]["std"]["acc"] is not None
    page = (out / "index.html").read_text()
    assert "map@T1" in page and "@T1</code> is that bundle" in page
    with pytest.raises(SystemExit, match="matches 0"):
        main([*setup["argv"], "--uncalibrated", "nope", "--no-timing"])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not on PATH (no headless screenshot)")
def test_report_renders_in_headless_chromium(setup: dict[str, Any], tmp_path: Path) -> None:
    assert main([*setup["argv"], "--no-timing"]) == 0
    shot = tmp_path / "shot.png"
    page = (setup["out"] / "index.html").resolve()
    subprocess.run(["chromium", "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
                    "--window-size=1280,2000", f"file://{page}"], check=False, timeout=120, capture_output=True)
    assert shot.is_file() and shot.stat().st_size > 20_000
    from matplotlib.image import imread

    img = imread(shot)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    assert float(img[..., :3].std()) > 0.05  # not a blank page
