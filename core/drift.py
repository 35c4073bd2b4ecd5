"""Drift reference: what "no drift" looks like for the server's alarm statistics (pure torch, float64).

The server watches three statistics per bundle, each over a sliding window of recent requests:

- **ECE** of the last ``n`` labelled answers (:func:`core.metrics.ece`, 15 equal-width bins),
- **KS** and **PSI** of the last ``n`` live scores (confidence, predictive entropy, mutual information)
  against a reference histogram (:func:`core.metrics.ks_statistic`, :func:`core.metrics.psi`).

All three are biased upward on small windows (a perfectly calibrated model shows ECE ≈ 0.12 at n = 100),
so a fixed threshold either cries wolf on small windows or misses drift on large ones. A
:class:`DriftReference`, built at bundle export from the validation (calibration) data, stores

- quantile-binned reference histograms of the live scores (each bin ≈ equal validation mass; a point mass
  such as MI ≈ 0 becomes one bin of its own instead of swallowing the histogram),
- the **no-drift distribution** of every statistic at the window sizes :data:`WINDOWS`, as quantiles at
  :data:`LEVELS`, by bootstrap from the validation data:

  * ECE: ``ECE(n resampled (p, y) pairs) − ECE(N resampled pairs)``, the excess of a window over a
    validation-sized sample of the same distribution; the threshold is ``validation ECE + quantile``, so
    the noise of the validation ECE itself is accounted for.
  * KS / PSI (two-sample): a live window of n and a reference of N, both resampled from the validation
    scores and binned on the reference edges (equivalently multinomial bin counts), compared as the
    server compares them.

The server reads :meth:`DriftReference.ece_threshold`, :meth:`~DriftReference.ks_threshold` and
:meth:`~DriftReference.psi_threshold` at the current window fill (log–log interpolation between grid
sizes; none below the smallest, the largest size's value above it, which is conservative since the
thresholds fall with n). At :data:`ALARM_LEVEL` each statistic exceeds its threshold on a fraction
``1 − ALARM_LEVEL`` of no-drift windows.

Bundles written before drift references existed get :func:`fallback_drift_reference` from what their
manifest does hold (equal-width histograms and the validation ECE); see its docstring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import pairwise

import torch
from pydantic import BaseModel, ConfigDict, FiniteFloat, model_validator

from core.metrics import ece

_F = torch.float64
SCORES = ("confidence", "predictive_entropy", "mutual_information")
WINDOWS = (50, 100, 200, 500, 1000)  # window sizes of the no-drift grid (server defaults: 500 and 500)
LEVELS = (0.5, 0.9, 0.99, 0.999)  # stored quantile levels of each no-drift distribution
ALARM_LEVEL = 0.999  # threshold = this quantile: 0.1 % of no-drift windows exceed it, per statistic
RESAMPLES = 10_000  # bootstrap replicates per window size (≈ 10 beyond the 0.999 quantile)
FALLBACK_RESAMPLES = 2_000  # the server builds these at load time (fewer: ±0.07 % on the 0.1 % rate)
MAX_BINS = 10
MIN_PER_BIN = 20  # fewer validation values than MAX_BINS × this → fewer bins
ECE_BINS = 15  # as core.metrics.ece
PSI_EPS = 1e-4  # as core.metrics.psi
_CHUNK = 2_000_000  # resampled values held at once

Table = tuple[tuple[FiniteFloat, ...], ...]  # [len(windows)][len(levels)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScoreReference(_Frozen):
    """One live score: reference bins ``[edges[b], edges[b+1])`` (values outside go to the end bins),
    validation ``counts`` per bin, and the no-drift quantiles of KS and PSI against it."""

    edges: tuple[FiniteFloat, ...]  # [B + 1], strictly increasing
    counts: tuple[int, ...]  # [B]
    ks: Table
    psi: Table


class DriftReference(_Frozen):
    """No-drift distributions of the server's alarm statistics, from a bundle's validation data.

    ``ece_excess[i][j]`` is the ``levels[j]`` quantile of (window ECE − validation-sized ECE) over windows
    of ``windows[i]`` labelled answers; ``scores[s].ks`` / ``.psi`` the same for the live-score statistics.
    """

    windows: tuple[int, ...]
    levels: tuple[float, ...]
    alarm_level: float = ALARM_LEVEL
    resamples: int
    n_reference: int  # validation questions the reference was built from
    source: str = "validation"  # "validation" (export) or "fallback: …" (rebuilt by the server)
    validation_ece: FiniteFloat | None = None
    ece_excess: Table | None = None
    scores: dict[str, ScoreReference] = {}

    @model_validator(mode="after")
    def _shapes(self) -> DriftReference:
        if not self.windows or list(self.windows) != sorted(set(self.windows)) or self.windows[0] < 1:
            raise ValueError("windows must be positive and strictly increasing")
        if list(self.levels) != sorted(set(self.levels)) or self.alarm_level not in self.levels:
            raise ValueError("levels must be increasing and contain alarm_level")
        if (self.validation_ece is None) != (self.ece_excess is None):
            raise ValueError("validation_ece and ece_excess go together")
        tables = [self.ece_excess] if self.ece_excess is not None else []
        for name, ref in self.scores.items():
            if name not in SCORES:
                raise ValueError(f"unknown score {name!r}")
            if len(ref.edges) != len(ref.counts) + 1 or not _increasing(ref.edges):
                raise ValueError(f"{name}: edges must be strictly increasing, one more than counts")
            tables += [ref.ks, ref.psi]
        if any(len(t) != len(self.windows) or any(len(r) != len(self.levels) for r in t) for t in tables):
            raise ValueError("every quantile table must be [len(windows)][len(levels)]")
        return self

    def _at(self, table: Table, n: int) -> float | None:
        return interpolate(self.windows, [row[self.levels.index(self.alarm_level)] for row in table], n)

    def ece_threshold(self, n: int) -> float | None:
        """Alarm threshold for the ECE of n labelled answers (None: no reference, or n < windows[0])."""
        if self.ece_excess is None or self.validation_ece is None:
            return None
        excess = self._at(self.ece_excess, n)
        return None if excess is None else self.validation_ece + excess

    def ks_threshold(self, score: str, n: int) -> float | None:
        ref = self.scores.get(score)
        return None if ref is None else self._at(ref.ks, n)

    def psi_threshold(self, score: str, n: int) -> float | None:
        ref = self.scores.get(score)
        return None if ref is None else self._at(ref.psi, n)


def _increasing(edges: Sequence[float]) -> bool:
    return all(b > a for a, b in pairwise(edges))


def interpolate(windows: Sequence[int], values: Sequence[float], n: int) -> float | None:
    """values[i] at windows[i], read at n: None below windows[0], values[-1] above windows[-1], else
    linear in (log n, log value) (in value where a value is ≤ 0): exact for power laws like n^-½."""
    if n < windows[0]:
        return None
    if n >= windows[-1]:
        return float(values[-1])
    i = max(j for j, w in enumerate(windows) if w <= n)
    t = (math.log(n) - math.log(windows[i])) / (math.log(windows[i + 1]) - math.log(windows[i]))
    lo, hi = float(values[i]), float(values[i + 1])
    if lo > 0 and hi > 0:
        return math.exp((1 - t) * math.log(lo) + t * math.log(hi))
    return (1 - t) * lo + t * hi


# --- reference bins --------------------------------------------------------------------------------------


def quantile_edges(values: torch.Tensor, max_bins: int = MAX_BINS, min_per_bin: int = MIN_PER_BIN) -> list[float]:
    """Edges of up to ``max_bins`` bins of about equal mass of values [N] (non-finite dropped).

    Cuts fall midway between consecutive distinct values, so tied values (a point mass) never straddle a
    bin edge: an atom holding more than 1/B of the mass is a bin of its own and the rest is split into
    bins of ≈ N/B. A bin is closed once it holds N/B values and at least N/(2B) remain. The outer edges
    are the smallest and largest value. Fewer than two bins (e.g. a single distinct value) → ``[]``."""
    v = values.detach().to("cpu", _F).reshape(-1)
    v = v[torch.isfinite(v)].sort().values
    n = v.numel()
    bins = min(max_bins, n // min_per_bin)
    if bins < 2:
        return []
    uniq, counts = torch.unique_consecutive(v, return_counts=True)
    cum = counts.cumsum(0).tolist()
    target = n / bins
    edges, start = [float(uniq[0])], 0
    for j in range(len(cum) - 1):
        if cum[j] - start >= target and n - cum[j] >= target / 2:
            edges.append(float((uniq[j] + uniq[j + 1]) / 2))
            start = cum[j]
    edges.append(float(uniq[-1]))
    return edges if len(edges) >= 3 else []


def bin_counts(values: torch.Tensor, edges: Sequence[float]) -> list[int]:
    """Counts of values [N] per bin ``[e_b, e_{b+1})``, out-of-range values in the end bins (as the server)."""
    e = torch.tensor(list(edges), dtype=_F)
    v = values.detach().to("cpu", _F).reshape(-1)
    v = v[torch.isfinite(v)]
    return torch.bincount(torch.bucketize(v, e[1:-1], right=True), minlength=len(edges) - 1).tolist()


# --- statistics of many windows at once ------------------------------------------------------------------


def ece_of_rows(confidence: torch.Tensor, correct: torch.Tensor, rows: torch.Tensor,
                n_bins: int = ECE_BINS) -> torch.Tensor:
    """ECE of each resampled window, as :func:`core.metrics.ece`: ``Σ_b |Σ_{i∈b} (correct_i − conf_i)| / n``.
    confidence [N] (max probability), correct [N] bool, rows [R, n] indices into them → [R]."""
    conf = confidence.to(_F)
    edges = torch.arange(n_bins + 1, dtype=_F) / n_bins
    bin_of = torch.bucketize(conf, edges[1:], right=False).clamp(0, n_bins - 1)  # as reliability_bins
    gap = correct.to(_F) - conf
    r, n = rows.shape
    flat = (bin_of[rows] + n_bins * torch.arange(r)[:, None]).reshape(-1)
    sums = torch.zeros(r * n_bins, dtype=_F).index_add_(0, flat, gap[rows].reshape(-1))
    return sums.view(r, n_bins).abs().sum(-1) / n


def ks_psi_of_counts(live: torch.Tensor, ref: torch.Tensor, eps: float = PSI_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """KS and PSI of each pair of binned samples, as :func:`core.metrics.ks_statistic` and
    :func:`core.metrics.psi`. live, ref [R, B] counts → ([R], [R])."""
    q = live.to(_F) / live.sum(-1, keepdim=True)
    p = ref.to(_F) / ref.sum(-1, keepdim=True)
    ks = (q.cumsum(-1) - p.cumsum(-1)).abs().amax(-1)
    qc, pc = q.clamp_min(eps), p.clamp_min(eps)
    return ks, ((qc - pc) * (qc / pc).log()).sum(-1)


def multinomial_counts(probs: torch.Tensor, total: int, reps: int, generator: torch.Generator) -> torch.Tensor:
    """``reps`` draws of Multinomial(total, probs [B]) → [reps, B] float64 counts (conditional binomials)."""
    p = probs.to(_F) / probs.sum()
    out = torch.zeros(reps, p.numel(), dtype=_F)
    remaining = torch.full((reps,), float(total), dtype=_F)
    rest = 1.0
    for b in range(p.numel() - 1):
        share = min(max(float(p[b]) / rest, 0.0), 1.0) if rest > 1e-12 else 0.0
        drawn = torch.binomial(remaining, torch.full_like(remaining, share), generator=generator)
        out[:, b], remaining, rest = drawn, remaining - drawn, rest - float(p[b])
    out[:, -1] = remaining
    return out


def _quantiles(samples: torch.Tensor, levels: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(x) for x in torch.quantile(samples, torch.tensor(list(levels), dtype=_F)))


def _ece_null(confidence: torch.Tensor, correct: torch.Tensor, n_ref: int | None, windows: Sequence[int],
              resamples: int, gen: torch.Generator) -> list[tuple[float, ...]]:
    """Per window n: quantiles of ECE(n rows) − ECE(n_ref rows) (rows resampled; n_ref None: minus 0)."""

    def sample(n: int) -> torch.Tensor:
        chunk = max(1, _CHUNK // n)
        parts = [ece_of_rows(confidence, correct, torch.randint(len(confidence), (min(chunk, resamples - lo), n),
                                                                 generator=gen))
                 for lo in range(0, resamples, chunk)]
        return torch.cat(parts)

    baseline = sample(n_ref) if n_ref is not None else torch.zeros(resamples, dtype=_F)
    return [_quantiles(sample(n) - baseline, LEVELS) for n in windows]


def _score_reference(edges: Sequence[float], counts: Sequence[int], windows: Sequence[int], resamples: int,
                     gen: torch.Generator) -> ScoreReference:
    """Two-sample no-drift KS/PSI: live window of n and reference of N = Σ counts, both ~ the reference bins."""
    probs = torch.tensor(list(counts), dtype=_F)
    ref = multinomial_counts(probs, int(probs.sum()), resamples, gen)
    ks_rows, psi_rows = [], []
    for n in windows:
        ks, psi = ks_psi_of_counts(multinomial_counts(probs, n, resamples, gen), ref)
        ks_rows.append(_quantiles(ks, LEVELS))
        psi_rows.append(_quantiles(psi, LEVELS))
    return ScoreReference(edges=tuple(edges), counts=tuple(int(c) for c in counts), ks=tuple(ks_rows),
                          psi=tuple(psi_rows))


# --- builders --------------------------------------------------------------------------------------------


def bootstrap_drift_reference(probabilities: torch.Tensor, labels: torch.Tensor,
                              scores: Mapping[str, torch.Tensor | None], *, seed: int = 0,
                              windows: Sequence[int] = WINDOWS, resamples: int = RESAMPLES) -> DriftReference:
    """:func:`build_drift_reference` with the grid and the number of bootstrap replicates as knobs."""
    probs = probabilities.detach().to("cpu", _F)
    y = labels.detach().to("cpu").long()
    if probs.dim() != 2 or y.shape != probs.shape[:1] or len(y) == 0:
        raise ValueError(f"probabilities [N, K] and labels [N] expected, got {list(probs.shape)} and {list(y.shape)}")
    gen = torch.Generator().manual_seed(seed)
    confidence = probs.max(-1).values
    correct = probs.argmax(-1) == y
    excess = _ece_null(confidence, correct, len(y), windows, resamples, gen)
    references = {}
    for name in SCORES:
        values = scores.get(name)
        if values is None:
            continue
        if values.shape != y.shape:
            raise ValueError(f"score {name!r} has shape {list(values.shape)}, expected [{len(y)}]")
        edges = quantile_edges(values)
        if edges:
            references[name] = _score_reference(edges, bin_counts(values, edges), windows, resamples, gen)
    return DriftReference(windows=tuple(windows), levels=LEVELS, resamples=resamples, n_reference=len(y),
                          validation_ece=ece(probs, y, ECE_BINS), ece_excess=tuple(excess), scores=references)


def build_drift_reference(probabilities: torch.Tensor, labels: torch.Tensor, scores: Mapping[str, torch.Tensor],
                          *, seed: int = 0) -> DriftReference:
    """The drift reference of a bundle from its validation data (called once, at export).

    probabilities [N, K] (the served predictive, zeros for absent choices), labels [N] long, scores:
    name → [N] for names among :data:`SCORES` (a score the method does not define, e.g. MI of a single
    member, is left out, or None). Scores with fewer than two quantile bins are left out. About one
    second on one CPU thread for N ≈ 600 at the default grid and :data:`RESAMPLES`; deterministic given
    ``seed``."""
    return bootstrap_drift_reference(probabilities, labels, scores, seed=seed)


def fallback_drift_reference(histograms: Mapping[str, tuple[Sequence[float], Sequence[int]]],
                             validation_ece: float | None, *, seed: int = 0,
                             resamples: int = FALLBACK_RESAMPLES) -> DriftReference:
    """A drift reference for a bundle exported without one, from its manifest's equal-width reference
    histograms (name → (edges, counts)) and validation ECE.

    - KS / PSI: the same two-sample bootstrap, on the stored (equal-width) bins. Exact for those bins,
      but a histogram with most of its mass in one bin (MI) stays a weak detector.
    - ECE: the validation pairs are not stored, so the no-drift excess is that of a *perfectly calibrated*
      model with the stored confidence distribution (confidence drawn from the histogram, uniform within
      a bin; correct ~ Bernoulli(confidence)); the threshold is validation ECE + that quantile. By the
      triangle inequality per bin this over-covers a model as calibrated as on validation: conservative.
    """
    gen = torch.Generator().manual_seed(seed)
    refs, n_ref = {}, 0
    for name in SCORES:
        if name not in histograms:
            continue
        edges, counts = histograms[name]
        if sum(c > 0 for c in counts) >= 2 and len(edges) == len(counts) + 1 and _increasing(edges):
            refs[name] = _score_reference(edges, counts, WINDOWS, resamples, gen)
            n_ref = max(n_ref, int(sum(counts)))
    excess = None
    if validation_ece is not None and math.isfinite(validation_ece) and "confidence" in refs:
        edges_t = torch.tensor(refs["confidence"].edges, dtype=_F)
        counts_t = torch.tensor(refs["confidence"].counts, dtype=_F)
        pool = 20_000  # a calibrated population drawn once; windows resample it
        b = torch.multinomial(counts_t, pool, replacement=True, generator=gen)
        conf = edges_t[b] + (edges_t[b + 1] - edges_t[b]) * torch.rand(pool, generator=gen, dtype=_F)
        correct = torch.rand(pool, generator=gen, dtype=_F) < conf
        excess = tuple(_ece_null(conf, correct, None, WINDOWS, resamples, gen))
    return DriftReference(windows=WINDOWS, levels=LEVELS, resamples=resamples, n_reference=n_ref,
                          source="fallback: equal-width manifest histograms; ECE vs a calibrated model",
                          validation_ece=validation_ece if excess is not None else None, ece_excess=excess,
                          scores=refs)
