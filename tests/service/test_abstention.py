"""Abstention: threshold precedence (request > bundle > settings), reasons naming every tripped score."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from core.answers import Question
from core.bundle import Thresholds
from service.engine.abstention import abstain_reasons, resolve_thresholds
from service.engine.types import AnswerOptions

Q = Question("Which gas do plants take in?", ("oxygen", "carbon dioxide", "helium"))


def test_precedence_request_then_bundle_then_settings() -> None:
    used = resolve_thresholds(
        {"predictive_entropy": 0.3},
        Thresholds(predictive_entropy=0.9, mutual_information=0.1),
        {"predictive_entropy": 2.0, "mutual_information": 5.0, "one_minus_max_probability": 0.5},
    )
    assert used.values == {
        "predictive_entropy": 0.3,
        "mutual_information": 0.1,
        "one_minus_max_probability": 0.5,
        "one_minus_feu": None,
    }
    assert used.sources == {
        "predictive_entropy": "request",
        "mutual_information": "bundle",
        "one_minus_max_probability": "settings",
        "one_minus_feu": "none",
    }
    none = resolve_thresholds({}, Thresholds(), {})
    assert set(none.values.values()) == {None} and set(none.sources.values()) == {"none"}


def test_reasons_name_every_tripped_score() -> None:
    used = resolve_thresholds(
        {}, Thresholds(predictive_entropy=0.5, mutual_information=0.05, one_minus_max_probability=0.4), {}
    )
    assert abstain_reasons(used, predictive_entropy=0.6, mutual_information=0.1, max_probability=0.5) == [
        "predictive_entropy",
        "mutual_information",
        "one_minus_max_probability",
    ]
    assert abstain_reasons(used, predictive_entropy=0.5, mutual_information=0.01, max_probability=0.9) == []
    assert abstain_reasons(used, predictive_entropy=0.1, mutual_information=0.2, max_probability=0.9) == [
        "mutual_information"
    ]
    # a method without MI (None) never trips the MI threshold
    assert abstain_reasons(used, predictive_entropy=0.1, mutual_information=None, max_probability=0.9) == []
    # 1 − FEU (UQ4CT's router confidence) trips only where the method reports FEU
    feu_used = resolve_thresholds({"one_minus_feu": 0.5}, Thresholds(), {})
    assert abstain_reasons(feu_used, predictive_entropy=0.1, mutual_information=None, max_probability=0.9,
                           feu=0.3) == ["one_minus_feu"]
    assert abstain_reasons(feu_used, predictive_entropy=0.1, mutual_information=None, max_probability=0.9,
                           feu=0.7) == []
    assert abstain_reasons(feu_used, predictive_entropy=0.1, mutual_information=0.2, max_probability=0.9) == []


def test_engine_abstains_with_bundle_request_and_settings_thresholds(
    engine_factory: Any, bundle_maker: Any, bundle_root: Path
) -> None:
    bundle_maker(bundle_root, "strict", thresholds=Thresholds(predictive_entropy=0.0))
    bundle_maker(bundle_root, "plain", seed=3)
    engine = engine_factory(bundle_root, abstain_one_minus_max_probability=0.0)

    async def main() -> None:
        await engine.start()
        for name in ("strict", "plain"):
            await engine.load_bundle(name)
        (r,) = await engine.answer("strict", [Q], AnswerOptions())
        assert r.abstained and "predictive_entropy" in r.abstain_reasons
        assert r.thresholds_used.sources["predictive_entropy"] == "bundle"
        assert r.probabilities and abs(sum(r.probabilities) - 1) < 1e-9  # computed even when abstaining
        relaxed = {"predictive_entropy": 10.0, "one_minus_max_probability": 1.0}
        (r,) = await engine.answer("strict", [Q], AnswerOptions(thresholds=relaxed))
        assert not r.abstained and r.abstain_reasons == []
        assert r.thresholds_used.sources["predictive_entropy"] == "request"
        (r,) = await engine.answer("plain", [Q], AnswerOptions())
        assert r.abstain_reasons == ["one_minus_max_probability"]
        assert r.thresholds_used.sources["one_minus_max_probability"] == "settings"
        await engine.stop()

    asyncio.run(main())
