"""Laplace-LoRA math: Jacobians vs autograd, KFAC vs the dense GGN, posterior algebra, probit vs MC."""

from __future__ import annotations

import math

import pytest
import torch

from core.answers import AnswerFormat
from core.laplace import (
    DiagBlock,
    Eigen,
    KronBlock,
    LaplacePosterior,
    mc_logits,
    probit,
    softmax_hessian_sqrt,
    standard_normal,
)
from core.laplace_tap import LoraTap, Record, block_jacobians, linearize
from core.multilora import ALL_MODULES, LoraLayout, MultiLora
from core.scoring import ChoiceScorer
from training.laplace import Curvature, CurvatureConfig

RANK, ALPHA, LAYERS = 2, 4.0, (2, 3)


def random_adapter(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> dict[str, torch.Tensor]:
    multilora = MultiLora(model, LoraLayout(ALL_MODULES, LAYERS, RANK, ALPHA), num_slots=1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in multilora.factors.values():
            f.lora_A[0].copy_(torch.randn(f.lora_A[0].shape, generator=gen) * scale)
            f.lora_B[0].copy_(torch.randn(f.lora_B[0].shape, generator=gen) * scale)
    tensors = multilora.peft_state_dict(0)
    multilora.remove()
    return tensors


def test_jacobian_matches_autograd_per_question(tiny_base, tiny_questions) -> None:
    scorer = ChoiceScorer(tiny_base.model, tiny_base.tokenizer, AnswerFormat.CLOZE)
    tensors = random_adapter(tiny_base.model)
    tap = LoraTap(tiny_base.model, tensors, ALPHA / RANK)
    batch = scorer.pack(tiny_questions)
    with torch.no_grad():
        hidden = scorer.trunk(batch, LAYERS[0])
    scores, jac = linearize(scorer, tap, batch, hidden, LAYERS[0])
    # reference: plain autograd through the MultiLora slot parameters, one question and one choice at a time
    multilora = MultiLora(tiny_base.model, LoraLayout(ALL_MODULES, LAYERS, RANK, ALPHA), num_slots=1)
    multilora.load_peft_state_dict(0, tensors, ALPHA / RANK)
    params = {}
    for name, f in multilora.factors.items():
        layer, module = name.split("_", 1)
        parent = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
        params[f"{prefix}.lora_A.weight"], params[f"{prefix}.lora_B.weight"] = f.lora_A, f.lora_B
        f.lora_A.requires_grad_(True)
        f.lora_B.requires_grad_(True)
    try:
        for q, question in enumerate(tiny_questions):
            one = scorer.pack([question])
            with multilora.rows(torch.zeros(1, dtype=torch.long)):
                ref_scores = scorer.scores(one)[0]
            torch.testing.assert_close(ref_scores, scores[q, : len(question.choices)], atol=1e-5, rtol=1e-5)
            for k in range(len(question.choices)):
                keys = list(params)
                grads = torch.autograd.grad(ref_scores[k], [params[key] for key in keys], retain_graph=True)
                for key, grad in zip(keys, grads, strict=True):
                    torch.testing.assert_close(jac[key][q, k], grad[0], atol=2e-5, rtol=1e-4)
            for key in params:  # absent choices have zero Jacobian
                assert jac[key][q, len(question.choices):].abs().max() == 0 if len(question.choices) < 5 else True
    finally:
        multilora.remove()


def _dense_kron(block: KronBlock) -> torch.Tensor:
    """GGN approximation A ⊗ G as a dense matrix over row-major vec(W), W [out, in]."""
    g = block.out.vectors @ torch.diag(block.out.values) @ block.out.vectors.T
    a = block.inp.vectors @ torch.diag(block.inp.values) @ block.inp.vectors.T
    return torch.kron(g.double(), a.double())


def _single_linear_curvature(n: int, tokens: int, mode: str, seed: int = 0, scale: float = 1.0):
    """LoRA on one linear layer, f = mean-free sum over tokens of s·B A x_t (K = out outputs): KFAC from
    :class:`Curvature` and the exact dense GGN blocks of A and B from autograd."""
    gen = torch.Generator().manual_seed(seed)
    d_in, r, k, s = 5, 3, 4, 1.5
    a = torch.randn(r, d_in, generator=gen, dtype=torch.float64)
    b = torch.randn(k, r, generator=gen, dtype=torch.float64)
    x = torch.randn(n, tokens, d_in, generator=gen, dtype=torch.float64) * scale
    mask = torch.ones(n, tokens, dtype=torch.bool)
    curv = Curvature(CurvatureConfig(tokens=mode))  # type: ignore[arg-type]
    rec = Record(0, "q_proj", "A", "B", a.float(), b.float(), x=x.float(), u=(x @ a.T).float())
    f = s * (x @ a.T @ b.T).sum(1)  # [N, K]
    curv.update_activations(rec, mask, set())
    directions = softmax_hessian_sqrt(f)  # [C, N, K]
    for c in range(k):
        grad_v = directions[c][:, None, :].expand(n, tokens, k).float()  # ∂(L_cᵀ f)/∂v_t
        jac_a, jac_b = block_jacobians(rec, grad_v, s)
        curv.update_gradients(rec, jac_a, jac_b, grad_v, s)
    curv.num_data = n
    dense = {"A": torch.zeros(r * d_in, r * d_in, dtype=torch.float64),
             "B": torch.zeros(k * r, k * r, dtype=torch.float64)}
    for i in range(n):
        ja = torch.autograd.functional.jacobian(lambda w, i=i: s * (x[i] @ w.T @ b.T).sum(0), a)  # [K, r, in]
        jb = torch.autograd.functional.jacobian(lambda w, i=i: s * (x[i] @ a.T @ w.T).sum(0), b)  # [K, k, r]
        p = torch.softmax(f[i], -1)
        lam = torch.diag(p) - torch.outer(p, p)
        dense["A"] += ja.flatten(1).T @ lam @ ja.flatten(1)
        dense["B"] += jb.flatten(1).T @ lam @ jb.flatten(1)
    kron = curv.kron()
    return {key: (_dense_kron(kron.blocks[key]), dense[key]) for key in ("A", "B")}, curv


@pytest.mark.parametrize("mode", ["reduce", "expand"])
def test_kfac_is_exact_for_one_linear_layer_one_token_one_example(mode: str) -> None:
    blocks, curv = _single_linear_curvature(n=1, tokens=1, mode=mode)
    for approx, exact in blocks.values():
        torch.testing.assert_close(approx, exact, atol=1e-5, rtol=1e-4)
    # the diagonal GGN is exact in every case
    diag = curv.diagonal()
    torch.testing.assert_close(diag.blocks["A"].diag.flatten().double(), torch.diagonal(blocks["A"][1]),
                               atol=1e-5, rtol=1e-4)


def test_kfac_approximates_dense_ggn_with_many_examples_and_tokens() -> None:
    # moderate logits (softmax not saturated); with saturation KFAC's product of means drifts further
    blocks, curv = _single_linear_curvature(n=12, tokens=3, mode="reduce", scale=0.1)
    for approx, exact in blocks.values():
        rel = float((approx - exact).norm() / exact.norm())
        assert rel < 0.3, rel  # an approximation, but the right scale and shape
        assert abs(float(approx.trace() / exact.trace()) - 1) < 0.2
    diag = curv.diagonal()  # exact
    torch.testing.assert_close(diag.blocks["B"].diag.flatten().double(), torch.diagonal(blocks["B"][1]),
                               atol=1e-4, rtol=1e-4)


def _random_kron(gen: torch.Generator, d_out: int, d_in: int, rank: int | None = None) -> KronBlock:
    ma, mg = torch.randn(d_in, d_in, generator=gen), torch.randn(d_out, d_out, generator=gen)
    return KronBlock(Eigen.of(ma @ ma.T / d_in, rank), Eigen.of(mg @ mg.T / d_out))


@pytest.mark.parametrize("rank", [None, 3])
def test_covariance_log_det_and_samples_match_dense(rank: int | None) -> None:
    gen = torch.Generator().manual_seed(1)
    block = _random_kron(gen, 4, 6, rank)
    diag = DiagBlock(torch.rand(2, 3, generator=gen))
    post = LaplacePosterior({"w": block, "d": diag}, prior_precision=0.7)
    jac = {"w": torch.randn(2, 3, 4, 6, generator=gen), "d": torch.randn(2, 3, 2, 3, generator=gen)}
    h_w = _dense_kron(block) + 0.7 * torch.eye(24, dtype=torch.float64)
    h_d = torch.diag(diag.diag.flatten().double() + 0.7)
    want = (jac["w"].flatten(2).double() @ torch.linalg.inv(h_w) @ jac["w"].flatten(2).double().transpose(1, 2)
            + jac["d"].flatten(2).double() @ torch.linalg.inv(h_d) @ jac["d"].flatten(2).double().transpose(1, 2))
    torch.testing.assert_close(post.covariance(jac)[0], want, atol=1e-4, rtol=1e-4)
    logdet = float(torch.logdet(h_w) + torch.logdet(h_d))
    assert post.log_det_precision(0.7) == pytest.approx(logdet, rel=1e-6)
    # weight samples: empirical covariance of the block ≈ (A ⊗ G + λI)⁻¹
    draws = post.sample({"w": torch.zeros(4, 6)}, 4000, torch.Generator().manual_seed(2))
    flat = torch.stack([d["w"].flatten() for d in draws]).double()
    emp = flat.T @ flat / flat.shape[0]
    assert float((emp - torch.linalg.inv(h_w)).norm() / torch.linalg.inv(h_w).norm()) < 0.1


def test_marginal_likelihood_optimum() -> None:
    gen = torch.Generator().manual_seed(3)
    post = LaplacePosterior({"w": _random_kron(gen, 4, 5)})
    lam, evidence = post.optimize_prior_precision(nll_sum=10.0, sq_norm=2.5)
    for other in (lam * 0.8, lam * 1.25):
        assert post.log_marginal_likelihood(other, 10.0, 2.5) < evidence
    # stationarity: d/dλ [P/2 log λ − λ/2 ‖θ‖² − ½ Σ log(e + λ)] = 0
    eig = post.blocks["w"].eigenvalues().double()
    grad = 20 / (2 * lam) - 2.5 / 2 - 0.5 * float((1 / (eig + lam)).sum())
    assert abs(grad) < 1e-4


def test_probit_matches_mc_with_many_samples() -> None:
    torch.manual_seed(0)
    mean = torch.tensor([[0.5, -0.5], [2.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    cov = torch.stack([torch.diag(torch.tensor(v, dtype=torch.float64)) for v in ([0.3, 0.3], [1.0, 2.0],
                                                                                   [4.0, 0.5])])
    eps = standard_normal(200_000, 2, seed=0)
    mc = torch.softmax(mc_logits(mean, cov, eps), -1).mean(-2)
    torch.testing.assert_close(probit(mean, cov), mc, atol=0.02, rtol=0)
    # zero covariance: both are the MAP softmax; absent choices (−inf) keep probability 0
    mean3 = torch.tensor([[1.0, 0.0, float("-inf")]], dtype=torch.float64)
    zero = torch.zeros(1, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(probit(mean3, zero), torch.softmax(mean3, -1))
    cov3 = torch.diag_embed(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    samples = mc_logits(mean3, cov3, standard_normal(64, 3, 0))
    assert torch.isneginf(samples[..., 2]).all()
    # multiclass with correlated logits: the joint MC agrees with probit to a few points
    a = torch.randn(4, 4, dtype=torch.float64)
    cov4 = (a @ a.T / 4)[None]
    mean4 = torch.tensor([[0.3, -0.2, 1.0, 0.0]], dtype=torch.float64)
    mc4 = torch.softmax(mc_logits(mean4, cov4, standard_normal(200_000, 4, 1)), -1).mean(-2)
    assert float((probit(mean4, cov4) - mc4).abs().max()) < 0.06
    assert math.isclose(float(mc4.sum()), 1.0, rel_tol=1e-9)


def test_curvature_on_tiny_llama_vs_dense_ggn(tiny_base, tiny_questions) -> None:
    """fit_curvature through the real scorer: the diagonal equals diag(dense GGN) exactly, KFAC's
    predictive variances track the dense block-diagonal GGN's."""
    from training.laplace import fit_curvature
    from training.trunk import TrunkCache

    scorer = ChoiceScorer(tiny_base.model, tiny_base.tokenizer, AnswerFormat.CLOZE)
    tensors = random_adapter(tiny_base.model, seed=4, scale=0.1)
    tap = LoraTap(tiny_base.model, tensors, ALPHA / RANK)
    cache = TrunkCache(scorer, tiny_questions, LAYERS[0])
    curv = fit_curvature(scorer, tap, cache, CurvatureConfig(batch_size=3), log=lambda _: None)
    hidden, packed, labels = cache.batch(list(range(len(cache))))
    scores, jac = linearize(scorer, tap, packed, hidden, LAYERS[0])
    assert curv.nll_sum == pytest.approx(float(torch.nn.functional.cross_entropy(scores, labels, reduction="sum")),
                                         rel=1e-5)
    lam_hess = torch.stack([torch.diag(p) - torch.outer(p, p) for p in torch.softmax(scores.double(), -1)])
    kron, diag = curv.kron(), curv.diagonal()
    lam = 1.0
    exact_cov, kron_cov = torch.zeros(4, 5, 5, dtype=torch.float64), kron.covariance(jac, torch.tensor([lam]))[0]
    for key, j in jac.items():
        flat = j.flatten(2).double()  # [Q, K, P]
        dense = torch.einsum("qkp,qkl,qlr->pr", flat, lam_hess, flat)
        torch.testing.assert_close(diag.blocks[key].diag.flatten().double(), torch.diagonal(dense),
                                   atol=1e-6, rtol=1e-4)
        exact_cov += flat @ torch.linalg.inv(dense + lam * torch.eye(dense.shape[0], dtype=dense.dtype)) @ \
            flat.transpose(1, 2)
    real = torch.isfinite(scores)
    var_exact = torch.diagonal(exact_cov, dim1=1, dim2=2)[real]
    var_kron = torch.diagonal(kron_cov, dim1=1, dim2=2)[real]
    ratio = var_kron / var_exact
    assert float(ratio.min()) > 0.5 and float(ratio.max()) < 2.0, ratio
    assert float(torch.corrcoef(torch.stack([var_exact, var_kron]))[0, 1]) > 0.9
