"""Laplace-LoRA (Yang et al. 2023): the posterior over one LoRA adapter and its predictive, shared by
training and serving.

Posterior. For each LoRA matrix W (a module's ``lora_A`` [r, in] or ``lora_B`` [out, r]) the precision
is ``H_W + λ I`` with the generalized Gauss–Newton block ``H_W`` of the K-choice likelihood and the
isotropic prior precision λ. Blocks of different matrices are independent (block-diagonal).

- ``kron`` (KFAC): ``H_W ≈ A ⊗ G``, A the activation factor (in × in), G the output-gradient factor
  (out × out). Both are stored eigendecomposed, ``A = U_A diag(a) U_Aᵀ``, so ``(A ⊗ G + λI)⁻¹`` is exact:
  in the rotated basis ``J̃ = U_Gᵀ J U_A`` it is diagonal with entries ``1 / (g_j a_i + λ)``. A factor may
  be truncated to its top-k eigenpairs (low-rank, for wide layers); directions outside the kept span
  then carry the prior precision λ alone.
- ``diag``: ``H_W ≈ diag(GGN)``, exact diagonal.
- ``llla``: ``kron`` restricted to the LoRA matrices of the last adapted layer (the rest stays at MAP).

Predictive (linearized / GLM). With the choice scores ``f(x; θ)`` [K] and their Jacobian J [K, P] at the
MAP θ*, ``f ~ N(μ = f(x; θ*), Σ_f = J Σ Jᵀ)`` [K, K]; :meth:`LaplacePosterior.covariance` sums
``J_W Σ_W J_Wᵀ`` over blocks for a batch of questions. The choice distribution is then either the
pairwise probit approximation (:func:`probit`) or the mean of
``softmax(μ + Σ_f^{1/2} ε_s)`` over S joint samples (:func:`mc_logits`); the samples also give
the mutual information through :func:`core.uncertainty.decompose`. :meth:`LaplacePosterior.sample`
draws whole weight samples θ* + Σ^{1/2} ε (the ensemble-compatible members).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from core.calibration import golden_section_minimize

PROBIT_SCALE = math.pi / 8
Structure = Literal["kron", "diag", "llla"]
Link = Literal["probit", "mc", "samples"]


class LaplaceConfig(BaseModel):
    """``method_config`` of a ``laplace`` bundle: which posterior and predictive the server uses."""

    model_config = ConfigDict(extra="allow")

    structure: Structure = "kron"
    link: Link = "probit"  # probit: probabilities from the probit; MI from the joint MC samples
    mc_samples: int = Field(default=32, gt=1)
    seed: int = 0  # the joint MC draws ε are fixed per bundle (same question → same answer)
    prior_precision: dict[str, float] = {}  # structure → λ
    map_member: str = "map"
    sample_members: list[str] = []
    artifact: dict[str, str] = {"kron": "kfac", "diag": "diag", "llla": "kfac"}  # structure → artifact role
    blocks: dict[str, Any] = {}  # structure → serialized block table (see LaplacePosterior.to_tensors)


@dataclass
class Eigen:
    """One Kronecker factor as (possibly truncated) eigenpairs. vectors [d, k], values [k] ≥ 0."""

    vectors: torch.Tensor
    values: torch.Tensor

    @classmethod
    def of(cls, matrix: torch.Tensor, rank: int | None = None) -> Eigen:
        """Eigendecomposition of a symmetric PSD factor [d, d], keeping the top ``rank`` pairs."""
        values, vectors = torch.linalg.eigh(matrix.double())
        values = values.clamp_min(0.0)
        if rank is not None and rank < values.shape[0]:
            values, vectors = values[-rank:], vectors[:, -rank:]
        return cls(vectors.float().contiguous(), values.float().contiguous())

    @property
    def full(self) -> bool:
        return self.vectors.shape[0] == self.vectors.shape[1]


@dataclass
class KronBlock:
    """Precision ``A ⊗ G + λI`` of one LoRA matrix [out, in]; ``inp`` = A (in), ``out`` = G (out)."""

    inp: Eigen
    out: Eigen

    @property
    def full(self) -> bool:
        return self.inp.full and self.out.full

    @property
    def num_params(self) -> int:
        return self.out.vectors.shape[0] * self.inp.vectors.shape[0]

    def eigenvalues(self) -> torch.Tensor:
        """GGN eigenvalues in the rotated basis: [k_out, k_in]."""
        return self.out.values[:, None] * self.inp.values[None, :]

    def project(self, jac: torch.Tensor) -> torch.Tensor:
        """Rotate Jacobian blocks into the eigenbasis: [..., out, in] → [..., k_out, k_in]."""
        return self.out.vectors.T @ jac.float() @ self.inp.vectors


@dataclass
class DiagBlock:
    """Precision ``diag(d) + λI`` of one LoRA matrix. diag [out, in]."""

    diag: torch.Tensor

    full = True

    @property
    def num_params(self) -> int:
        return self.diag.numel()

    def eigenvalues(self) -> torch.Tensor:
        return self.diag

    def project(self, jac: torch.Tensor) -> torch.Tensor:
        return jac.float()


Block = KronBlock | DiagBlock


class LaplacePosterior:
    """Block-diagonal Laplace posterior over one adapter's LoRA matrices (keys = peft tensor keys)."""

    def __init__(self, blocks: dict[str, Block], prior_precision: float = 1.0) -> None:
        self.blocks = blocks
        self.prior_precision = float(prior_precision)

    @property
    def num_params(self) -> int:
        return sum(b.num_params for b in self.blocks.values())

    def subset(self, keys: list[str]) -> LaplacePosterior:
        return LaplacePosterior({k: self.blocks[k] for k in keys}, self.prior_precision)

    # --- evidence ---------------------------------------------------------------------------------------

    def log_det_precision(self, prior_precision: float) -> float:
        """log det(H + λI) = Σ log(eig + λ), the truncated directions contributing log λ each."""
        lam, total = float(prior_precision), 0.0
        for block in self.blocks.values():
            eig = block.eigenvalues().double()
            total += float(torch.log(eig + lam).sum()) + (block.num_params - eig.numel()) * math.log(lam)
        return total

    def log_marginal_likelihood(self, prior_precision: float, nll_sum: float, sq_norm: float) -> float:
        """Laplace evidence ``−Σ NLL(θ*) − λ/2 ‖θ*‖² + P/2 log λ − ½ log det(H + λI)`` (2π terms cancel)."""
        lam = float(prior_precision)
        return (-nll_sum - 0.5 * lam * sq_norm + 0.5 * self.num_params * math.log(lam)
                - 0.5 * self.log_det_precision(lam))

    def optimize_prior_precision(self, nll_sum: float, sq_norm: float, lo: float = 1e-4,
                                 hi: float = 1e6) -> tuple[float, float]:
        """(λ, log evidence) maximizing the evidence: log grid over [lo, hi], then golden section."""
        grid = torch.logspace(math.log10(lo), math.log10(hi), 61, dtype=torch.float64).tolist()
        values = [self.log_marginal_likelihood(lam, nll_sum, sq_norm) for lam in grid]
        best = max(range(len(grid)), key=values.__getitem__)
        a, b = math.log(grid[max(best - 1, 0)]), math.log(grid[min(best + 1, len(grid) - 1)])

        def f(log_lam: float) -> float:
            return -self.log_marginal_likelihood(math.exp(log_lam), nll_sum, sq_norm)

        lam = math.exp(golden_section_minimize(f, a, b, tol=1e-6))
        return lam, -f(math.log(lam))

    # --- functional covariance -----------------------------------------------------------------------

    def covariance(self, jacobians: Mapping[str, torch.Tensor],
                   prior_precisions: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ_f = Σ_W J_W (H_W + λI)⁻¹ J_Wᵀ`` for Q questions: jacobians key → [Q, K, out, in] (keys
        without a block are ignored). Returns [G, Q, K, K] (float64) for G prior precisions [G] (default:
        the posterior's own λ)."""
        lams = (torch.tensor([self.prior_precision]) if prior_precisions is None
                else prior_precisions.reshape(-1)).double()
        cov: torch.Tensor | None = None
        for key, block in self.blocks.items():
            jac = jacobians.get(key)
            if jac is None:
                continue
            z = block.project(jac).flatten(2)  # [Q, K, P̃]
            eig = block.eigenvalues().flatten().float()
            parts = []
            for lam in lams.tolist():
                zw = z / (eig + lam)
                part = (zw @ z.transpose(1, 2)).double()  # [Q, K, K]
                if not block.full:  # truncated directions: precision λ
                    flat = jac.float().flatten(2)
                    rest = (flat @ flat.transpose(1, 2) - z @ z.transpose(1, 2)).double()
                    part = part + rest / lam
                parts.append(part)
            stacked = torch.stack(parts)
            cov = stacked if cov is None else cov + stacked
        if cov is None:
            raise ValueError("no Jacobian matches a posterior block")
        return 0.5 * (cov + cov.transpose(-1, -2))

    # --- weight samples --------------------------------------------------------------------------------

    def sample(self, weights: Mapping[str, torch.Tensor], count: int, generator: torch.Generator,
               prior_precision: float | None = None) -> list[dict[str, torch.Tensor]]:
        """``count`` draws θ* + Σ^{1/2} ε of the tensors in ``weights`` (peft keys; keys without a block
        stay at θ*)."""
        lam = self.prior_precision if prior_precision is None else float(prior_precision)
        out = []
        for _ in range(count):
            drawn = {}
            for key, w in weights.items():
                block = self.blocks.get(key)
                if block is None:
                    drawn[key] = w.clone()
                    continue
                eig = block.eigenvalues().float()
                z = torch.randn(eig.shape, generator=generator) / (eig + lam).sqrt()
                if isinstance(block, DiagBlock):
                    drawn[key] = w + z.reshape(w.shape)
                    continue
                uo, ui = block.out.vectors, block.inp.vectors
                noise = uo @ z @ ui.T
                if not block.full:
                    xi = torch.randn(w.shape, generator=generator)
                    noise = noise + (xi - uo @ (uo.T @ xi @ ui) @ ui.T) / math.sqrt(lam)
                drawn[key] = w + noise
            out.append(drawn)
        return out

    # --- storage ---------------------------------------------------------------------------------------

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        """(safetensors dict, block table). Kronecker factors shared between blocks are stored once."""
        tensors: dict[str, torch.Tensor] = {}
        table: dict[str, list[str]] = {}
        names: dict[int, str] = {}
        for key, block in self.blocks.items():
            if isinstance(block, DiagBlock):
                tensors[f"diag.{key}"] = block.diag.contiguous()
                table[key] = [f"diag.{key}"]
                continue
            refs = []
            for factor in (block.inp, block.out):
                if id(factor) not in names:
                    names[id(factor)] = f"f{len(names)}"
                    tensors[f"{names[id(factor)]}.vectors"] = factor.vectors.contiguous()
                    tensors[f"{names[id(factor)]}.values"] = factor.values.contiguous()
                refs.append(names[id(factor)])
            table[key] = refs
        return tensors, table

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], table: Mapping[str, list[str]],
                     prior_precision: float) -> LaplacePosterior:
        factors: dict[str, Eigen] = {}
        blocks: dict[str, Block] = {}
        for key, refs in table.items():
            if len(refs) == 1:
                blocks[key] = DiagBlock(tensors[refs[0]].float())
                continue
            for ref in refs:
                if ref not in factors:
                    factors[ref] = Eigen(tensors[f"{ref}.vectors"].float(), tensors[f"{ref}.values"].float())
            blocks[key] = KronBlock(factors[refs[0]], factors[refs[1]])
        return cls(blocks, prior_precision)


# --- predictive ---------------------------------------------------------------------------------------


def softmax_hessian_sqrt(scores: torch.Tensor) -> torch.Tensor:
    """Columns of L with ``L Lᵀ = diag(p) − p pᵀ``, p = softmax(scores): [K (column c), Q, K], where
    ``L[:, c] = √p_c (e_c − p)``. scores [Q, K] (−inf = absent: its column is 0)."""
    p = torch.softmax(scores.detach().double(), dim=-1)  # [Q, K]
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
    cols = p.sqrt().T[:, :, None] * (eye[:, None, :] - p[None, :, :])  # [C, Q, K]
    return cols.to(scores.dtype)


def probit(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Pairwise (mean-field) probit approximation of ``E[softmax(f)]``, f ~ N(mean, cov):

        p_k ∝ 1 / Σ_j exp(−(μ_k − μ_j) / sqrt(1 + π/8 · Var(f_k − f_j)))

    renormalized over k. It depends only on score *differences*, so it is invariant to shifting all K
    scores (ours are log-likelihoods, not centred logits; the per-logit ``softmax(μ_k / sqrt(1 + π/8
    Σ_kk))`` is not), uses the full covariance, and is the exact binary probit for K = 2.
    mean [..., K] (−inf = absent choice, probability 0), cov [..., K, K] → [..., K]."""
    mu = mean.double()
    c = cov.double()
    var = torch.diagonal(c, dim1=-2, dim2=-1)
    diff_var = (var[..., :, None] + var[..., None, :] - 2 * c).clamp_min(0.0)  # Var(f_k − f_j)
    diff = mu[..., :, None] - mu[..., None, :]  # μ_k − μ_j
    z = -diff / torch.sqrt(1.0 + PROBIT_SCALE * diff_var)
    absent = torch.isneginf(mu)
    z = z.masked_fill(absent[..., None, :], float("-inf"))  # j absent: no term
    z = z.masked_fill(absent[..., :, None], float("inf"))  # k absent: p_k = 0
    p = torch.exp(-torch.logsumexp(z, dim=-1))
    p = p.masked_fill(absent, 0.0)
    return (p / p.sum(-1, keepdim=True)).to(mean.dtype)


def standard_normal(samples: int, k: int, seed: int) -> torch.Tensor:
    """Fixed draws ε [S, K] for joint MC (seeded, so a bundle answers the same question the same way)."""
    return torch.randn(samples, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def mc_logits(mean: torch.Tensor, cov: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Joint samples of the linearized scores ``μ + Σ^{1/2} ε_s`` with the principal (symmetric) square
    root of Σ (robust to semi-definite Σ). The principal root of a covariance padded with zero rows and
    columns is the padded root of the unpadded one, so with per-question draws a question's samples do
    not depend on the batch it rides in. mean [..., K], cov [..., K, K], eps [..., S, K] (or [S, ≥K], one
    set shared by every question) → [..., S, K]."""
    k = mean.shape[-1]
    values, vectors = torch.linalg.eigh(cov.double())
    root = (vectors * values.clamp_min(0.0).sqrt()[..., None, :]) @ vectors.transpose(-1, -2)  # [..., K, K]
    e = eps[..., :k].to(root)
    noise = e @ root.transpose(-1, -2)  # [..., S, K]
    return mean.double()[..., None, :] + noise
