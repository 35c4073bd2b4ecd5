"""Laplace-LoRA export → serve round trip on the tiny model: the bundle trains from a MAP LoRA, the engine
loads it and answers with the linearized predictive, alone and mixed with an ensemble bundle."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch

from core.answers import AnswerFormat, Question
from core.bundle import Method, read_bundle
from core.laplace import LaplaceConfig, LaplacePosterior, probit
from core.laplace_tap import LoraTap
from core.scoring import ChoiceScorer
from training.ensemble import EnsembleConfig
from training.ensemble_cli import train_and_export
from training.laplace import CurvatureConfig, linearized_pass
from training.laplace_cli import build_bundle
from training.trunk import TrunkCache


def _export(tiny_base, questions: list[Question], root: Path, name: str, members: int) -> Path:
    config = EnsembleConfig(members=members, rank=4, alpha=8.0, top_layers=2, epochs=3, batch_size=2, lr=2e-2,
                            dtype="float32", row_tokens=64)
    train_and_export(tiny_base, config, questions, questions, root, name, log=lambda _: None)
    return root / name


@pytest.fixture(scope="module")
def laplace_root(tiny_base, tiny_questions, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("laplace-bundles")
    _export(tiny_base, tiny_questions, root, "tiny-map", members=1)
    _export(tiny_base, tiny_questions, root, "tiny-ens", members=2)
    build_bundle(tiny_base, root / "tiny-map", tiny_questions, tiny_questions, root, "tiny-laplace",
                 config=CurvatureConfig(batch_size=3), mc_samples=16, weight_samples=2, curvature_limit=3,
                 log=lambda _: None)
    return root


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


def _offline_probit(tiny_base, bundle_dir: Path, questions: list[Question]) -> torch.Tensor:
    bundle = read_bundle(bundle_dir)
    config = LaplaceConfig.model_validate(bundle.manifest.method_config)
    post = LaplacePosterior.from_tensors(bundle.artifacts["kfac"], config.blocks["kron"],
                                         config.prior_precision["kron"])
    lora = bundle.manifest.lora
    tap = LoraTap(tiny_base.model, bundle.members["map"], lora.alpha / lora.rank)
    scorer = ChoiceScorer(tiny_base.model, tiny_base.tokenizer, AnswerFormat.CLOZE)
    lin = linearized_pass(scorer, tap, TrunkCache(scorer, questions, min(lora.layers)),
                          {"kron": (post, torch.tensor([post.prior_precision]))})
    return probit(lin.mean, lin.cov["kron"][0])


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
    want = _offline_probit(tiny_base, laplace_root / "tiny-laplace", tiny_questions)
    for i, q in enumerate(tiny_questions):
        k = len(q.choices)
        torch.testing.assert_close(torch.tensor(lap[i].probabilities, dtype=torch.float64), want[i, :k],
                                   atol=1e-4, rtol=1e-4)
        assert lap[i].bundle.method == "laplace" and len(lap[i].members) == 16
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
