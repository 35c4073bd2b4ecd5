"""Evaluation plots (PNG, dpi 120) drawn with matplotlib's object API on the Agg canvas.

matplotlib is imported inside each function (it is a ``train`` extra); no pyplot global state is touched.
Each function writes ``path`` (creating its folder) and returns it as a ``Path``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.metrics import ece, reliability_bins

DPI = 120


def _new_figure(**kwargs: Any) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    return out


def _np(x: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def reliability_diagram(probs: torch.Tensor, labels: torch.Tensor, path: str | Path, title: str = "",
                        n_bins: int = 15) -> Path:
    """Accuracy per confidence bin (bars) against the diagonal, the gap to each bin's mean confidence
    shaded, ECE in the title; bin counts beneath. probs [N, K], labels [N]."""
    conf = probs.max(-1).values
    correct = probs.argmax(-1) == labels.to(probs.device)
    bins = reliability_bins(conf, correct, n_bins)
    lower, upper = bins.lower.numpy(), bins.upper.numpy()
    centers, width = (lower + upper) / 2.0, upper - lower
    full = bins.count.numpy() > 0
    acc, mean_conf = bins.accuracy.numpy(), bins.confidence.numpy()

    fig = _new_figure(figsize=(5.0, 6.0))
    grid = fig.add_gridspec(2, 1, height_ratios=[3, 1], hspace=0.08)
    ax = fig.add_subplot(grid[0])
    ax.bar(centers[full], acc[full], width=width[full], edgecolor="black", color="tab:blue", alpha=0.8,
           label="accuracy")
    gap_lo, gap_hi = np.minimum(acc, mean_conf)[full], np.maximum(acc, mean_conf)[full]
    ax.bar(centers[full], gap_hi - gap_lo, bottom=gap_lo, width=width[full], color="tab:red", alpha=0.3,
           hatch="//", edgecolor="tab:red", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    ax.tick_params(labelbottom=False)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{title}  (ECE = {ece(probs, labels, n_bins):.3f}, N = {len(labels)})".strip())

    ax_n = fig.add_subplot(grid[1], sharex=ax)
    ax_n.bar(centers, bins.count.numpy(), width=width, color="gray", edgecolor="black")
    ax_n.set(xlabel="confidence (max probability)", ylabel="count")
    return _save(fig, path)


def accuracy_coverage_curve(curves: Mapping[str, tuple[Any, Any]], path: str | Path, title: str = "") -> Path:
    """Selective accuracy against coverage for several uncertainty scores on one axis.
    curves: name → (coverage [N], accuracy [N]), e.g. ``(cov, 1 − risk)`` from ``metrics.risk_coverage``."""
    fig = _new_figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for name, (coverage, acc) in curves.items():
        ax.plot(_np(coverage), _np(acc), label=name, linewidth=1.5)
    ax.set(xlim=(0, 1), xlabel="coverage (fraction answered)", ylabel="accuracy on answered", title=title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    return _save(fig, path)


def mi_entropy_histogram(entropy: torch.Tensor, mi: torch.Tensor, correct: torch.Tensor, path: str | Path,
                         title: str = "", bins: int = 40) -> Path:
    """2-D histograms of mutual information against predictive entropy, side by side for correct and
    incorrect predictions, on shared axes and a shared log colour scale. entropy, mi, correct [N]."""
    from matplotlib.colors import LogNorm

    h, m, ok = _np(entropy), _np(mi), _np(correct).astype(bool)
    x_edges = np.linspace(0.0, max(float(h.max(initial=0.0)), 1e-6) * 1.001, bins + 1)
    y_edges = np.linspace(0.0, max(float(m.max(initial=0.0)), 1e-6) * 1.001, bins + 1)
    panels = [("correct", ok), ("incorrect", ~ok)]
    counts = [np.histogram2d(h[sel], m[sel], bins=(x_edges, y_edges))[0] for _, sel in panels]
    norm = LogNorm(vmin=1.0, vmax=max(1.0, *(float(c.max(initial=0.0)) for c in counts)))

    fig = _new_figure(figsize=(10.0, 4.2), layout="constrained")
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    mesh = None
    for ax, (name, sel), c in zip(axes, panels, counts, strict=True):
        mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_equal(c.T, 0.0), norm=norm, cmap="viridis")
        ax.set(xlabel="predictive entropy (nats)", ylabel="mutual information (nats)",
               title=f"{name} (n = {int(sel.sum())})")
    fig.colorbar(mesh, ax=axes, label="count (log)")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
