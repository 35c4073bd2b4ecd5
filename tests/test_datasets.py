"""Dataset loaders: official counts, label mapping, deterministic splits and shuffles, clear errors."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections import Counter
from pathlib import Path

import pytest

from core.answers import Question
from core.datasets import (
    DATA_DIR_ENV,
    DATASETS,
    MMLU_CATEGORIES,
    MMLU_GROUPS,
    SPLITS,
    VENDORED_DIR,
    available_datasets,
    data_hash,
    load_questions,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"staged data not found at {SHARED}")


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


@functools.cache
def shared(dataset: str, split: str) -> tuple[Question, ...]:
    return tuple(load_questions(dataset, split, SHARED))


# --- ARC-Easy, vendored -------------------------------------------------------------------------------------


def test_arc_easy_vendored_counts_without_data_dir() -> None:
    counts = {split: len(load_questions("arc_easy", split)) for split in SPLITS}
    assert counts == {"train": 2251, "validation": 570, "test": 2376}


def test_vendored_files_match_readme_sha256() -> None:
    readme = (VENDORED_DIR / "README.md").read_text(encoding="utf-8")
    files = sorted((VENDORED_DIR / "arc_easy").glob("*.jsonl"))
    assert [f.name for f in files] == ["ARC-Easy-Dev.jsonl", "ARC-Easy-Test.jsonl", "ARC-Easy-Train.jsonl"]
    for f in files:
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        assert re.search(rf"`arc_easy/{f.name}`.*`{digest}`", readme), f"README lacks the sha256 of {f.name}"


def test_numeric_labels_map_to_indices() -> None:
    by_id = {q.id: q for q in load_questions("arc_easy", "validation")}
    q = by_id["NYSEDREGENTS_2014_8_8"]  # labels "1".."4", answerKey "2"
    assert q.choices == ("life cycle", "pedigree chart", "food web", "energy pyramid")
    assert q.answer == 1
    assert by_id["NYSEDREGENTS_2014_8_10"].answer == 0


def test_arc_keeps_three_and_five_choice_items() -> None:
    sizes = Counter(len(q.choices) for q in load_questions("arc_easy", "train"))
    assert sizes == {4: 2241, 3: 6, 5: 4}
    test = load_questions("arc_easy", "test")
    assert all(q.answer is not None and q.meta["dataset"] == "arc_easy" for q in test)


def test_arc_easy_falls_back_to_vendored_when_data_dir_lacks_it(tmp_path: Path) -> None:
    assert data_hash(load_questions("arc_easy", "validation", tmp_path)) == data_hash(
        load_questions("arc_easy", "validation"))


def test_limit_takes_first_n() -> None:
    full = load_questions("arc_easy", "test")
    assert load_questions("arc_easy", "test", limit=7) == full[:7]
    assert load_questions("arc_easy", "test", limit=0) == []


# --- staged datasets ----------------------------------------------------------------------------------------

EXPECTED = {
    "arc_easy": {"train": 2251, "validation": 570, "test": 2376},
    "arc_challenge": {"train": 1119, "validation": 299, "test": 1172},
    "openbookqa": {"train": 4957, "validation": 500, "test": 500},
    "boolq": {"train": 1770, "validation": 500, "test": 1000},
    "sciq": {"validation": 1000, "test": 1000},
    "commonsenseqa": {"train": 8741, "validation": 1000, "test": 1221},
    "mmlu": {"train": 285, "validation": 1531, "test": 14042},
    "truthfulqa_mc1": {"test": 817},
}


@needs_shared
@pytest.mark.parametrize(("dataset", "split", "count"),
                         [(d, s, n) for d, splits in EXPECTED.items() for s, n in splits.items()])
def test_official_counts(dataset: str, split: str, count: int) -> None:
    qs = shared(dataset, split)
    assert len(qs) == count
    assert all(q.answer is not None for q in qs)


@needs_shared
def test_arc_challenge_choice_counts() -> None:
    sizes = Counter(len(q.choices) for q in shared("arc_challenge", "test"))
    assert sizes[3] == 4 and sizes[5] == 3


@needs_shared
def test_boolq_split_disjoint_deterministic() -> None:
    parts = {s: shared("boolq", s) for s in SPLITS}
    ids = [q.id for qs in parts.values() for q in qs]
    assert len(ids) == len(set(ids)) == 3270
    for split, qs in parts.items():
        assert data_hash(load_questions("boolq", split, SHARED)) == data_hash(list(qs))
    q = parts["test"][0]
    assert q.choices == ("no", "yes") and q.context
    assert q.question[0].isupper() and q.question.endswith("?")
    assert Counter(q.answer for qs in parts.values() for q in qs) == {1: 2033, 0: 1237}


@needs_shared
def test_sciq_options_shuffled_deterministically() -> None:
    qs = shared("sciq", "test")
    answers = Counter(q.answer for q in qs)
    assert len(answers) == 4 and max(answers.values()) < 400
    assert data_hash(load_questions("sciq", "test", SHARED)) == data_hash(list(qs))
    raw = json.loads((SHARED / "sciq" / "test.json").read_text(encoding="utf-8"))
    for q, r in zip(qs, raw, strict=True):
        assert q.answer is not None and q.choices[q.answer] == r["correct_answer"]
    assert all(len(set(q.choices)) == len(q.choices) for q in qs)  # duplicate distractors dropped
    assert sum(q.context is not None for q in qs) == 884
    with pytest.raises(ValueError, match="SciQ has no train split"):
        load_questions("sciq", "train", SHARED)


@needs_shared
def test_commonsenseqa_validation_carved_from_train() -> None:
    train, val = shared("commonsenseqa", "train"), shared("commonsenseqa", "validation")
    assert not {q.id for q in train} & {q.id for q in val}
    assert len({q.id for q in train} | {q.id for q in val}) == 9741
    assert all(len(q.choices) == 5 for q in shared("commonsenseqa", "test"))


@needs_shared
def test_mmlu_groups_and_subjects() -> None:
    assert len(MMLU_CATEGORIES) == 57
    staged = {p.name.removesuffix("_test.csv") for p in (SHARED / "mmlu" / "test").glob("*.csv")}
    assert staged == set(MMLU_CATEGORIES)
    sizes = {"stem": 18, "humanities": 13, "social_sciences": 12, "other": 14}
    assert Counter(MMLU_CATEGORIES.values()) == sizes
    expected = {
        "mmlu_cs": {"college_computer_science", "computer_security", "high_school_computer_science",
                    "machine_learning"},
        "mmlu_eng": {"electrical_engineering"},
        "mmlu_law": {"international_law", "jurisprudence", "professional_law"},
        "mmlu_health": {"anatomy", "clinical_knowledge", "college_medicine", "human_aging",
                        "medical_genetics", "nutrition", "professional_medicine", "virology"},
    }
    for group in ("mmlu_stem", "mmlu_social_sciences", *expected):
        qs = load_questions(group, "validation", SHARED)
        assert qs, group
        assert {q.meta["subject"] for q in qs} == set(MMLU_GROUPS[group])
    for group, subjects in expected.items():
        assert set(MMLU_GROUPS[group]) == subjects
    assert {"abstract_algebra", "machine_learning", "high_school_statistics"} <= set(MMLU_GROUPS["mmlu_stem"])
    assert {"econometrics", "sociology", "us_foreign_policy"} <= set(MMLU_GROUPS["mmlu_social_sciences"])
    assert [len(load_questions("mmlu:virology", s, SHARED)) for s in SPLITS] == [5, 18, 166]
    assert sum(1 for q in shared("mmlu", "test") if q.meta["subject"] == "professional_law") == 1534


@needs_shared
def test_truthfulqa_mc1_shuffled_with_correct_target() -> None:
    qs = shared("truthfulqa_mc1", "test")
    raw = json.loads((SHARED / "truthfulqa" / "mc_task.json").read_text(encoding="utf-8"))
    for q, r in zip(qs, raw, strict=True):
        assert q.answer is not None and r["mc1_targets"][q.choices[q.answer]] == 1
        assert set(q.choices) == set(r["mc1_targets"])
    assert len(Counter(q.answer for q in qs)) > 3
    for split in ("train", "validation"):
        with pytest.raises(ValueError, match="test"):
            load_questions("truthfulqa_mc1", split, SHARED)


@needs_shared
def test_env_var_and_available_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    assert available_datasets() == ("arc_easy",)
    assert set(available_datasets(SHARED)) == set(DATASETS)
    monkeypatch.setenv(DATA_DIR_ENV, str(SHARED))
    assert len(load_questions("openbookqa", "test")) == 500
    assert set(available_datasets()) == set(DATASETS)


# --- hashing, errors, malformed items -----------------------------------------------------------------------


def test_data_hash_stable_and_order_sensitive() -> None:
    qs = load_questions("arc_easy", "validation", limit=20)
    h = data_hash(qs)
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    assert data_hash(load_questions("arc_easy", "validation", limit=20)) == h
    assert data_hash(qs[::-1]) != h
    assert data_hash(qs[:19]) != h
    relabelled = [Question(q.question, q.choices, q.answer, q.context, id="x", meta={"a": "b"}) for q in qs]
    assert data_hash(relabelled) == h
    q0 = qs[0]
    other = 1 - (q0.answer or 0) if q0.answer in (0, 1) else 0
    assert data_hash([Question(q0.question, q0.choices, other), *qs[1:]]) != h


def test_unknown_dataset_and_split() -> None:
    with pytest.raises(ValueError, match=r"valid datasets: arc_easy.*truthfulqa_mc1"):
        load_questions("squad", "test")
    with pytest.raises(ValueError, match="valid splits: train, validation, test"):
        load_questions("arc_easy", "dev")
    with pytest.raises(ValueError, match="unknown MMLU subject 'astrology'"):
        load_questions("mmlu:astrology", "test")


def test_missing_files_name_the_path_and_hint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--data-dir") as no_dir:
        load_questions("boolq", "test")
    assert "boolq/val.jsonl" in str(no_dir.value)
    with pytest.raises(FileNotFoundError, match="--data-dir") as missing:
        load_questions("arc_challenge", "validation", tmp_path)
    message = str(missing.value)
    assert "arc_challenge/ARC-Challenge-Dev.jsonl" in message and str(tmp_path) in message
    with pytest.raises(FileNotFoundError, match=r"mmlu/test/anatomy_test\.csv"):
        load_questions("mmlu_health", "test", tmp_path)


def test_malformed_items_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def item(i: int, texts: list[str], key: str) -> str:
        choices = [{"text": t, "label": "ABCDE"[j]} for j, t in enumerate(texts)]
        return json.dumps({"id": f"q{i}", "question": {"stem": "Why?", "choices": choices}, "answerKey": key})

    (tmp_path / "arc_challenge").mkdir()
    # q1 has an empty choice, q2 an answer key that is not a label
    lines = [item(0, ["a", "b"], "B"), item(1, ["a", " "], "A"), item(2, ["a", "b"], "Z"),
             item(3, ["c", "d"], "A")]
    path = tmp_path / "arc_challenge" / "ARC-Challenge-Test.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="core.datasets"):
        qs = load_questions("arc_challenge", "test", tmp_path)
    assert [(q.id, q.answer) for q in qs] == [("q0", 1), ("q3", 0)]
    assert "skipped 2 malformed item(s)" in caplog.text
