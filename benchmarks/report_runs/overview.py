"""The overview of the committed report pages: ``python benchmarks/report_runs/overview.py RESULTS_DIR``.

Reads every ``RESULTS_DIR/<page>/report.json`` written by ``uqserve report`` for the grid of
``small_grid.sh`` (pages ``<dataset>`` and ``<dataset>-overtrained``; rows named
``<dataset>[-ot]-<method>[-s<seed>][@T1]`` or seed groups ``<dataset>[-ot]-<method>[@T1]``) and writes
``RESULTS_DIR/index.html`` (tables and one figure, linking each page), ``overview.md`` (the same tables in
Markdown, for the README and closing notes) and ``overview.json``. Every number is copied from a page's JSON;
nothing is recomputed here.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
from pathlib import Path
from typing import Any

METHODS = {  # row suffix → label, in table order
    "map@T1": "MAP (T = 1)",
    "map": "MAP + temperature",
    "ckpt": "checkpoint ensemble (K = 5)",
    "mcdropout": "MC dropout (S = 5)",
    "laplace": "Laplace (KFAC)",
    "ens5": "ensemble (M = 5)",
    "uq4ct": "UQ4CT",
}
DATASETS = {"arc_easy": "ARC-E", "arc_challenge": "ARC-C", "openbookqa": "OBQA", "boolq": "BoolQ",
            "mmlu_cs": "MMLU CS", "mmlu_eng": "MMLU Eng", "mmlu_law": "MMLU Law", "mmlu_health": "MMLU Health"}
REGIMES = {"": "default recipe (shortened: 400 questions, 1 epoch)",
           "-overtrained": "over-trained (400 questions, 3 epochs)"}
IN_DIST = (("acc", "ACC", True), ("nll", "NLL", False), ("ece", "ECE", False), ("auroc_entropy", "AUROC H", True),
           ("auroc_mi", "AUROC MI", True), ("aurc", "AURC", False))
SHIFT = (("acc", "ACC", True), ("ece", "ECE", False), ("auroc_entropy", "AUROC H", True),
         ("auroc_mi", "AUROC MI", True))
_ROW = re.compile(r"^(?P<data>[a-z_]+?)(?:-ot)?-(?P<method>map|ckpt|mcdropout|laplace|ens5|uq4ct)(?:-s\d+)?"
                  r"(?P<t1>@T1)?$")


def method_of(row_name: str) -> str | None:
    """The METHODS key of a row name, or None for a row outside the grid's naming."""
    match = _ROW.match(row_name)
    if match is None:
        return None
    return match["method"] + (match["t1"] or "")


def cell(row: dict[str, Any], key: str) -> str:
    """``mean`` or ``mean ± std`` (3 decimals), "—" when undefined."""
    if key not in row["mean"]:
        return "—"
    mean, std = row["mean"][key], row["std"].get(key)
    return f"{mean:.3f}" + ("" if std is None or not math.isfinite(std) else f" ± {std:.3f}")


def load_pages(results: Path) -> list[dict[str, Any]]:
    """Every page's report.json with its folder, regime suffix and training dataset, in a stable order."""
    pages = []
    for path in sorted(results.glob("*/report.json")):
        doc = json.loads(path.read_text())
        folder = path.parent.name
        suffix = next((s for s in REGIMES if s and folder.endswith(s)), "")
        pages.append({"folder": folder, "regime": suffix, "train": folder.removesuffix(suffix) if suffix else folder,
                      **doc})
    order = list(DATASETS)
    pages.sort(key=lambda p: (list(REGIMES).index(p["regime"]),
                              order.index(p["train"]) if p["train"] in order else len(order), p["folder"]))
    return pages


def method_rows(dataset: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(method label, row) in METHODS order; a bundle that is also in a seed group is shown by the group."""
    by_method: dict[str, dict[str, Any]] = {}
    for row in dataset["rows"]:
        method = method_of(row["name"])
        if method is None:
            continue
        if method not in by_method or len(row["bundles"]) > len(by_method[method]["bundles"]):
            by_method[method] = row
    return [(METHODS[m], by_method[m]) for m in METHODS if m in by_method]


def cost_of(page: dict[str, Any], row: dict[str, Any]) -> str:
    costs = [page["serving_cost"][b]["ms_per_question"] for b in row["bundles"] if b in page["serving_cost"]]
    return "—" if not costs else f"{min(costs):.0f}" + ("" if len(costs) == 1 else f"–{max(costs):.0f}")


def tables(pages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table specs: title, header, rows of cells (in distribution per regime, then shift per regime)."""
    specs = []
    for regime, label in REGIMES.items():
        chosen = [p for p in pages if p["regime"] == regime]
        if not chosen:
            continue
        rows = []
        for page in chosen:
            d = next(d for d in page["datasets"] if not d["shift"])
            for method, row in method_rows(d):
                rows.append([f'{DATASETS.get(page["train"], page["train"])}', method, str(len(row["bundles"])),
                             *(cell(row, k) for k, _, _ in IN_DIST), cost_of(page, row), page["folder"]])
        specs.append({"title": f"In distribution, {label}", "rows": rows,
                      "header": ["data", "method", "seeds", *(h for _, h, _ in IN_DIST), "ms / q", "page"]})
        rows = []
        for page in chosen:
            for d in (d for d in page["datasets"] if d["shift"]):
                for method, row in method_rows(d):
                    rows.append([f'{DATASETS.get(page["train"], page["train"])} → {DATASETS.get(d["name"], d["name"])}',
                                 method, str(len(row["bundles"])), *(cell(row, k) for k, _, _ in SHIFT),
                                 page["folder"]])
        if rows:
            specs.append({"title": f"Under shift, {label}", "rows": rows,
                          "header": ["train → test", "method", "seeds", *(h for _, h, _ in SHIFT), "page"]})
    return specs


def markdown(specs: list[dict[str, Any]]) -> str:
    out = []
    for spec in specs:
        out += [f"### {spec['title']}", "", "| " + " | ".join(spec["header"]) + " |",
                "|" + "---|" * len(spec["header"])]
        out += ["| " + " | ".join(r) + " |" for r in spec["rows"]]
        out.append("")
    return "\n".join(out)


def figure(pages: list[dict[str, Any]], path: Path) -> bool:
    """ECE and AURC in distribution, one panel row per metric, grouped bars per page; False if no page."""
    from training.plots import _new_figure, _save

    panels = [(p["folder"], method_rows(next(d for d in p["datasets"] if not d["shift"]))) for p in pages]
    if not panels:
        return False
    fig = _new_figure(figsize=(max(8, 1.6 * len(panels)), 6.5), constrained_layout=True)
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(METHODS)
    for ax, (key, label) in zip(axes, (("ece", "ECE ↓"), ("aurc", "AURC ↓")), strict=True):
        for i, method in enumerate(METHODS.values()):
            xs, ys, errs = [], [], []
            for j, (_, rows) in enumerate(panels):
                row = dict(rows).get(method)
                if row is not None and key in row["mean"]:
                    xs.append(j + (i - len(METHODS) / 2 + 0.5) * width)
                    ys.append(row["mean"][key])
                    errs.append(row["std"].get(key) or 0.0)
            ax.bar(xs, ys, width, yerr=errs if any(errs) else None, label=method, capsize=2)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(panels)), [f for f, _ in panels], rotation=20)
    axes[0].legend(fontsize=7, ncol=4)
    axes[0].set_title("in distribution, per page (error bars: std over seeds where there are several)")
    _save(fig, path)
    return True


def write(results: Path) -> Path:
    pages = load_pages(results)
    specs = tables(pages)
    (results / "overview.md").write_text(markdown(specs), encoding="utf-8")
    (results / "overview.json").write_text(json.dumps(specs, indent=1) + "\n", encoding="utf-8")
    e = html.escape
    body = []
    for spec in specs:
        head = "".join(f"<th>{e(h)}</th>" for h in spec["header"])
        rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r[:-1])
                       + f'<td><a href="{e(r[-1])}/index.html">{e(r[-1])}</a></td></tr>' for r in spec["rows"])
        body.append(f"<h2>{e(spec['title'])}</h2><table><tr>{head}</tr>{rows}</table>")
    has_fig = figure(pages, results / "overview.png")
    page = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>uqserve: the seeds\' grid</title>'
            "<style>body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1240px;padding:0 16px}"
            "table{border-collapse:collapse;font-size:.85em}th,td{border:1px solid #d9dee8;padding:3px 6px;"
            "text-align:right}td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}th{background:#f1f4f9}"
            "img{max-width:100%}</style></head><body><h1>The seeds' grid on this CPU</h1>"
            "<p>SmolLM2-135M, the first 200 test questions of each dataset; every number is copied from the "
            "page it links (its <code>report.json</code>). AUROC H / MI: predictive entropy / mutual information "
            "ranking errors; AURC abstains on entropy. ± is the std over seeds; ms / q is the offline served "
            "prediction on this machine (a range over seeds). Rebuild: <code>bash benchmarks/report_runs/"
            "small_grid.sh</code> (see its header).</p>"
            + ('<img src="overview.png" alt="ECE and AURC per page and method">' if has_fig else "")
            + "".join(body) + "</body></html>")
    path = results / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="?", default=Path("benchmarks/results/report"))
    print(write(parser.parse_args().results))


if __name__ == "__main__":
    main()
