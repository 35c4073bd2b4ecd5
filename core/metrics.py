"""Evaluation metrics for multiple-choice predictions with uncertainty (pure torch, float64 inside).

Conventions: ``probs`` is ``[N, K]`` with zeros for padded/absent choices, ``labels`` is ``[N]`` long; an
uncertainty ``score`` is ``[N]`` with higher = more uncertain; ``correct``/``is_error`` are ``[N]`` bool.
Every metric returns a Python float (``nan`` where it is undefined).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.uncertainty import UncertaintyScores, decompose

_F = torch.float64
Edges = list[float] | tuple[float, ...]
Counts = list[int] | tuple[int, ...]


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=_F)


def _pred_correct(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return probs.argmax(-1) == labels.to(probs.device)


# --- point metrics --------------------------------------------------------------------------------------


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction with ``argmax_k p_k == y``. probs [N, K], labels [N]."""
    return float(_pred_correct(probs, labels).to(_F).mean())


def nll(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``mean_n −log max(p_{n,y_n}, eps)``. probs [N, K], labels [N]."""
    p_y = _f64(probs).gather(-1, labels.long().cpu()[:, None])[:, 0]
    return float(-p_y.clamp_min(eps).log().mean())


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier ``mean_n Σ_k (p_{n,k} − 1[k = y_n])²`` (in [0, 2]). probs [N, K], labels [N]."""
    p = _f64(probs)
    onehot = torch.nn.functional.one_hot(labels.long().cpu(), p.shape[-1]).to(_F)
    return float(((p - onehot) ** 2).sum(-1).mean())


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics, each ``[B]``; ``accuracy``/``confidence`` are nan where ``count == 0``."""

    lower: torch.Tensor
    upper: torch.Tensor
    count: torch.Tensor
    accuracy: torch.Tensor
    confidence: torch.Tensor


def confidence_bins(confidence: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """The equal-width bin ``b`` with ``b/B < c <= (b+1)/B`` of each confidence (0 in bin 0): long [N]."""
    edges = torch.arange(n_bins + 1, dtype=_F) / n_bins
    # bucketize(right=False) on the upper edges gives b with edges[b] < c <= edges[b+1]
    return torch.bucketize(_f64(confidence).reshape(-1), edges[1:], right=False).clamp(0, n_bins - 1)


def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> ReliabilityBins:
    """Equal-width bins ``(b/B, (b+1)/B]`` on confidence (:func:`confidence_bins`), the first also holding 0.
    confidence [N] float, correct [N] bool → per-bin stats [B]."""
    conf = _f64(confidence).reshape(-1)
    hit = _f64(correct).reshape(-1)
    idx = confidence_bins(conf, n_bins)
    edges = torch.arange(n_bins + 1, dtype=_F) / n_bins
    count = torch.bincount(idx, minlength=n_bins).to(_F)
    acc_sum = torch.zeros(n_bins, dtype=_F).index_add_(0, idx, hit)
    conf_sum = torch.zeros(n_bins, dtype=_F).index_add_(0, idx, conf)
    safe = count.clamp_min(1.0)
    empty = count == 0
    return ReliabilityBins(
        lower=edges[:-1],
        upper=edges[1:],
        count=count.long(),
        accuracy=(acc_sum / safe).masked_fill(empty, math.nan),
        confidence=(conf_sum / safe).masked_fill(empty, math.nan),
    )


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error ``Σ_b (n_b / N) |acc_b − conf_b|`` with conf = max_k p_k. probs [N, K]."""
    bins = reliability_bins(probs.max(-1).values, _pred_correct(probs, labels), n_bins)
    full = bins.count > 0
    if not full.any():
        return math.nan
    weights = bins.count[full].to(_F) / bins.count.sum()
    return float((weights * (bins.accuracy[full] - bins.confidence[full]).abs()).sum())


# --- error detection ------------------------------------------------------------------------------------


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of x [N], tied values sharing their mean rank."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(_F)
    mean_rank = ends - (counts.to(_F) - 1.0) / 2.0  # mean of start+1 .. end
    return mean_rank[inverse]


def auroc(score: torch.Tensor, is_error: torch.Tensor) -> float:
    """P(score_error > score_correct) + ½ P(tie), via the Mann–Whitney rank sum:
    ``(Σ_{pos} rank − P(P+1)/2) / (P·Q)`` with average ranks for ties. score, is_error [N]."""
    s, pos = _f64(score).reshape(-1), is_error.detach().cpu().reshape(-1).bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = float(_average_ranks(s)[pos].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def auprc(score: torch.Tensor, is_error: torch.Tensor) -> float:
    """Average precision of errors ranked by score: ``Σ_n (R_n − R_{n−1}) P_n`` over thresholds at the
    distinct score values (descending), as sklearn's ``average_precision_score``. score, is_error [N]."""
    s, pos = _f64(score).reshape(-1), _f64(is_error.bool()).reshape(-1)
    n_pos = float(pos.sum())
    if n_pos == 0 or n_pos == pos.numel():
        return math.nan
    order = torch.argsort(s, descending=True, stable=True)
    s, pos = s[order], pos[order]
    # the last index of each run of equal scores is where a threshold ``score >= t`` takes the whole run
    last = torch.cat([s[1:] != s[:-1], torch.tensor([True])])
    tp = pos.cumsum(0)[last]
    kept = torch.arange(1, s.numel() + 1, dtype=_F)[last]
    precision, recall = tp / kept, tp / n_pos
    d_recall = torch.diff(recall, prepend=torch.zeros(1, dtype=_F))
    return float((d_recall * precision).sum())


# --- selective prediction -------------------------------------------------------------------------------


def risk_coverage(score: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the most certain first (ascending score, stable for ties).
    Returns coverage[i] = (i+1)/N and risk[i] = errors among the first i+1 / (i+1), both [N] float64."""
    s, hit = _f64(score).reshape(-1), _f64(correct).reshape(-1)
    order = torch.argsort(s, stable=True)
    kept = torch.arange(1, s.numel() + 1, dtype=_F)
    return kept / s.numel(), (1.0 - hit[order]).cumsum(0) / kept


def aurc(score: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under the risk–coverage curve, ``mean_i risk[i]``; lower is better. score, correct [N]."""
    if score.numel() == 0:
        return math.nan
    return float(risk_coverage(score, correct)[1].mean())


def accuracy_at_coverage(score: torch.Tensor, correct: torch.Tensor, coverage: float = 0.8) -> float:
    """Accuracy on the ``ceil(coverage·N)`` most certain items. score, correct [N]."""
    n = score.numel()
    if n == 0:
        return math.nan
    keep = min(n, max(1, math.ceil(coverage * n - 1e-9)))
    return 1.0 - float(risk_coverage(score, correct)[1][keep - 1])


# --- summary --------------------------------------------------------------------------------------------


MI_METRICS = ("mutual_information", "expected_entropy", "auroc_mi", "auprc_mi")


def summarize(member_probs: torch.Tensor, labels: torch.Tensor,
              weights: torch.Tensor | None = None) -> dict[str, float]:
    """All metrics for an ensemble. member_probs [N, M, K], labels [N], weights [M] (None = uniform); one
    member has no mutual information (its MI metrics are nan). See :func:`summarize_scores`."""
    u = decompose(_f64(member_probs), None if weights is None else _f64(weights))
    return summarize_scores(u, labels, has_mi=member_probs.shape[-2] > 1)


def summarize_scores(u: UncertaintyScores, labels: torch.Tensor, has_mi: bool = True) -> dict[str, float]:
    """All metrics of a served predictive ``u`` (probabilities [N, K], scores [N]) against labels [N].

    Keys: acc, nll, brier, ece, predictive_entropy / mutual_information / expected_entropy (means over N),
    auroc_{s} and auprc_{s} for s in {entropy, mi, one_minus_max_prob} (errors as positives), aurc (by
    predictive entropy), acc_at_80_coverage (by predictive entropy), n. Where the method defines no mutual
    information (``has_mi`` False) the :data:`MI_METRICS` are nan, never a fake 0 or 0.5.
    """
    probs, y = _f64(u.probabilities), labels.long().cpu()
    entropy_, mi = _f64(u.predictive_entropy), _f64(u.mutual_information)
    correct = _pred_correct(probs, y)
    out = {"acc": accuracy(probs, y), "nll": nll(probs, y), "brier": brier(probs, y), "ece": ece(probs, y),
           "predictive_entropy": float(entropy_.mean()),
           "mutual_information": float(mi.mean()),
           "expected_entropy": float(_f64(u.expected_entropy).mean())}
    detectors = {"entropy": entropy_, "mi": mi, "one_minus_max_prob": 1.0 - _f64(u.max_probability)}
    for name, score in detectors.items():
        out[f"auroc_{name}"] = auroc(score, ~correct)
        out[f"auprc_{name}"] = auprc(score, ~correct)
    out["aurc"] = aurc(entropy_, correct)
    out["acc_at_80_coverage"] = accuracy_at_coverage(entropy_, correct, 0.8)
    out["n"] = float(y.numel())
    if not has_mi:
        out.update(dict.fromkeys(MI_METRICS, math.nan))
    return out


def finite_metrics(metrics: dict[str, float], undefined_reason: str) -> tuple[dict[str, float], dict[str, str]]:
    """Split metrics into (finite values, name → reason for each undefined one). The reason for MI metrics
    is ``undefined_reason``; other nan metrics (AUROC with one class, …) get a generic one."""
    values = {k: v for k, v in metrics.items() if math.isfinite(v)}
    reasons = {k: (undefined_reason if k in MI_METRICS else "undefined on this data (e.g. only one class)")
               for k, v in metrics.items() if not math.isfinite(v)}
    return values, reasons


# --- reference histograms and drift ---------------------------------------------------------------------


def _bin_index(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bin b with ``edges[b] <= v < edges[b+1]`` (last bin closed); out-of-range values go to the end bins."""
    return torch.bucketize(values, edges[1:-1], right=True)


def histogram(values: torch.Tensor, edges: Edges | torch.Tensor) -> list[int]:
    """Counts of values [N] in bins ``[e_b, e_{b+1})`` (last closed); out-of-range values are clamped into
    the first/last bin so every non-nan value is counted; nans are dropped. Returns len(edges) − 1 ints."""
    e = torch.as_tensor(edges, dtype=_F)
    v = _f64(values).reshape(-1)
    v = v[~v.isnan()]
    return [int(c) for c in torch.bincount(_bin_index(v, e), minlength=e.numel() - 1)]


def reference_histograms(scores: UncertaintyScores, num_choices: int = 4,
                         bins: int = 20) -> dict[str, dict[str, list]]:
    """Validation-time score histograms stored in a bundle for drift checks.

    "confidence": max probability on [0, 1]; "predictive_entropy" and "mutual_information" on [0, log K]
    with K = num_choices. Each entry is ``{"edges": [bins+1 floats], "counts": [bins ints]}``.
    """
    ranges = {"confidence": (scores.max_probability, 1.0),
              "predictive_entropy": (scores.predictive_entropy, math.log(num_choices)),
              "mutual_information": (scores.mutual_information, math.log(num_choices))}
    out: dict[str, dict[str, list]] = {}
    for name, (values, top) in ranges.items():
        edges = [top * b / bins for b in range(bins + 1)]
        out[name] = {"edges": edges, "counts": histogram(values, edges)}
    return out


def _live_and_ref_fractions(live_values: torch.Tensor, ref_edges: Edges,
                            ref_counts: Counts) -> tuple[torch.Tensor, torch.Tensor] | None:
    ref = torch.as_tensor(ref_counts, dtype=_F)
    live = torch.as_tensor(histogram(live_values, ref_edges), dtype=_F)
    if ref.numel() != live.numel():
        raise ValueError(f"{len(ref_edges)} edges need {len(ref_edges) - 1} counts, got {ref.numel()}")
    if ref.sum() <= 0 or live.sum() <= 0:
        return None
    return live / live.sum(), ref / ref.sum()


def ks_statistic(live_values: torch.Tensor, ref_edges: Edges, ref_counts: Counts) -> float:
    """Two-sample Kolmogorov–Smirnov distance on the reference bins: the live sample [N] is binned like
    the reference, then ``KS = max_b |F_live(e_b) − F_ref(e_b)|`` over the edges (cumulative fractions).
    In [0, 1]; nan if either side is empty."""
    fr = _live_and_ref_fractions(live_values, ref_edges, ref_counts)
    if fr is None:
        return math.nan
    live, ref = fr
    return float((live.cumsum(0) - ref.cumsum(0)).abs().max())


def psi(live_values: torch.Tensor, ref_edges: Edges, ref_counts: Counts, eps: float = 1e-4) -> float:
    """Population stability index ``Σ_b (q_b − p_b) ln(q_b / p_b)`` with q = live and p = reference bin
    fractions, both floored at eps; ≥ 0, and 0 iff the binned distributions agree."""
    fr = _live_and_ref_fractions(live_values, ref_edges, ref_counts)
    if fr is None:
        return math.nan
    q, p = (x.clamp_min(eps) for x in fr)
    return float(((q - p) * (q / p).log()).sum())
