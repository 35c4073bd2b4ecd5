"""The ``uqserve report`` page: overlaid plots (PNG beside the page) and one self-contained HTML file.

The HTML has inline CSS, no scripts and no external URLs; images are referenced by relative file names.
An undefined metric is shown as "—" with a numbered note giving the reason (as ``core.metrics`` reports it).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.metrics import ece, reliability_bins, risk_coverage
from training.plots import _new_figure, _save, accuracy_coverage_curve, mi_entropy_histogram
from training.report import COLUMNS, CachedScores, ReportDataset, Row

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1240px;
 color:#1d2330;padding:0 16px;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #d9dee8;padding-bottom:4px;margin-top:1.8em}
h3{margin-bottom:.3em}.sub{color:#5a6475;margin-top:0}
table{border-collapse:collapse;margin:8px 0 4px;font-size:.85em}.wide{overflow-x:auto}
th,td{border:1px solid #d9dee8;padding:4px 6px;text-align:right;white-space:nowrap}
table.metrics th{white-space:normal;vertical-align:bottom;min-width:56px}
table.metrics td.name{white-space:normal;max-width:190px}
th{background:#f1f4f9;font-weight:600}td.name,th.name{text-align:left}
tr:nth-child(even) td{background:#fafbfd}td.best{font-weight:700;color:#0b5d1e}
.pm{color:#6b7385;font-size:.85em}.undef{color:#9aa1ae}
.notes{font-size:.82em;color:#5a6475;margin:2px 0 14px;padding-left:20px}
.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.figs figure{margin:0;border:1px solid #e3e7ef;padding:6px;background:#fff;flex:0 1 590px}
.figs img{width:100%;height:auto;display:block}figcaption{font-size:.8em;color:#5a6475}
.kv td{text-align:left;white-space:normal}code{background:#f1f4f9;padding:1px 4px;border-radius:3px;
 word-break:break-all}
"""


@dataclass
class DatasetSection:
    """One dataset's part of the page: its questions, table rows and per-bundle scores."""

    dataset: ReportDataset
    rows: list[Row]
    scores: dict[str, CachedScores]
    images: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)

    def plotted(self) -> dict[str, CachedScores]:
        """Row name → scores of the row's first bundle (a seed group is drawn by its first seed, so the plots
        stay readable with many seeds; the table holds every seed)."""
        return {row.name: self.scores[row.bundles[0]] for row in self.rows}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def reliability_overlay(scores: Mapping[str, CachedScores], path: Path, title: str, n_bins: int = 10) -> Path:
    """Accuracy against mean confidence per equal-width bin, one line per bundle, over the diagonal; ECE
    of each in the legend (15 bins, as the tables)."""
    fig = _new_figure(figsize=(5.6, 4.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    for name, s in scores.items():
        bins = reliability_bins(s.probabilities.max(-1).values, s.correct, n_bins)
        full = bins.count.numpy() > 0
        ax.plot(bins.confidence.numpy()[full], bins.accuracy.numpy()[full], marker="o", markersize=4,
                linewidth=1.5, label=f"{name} (ECE {ece(s.probabilities, s.labels):.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max probability)", ylabel="accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def write_plots(section: DatasetSection, out: Path) -> None:
    """The dataset's overlaid reliability and accuracy–coverage (by predictive entropy) PNGs, and an
    MI-vs-entropy histogram per bundle that defines MI; appended to ``section.images``."""
    title, slug = section.dataset.title, _slug(section.dataset.name)
    name = f"reliability-{slug}.png"
    shown = section.plotted()
    reliability_overlay(shown, out / name, f"reliability — {title}")
    section.images.append((name, "reliability (all bundles)"))
    curves = {}
    for bundle, s in shown.items():
        coverage, risk = risk_coverage(s.predictive_entropy, s.correct)
        curves[bundle] = (coverage, 1 - risk)
    name = f"coverage-{slug}.png"
    accuracy_coverage_curve(curves, out / name, f"accuracy–coverage by entropy — {title}")
    section.images.append((name, "accuracy–coverage, abstaining on highest predictive entropy first"))
    for bundle, s in shown.items():
        if not s.has_mi:
            continue
        name = f"mi-{_slug(bundle)}-{slug}.png"
        mi_entropy_histogram(s.predictive_entropy, s.mutual_information, s.correct, out / name,
                             f"{bundle} on {title}")
        section.images.append((name, f"MI vs entropy — {bundle}"))


def _fmt(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "—"


def _best(rows: Sequence[Row], key: str, higher: bool) -> float | None:
    values = [r.mean[key] for r in rows if key in r.mean]
    if len(values) < 2:
        return None
    return max(values) if higher else min(values)


def metrics_table(rows: Sequence[Row], notes: list[str]) -> str:
    """The HTML table of rows; the reason of each undefined cell is numbered into ``notes``."""
    e = html.escape
    head = "".join(f'<th title="{"higher" if hi else "lower"} is better">{e(label)} {"↑" if hi else "↓"}</th>'
                   for _, label, hi in COLUMNS)
    body = []
    for row in rows:
        cells = [f'<td class="name" title="{e(", ".join(row.bundles))}">{e(row.name)}'
                 + (f'<br><span class="pm">{len(row.bundles)} seeds: {e(", ".join(row.bundles))}</span>'
                    if len(row.bundles) > 1 else "") + "</td>"]
        for key, _, hi in COLUMNS:
            if key in row.undefined:
                reason = row.undefined[key]
                if reason not in notes:
                    notes.append(reason)
                cells.append(f'<td class="undef" title="{e(reason)}">—<sup>{notes.index(reason) + 1}</sup></td>')
                continue
            value, std = row.mean[key], row.std.get(key)
            best = _best(rows, key, hi)
            cls = ' class="best"' if best is not None and value == best else ""
            pm = f' <span class="pm">± {_fmt(std)}</span>' if std is not None else ""
            cells.append(f'<td{cls} data-key="{key}">{_fmt(value)}{pm}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return ('<div class="wide"><table class="metrics"><thead><tr><th class="name">bundle / group</th>'
            f"{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _section_html(section: DatasetSection) -> str:
    e, d = html.escape, section.dataset
    notes: list[str] = []
    table = metrics_table(section.rows, notes)
    note_html = "".join(f"<li>{e(n)}</li>" for n in notes)
    figs = "".join(f'<figure><img src="{e(src)}" alt="{e(cap)}"><figcaption>{e(cap)}</figcaption></figure>'
                   for src, cap in section.images)
    kind = "shift" if d.shift else "in-distribution"
    return (f'<section id="{_slug(d.name)}"><h2>{e(d.title)} <span class="pm">({kind}, N = {len(d.questions)}, '
            f"data hash <code>{e(d.hash)}</code>)</span></h2>{table}"
            + (f'<ol class="notes">{note_html}</ol>' if notes else "")
            + f'<div class="figs">{figs}</div></section>')


def _cost_html(costs: Mapping[str, Mapping[str, Any]]) -> str:
    e = html.escape
    if not costs:
        return "<p>Not measured (<code>--no-timing</code>).</p>"
    first = next(iter(costs.values()))
    rows = "".join(
        f'<tr><td class="name">{e(n)}</td><td>{c["questions"]}</td><td>{c["ms_per_question"]:.1f}</td>'
        f'<td>{c["questions_per_s"]:.2f}</td><td class="name">{e(c["measured_at"])}'
        f'{" (memoized)" if c.get("cached") else ""}</td></tr>' for n, c in costs.items())
    return (f"<p>Wall time of the offline served prediction (<code>bundle_prediction</code>: shared trunk, every "
            "member, predictive, including attaching the bundle's adapters once; no HTTP, no batching across "
            f"requests) on the first {first['questions']} "
            f"questions of the main dataset, after a one-question warm-up, on <b>{e(str(first['cpu']))}</b> "
            f"({first['logical_cpus']} logical CPUs, torch threads = {first['torch_threads']}, device "
            f"{e(str(first['device']))}, torch {e(str(first['torch']))}).</p>"
            '<table><thead><tr><th class="name">bundle</th><th>questions</th><th>ms / question</th>'
            f'<th>questions / s</th><th class="name">measured</th></tr></thead><tbody>{rows}</tbody></table>')


def _lineage_html(lineage: Mapping[str, Any]) -> str:
    e = html.escape
    keys = ("name", "version", "method", "path", "calibration_hash", "tensors_hash", "prompt_hash", "base_model",
            "base_weight_hash", "training_data_hashes")
    bundles = lineage["bundles"]
    head = "".join(f"<th class=name>{e(k)}</th>" for k in keys)

    def cell(key: str, value: Any) -> str:
        text = str(value)
        if key.endswith("_hash") and len(text) > 16:
            return f'<td class="name" title="{e(text)}"><code>{e(text[:16])}…</code></td>'
        if key in ("path", "training_data_hashes"):
            return f'<td class="name"><code>{e(text)}</code></td>'
        return f'<td class="name" style="white-space:nowrap">{e(text)}</td>'

    body = "".join("<tr>" + "".join(cell(k, b.get(k, "")) for k in keys) + "</tr>" for b in bundles)
    data = "".join(f"<tr><td>{e(t)}</td><td><code>{e(h)}</code></td><td>{n}</td></tr>"
                   for t, h, n in lineage["datasets"])
    return (f'<table class="kv"><tr><td>command</td><td><code>{e(lineage["command"])}</code></td></tr>'
            f'<tr><td>git commit</td><td><code>{e(lineage["git"])}</code></td></tr>'
            f'<tr><td>generated</td><td>{e(lineage["generated"])}</td></tr></table>'
            f'<h3>Bundles</h3><div style="overflow-x:auto"><table class="kv"><tr>{head}</tr>{body}</table></div>'
            f'<h3>Questions</h3><table class="kv"><tr><th>dataset</th><th>data hash</th><th>N</th></tr>{data}</table>')


def write_json(out: Path, sections: Sequence[DatasetSection], costs: Mapping[str, Mapping[str, Any]],
               lineage: Mapping[str, Any]) -> Path:
    """``out/report.json``: every table row (mean, std over seeds, undefined metrics with their reason) of
    every dataset, the serving costs and the lineage; what the page shows, for scripts."""
    doc = {
        "columns": [{"key": k, "label": label, "higher_is_better": hi} for k, label, hi in COLUMNS],
        "datasets": [{"name": s.dataset.name, "split": s.dataset.split, "shift": s.dataset.shift,
                      "questions": len(s.dataset.questions), "data_hash": s.dataset.hash,
                      "rows": [{"name": r.name, "bundles": list(r.bundles), "mean": r.mean, "std": r.std,
                                "undefined": r.undefined} for r in s.rows]} for s in sections],
        "serving_cost": costs,
        "lineage": lineage,
    }
    path = out / "report.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    return path


def write_page(out: Path, sections: Sequence[DatasetSection], costs: Mapping[str, Mapping[str, Any]],
               lineage: Mapping[str, Any]) -> Path:
    """``out/index.html`` from the sections (their PNGs already written beside it)."""
    e = html.escape
    names = ", ".join(lineage["bundle_names"])
    toc = " · ".join(f'<a href="#{_slug(s.dataset.name)}">{e(s.dataset.title)}</a>' for s in sections)
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>uqserve report: {e(names)}</title><style>{_CSS}</style></head><body>"
        f"<h1>uqserve report</h1><p class=sub>{e(names)} — served predictive (<code>bundle_prediction</code>), "
        f"{len(sections)} dataset(s): {toc} · <a href=\"#cost\">serving cost</a> · "
        '<a href="#lineage">lineage</a></p>'
        "<p class=sub>AUROC: how well each uncertainty score ranks errors above correct answers (0.5 = chance). "
        "AURC (area under risk–coverage) and ACC @ 80% coverage abstain on predictive entropy. ECE uses 15 "
        "equal-width bins. Groups show mean ± sample std over their bundles (seeds), and the plots draw each group "
        "by its first bundle; the best value per column is bold. A name ending in <code>@T1</code> is that bundle "
        "served at temperature 1 (no temperature scaling: the plain MAP of the seed papers).</p>"
        + "".join(_section_html(s) for s in sections)
        + f'<section id="cost"><h2>Serving cost per question</h2>{_cost_html(costs)}</section>'
        + f'<section id="lineage"><h2>Lineage</h2>{_lineage_html(lineage)}</section></body></html>')
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path

