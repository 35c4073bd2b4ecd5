"""The calibration split held out at export: disjoint from validation (so it fits nothing), seeded, recorded
in the provenance and the data hashes; --calibration FILE instead; the guarantee flags reach the bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from training.data_cli import training_data
from uqserve.cli import build_parser


def questions_file(path: Path, n: int) -> Path:
    rows = [{"question": f"Question number {i}?", "choices": ["alpha", "beta", "gamma"], "answer": i % 3}
            for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def parse(*argv: str) -> Any:
    argv_list = ["train", "ensemble", *argv]
    return build_parser(argv_list).parse_args(argv_list)


def test_half_of_validation_is_held_out_disjoint_and_seeded(tiny_tokenizer: Any, tmp_path: Path) -> None:
    from core.answers import AnswerFormat
    from core.prompt import PromptSpec

    train = questions_file(tmp_path / "train.jsonl", 200)
    args = parse("--train", str(train), "--validation-fraction", "0.3")
    data, _ = training_data(args, tiny_tokenizer, AnswerFormat.CLOZE, PromptSpec(), 768)
    assert len(data.validation) == 30 and len(data.calibration) == 30 and len(data.train) == 140
    texts = {name: {q.question for q in qs} for name, qs in
             (("train", data.train), ("validation", data.validation), ("calibration", data.calibration))}
    assert not texts["validation"] & texts["calibration"] and not texts["train"] & texts["calibration"]
    assert data.provenance["calibration_split"] == {"from": "validation", "fraction": 0.5, "seed": 0}
    assert data.provenance["rows"]["calibration"] == 30 and "calibration" in data.hashes()
    again, _ = training_data(args, tiny_tokenizer, AnswerFormat.CLOZE, PromptSpec(), 768)
    assert [q.question for q in again.calibration] == [q.question for q in data.calibration]
    other, _ = training_data(parse("--train", str(train), "--validation-fraction", "0.3", "--split-seed", "1"),
                             tiny_tokenizer, AnswerFormat.CLOZE, PromptSpec(), 768)
    assert [q.question for q in other.calibration] != [q.question for q in data.calibration]
    none, _ = training_data(parse("--train", str(train), "--calibration-fraction", "0"), tiny_tokenizer,
                            AnswerFormat.CLOZE, PromptSpec(), 768)
    assert none.calibration == [] and len(none.validation) == 20


def test_a_calibration_file_leaves_validation_whole(tiny_tokenizer: Any, tmp_path: Path) -> None:
    from core.answers import AnswerFormat
    from core.prompt import PromptSpec

    train = questions_file(tmp_path / "train.jsonl", 100)
    calibration = questions_file(tmp_path / "cal.jsonl", 40)
    data, _ = training_data(parse("--train", str(train), "--calibration", str(calibration)), tiny_tokenizer,
                            AnswerFormat.CLOZE, PromptSpec(), 768)
    assert len(data.calibration) == 40 and len(data.validation) == 10
    assert data.provenance["files"]["calibration"]["rows"] == 40
    with pytest.raises(SystemExit, match="calibration split"):
        training_data(parse("--train", str(train), "--validation-fraction", "0.01", "--calibration-fraction",
                            "0.5"), tiny_tokenizer, AnswerFormat.CLOZE, PromptSpec(), 768)
