"""What a bundle answers, per method: the one definition that serving, evaluation and export all call.

Every function here maps the *raw* per-question outputs of a forward (choice scores of the members,
or the linearized mean and covariance of a Laplace posterior, or a routed mixture's scores and FEU) to
the answer distribution and its uncertainty, in float64. The server's predictors and ``uqserve eval``
both go through these, so an evaluated number is the served number by construction (a test checks it
end to end on both paths).

Laplace MC noise is drawn per question from a seed derived from the bundle's seed and the question's
token ids (:func:`question_normals`), and turned into joint samples with the principal square root of
the covariance (:func:`core.laplace.mc_logits`), so a question's answer does not depend on which other
questions share its batch, on padding, or on the order of the batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from core.answers import EncodedQuestion
from core.laplace import Link, mc_logits, probit
from core.uncertainty import UncertaintyScores, decompose, entropy, tempered_probabilities

_F = torch.float64
SINGLE_MEMBER_MI_NOTE = ("mutual_information is null: a single-member bundle (MAP LoRA) has no members whose "
                         "disagreement would define it")
MOE_MI_NOTE = ("mutual_information is null: a single routed mixture of LoRA experts (UQ4CT) has no members whose "
               "disagreement would define it; feu / one_minus_feu carry its functional-level epistemic uncertainty")


@dataclass(frozen=True)
class BundlePrediction:
    """The served predictive of Q questions of one bundle.

    scores        probabilities [Q, K] and the entropy decomposition [Q] (expected entropy and MI are
                  meaningless where ``has_mi`` is False)
    member_probs  [Q, S, K] member (or posterior sample) distributions, None when there are none
    has_mi        False when the method cannot separate epistemic uncertainty (MI reported as null)
    notes         human-readable remarks that travel with every answer (why MI is null, how it was computed)
    feu           [Q] functional-level confidence of a routed mixture (method moe), else None
    """

    scores: UncertaintyScores
    member_probs: torch.Tensor | None
    has_mi: bool = True
    notes: list[str] = field(default_factory=list)
    feu: torch.Tensor | None = None


def ensemble_prediction(scores: torch.Tensor, temperature: float, weights: torch.Tensor | None) -> BundlePrediction:
    """M members' raw choice scores [Q, M, K] (−inf = absent) → softmax(s / T) per member, mixed by the
    bundle weights [M]. One member (MAP) has no mutual information: it is reported as undefined."""
    member_probs = tempered_probabilities(scores.to(_F), temperature)  # [Q, M, K]
    w = None if weights is None else weights.to(_F)
    single = scores.shape[-2] == 1
    return BundlePrediction(scores=decompose(member_probs, w), member_probs=member_probs, has_mi=not single,
                            notes=[SINGLE_MEMBER_MI_NOTE] if single else [])


def moe_prediction(scores: torch.Tensor, feu: torch.Tensor, temperature: float) -> BundlePrediction:
    """A routed mixture's scores [Q, K] and FEU [Q] → softmax(s / T); MI undefined, FEU carried along."""
    probs = tempered_probabilities(scores.to(_F), temperature)
    return BundlePrediction(scores=decompose(probs[:, None, :]), member_probs=None, has_mi=False,
                            notes=[MOE_MI_NOTE], feu=feu.to(_F))


# --- Laplace -------------------------------------------------------------------------------------------


def question_seed(encoded: EncodedQuestion, bundle_seed: int) -> int:
    """A 63-bit seed from the bundle's seed and the question's exact token ids (prefix and choices)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{bundle_seed}|".encode())
    h.update(",".join(map(str, encoded.prefix_ids)).encode())
    for choice in encoded.choice_ids:
        h.update(b"|" + ",".join(map(str, choice)).encode())
    return int.from_bytes(h.digest(), "little") >> 1


def question_normals(encoded: Sequence[EncodedQuestion], bundle_seed: int, samples: int,
                     k_max: int | None = None) -> torch.Tensor:
    """Standard normal draws ε [Q, S, K_max] per question, each from its own :func:`question_seed`; entries
    past a question's K choices are zero (they meet zero rows of its covariance)."""
    k_max = k_max or max(len(e.choice_ids) for e in encoded)
    out = torch.zeros(len(encoded), samples, k_max, dtype=_F)
    for i, e in enumerate(encoded):
        k = len(e.choice_ids)
        gen = torch.Generator().manual_seed(question_seed(e, bundle_seed))
        out[i, :, :k] = torch.randn(samples, k, generator=gen, dtype=_F)
    return out


def laplace_outputs(mean: torch.Tensor, cov: torch.Tensor, temperature: float, eps: torch.Tensor) -> torch.Tensor:
    """Raw per-question Laplace outputs [Q, 1 + S, K]: row 0 the log probit predictive, rows 1..S the joint
    samples of the linearized scores, all at temperature T (scores / T, covariance / T²).
    mean [Q, K] (−inf = absent), cov [Q, K, K], eps [Q, S, K] from :func:`question_normals`."""
    absent = torch.isneginf(mean)
    mu = mean.to(_F) / temperature
    sigma = cov.to(_F) / (temperature * temperature)
    keep = (~absent).to(_F)
    sigma = sigma * keep[:, :, None] * keep[:, None, :]  # absent choices: no variance, no covariance
    log_probs = probit(mu, sigma).clamp_min(1e-300).log().masked_fill(absent, float("-inf"))
    samples = mc_logits(mu.masked_fill(absent, 0.0), sigma, eps).masked_fill(absent[:, None, :], float("-inf"))
    return torch.cat([log_probs[:, None, :], samples], dim=1)


def laplace_prediction(outputs: torch.Tensor, link: Link, description: str = "laplace") -> BundlePrediction:
    """Raw outputs [Q, 1 + S, K] of :func:`laplace_outputs` → the served predictive of a probit or mc link.

    - probit: probabilities and predictive entropy from the probit; MI from the S joint samples
      (``H[mean] − mean H``); expected entropy = predictive entropy − MI (clamped at 0).
    - mc: everything from the S samples through :func:`core.uncertainty.decompose`.
    (The ``samples`` link is an ordinary ensemble of weight samples: :func:`ensemble_prediction`.)"""
    member_probs = torch.softmax(outputs[:, 1:].to(_F), dim=-1)  # [Q, S, K]
    mc = decompose(member_probs)
    notes = [f"{description}: MI from {member_probs.shape[1]} joint samples of the linearized choice scores, "
             "seeded per question"]
    if link == "mc":
        return BundlePrediction(scores=mc, member_probs=member_probs, notes=notes)
    if link != "probit":
        raise ValueError(f"laplace_prediction serves the probit and mc links, not {link!r}")
    probs = torch.softmax(outputs[:, 0].to(_F), dim=-1)
    total = entropy(probs)
    scores = UncertaintyScores(probabilities=probs, predictive_entropy=total,
                               expected_entropy=(total - mc.mutual_information).clamp_min(0.0),
                               mutual_information=mc.mutual_information, max_probability=probs.max(-1).values)
    return BundlePrediction(scores=scores, member_probs=member_probs, notes=notes)
