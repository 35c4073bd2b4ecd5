"""Risk-controlled selective answering (Learn-then-Test) and anytime-valid bounds for watching it online.

**Learn-then-Test** (Angelopoulos, Bates, Candès, Jordan & Lei 2021). The served rule answers a question iff
its uncertainty score u ≤ λ. The selective risk R(λ) = P(wrong | u ≤ λ) is to be at most ε with probability
at least 1 − δ over the draw of the n calibration questions. Each λ of a *data-independent* grid (G evenly
spaced values over the score's range, :func:`threshold_grid`) is a null hypothesis H_λ: R(λ) > ε, with the
Hoeffding–Bentkus p-value of the errors among the n_λ calibration questions it answers (given n_λ those are
an i.i.d. sample of the answered population, so the p-value is valid). The multiple testing is fixed-sequence
testing with S evenly spaced starting points (LTT §4): from each start, λ grows (answers more) and each test
runs at δ / S until the first H_λ that is not rejected. Every rejected λ then has R(λ) ≤ ε simultaneously
with probability ≥ 1 − δ (Bonferroni over S sequences, each controlling its error at δ / S); the served λ̂
is the largest rejected one (the most answers). One start (S = 1) at the most cautious λ would stop at once
(a handful of answered questions proves nothing), which is why the starts are spread.

If nothing is rejected, no threshold carries the guarantee: the answer is "not certified" and the server
abstains rather than answer without it.

**Confidence sequences** (Howard, Ramdas, McAuliffe & Sekhon 2021). For labelled outcomes X_t ∈ [0, 1] (a
miss of the conformal set, an error among answered), :func:`anytime_lower_bound` is a lower bound on the
running average of their conditional means that holds *simultaneously for every t* with probability ≥ 1 − a
(the two-sided normal-mixture boundary for 1/2-sub-Gaussian increments). Prometheus may evaluate an alert on
it at every scrape without inflating its false-alarm rate, unlike a fixed-n test repeated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

_F = torch.float64
GRID_SIZE = 200
STARTS = 10
MAX_CHOICES_LOG = math.log(26)
SCORE_RANGES: dict[str, float] = {  # upper end of each score's range (all start at 0)
    "one_minus_max_probability": 1.0,
    "predictive_entropy": MAX_CHOICES_LOG,
    "mutual_information": MAX_CHOICES_LOG,
    "one_minus_feu": 1.0,
}


def threshold_grid(score: str, size: int = GRID_SIZE) -> torch.Tensor:
    """The data-independent candidate thresholds of a score, ascending: [size] float64 over [0, range]."""
    if score not in SCORE_RANGES:
        raise ValueError(f"no risk-control grid for score {score!r}; choose one of {sorted(SCORE_RANGES)}")
    return torch.linspace(0.0, SCORE_RANGES[score], size, dtype=_F)


class RiskCertificate(BaseModel):
    """The outcome of Learn-then-Test for one (score, ε, δ): the served threshold λ̂ (None when nothing was
    certified) and what it did on the n calibration questions."""

    model_config = ConfigDict(frozen=True)

    score: str
    target_risk: float
    delta: float
    n: int
    certified: bool
    threshold: float | None
    calibration_coverage: float  # answered fraction at λ̂ (0 when not certified)
    calibration_risk: float  # errors among answered at λ̂ (0 when not certified)
    reason: str = ""


def learn_then_test(values: torch.Tensor, correct: torch.Tensor, *, score: str, target_risk: float, delta: float,
                    grid: torch.Tensor | None = None, starts: int = STARTS) -> RiskCertificate:
    """λ̂ with P(R(λ̂) ≤ ε) ≥ 1 − δ (see the module docstring). values [n] the score u of each calibration
    question (non-finite: never answered), correct [n] bool (argmax = label)."""
    if not 0 < target_risk < 1 or not 0 < delta < 1:
        raise ValueError(f"target_risk and delta must be in (0, 1), got {target_risk} and {delta}")
    u = values.detach().to(device="cpu", dtype=_F).reshape(-1)
    hit = correct.detach().cpu().reshape(-1).bool()
    n = u.numel()
    lambdas = threshold_grid(score) if grid is None else grid.to(_F)
    answered = u[None, :] <= lambdas[:, None]  # [G, n]
    kept = answered.sum(1)
    wrong = (answered & ~hit[None, :]).sum(1)
    pvalues = hb_pvalues(kept, wrong, target_risk).tolist()
    g = lambdas.numel()
    s = max(1, min(starts, g))
    level = delta / s
    rejected: set[int] = set()
    for start in sorted({round(i * (g - 1) / max(s - 1, 1)) for i in range(s)}):
        for j in range(start, g):
            if pvalues[j] > level:
                break
            rejected.add(j)
    if not rejected:
        overall = float((~hit).to(_F).mean()) if n else math.nan
        return RiskCertificate(score=score, target_risk=target_risk, delta=delta, n=n, certified=False,
                               threshold=None, calibration_coverage=0.0, calibration_risk=0.0,
                               reason=f"no threshold on {score} certifies selective risk <= {target_risk:g} with "
                                      f"confidence {1 - delta:g} from n={n} calibration questions (error rate "
                                      f"answering all: {overall:.3f})")
    j = max(rejected)
    return RiskCertificate(score=score, target_risk=target_risk, delta=delta, n=n, certified=True,
                           threshold=float(lambdas[j]), calibration_coverage=int(kept[j]) / n,
                           calibration_risk=int(wrong[j]) / int(kept[j]))


def hb_pvalues(kept: torch.Tensor, wrong: torch.Tensor, epsilon: float) -> torch.Tensor:
    """:func:`core.conformal.hoeffding_bentkus_pvalue` for many (n, errors) pairs at once: kept [G] answered
    counts, wrong [G] errors among them → [G] p-values (1 where nothing is answered)."""
    n = kept.to(_F)
    risk = torch.where(n > 0, wrong.to(_F) / n.clamp_min(1), torch.zeros_like(n))
    r = risk.clamp(max=epsilon)
    kl = torch.special.xlogy(r, r / epsilon) + torch.special.xlogy(1 - r, (1 - r) / (1 - epsilon))
    hoeffding = torch.exp(-n * kl)
    k = torch.ceil(n * risk - 1e-12)
    i = torch.arange(0, int(n.max().item()) + 1 if n.numel() else 1, dtype=_F)[None, :]  # [1, n_max + 1]
    log_terms = (torch.lgamma(n[:, None] + 1) - torch.lgamma(i + 1) - torch.lgamma((n[:, None] - i).clamp_min(0) + 1)
                 + i * math.log(epsilon) + (n[:, None] - i) * math.log(1 - epsilon))
    log_terms = log_terms.masked_fill((i > k[:, None]) | (i > n[:, None]), -math.inf)
    binomial = torch.logsumexp(log_terms, dim=-1).exp()
    p = torch.minimum(torch.minimum(hoeffding, math.e * binomial), torch.ones_like(n))
    return torch.where(n > 0, p, torch.ones_like(n))


class RiskReference(BaseModel):
    """What a bundle stores for risk control (``manifest.calibration.risk``): each abstention score of its n
    calibration questions (in question order) and whether the served argmax was right, plus defaults: δ, the
    score, and an optional bundle-wide target risk ε (None: only requests ask for risk control)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(gt=0)
    data_hash: str
    delta: float = Field(default=0.05, gt=0, lt=1)
    score: str = "one_minus_max_probability"
    target_risk: float | None = Field(default=None, gt=0, lt=1)
    values: dict[str, tuple[float, ...]]
    correct: tuple[bool, ...]

    @model_validator(mode="after")
    def _consistent(self) -> RiskReference:
        unknown = sorted(set(self.values) - set(SCORE_RANGES))
        if unknown:
            raise ValueError(f"unknown risk-control scores {unknown}")
        if self.score not in self.values:
            raise ValueError(f"default score {self.score!r} has no calibration values")
        if len(self.correct) != self.n or any(len(v) != self.n for v in self.values.values()):
            raise ValueError(f"every score and 'correct' need n = {self.n} values")
        return self

    def certify(self, score: str, target_risk: float, delta: float) -> RiskCertificate:
        """Learn-then-Test on this reference (KeyError when the bundle has no values for ``score``)."""
        return learn_then_test(torch.tensor(self.values[score], dtype=_F), torch.tensor(self.correct),
                               score=score, target_risk=target_risk, delta=delta)


def risk_reference(scores: Mapping[str, torch.Tensor], correct: torch.Tensor, data_hash: str, *,
                   delta: float = 0.05, score: str = "one_minus_max_probability",
                   target_risk: float | None = None) -> RiskReference:
    """From the calibration questions' abstention scores (name → [n]) and correctness [n] bool."""
    return RiskReference(n=int(correct.numel()), data_hash=data_hash, delta=delta, score=score,
                         target_risk=target_risk, correct=tuple(bool(c) for c in correct.reshape(-1).tolist()),
                         values={k: tuple(float(x) for x in v.reshape(-1).tolist()) for k, v in scores.items()})


# --- anytime-valid bounds ------------------------------------------------------------------------------

CS_DESIGN_SAMPLES = 200  # the mixture is tuned to be tightest near this many labels (valid at every count)


def mixture_rho(design_samples: int = CS_DESIGN_SAMPLES, level: float = 0.05) -> float:
    """ρ of the normal mixture, chosen so that the boundary is near its tightest around t = ``design_samples``
    (ρ = v / (2 log(1/a) + log(1 + 2 log(1/a))) with v = t/4; a heuristic: every ρ > 0 gives a valid sequence)."""
    v = design_samples / 4.0
    return v / (2.0 * math.log(1.0 / level) + math.log(1.0 + 2.0 * math.log(1.0 / level)))


def anytime_radius(t: int, level: float, rho: float | None = None) -> float:
    """Half-width at count t of a (1 − level) confidence sequence for the mean of [0, 1] outcomes:
    sqrt((t/4 + ρ) log((t/4 + ρ) / (ρ level²))) / t (inf at t = 0)."""
    if t <= 0:
        return math.inf
    rho = mixture_rho(level=level) if rho is None else rho
    v = t / 4.0
    return math.sqrt((v + rho) * math.log((v + rho) / (rho * level * level))) / t


def anytime_lower_bound(successes: float, t: int, level: float, rho: float | None = None) -> float:
    """Lower end (clipped at 0) of the confidence sequence after ``successes`` of t outcomes."""
    if t <= 0:
        return 0.0
    return max(0.0, successes / t - anytime_radius(t, level, rho))
