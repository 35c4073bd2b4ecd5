"""UQ4CT on the tiny model: training lowers the loss, the bundle round-trips, and the server loads and answers
with it (alone, mixed with an ensemble bundle, over HTTP), reporting FEU and a null MI with its reason.

Scores and FEU are checked against a reference that shares no code with core.moe, training.uq4ct or the
engine: it reads the routers and experts from the bundle's safetensors artifact, runs each choice as its own
plain sequence (prefix + choice) through a copy of the base with its own forward hooks on the adapted
linears (router softmax and top-k by a loop over tokens, gates renormalized over the kept experts, the
kept experts' LoRA deltas added one by one), and averages the raw kept router mass over the routed layers
and the question's tokens (prefix once, every choice's tokens) for FEU.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch_threads import one_torch_thread

from core.answers import Question
from core.bundle import Method, read_bundle
from core.calibration import apply_temperature
from core.multilora import ATTENTION_MODULES, decoder_layers
from training.ensemble import EnsembleConfig
from training.ensemble_cli import train_and_export as train_and_export_ensemble
from training.uq4ct import UQ4CTConfig, moe_bundle_scores
from training.uq4ct_cli import train_and_export

CONFIG: dict[str, Any] = dict(num_experts=4, top_k=2, rank=4, alpha=8.0, top_layers=2, epochs=4, batch_size=2, lr=2e-2,
              dtype="float32", row_tokens=64)


@pytest.fixture(scope="module")
def root(tiny_base, tiny_questions, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uq4ct-bundles")
    with one_torch_thread():
        _build(tiny_base, tiny_questions, root)
    return root


def _build(tiny_base, tiny_questions: list[Question], root: Path) -> None:
    train_and_export(tiny_base, UQ4CTConfig(**CONFIG), tiny_questions, tiny_questions, root, "tiny-uq4ct",
                     log=lambda _: None)
    ens = EnsembleConfig(members=2, rank=4, alpha=8.0, top_layers=3, epochs=1, batch_size=2, lr=2e-2,
                         dtype="float32", row_tokens=64)
    train_and_export_ensemble(tiny_base, ens, tiny_questions, tiny_questions, root, "tiny-ens", log=lambda _: None)


# --- the independent reference ----------------------------------------------------------------------------


def _prompt(q: Question) -> str:
    """The cloze prompt, written out (core.answers.prompt_prefix documents the same template)."""
    passage = f"Passage: {q.context.strip()}\n" if q.context else ""
    return f"{passage}Question: {q.question.strip()}\nAnswer:"


@dataclass
class MoeReference:
    scores: list[float]  # [K] mean log-likelihood of each choice under the routed mixture
    feu: float


def _top_k(p: list[float], k: int) -> list[int]:
    """Indices of the k largest entries, ties to the lower index."""
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    return order[:k]


def _naive_moe(tiny_base, bundle_dir: Path, questions: list[Question]) -> list[MoeReference]:
    from safetensors.torch import load_file

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    lora, config = manifest["lora"], manifest["method_config"]
    tensors = load_file(str(bundle_dir / manifest["artifacts"]["moe"]))
    top_k, scaling = int(config["top_k"]), lora["alpha"] / lora["rank"]
    routed = sorted(lora["layers"])
    assert {"q_proj", "k_proj", "v_proj"} <= set(lora["target_modules"])  # they read input_layernorm's output
    model = copy.deepcopy(tiny_base.model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # no engine hooks copied
    gates: dict[int, list[dict[int, float]]] = {}  # layer → per token {kept expert: renormalized gate}
    kept_mass: dict[int, list[float]] = {}  # layer → per token raw kept softmax mass

    def hook(layer: int, module: str):
        parent = "self_attn" if module in ATTENTION_MODULES else "mlp"
        lora_a = tensors[f"layers.{layer}.{parent}.{module}.experts.lora_A"].double()  # [N, r, in]
        lora_b = tensors[f"layers.{layer}.{parent}.{module}.experts.lora_B"].double()  # [N, out, r]

        def add(_m: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            x = inputs[0][0].double()  # [T, in], batch of one sequence
            if module == "q_proj":  # the layer's router reads the normalized hidden state, first here
                logits = x @ tensors[f"layers.{layer}.router.weight"].double().T  # [T, N]
                gates[layer], kept_mass[layer] = [], []
                for row in logits.tolist():
                    top = max(row)
                    e = [math.exp(v - top) for v in row]
                    p = [v / sum(e) for v in e]
                    kept = _top_k(p, top_k)
                    mass = sum(p[i] for i in kept)
                    gates[layer].append({i: p[i] / mass for i in kept})
                    kept_mass[layer].append(mass)
            delta = torch.zeros(x.shape[0], output.shape[-1], dtype=torch.float64)
            for t, token_gates in enumerate(gates[layer]):
                for i, g in token_gates.items():
                    delta[t] += g * scaling * (lora_b[i] @ (lora_a[i] @ x[t]))
            return output + delta.to(output.dtype)[None]

        return add

    layers = decoder_layers(model)
    for layer in routed:
        for module in lora["target_modules"]:
            parent = "self_attn" if module in ATTENTION_MODULES else "mlp"
            getattr(getattr(layers[layer], parent), module).register_forward_hook(hook(layer, module))
    tok = tiny_base.tokenizer
    out = []
    with torch.no_grad():
        for q in questions:
            prefix = tok(_prompt(q), add_special_tokens=False)["input_ids"]
            p = len(prefix)
            scores, masses, prefix_masses = [], [], []
            for c in q.choices:
                choice = tok(f" {c.strip()}", add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(model(input_ids=torch.tensor([prefix + choice])).logits[0].float(), -1)
                scores.append(sum(float(logp[p - 1 + i, t]) for i, t in enumerate(choice)) / len(choice))
                per_token = [sum(kept_mass[layer][t] for layer in routed) / len(routed) for t in range(p + len(choice))]
                prefix_masses.append(per_token[:p])
                masses.extend(per_token[p:])  # the choice's own tokens
            for other in prefix_masses[1:]:  # the prefix routes the same in every choice's sequence
                assert other == pytest.approx(prefix_masses[0], abs=1e-6)
            tokens = prefix_masses[0] + masses  # the question's tokens: prefix once, then every choice's
            out.append(MoeReference(scores, sum(tokens) / len(tokens)))
    return out


@pytest.fixture(scope="module")
def naive(root: Path, tiny_base, tiny_questions) -> list[MoeReference]:
    return _naive_moe(tiny_base, root / "tiny-uq4ct", tiny_questions)


def _softmax(scores: list[float], temperature: float) -> list[float]:
    top = max(scores)
    e = [math.exp((s - top) / temperature) for s in scores]
    return [v / sum(e) for v in e]


def _gaps(scores: list[float]) -> list[float]:
    return [v - scores[0] for v in scores]


def _served_gaps(probabilities: list[float], temperature: float) -> list[float]:
    """The score differences s_k − s_0 behind served softmax(s / T) probabilities (T · log-ratios). The fitted
    temperature is small here (4 questions, all learned), so the probabilities alone sit near 0 and 1."""
    assert min(probabilities) > 0
    return [temperature * (math.log(p) - math.log(probabilities[0])) for p in probabilities]


SCORE_TOL = 1e-5
"""Float32 base on one plain sequence per choice (reference, experts applied in float64) against packed rows with
block attention and the float32 vectorized mixture: scores, their gaps and FEU agree to ~5e-7."""


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_beta_schedule() -> None:
    assert UQ4CTConfig(beta=0.5).beta_at(3) == 0.5
    warm = UQ4CTConfig(beta=1.0, beta_warmup_steps=50)
    assert [warm.beta_at(s) for s in (0, 25, 50, 80)] == [0.0, 0.5, 1.0, 1.0]


def test_bundle_trains_and_round_trips(root: Path, tiny_base, tiny_questions, naive: list[MoeReference]) -> None:
    bundle = read_bundle(root / "tiny-uq4ct", expect_base=tiny_base.info)
    manifest = bundle.manifest
    assert manifest.method == Method.MOE and [m.name for m in manifest.members] == ["expert-0"]
    assert manifest.artifacts == {"moe": "moe.safetensors"}
    assert manifest.method_config["num_experts"] == 4 and manifest.method_config["top_k"] == 2
    history = manifest.training["history"]
    assert history[-1]["ce"] < history[0]["ce"]
    scores, feu = moe_bundle_scores(tiny_base, bundle, tiny_questions)  # from disk, fresh hooks
    for i, (q, ref) in enumerate(zip(tiny_questions, naive, strict=True)):
        assert scores[i, : len(q.choices)].tolist() == pytest.approx(ref.scores, abs=SCORE_TOL), q.id
        assert float(feu[i]) == pytest.approx(ref.feu, abs=SCORE_TOL), q.id
    # the validation numbers the manifest records (val = these questions) are those of the reference
    nll = sum(-math.log(_softmax(ref.scores, 1.0)[q.answer]) for q, ref in zip(tiny_questions, naive, strict=True))
    assert nll / len(naive) == pytest.approx(manifest.calibration.validation_metrics["uncalibrated_nll"], abs=1e-4)
    feu_mean = sum(ref.feu for ref in naive) / len(naive)
    assert feu_mean == pytest.approx(manifest.method_config["validation"]["feu_mean"], abs=SCORE_TOL)
    # the routers are trained, not uniform, and FEU is the raw kept mass (renormalized gates would give 1)
    k_over_n = manifest.method_config["top_k"] / manifest.method_config["num_experts"]
    assert all(k_over_n + 100 * SCORE_TOL < ref.feu < 1 - 100 * SCORE_TOL for ref in naive)


def _engine(tiny_base, root: Path):
    from service.engine.engine import UQEngine
    from service.settings import Settings

    settings = Settings(_env_file=None, bundle_root=root, preload_bundles=["tiny-uq4ct", "tiny-ens"],  # type: ignore[call-arg]
                        max_slots=4, max_lora_rank=16, max_wait_ms=30.0, torch_threads=1)
    return UQEngine(tiny_base, settings), settings


def test_engine_serves_moe_alone_and_mixed(root: Path, tiny_base, tiny_questions: list[Question],
                                           naive: list[MoeReference]) -> None:
    from service.engine.moe_predictor import MI_NOTE
    from service.engine.types import AnswerOptions

    hooks_before = _hook_count(tiny_base.model)
    engine, _ = _engine(tiny_base, root)
    options = AnswerOptions(return_members=True)

    async def main() -> tuple[list, list, list, list, list[int], int]:
        await engine.start()
        status = await engine.load_bundle("tiny-uq4ct")
        await engine.load_bundle("tiny-ens")
        moe = await engine.answer("tiny-uq4ct", tiny_questions, options)
        ens = await engine.answer("tiny-ens", tiny_questions, options)
        moe_mixed, ens_mixed = await asyncio.gather(engine.answer("tiny-uq4ct", tiny_questions, options),
                                                    engine.answer("tiny-ens", tiny_questions, options))
        await engine.unload_bundle("tiny-uq4ct")
        await asyncio.sleep(0.2)  # the detach runs on the worker thread
        hooks = _hook_count(tiny_base.model)
        await engine.stop()
        return moe, ens, moe_mixed, ens_mixed, status.slots, hooks

    try:
        moe, ens, moe_mixed, ens_mixed, slots, hooks_after_unload = asyncio.run(main())
    finally:
        engine.multilora.remove()
    assert slots == []  # experts live in the predictor's own hooks, not in multi-LoRA slots
    bundle = read_bundle(root / "tiny-uq4ct")
    temperature = bundle.manifest.calibration.temperature
    scores, feu = moe_bundle_scores(tiny_base, bundle, tiny_questions)
    offline = apply_temperature(scores, temperature)  # what `uqserve eval` reports
    for i, q in enumerate(tiny_questions):
        k = len(q.choices)
        got = torch.tensor(moe[i].probabilities)
        assert moe[i].probabilities == pytest.approx(_softmax(naive[i].scores, temperature), abs=SCORE_TOL), q.id
        assert _served_gaps(moe[i].probabilities, temperature) == pytest.approx(_gaps(naive[i].scores),
                                                                                abs=SCORE_TOL), q.id
        assert moe[i].feu == pytest.approx(naive[i].feu, abs=SCORE_TOL), q.id
        torch.testing.assert_close(got, offline[i, :k], atol=1e-5, rtol=1e-5)
        assert moe[i].feu == pytest.approx(float(feu[i]), abs=1e-5)
        assert moe[i].mutual_information is None and moe[i].expected_entropy is None and moe[i].members is None
        assert MI_NOTE in moe[i].notes and moe[i].bundle.method == "moe"
        assert moe[i].predictive_entropy == pytest.approx(float(-(got * got.log()).sum()), abs=1e-5)
        torch.testing.assert_close(torch.tensor(moe_mixed[i].probabilities), got, atol=1e-5, rtol=1e-5)
        assert moe_mixed[i].feu == pytest.approx(moe[i].feu, abs=1e-6)
        torch.testing.assert_close(torch.tensor(ens_mixed[i].probabilities), torch.tensor(ens[i].probabilities),
                                   atol=1e-5, rtol=1e-5)
        assert ens[i].feu is None and len(ens[i].members) == 2
    engine_hooks = 7 * len(decoder_layers(tiny_base.model))  # the engine's MultiLora: every projection
    assert hooks_after_unload == hooks_before + engine_hooks  # unloading removed the routers' and experts' hooks
    assert _hook_count(tiny_base.model) == hooks_before


def test_http_answer_has_feu_and_null_mi(root: Path, tiny_base, tiny_questions, naive: list[MoeReference]) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app

    engine, settings = _engine(tiny_base, root)
    body = {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium"]}
    try:
        with TestClient(create_app(settings, engine=engine)) as client:
            moe = client.post("/v1/answer", json={**body, "bundle": "tiny-uq4ct"}).json()
            ens = client.post("/v1/answer", json={**body, "bundle": "tiny-ens"}).json()
            strict = {"thresholds": {"one_minus_feu": 0.0}}
            moe_strict = client.post("/v1/answer", json={**body, "bundle": "tiny-uq4ct", **strict}).json()
            ens_strict = client.post("/v1/answer", json={**body, "bundle": "tiny-ens", **strict}).json()
            bad = client.post("/v1/answer", json={**body, "bundle": "tiny-uq4ct", "thresholds": {"one_minus_feu": 2}})
    finally:
        engine.multilora.remove()
    assert tiny_questions[0].question == body["question"] and list(tiny_questions[0].choices) == body["choices"]
    temperature = read_bundle(root / "tiny-uq4ct").manifest.calibration.temperature
    assert moe["probabilities"] == pytest.approx(_softmax(naive[0].scores, temperature), abs=SCORE_TOL)
    assert _served_gaps(moe["probabilities"], temperature) == pytest.approx(_gaps(naive[0].scores), abs=SCORE_TOL)
    assert moe["feu"] == pytest.approx(naive[0].feu, abs=SCORE_TOL)
    assert moe["one_minus_feu"] == pytest.approx(1 - moe["feu"])
    assert moe["mutual_information"] is None and any("mutual_information is null" in n for n in moe["notes"])
    assert abs(sum(moe["probabilities"]) - 1) < 1e-6 and moe["bundle"]["method"] == "moe"
    assert "feu" not in ens and "one_minus_feu" not in ens and ens["mutual_information"] is not None
    # 1 − FEU is an abstention score: it trips for the routed model, and never for a method without FEU
    assert moe_strict["abstained"] and moe_strict["abstain_reasons"] == ["one_minus_feu"]
    assert moe_strict["answer"] is None and moe_strict["thresholds_used"]["sources"]["one_minus_feu"] == "request"
    assert "one_minus_feu" not in ens_strict["abstain_reasons"]
    assert bad.status_code == 422 and bad.json()["error"]["param"].endswith("one_minus_feu")
