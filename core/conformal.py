"""Split conformal answer sets and Learn-then-Test risk control (pure torch, float64).

**Conformal sets.** From n held-out labelled questions (the calibration split, used for nothing else), each
with its served probabilities p [K] and label y, a nonconformity score s(p, y) is computed:

- ``lac``: 1 − p_y (Sadinle et al. 2019: the smallest sets on average);
- ``aps``: the total probability of the choices ranked at or above y (Romano et al. 2020);
- ``raps``: aps + λ · max(0, rank(y) − k_reg) (Angelopoulos et al. 2021: penalizes long tails).

With q̂ the ⌈(n + 1)(1 − α)⌉-th smallest calibration score, the set {k : s(p, k) ≤ q̂} contains the true
answer with probability at least 1 − α for an exchangeable new question. α below 1 / (n + 1) needs a
score beyond the largest calibration one: :func:`conformal_quantile` refuses it (the bound is vacuous).
Ties keep choice order (a stable sort), as :func:`torch.argmax` does.

:class:`ConformalReference` is what a bundle's manifest stores (the sorted calibration scores), so the
server can build the set at any supported α exactly. Learn-then-Test risk control is :mod:`core.risk_control`;
its p-value, :func:`hoeffding_bentkus_pvalue` (Bates et al. 2021), is here.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

_F = torch.float64
SCORES = ("lac", "aps", "raps")
ConformityScore = Literal["lac", "aps", "raps"]


def _ranked(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Descending order (stable: ties keep choice order) and each choice's 0-based rank. probs [N, K]."""
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices  # [N, K]
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(probs.shape[-1], device=probs.device).expand_as(order))
    return order, rank


def all_scores(probs: torch.Tensor, score: str = "lac", *, raps_lambda: float = 0.01,
               raps_k: int = 1) -> torch.Tensor:
    """s(p, k) for every choice k: [N, K] (choices absent from a question have p = 0 and are never in a set
    unless q̂ allows their score). probs [N, K]."""
    p = probs.to(_F)
    if score == "lac":
        return 1.0 - p
    if score not in SCORES:
        raise ValueError(f"unknown conformity score {score!r}; choose one of {SCORES}")
    order, rank = _ranked(p)
    cumulative = torch.gather(p, -1, order).cumsum(-1)  # [N, K], by rank
    through = torch.gather(cumulative, -1, rank)  # [N, K]: mass ranked at or above k
    if score == "aps":
        return through
    return through + raps_lambda * (rank + 1 - raps_k).clamp_min(0).to(_F)


def nonconformity(probs: torch.Tensor, labels: torch.Tensor, score: str = "lac", *, raps_lambda: float = 0.01,
                  raps_k: int = 1) -> torch.Tensor:
    """The calibration scores s(p_i, y_i): [N]. probs [N, K], labels [N]."""
    scores = all_scores(probs, score, raps_lambda=raps_lambda, raps_k=raps_k)
    return scores.gather(-1, labels.long().reshape(-1, 1))[:, 0]


def quantile_rank(n: int, alpha: float) -> int:
    """⌈(n + 1)(1 − α)⌉: the 1-based rank of q̂ among n sorted calibration scores (> n: α too small)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return math.ceil((n + 1) * (1 - alpha) - 1e-12)


def min_alpha(n: int) -> float:
    """The smallest α that n calibration scores support: 1 / (n + 1)."""
    return 1.0 / (n + 1)


def conformal_quantile(sorted_scores: torch.Tensor, alpha: float) -> float:
    """q̂ from ascending calibration scores [n]; ValueError when α < 1 / (n + 1) (no finite q̂)."""
    n = sorted_scores.numel()
    k = quantile_rank(n, alpha)
    if k > n:
        raise ValueError(f"alpha {alpha:g} needs more calibration questions: with n = {n} the smallest "
                         f"supported alpha is 1/(n+1) = {min_alpha(n):.4g}")
    return float(sorted_scores[max(k, 1) - 1])


def prediction_sets(probs: torch.Tensor, qhat: float, score: str = "lac", *, raps_lambda: float = 0.01,
                    raps_k: int = 1) -> torch.Tensor:
    """bool [N, K]: choice k is in question i's set iff s(p_i, k) ≤ q̂. probs [N, K]."""
    return all_scores(probs, score, raps_lambda=raps_lambda, raps_k=raps_k) <= qhat + 1e-12


# --- Learn-then-Test --------------------------------------------------------------------------------------


def hoeffding_bentkus_pvalue(risk: float, n: int, epsilon: float) -> float:
    """p-value of H0 "true risk > ε" given the empirical risk of n losses in [0, 1] (Bates et al. 2021):
    min(exp(−n h(min(r̂, ε), ε)), e · P(Binomial(n, ε) ≤ ⌈n r̂⌉)), h the Bernoulli KL divergence."""
    if n == 0:
        return 1.0
    r = min(risk, epsilon)

    def kl(a: float, b: float) -> float:
        out = 0.0
        if a > 0:
            out += a * math.log(a / b)
        if a < 1:
            out += (1 - a) * math.log((1 - a) / (1 - b))
        return out

    hoeffding = math.exp(-n * kl(r, epsilon)) if 0 < epsilon < 1 else 1.0
    k = math.ceil(n * risk - 1e-12)
    binomial = float(torch.distributions.Binomial(n, torch.tensor(epsilon, dtype=_F)).log_prob(
        torch.arange(0, k + 1, dtype=_F)).exp().sum()) if 0 < epsilon < 1 else 1.0
    return min(1.0, hoeffding, math.e * binomial)


class ConformalReference(BaseModel):
    """A bundle's split-conformal calibration (in ``manifest.calibration.conformal``): the ascending
    nonconformity scores s(p_i, y_i) of its n held-out calibration questions under the served predictive,
    the score that made them and the bundle's default α. Any α ≥ 1/(n + 1) is served exactly from them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    score: ConformityScore = "lac"
    raps_lambda: float = Field(default=0.01, ge=0)
    raps_k: int = Field(default=1, ge=0)
    alpha: float = Field(default=0.1, gt=0, lt=1)
    n: int = Field(gt=0)
    data_hash: str
    sorted_scores: tuple[float, ...]

    @model_validator(mode="after")
    def _consistent(self) -> ConformalReference:
        scores = self.sorted_scores
        if len(scores) != self.n:
            raise ValueError(f"sorted_scores holds {len(scores)} scores, n is {self.n}")
        if any(b < a for a, b in itertools.pairwise(scores)) or not all(map(math.isfinite, scores)):
            raise ValueError("sorted_scores must be finite and ascending")
        if self.alpha < min_alpha(self.n):
            raise ValueError(f"alpha {self.alpha} is below 1/(n+1) = {min_alpha(self.n):.4g}")
        return self

    def qhat(self, alpha: float) -> float:
        """q̂ at α (ValueError when α < 1/(n + 1) or α ∉ (0, 1))."""
        return conformal_quantile(torch.tensor(self.sorted_scores, dtype=_F), alpha)

    def sets(self, probs: torch.Tensor, alpha: float) -> torch.Tensor:
        """bool [N, K]: the answer sets at α of the served probabilities probs [N, K]."""
        return prediction_sets(probs, self.qhat(alpha), self.score, raps_lambda=self.raps_lambda,
                               raps_k=self.raps_k)


def conformal_reference(probs: torch.Tensor, labels: torch.Tensor, data_hash: str, *, score: str = "lac",
                        alpha: float = 0.1, raps_lambda: float = 0.01, raps_k: int = 1) -> ConformalReference:
    """The reference of n calibration questions: probs [n, K] served probabilities, labels [n]."""
    values = nonconformity(probs, labels, score, raps_lambda=raps_lambda, raps_k=raps_k)
    return ConformalReference(score=score, raps_lambda=raps_lambda, raps_k=raps_k, alpha=alpha,  # type: ignore[arg-type]
                              n=int(values.numel()), data_hash=data_hash,
                              sorted_scores=tuple(float(v) for v in torch.sort(values).values))
