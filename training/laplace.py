"""Laplace-LoRA fitting: curvature of the K-choice likelihood over a MAP adapter, prior precision, predictive.

One pass over the training set (one forward of the upper layers and K backwards per batch, through
:class:`core.laplace_tap.LoraTap`) accumulates, for every LoRA matrix W of every adapted layer, the GGN
of ``Σ_n −log softmax(f(x_n))[y_n]`` over the K choice scores f. With ``Λ = diag(p) − ppᵀ = L Lᵀ``
(:func:`core.laplace.softmax_hessian_sqrt`) the GGN is ``Σ_{n,c} vec(J_{n,c}) vec(J_{n,c})ᵀ`` with the
pseudo-Jacobians ``J_{n,c} = Σ_t g_{n,t,c} a_{n,t}ᵀ`` (module inputs a, output gradients g of Lᵀ_c f):

- KFAC ``reduce`` (default; the per-question score aggregates over tokens): ``A = (1/N) Σ_n ā_n ā_nᵀ``
  with ā the mean input over the question's tokens, ``G = Σ_{n,c} ĝ_{n,c} ĝ_{n,c}ᵀ`` with ĝ the sum of
  output gradients over tokens. Exact when a question's tokens share one input (e.g. one token, N = 1).
- KFAC ``expand`` (tokens as independent examples): ``A = mean_{n,t} a aᵀ``, ``G = Σ_{n,t,c} g gᵀ``.
- diagonal: ``Σ_{n,c} J_{n,c}²`` exactly (per-question Jacobians from the same backwards).

The A blocks of q/k/v (and gate/up) of one layer read the same input, so they share one activation
factor. Factors wider than ``max_factor_dim`` keep their top ``low_rank`` eigenpairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from core.answers import packed_length
from core.laplace import DiagBlock, Eigen, KronBlock, LaplacePosterior, probit, softmax_hessian_sqrt
from core.laplace_tap import LoraTap, Record, linearize
from core.predictive import laplace_outputs, laplace_prediction
from core.scoring import ChoiceScorer
from training.trunk import TrunkCache


class CurvatureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: Literal["reduce", "expand"] = "reduce"
    max_factor_dim: int = 1024  # factors wider than this are truncated (low-rank)
    low_rank: int = 256
    batch_size: int = 8


@dataclass
class Curvature:
    """Running sums over the training set (see the module docstring)."""

    config: CurvatureConfig
    act: dict[str, torch.Tensor] = field(default_factory=dict)  # factor name → Σ a aᵀ
    act_count: dict[str, float] = field(default_factory=dict)
    grad: dict[str, torch.Tensor] = field(default_factory=dict)  # peft key → Σ g gᵀ
    diag: dict[str, torch.Tensor] = field(default_factory=dict)  # peft key → Σ J²
    in_factor: dict[str, str] = field(default_factory=dict)  # peft key → activation factor name
    nll_sum: float = 0.0
    num_data: int = 0

    def _add(self, table: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
        table[key] = table[key] + value if key in table else value.clone()

    def update_activations(self, rec: Record, mask: torch.Tensor, seen: set[str]) -> None:
        """Add the module's input statistics (A's input x, B's input u) unless this batch already added
        the factor (q/k/v share one). mask [Q, T] bool = real tokens."""
        assert rec.x is not None and rec.u is not None
        for key, name, inputs in ((rec.key_a, rec.group, rec.x), (rec.key_b, f"{rec.key_b}.in", rec.u)):
            self.in_factor[key] = name
            if name in seen:
                continue
            seen.add(name)
            x = inputs.float()
            if self.config.tokens == "expand":
                flat = x[mask]  # [tokens, d]
            else:
                weights = mask.float() / mask.float().sum(1, keepdim=True).clamp_min(1.0)
                flat = torch.einsum("qt,qtd->qd", weights, x)  # mean input per question
            self._add(self.act, name, flat.T @ flat)
            self.act_count[name] = self.act_count.get(name, 0.0) + float(flat.shape[0])

    def update_gradients(self, rec: Record, jac_a: torch.Tensor, jac_b: torch.Tensor, grad_v: torch.Tensor,
                         scaling: float) -> None:
        """Add one direction's output statistics. jac_a [Q, r, in], jac_b [Q, out, r], grad_v [Q, T, out]."""
        g_v = grad_v.float() * scaling
        g_u = g_v @ rec.b.detach()  # [Q, T, r]
        if self.config.tokens == "expand":
            g_v, g_u = g_v.flatten(0, 1), g_u.flatten(0, 1)
        else:
            g_v, g_u = g_v.sum(1), g_u.sum(1)
        self._add(self.grad, rec.key_a, g_u.T @ g_u)
        self._add(self.grad, rec.key_b, g_v.T @ g_v)
        self._add(self.diag, rec.key_a, jac_a.pow(2).sum(0))
        self._add(self.diag, rec.key_b, jac_b.pow(2).sum(0))

    def rescale(self, num_data: int) -> None:
        """Scale the sums from a subset of the training set to ``num_data`` questions (the GGN and the NLL
        are sums over the data; the activation factors are means and stay)."""
        factor = num_data / max(self.num_data, 1)
        self.grad = {k: v * factor for k, v in self.grad.items()}
        self.diag = {k: v * factor for k, v in self.diag.items()}
        self.nll_sum *= factor
        self.num_data = num_data

    def kron(self) -> LaplacePosterior:
        """The KFAC posterior (prior precision 1 until chosen)."""
        factors: dict[str, Eigen] = {}

        def eig(name: str, matrix: torch.Tensor) -> Eigen:
            if name not in factors:
                rank = self.config.low_rank if matrix.shape[0] > self.config.max_factor_dim else None
                factors[name] = Eigen.of(matrix, rank)
            return factors[name]

        blocks: dict[str, KronBlock | DiagBlock] = {}
        for key, grad in self.grad.items():
            name = self.in_factor[key]
            act = self.act[name] / max(self.act_count[name], 1.0)  # mean over questions (or tokens)
            blocks[key] = KronBlock(eig(name, act), eig(f"{key}.grad", grad))
        return LaplacePosterior(blocks)

    def diagonal(self) -> LaplacePosterior:
        return LaplacePosterior({k: DiagBlock(v.clone()) for k, v in self.diag.items()})


def token_mask(cache: TrunkCache, idx: Sequence[int], length: int) -> torch.Tensor:
    """[B, T] bool: the real (non-padding) tokens of questions ``idx`` packed one per row."""
    lengths = torch.tensor([packed_length(cache.encoded[i], cache.scorer.answer_format) for i in idx])
    return torch.arange(length)[None, :] < lengths[:, None]


def fit_curvature(scorer: ChoiceScorer, tap: LoraTap, cache: TrunkCache, config: CurvatureConfig,
                  log: Callable[[str], Any] = print) -> Curvature:
    """Accumulate KFAC factors, the diagonal GGN and the MAP NLL over every question in ``cache``."""
    curv = Curvature(config)
    split = cache.split
    for lo in tqdm(range(0, len(cache), config.batch_size), desc="curvature", unit="batch", leave=False):
        idx = list(range(lo, min(lo + config.batch_size, len(cache))))
        hidden, packed, labels = cache.batch(idx)
        mask = token_mask(cache, idx, packed.input_ids.shape[1]).to(hidden.device)
        with torch.enable_grad(), tap.attach():
            rows = scorer.run_layers(hidden, packed, split, scorer.num_layers)
            scores = scorer.head(rows, packed)  # [Q, K]
            curv.nll_sum += float(torch.nn.functional.cross_entropy(scores.detach(), labels, reduction="sum"))
            curv.num_data += len(idx)
            seen: set[str] = set()
            for rec in tap.records:
                curv.update_activations(rec, mask, seen)
            directions = softmax_hessian_sqrt(scores)  # [C, Q, K]
            for c in range(directions.shape[0]):
                grads = tap.output_grads(scores, directions[c], retain_graph=c < directions.shape[0] - 1)
                for rec, grad_v in zip(tap.records, grads, strict=True):
                    jac_a, jac_b = tap.block_jacobians(rec, grad_v)
                    curv.update_gradients(rec, jac_a, jac_b, grad_v, tap.scaling)
    log(f"[laplace] curvature over {curv.num_data} questions: MAP NLL {curv.nll_sum / curv.num_data:.4f}")
    return curv


def last_layer_keys(posterior: LaplacePosterior) -> list[str]:
    """Blocks of the highest adapted decoder layer (the LLLA baseline's parameters)."""
    layer_of = {k: int(k.split(".layers.")[1].split(".")[0]) for k in posterior.blocks}
    top = max(layer_of.values())
    return [k for k, layer in layer_of.items() if layer == top]


@dataclass
class Linearized:
    """MAP scores mean [N, K] and functional covariances per posterior: name → [G, N, K, K]."""

    mean: torch.Tensor
    cov: dict[str, torch.Tensor]


def linearized_pass(scorer: ChoiceScorer, tap: LoraTap, cache: TrunkCache,
                    posteriors: dict[str, tuple[LaplacePosterior, torch.Tensor]], batch_size: int = 8,
                    desc: str = "linearize") -> Linearized:
    """Scores and ``J Σ Jᵀ`` for every cached question, for each posterior at each of its G precisions."""
    n = len(cache)
    k_max = max(len(q.choices) for q in cache.questions)
    mean = torch.full((n, k_max), float("-inf"), dtype=torch.float64)
    cov = {name: torch.zeros(len(lams), n, k_max, k_max, dtype=torch.float64)
           for name, (_, lams) in posteriors.items()}
    for lo in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False):
        idx = list(range(lo, min(lo + batch_size, n)))
        hidden, packed, _ = cache.batch(idx)
        scores, jacobians = linearize(scorer, tap, packed, hidden, cache.split)
        k = scores.shape[-1]
        mean[lo : lo + len(idx), :k] = scores.double().cpu()
        for name, (posterior, lams) in posteriors.items():
            cov[name][:, lo : lo + len(idx), :k, :k] = posterior.covariance(jacobians, lams).cpu()
    return Linearized(mean, cov)


def probit_nll(mean: torch.Tensor, cov: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL of the probit predictive for each of G covariances: cov [G, N, K, K] → [G]."""
    probs = probit(mean[None].expand(cov.shape[0], -1, -1), cov)  # [G, N, K]
    p_y = probs.gather(-1, labels[None, :, None].expand(cov.shape[0], -1, 1))[..., 0]
    return -p_y.clamp_min(1e-12).log().mean(-1)


def predictive_nll(mean: torch.Tensor, cov: torch.Tensor, labels: torch.Tensor, link: str,
                   eps: torch.Tensor | None = None) -> torch.Tensor:
    """Mean validation NLL of the served predictive of ``link`` for each of G covariances [G, N, K, K] → [G]:
    the probit, or (mc, and samples as its linearized proxy) the mean of softmax over the per-question joint
    draws eps [N, S, K] (see :mod:`core.predictive`)."""
    if link == "probit":
        return probit_nll(mean, cov, labels)
    if eps is None:
        raise ValueError(f"link {link!r} needs the per-question draws eps")
    out = []
    for g in range(cov.shape[0]):
        prediction = laplace_prediction(laplace_outputs(mean, cov[g], 1.0, eps), "mc")
        p_y = prediction.scores.probabilities.gather(-1, labels[:, None])[:, 0]
        out.append(-p_y.clamp_min(1e-12).log().mean())
    return torch.stack(out)


def prior_grid(center: float, decades: float = 4.0, points: int = 25) -> torch.Tensor:
    """Log-spaced prior precisions around ``center`` (± ``decades``)."""
    c = math.log10(center)
    return torch.logspace(c - decades, c + decades, points, dtype=torch.float64)
