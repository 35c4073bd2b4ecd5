"""Laplace-LoRA export → serve round trip on the tiny model, checked against a reference that shares no code
with the server.

The server linearizes the K cloze scores through packed batches and recording hooks
(:mod:`core.laplace_tap`), applies the posterior in the Kronecker eigenbasis
(:meth:`core.laplace.LaplacePosterior.covariance`) and turns mean and covariance into answers with the
vectorized :mod:`core.predictive`. The reference here instead loads the bundle's MAP member with plain
``peft``, scores every choice as its own full sequence (prefix + choice, one forward each), takes the
Jacobian of the K scores w.r.t. every LoRA matrix with ``torch.autograd``, inverts each posterior block
*densely* from the stored eigen-factors, forms ``Σ_f = J Σ Jᵀ`` and evaluates the probit and the MC
predictive with plain Python loops. Only the definitions are shared (the prompt text, the per-question
seed of the MC draws, the peft file format).
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_threads import one_torch_thread

from core.answers import EncodedQuestion, Question
from core.bundle import Method, read_bundle
from core.laplace import LaplaceConfig
from core.predictive import question_normals
from training.ensemble import EnsembleConfig
from training.ensemble_cli import train_and_export
from training.laplace import CurvatureConfig
from training.laplace_cli import build_bundle

# bundles checked against the dense reference: name → (structure, link, curvature config)
REFERENCE_BUNDLES = {
    "tiny-laplace": ("kron", "probit", CurvatureConfig(batch_size=3)),  # λ by validation NLL (large here)
    "tiny-laplace-kron": ("kron", "probit", CurvatureConfig(batch_size=3)),  # λ by evidence (posterior matters)
    # factors wider than 100 keep their top 16 eigenpairs: down_proj's input (128), gate/up outputs (128)
    "tiny-laplace-lowrank-mc": ("kron", "mc", CurvatureConfig(batch_size=3, max_factor_dim=100, low_rank=16)),
    "tiny-laplace-diag": ("diag", "probit", CurvatureConfig(batch_size=3)),
}
MC_SAMPLES = 16


def _export(tiny_base, questions: list[Question], root: Path, name: str, members: int) -> Path:
    config = EnsembleConfig(members=members, rank=4, alpha=8.0, top_layers=2, epochs=3, batch_size=2, lr=2e-2,
                            dtype="float32", row_tokens=64)
    train_and_export(tiny_base, config, questions, questions, root, name, log=lambda _: None)
    return root / name


@pytest.fixture(scope="module")
def laplace_root(tiny_base, tiny_questions, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("laplace-bundles")
    with one_torch_thread():
        _build(tiny_base, tiny_questions, root)
    return root


def _build(tiny_base, tiny_questions: list[Question], root: Path) -> None:
    _export(tiny_base, tiny_questions, root, "tiny-map", members=1)
    _export(tiny_base, tiny_questions, root, "tiny-ens", members=2)
    build_bundle(tiny_base, root / "tiny-map", tiny_questions, tiny_questions, root, "tiny-laplace",
                 config=CurvatureConfig(batch_size=3), mc_samples=MC_SAMPLES, weight_samples=2, curvature_limit=3,
                 log=lambda _: None)
    for name, (structure, link, config) in REFERENCE_BUNDLES.items():
        if name != "tiny-laplace":
            build_bundle(tiny_base, root / "tiny-map", tiny_questions, tiny_questions, root, name, config=config,
                         prior="marglik", structure=structure, link=link, mc_samples=MC_SAMPLES,
                         curvature_limit=3, log=lambda _: None)


def test_bundle_holds_map_factors_prior_and_samples(laplace_root: Path, tiny_base) -> None:
    bundle = read_bundle(laplace_root / "tiny-laplace", expect_base=tiny_base.info)
    manifest = bundle.manifest
    assert manifest.method == Method.LAPLACE
    assert [m.name for m in manifest.members] == ["map", "sample-0", "sample-1"]
    config = LaplaceConfig.model_validate(manifest.method_config)
    assert set(config.prior_precision) == {"kron", "diag", "llla"} and min(config.prior_precision.values()) > 0
    evidence = manifest.method_config["evidence"]["kron"]
    assert evidence["log_marginal_likelihood"] < 0 and evidence["num_params"] > 0
    map_bundle = read_bundle(laplace_root / "tiny-map")
    for key, tensor in map_bundle.members["member-0"].items():  # the MAP adapter is stored unchanged
        torch.testing.assert_close(bundle.members["map"][key], tensor)
    assert not torch.equal(bundle.members["sample-0"][key], tensor)
    assert manifest.calibration.temperature == 1.0
    assert "mutual_information" in manifest.calibration.reference_histograms


# --- the independent reference ----------------------------------------------------------------------------


def _prompt(q: Question) -> str:
    """The cloze prompt, written out (core.answers.prompt_prefix documents the same template)."""
    passage = f"Passage: {q.context.strip()}\n" if q.context else ""
    return f"{passage}Question: {q.question.strip()}\nAnswer:"


@dataclass
class Linearized:
    """One question at the MAP: scores mean [K] and Jacobian blocks peft key → [K, out·in] (row-major
    flattening of the LoRA matrix [out, in]), float64; ``encoded`` the token ids (they seed the MC draws)."""

    mean: torch.Tensor
    jac: dict[str, torch.Tensor]
    encoded: EncodedQuestion


def _peft_key(name: str) -> str:
    """peft parameter name (adapter "default") → the key the adapter file stores."""
    return name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def _naive_linearize(tiny_base, member_dir: Path, map_tensors: dict[str, torch.Tensor],
                     questions: list[Question]) -> list[Linearized]:
    """MAP choice scores and their Jacobians: plain peft on a copy of the base, one forward per choice."""
    from peft import PeftModel

    base = copy.deepcopy(tiny_base.model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())  # no engine hooks copied
    model = PeftModel.from_pretrained(base, str(member_dir)).eval()
    params = {_peft_key(n): p.requires_grad_(True) for n, p in model.named_parameters() if "lora_" in n}
    assert set(params) == set(map_tensors)  # every stored tensor loaded, nothing else adapted
    for key, p in params.items():
        torch.testing.assert_close(p.detach(), map_tensors[key], atol=0, rtol=0)
    tok = tiny_base.tokenizer
    out = []
    for q in questions:
        prefix = tok(_prompt(q), add_special_tokens=False)["input_ids"]
        choices = [tok(f" {c.strip()}", add_special_tokens=False)["input_ids"] for c in q.choices]
        mean, rows = [], []
        for choice in choices:
            ids = torch.tensor([prefix + choice])
            with torch.enable_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                # token l of the choice is predicted at position len(prefix) - 1 + l; score = mean log-likelihood
                score = torch.stack([logp[len(prefix) - 1 + i, t] for i, t in enumerate(choice)]).mean()
                grads = torch.autograd.grad(score, list(params.values()))
            mean.append(float(score.detach()))
            rows.append({key: g.detach().double().flatten() for key, g in zip(params, grads, strict=True)})
        jac = {key: torch.stack([row[key] for row in rows]) for key in params}
        out.append(Linearized(torch.tensor(mean, dtype=torch.float64), jac, EncodedQuestion(prefix, choices)))
    return out


def _dense_posterior(bundle_dir: Path) -> dict[str, torch.Tensor]:
    """Each block's covariance Σ_W = (H_W + λI)⁻¹ [out·in, out·in], built densely in float64.

    Kron blocks store (activation factor A [in, in], output factor G [out, out]) as eigenpairs, possibly only
    the top k. For W [out, in] one question's pseudo-Jacobian is g aᵀ, whose row-major flattening (index
    o·in + i) is g ⊗ a, so Σ vec vecᵀ = G ⊗ A: ``torch.kron(G, A)`` in this order (the column-major
    notation of the module docstring writes it A ⊗ G). A truncated factor is U diag(v) Uᵀ of rank k, which
    leaves exactly λ on the dropped directions. Diag blocks: diag(d) + λI."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    config = manifest["method_config"]
    structure = config["structure"]
    lam = float(config["prior_precision"][structure])
    from safetensors.torch import load_file

    tensors = load_file(str(bundle_dir / manifest["artifacts"][config["artifact"][structure]]))

    def dense(ref: str) -> torch.Tensor:  # U diag(v) Uᵀ from the stored (possibly top-k) eigenpairs
        u, v = tensors[f"{ref}.vectors"].double(), tensors[f"{ref}.values"].double()
        return u @ torch.diag(v) @ u.T

    out = {}
    for key, refs in config["blocks"][structure].items():
        if len(refs) == 1:  # diagonal
            h = torch.diag(tensors[refs[0]].double().flatten())
        else:
            a_ref, g_ref = refs  # stored (input factor, output factor)
            h = torch.kron(dense(g_ref), dense(a_ref))
        out[key] = torch.linalg.inv(h + lam * torch.eye(h.shape[0], dtype=torch.float64))
    return out


def _functional_cov(lin: Linearized, posterior: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """Σ_f = Σ_W J_W Σ_W J_Wᵀ [K, K] (blocks are independent), at temperature T (Σ_f / T²)."""
    assert set(posterior) <= set(lin.jac)
    cov = sum(lin.jac[key] @ sigma @ lin.jac[key].T for key, sigma in posterior.items())
    assert isinstance(cov, torch.Tensor)
    return cov / temperature**2


def _naive_probit(mu: list[float], cov: torch.Tensor) -> list[float]:
    """p_k ∝ 1 / Σ_j exp(−(μ_k − μ_j) / sqrt(1 + π/8 · Var(f_k − f_j))), renormalized; a double loop."""
    k = len(mu)
    raw = []
    for a in range(k):
        total = 0.0
        for b in range(k):
            var = float(cov[a, a] + cov[b, b] - 2 * cov[a, b])
            total += math.exp(-(mu[a] - mu[b]) / math.sqrt(1.0 + math.pi / 8 * max(var, 0.0)))
        raw.append(1.0 / total)
    return [r / sum(raw) for r in raw]


def _entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def _softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    return [x / sum(e) for x in e]


@dataclass
class McReference:
    samples: list[list[float]]  # S sample distributions softmax(μ + Σ_f^{1/2} ε_s)
    mean: list[float]
    expected_entropy: float
    mutual_information: float


def _naive_mc(mu: list[float], cov: torch.Tensor, eps: torch.Tensor) -> McReference:
    """Joint MC with the principal square root of Σ_f (scipy's sqrtm) and the draws ε [S, K]."""
    root = scipy.linalg.sqrtm(cov.numpy())
    root = np.real_if_close(root, tol=1e6)
    assert np.isrealobj(root) and np.allclose(root @ root, cov.numpy(), rtol=1e-8, atol=1e-10)
    k = len(mu)
    samples = []
    for e in eps.tolist():
        logits = [mu[a] + sum(float(root[a, b]) * e[b] for b in range(k)) for a in range(k)]
        samples.append(_softmax(logits))
    mean = [sum(s[a] for s in samples) / len(samples) for a in range(k)]
    expected = sum(_entropy(s) for s in samples) / len(samples)
    return McReference(samples, mean, expected, _entropy(mean) - expected)


def _serve(tiny_base, root: Path, names: list[str], questions: list[Question]) -> dict[str, list]:
    from service.engine.engine import UQEngine
    from service.engine.types import AnswerOptions
    from service.settings import Settings

    settings = Settings(_env_file=None, bundle_root=root, preload_bundles=[], max_slots=8,  # type: ignore[call-arg]
                        max_lora_rank=16, max_wait_ms=30.0, torch_threads=1)
    engine = UQEngine(tiny_base, settings)
    options = AnswerOptions(return_members=True)

    async def main() -> list[list]:
        await engine.start()
        for name in names:
            await engine.load_bundle(name)
        answers = await asyncio.gather(*(engine.answer(name, questions, options) for name in names))
        await engine.stop()
        return list(answers)

    try:
        answers = asyncio.run(main())
    finally:
        engine.multilora.remove()
    return dict(zip(names, answers, strict=True))


PROB_TOL = 1e-4
"""The engine runs the base in float32 on packed rows (shared prefix, block attention) with hook-applied LoRA,
the reference in float32 on one plain sequence per choice through peft: scores agree to ~1e-6, the float32
Jacobians and covariance to ~1e-6 relative; every served probability is a float32 value."""


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's loader
def test_served_laplace_matches_a_dense_reference(laplace_root: Path, tiny_base, tiny_questions) -> None:
    names = list(REFERENCE_BUNDLES)
    served = _serve(tiny_base, laplace_root, names, tiny_questions)
    map_bundle = read_bundle(laplace_root / "tiny-laplace")
    refs = _naive_linearize(tiny_base, laplace_root / "tiny-laplace" / "members" / "map",
                            map_bundle.members["map"], tiny_questions)
    for name, (structure, link, _) in REFERENCE_BUNDLES.items():
        bundle_dir = laplace_root / name
        manifest = json.loads((bundle_dir / "manifest.json").read_text())
        config = manifest["method_config"]
        assert (config["structure"], config["link"]) == (structure, link)
        temperature = manifest["calibration"]["temperature"]
        for key, tensor in read_bundle(bundle_dir).members["map"].items():  # one MAP, so one Jacobian for all
            assert torch.equal(tensor, map_bundle.members["map"][key])
        posterior = _dense_posterior(bundle_dir)
        assert set(posterior) == set(refs[0].jac)  # kron and diag cover every LoRA matrix
        eps = question_normals([r.encoded for r in refs], config["seed"], config["mc_samples"])
        spread = 0.0
        for i, (q, ref) in enumerate(zip(tiny_questions, refs, strict=True)):
            answer = served[name][i]
            k = len(q.choices)
            mu = (ref.mean / temperature).tolist()
            cov = _functional_cov(ref, posterior, temperature)
            mc = _naive_mc(mu, cov, eps[i, :, :k])
            want = _naive_probit(mu, cov) if link == "probit" else mc.mean
            got = answer.probabilities
            assert got == pytest.approx(want, abs=PROB_TOL), (name, q.id)
            for member, sample in zip(answer.members, mc.samples, strict=True):
                assert member == pytest.approx(sample, abs=PROB_TOL), (name, q.id)
            assert answer.mutual_information == pytest.approx(mc.mutual_information, abs=PROB_TOL), (name, q.id)
            assert answer.predictive_entropy == pytest.approx(_entropy(want), abs=PROB_TOL), (name, q.id)
            # probit: expected entropy = H[probit] − MI (clamped at 0); mc: the mean entropy of the samples
            expected = mc.expected_entropy if link == "mc" else max(_entropy(want) - mc.mutual_information, 0.0)
            assert answer.expected_entropy == pytest.approx(expected, abs=PROB_TOL), (name, q.id)
            spread = max(spread, max(abs(a - b) for a, b in zip(want, _softmax(mu), strict=True)))
        if name != "tiny-laplace":
            # with λ from the evidence the posterior moves the answer far beyond the tolerance, so a wrong
            # covariance (index convention, truncation, λ) could not pass unnoticed
            assert spread > 100 * PROB_TOL, name


def test_engine_serves_laplace_alone_and_mixed_with_an_ensemble(laplace_root: Path, tiny_base,
                                                                 tiny_questions) -> None:
    from service.engine.engine import UQEngine
    from service.engine.types import AnswerOptions
    from service.settings import Settings

    settings = Settings(_env_file=None, bundle_root=laplace_root, preload_bundles=[], max_slots=8,  # type: ignore[call-arg]
                        max_lora_rank=16, max_wait_ms=30.0, torch_threads=1)
    engine = UQEngine(tiny_base, settings)
    options = AnswerOptions(return_members=True)

    async def main() -> tuple[list, list, list, list]:
        await engine.start()
        await engine.load_bundle("tiny-laplace")
        await engine.load_bundle("tiny-ens")
        lap = await engine.answer("tiny-laplace", tiny_questions, options)
        ens = await engine.answer("tiny-ens", tiny_questions, options)
        lap_mixed, ens_mixed = await asyncio.gather(engine.answer("tiny-laplace", tiny_questions, options),
                                                    engine.answer("tiny-ens", tiny_questions, options))
        await engine.stop()
        return lap, ens, lap_mixed, ens_mixed

    try:
        lap, ens, lap_mixed, ens_mixed = asyncio.run(main())
    finally:
        engine.multilora.remove()
    for i, _q in enumerate(tiny_questions):
        assert lap[i].bundle.method == "laplace" and len(lap[i].members) == MC_SAMPLES
        assert lap[i].mutual_information is not None and lap[i].mutual_information >= 0
        assert lap[i].predictive_entropy == pytest.approx(lap[i].expected_entropy + lap[i].mutual_information,
                                                          abs=1e-6) or lap[i].expected_entropy == 0
        torch.testing.assert_close(torch.tensor(lap_mixed[i].probabilities), torch.tensor(lap[i].probabilities),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(ens_mixed[i].probabilities), torch.tensor(ens[i].probabilities),
                                   atol=1e-5, rtol=1e-5)
        assert len(ens[i].members) == 2
    assert lap_mixed[0].timings.batch_rows == len(tiny_questions) * 3  # one flush: 1 row + 2 rows per question


def test_weight_sample_members_serve_as_an_ensemble(laplace_root: Path, tiny_base, tmp_path: Path,
                                                    tiny_questions) -> None:
    from service.engine.engine import UQEngine
    from service.engine.types import AnswerOptions
    from service.settings import Settings

    root = tmp_path / "b"
    shutil.copytree(laplace_root / "tiny-laplace", root / "tiny-laplace")
    manifest_file = root / "tiny-laplace" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["method_config"]["link"] = "samples"
    manifest_file.write_text(json.dumps(manifest))
    settings = Settings(_env_file=None, bundle_root=root, preload_bundles=[], max_slots=8,  # type: ignore[call-arg]
                        max_lora_rank=16, torch_threads=1)
    engine = UQEngine(tiny_base, settings)

    async def main() -> list:
        await engine.start()
        status = await engine.load_bundle("tiny-laplace")
        assert len(status.slots) == 2
        out = await engine.answer("tiny-laplace", tiny_questions, AnswerOptions(return_members=True))
        await engine.stop()
        return out

    try:
        answers = asyncio.run(main())
    finally:
        engine.multilora.remove()
    assert all(len(a.members) == 2 and abs(sum(a.probabilities) - 1) < 1e-5 for a in answers)
