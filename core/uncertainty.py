"""Uncertainty of a weighted set of member distributions, in nats (pure torch).

With member probabilities ``p_m`` (``[..., M, K]``) and weights ``w_m`` (``[M]`` or ``[..., M]``, summing to 1):

- predictive mean        ``p̄ = Σ_m w_m p_m``
- predictive entropy     ``H[p̄] = −Σ_k p̄_k log p̄_k``          (total uncertainty)
- expected entropy       ``E_w H[p_m] = Σ_m w_m H[p_m]``      (aleatoric)
- mutual information     ``H[p̄] − E_w H[p_m]``               (epistemic, the members' disagreement)

``0 ≤ MI ≤ H[p̄] ≤ log K`` holds by concavity of entropy; MI is clamped at 0 against rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along ``dim``; ``0 · log 0 = 0``. probs [..., K] → [...]."""
    logs = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
    return -(probs * logs).masked_fill(probs <= 0, 0.0).sum(dim)


def _normalized_weights(weights: torch.Tensor | None, members: int, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.full((members,), 1.0 / members, dtype=like.dtype, device=like.device)
    weights = weights.to(dtype=like.dtype, device=like.device)
    if (weights < 0).any():
        raise ValueError("member weights must be non-negative")
    return weights / weights.sum(-1, keepdim=True)


def predictive(member_probs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted predictive mean. member_probs [..., M, K], weights [M] or [..., M] → [..., K]."""
    w = _normalized_weights(weights, member_probs.shape[-2], member_probs)
    return (w[..., :, None] * member_probs).sum(-2)


@dataclass(frozen=True)
class UncertaintyScores:
    """All fields share the leading shape ``[...]`` of the input; ``probabilities`` adds ``K``."""

    probabilities: torch.Tensor  # [..., K] predictive mean p̄
    predictive_entropy: torch.Tensor  # [...] H[p̄]
    expected_entropy: torch.Tensor  # [...] Σ w_m H[p_m]
    mutual_information: torch.Tensor  # [...] H[p̄] − Σ w_m H[p_m]
    max_probability: torch.Tensor  # [...] max_k p̄_k


def decompose(member_probs: torch.Tensor, weights: torch.Tensor | None = None) -> UncertaintyScores:
    """Predictive distribution and its entropy decomposition. member_probs [..., M, K], weights [M] or [..., M]."""
    w = _normalized_weights(weights, member_probs.shape[-2], member_probs)
    mean = (w[..., :, None] * member_probs).sum(-2)
    total = entropy(mean)
    expected = (w * entropy(member_probs)).sum(-1)
    return UncertaintyScores(
        probabilities=mean,
        predictive_entropy=total,
        expected_entropy=expected,
        mutual_information=(total - expected).clamp_min(0.0),
        max_probability=mean.max(-1).values,
    )


def tempered_probabilities(scores: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """softmax(scores / T) over the last dim; -inf scores (absent choices) get probability 0."""
    return torch.softmax(scores / temperature, dim=-1)
