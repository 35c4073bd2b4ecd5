"""benchmarks/report_runs/overview.py: the grid's overview copies each page's report.json numbers into tables
(a seed group shown instead of its seeds, regimes apart, shift rows per shift set) and links every page."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "report_runs" / "overview.py"


@pytest.fixture(scope="module")
def overview() -> Any:
    spec = importlib.util.spec_from_file_location("grid_overview", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(name: str, bundles: list[str], acc: float, acc_std: float | None = None) -> dict[str, Any]:
    return {"name": name, "bundles": bundles, "mean": {"acc": acc, "nll": 1.0, "ece": 0.1, "auroc_entropy": 0.6,
                                                       "aurc": 0.3},
            "std": {"acc": acc_std, "nll": None, "ece": None, "auroc_entropy": None, "aurc": None},
            "undefined": {"auroc_mi": "single-member bundle"}}


def _page(root: Path, folder: str, datasets: list[dict[str, Any]], costs: dict[str, float]) -> None:
    (root / folder).mkdir(parents=True)
    doc = {"columns": [], "datasets": datasets, "lineage": {},
           "serving_cost": {b: {"ms_per_question": ms} for b, ms in costs.items()}}
    (root / folder / "report.json").write_text(json.dumps(doc))


def test_overview_tables(overview: Any, tmp_path: Path) -> None:
    seeds = ["arc_easy-ens5", "arc_easy-ens5-s1"]
    _page(tmp_path, "arc_easy", [
        {"name": "arc_easy", "shift": False, "rows": [
            _row("arc_easy-ens5", seeds, 0.6, 0.02), _row("arc_easy-map", ["arc_easy-map"], 0.55),
            _row("arc_easy-map@T1", ["arc_easy-map@T1"], 0.55), _row("someone-else", ["x"], 0.9)]},
        {"name": "arc_challenge", "shift": True, "rows": [_row("arc_easy-ens5", seeds, 0.3, 0.01)]}],
        {"arc_easy-ens5": 150.0, "arc_easy-ens5-s1": 170.0, "arc_easy-map": 80.0})
    _page(tmp_path, "openbookqa-overtrained", [
        {"name": "openbookqa", "shift": False, "rows": [_row("openbookqa-ot-uq4ct", ["openbookqa-ot-uq4ct"], 0.31)]}],
        {})
    assert overview.method_of("arc_easy-ot-map-s2@T1") == "map@T1" and overview.method_of("x-map2") is None
    index = overview.write(tmp_path)
    specs = json.loads((tmp_path / "overview.json").read_text())
    assert [s["title"].split(",")[0] for s in specs] == ["In distribution", "Under shift", "In distribution"]
    default_rows = specs[0]["rows"]
    assert [r[1] for r in default_rows] == ["MAP (T = 1)", "MAP + temperature", "ensemble (M = 5)"]
    ens = default_rows[2]
    assert ens[:4] == ["ARC-E", "ensemble (M = 5)", "2", "0.600 ± 0.020"] and ens[-2:] == ["150–170", "arc_easy"]
    assert default_rows[1][-2] == "80" and default_rows[0][-2] == "—"  # the @T1 variant was not timed
    assert default_rows[1][3 + [k for k, _, _ in overview.IN_DIST].index("auroc_mi")] == "—"
    assert specs[1]["rows"] == [["ARC-E → ARC-C", "ensemble (M = 5)", "2", "0.300 ± 0.010", "0.100", "0.600", "—",
                                 "arc_easy"]]
    assert "over-trained" in specs[2]["title"] and specs[2]["rows"][0][:4] == ["OBQA", "UQ4CT", "1", "0.310"]
    text = index.read_text()
    assert 'href="arc_easy/index.html"' in text and 'href="openbookqa-overtrained/index.html"' in text
    assert (tmp_path / "overview.png").stat().st_size > 5000
    assert "| ARC-E | ensemble (M = 5) | 2 | 0.600 ± 0.020 |" in (tmp_path / "overview.md").read_text()
