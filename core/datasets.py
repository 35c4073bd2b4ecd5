"""Dataset loaders: every supported benchmark as a list of :class:`~core.answers.Question`.

ARC-Easy is vendored in ``core/data/arc_easy`` and loads with no data directory. Every other dataset is
read from ``data_dir`` (else the ``UQSERVE_DATA_DIR`` environment variable): a folder laid out like the
staged ``data/`` folder, i.e. ``arc_easy/ARC-Easy-{Train,Dev,Test}.jsonl``, ``arc_challenge/…``,
``openbookqa/{train,dev,test}.jsonl``, ``boolq/val.jsonl``, ``sciq/{valid,test}.json``,
``commonsenseqa/{train,dev}_rand_split.jsonl``, ``mmlu/{dev,val,test}/<subject>_<split>.csv`` and
``truthfulqa/mc_task.json``.

Splits (``train`` / ``validation`` / ``test``):

* ARC-Easy, ARC-Challenge: Train / Dev / Test. OpenBookQA: train / dev / test.
* BoolQ: only the SuperGLUE ``val.jsonl`` (3270) is staged. It is shuffled with ``random.Random(0)``;
  the first 1000 are ``test``, the next 500 ``validation``, the remaining 1770 ``train``.
  Choices are ``("no", "yes")``, the passage is the context.
* SciQ: ``validation`` = valid.json, ``test`` = test.json; there is no train split. The options
  (correct answer, then the distractors, duplicates dropped) are shuffled per question with an RNG
  seeded from the question text; the support text is the context when non-empty.
* CommonsenseQA: the official test set has no answers, so ``test`` = dev_rand_split (1221);
  train_rand_split is shuffled with ``random.Random(0)``, the last 1000 are ``validation`` and the
  first 8741 ``train``.
* MMLU: ``train`` = dev (5 per subject), ``validation`` = val, ``test`` = test. ``mmlu`` is all 57
  subjects (alphabetical, file order within), ``mmlu:<subject>`` one subject, ``mmlu_<group>`` a group
  (:data:`MMLU_CATEGORIES` holds Hendrycks et al.'s subject → category map; ``mmlu_cs``, ``mmlu_eng``,
  ``mmlu_law``, ``mmlu_health`` are UQ4CT's domain groups).
* TruthfulQA MC1 (``mc_task.json``, the current revision, not ``v0/``): ``test`` only; the MC1 targets
  are shuffled per question (seeded from the question text), since the true answer is always first.

``limit`` keeps the first N questions after any shuffling. Items that fail :class:`Question`
validation are skipped and counted in a warning.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from core.answers import Question
from core.errors import InvalidQuestionError

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "UQSERVE_DATA_DIR"
VENDORED_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("train", "validation", "test")
_T = TypeVar("_T")
_Dir = Path | str | None

_STEM, _HUM, _SOC, _OTHER = "stem", "humanities", "social_sciences", "other"
MMLU_CATEGORIES: dict[str, str] = {
    # Hendrycks et al. (hendrycks/test categories.py): subject -> STEM / humanities / social sciences / other.
    "abstract_algebra": _STEM, "anatomy": _OTHER, "astronomy": _STEM, "business_ethics": _OTHER,
    "clinical_knowledge": _OTHER, "college_biology": _STEM, "college_chemistry": _STEM,
    "college_computer_science": _STEM, "college_mathematics": _STEM, "college_medicine": _OTHER,
    "college_physics": _STEM, "computer_security": _STEM, "conceptual_physics": _STEM, "econometrics": _SOC,
    "electrical_engineering": _STEM, "elementary_mathematics": _STEM, "formal_logic": _HUM,
    "global_facts": _OTHER, "high_school_biology": _STEM, "high_school_chemistry": _STEM,
    "high_school_computer_science": _STEM, "high_school_european_history": _HUM,
    "high_school_geography": _SOC, "high_school_government_and_politics": _SOC,
    "high_school_macroeconomics": _SOC, "high_school_mathematics": _STEM, "high_school_microeconomics": _SOC,
    "high_school_physics": _STEM, "high_school_psychology": _SOC, "high_school_statistics": _STEM,
    "high_school_us_history": _HUM, "high_school_world_history": _HUM, "human_aging": _OTHER,
    "human_sexuality": _SOC, "international_law": _HUM, "jurisprudence": _HUM, "logical_fallacies": _HUM,
    "machine_learning": _STEM, "management": _OTHER, "marketing": _OTHER, "medical_genetics": _OTHER,
    "miscellaneous": _OTHER, "moral_disputes": _HUM, "moral_scenarios": _HUM, "nutrition": _OTHER,
    "philosophy": _HUM, "prehistory": _HUM, "professional_accounting": _OTHER, "professional_law": _HUM,
    "professional_medicine": _OTHER, "professional_psychology": _SOC, "public_relations": _SOC,
    "security_studies": _SOC, "sociology": _SOC, "us_foreign_policy": _SOC, "virology": _OTHER,
    "world_religions": _HUM,
}
MMLU_SUBJECTS: tuple[str, ...] = tuple(sorted(MMLU_CATEGORIES))
MMLU_GROUPS: dict[str, tuple[str, ...]] = {
    **{f"mmlu_{cat}": tuple(s for s in MMLU_SUBJECTS if MMLU_CATEGORIES[s] == cat)
       for cat in (_STEM, _HUM, _SOC, _OTHER)},
    # UQ4CT (Niu et al., arXiv:2410.06431) domain groups.
    "mmlu_cs": ("college_computer_science", "computer_security", "high_school_computer_science",
                "machine_learning"),
    "mmlu_eng": ("electrical_engineering",),
    "mmlu_law": ("international_law", "jurisprudence", "professional_law"),
    "mmlu_health": ("anatomy", "clinical_knowledge", "college_medicine", "human_aging", "medical_genetics",
                    "nutrition", "professional_medicine", "virology"),
}

DATASETS: tuple[str, ...] = (
    "arc_easy", "arc_challenge", "openbookqa", "boolq", "sciq", "commonsenseqa", "mmlu", "truthfulqa_mc1",
    *MMLU_GROUPS,
)

_ARC_FILES = {"train": "Train", "validation": "Dev", "test": "Test"}
_OBQA_FILES = {"train": "train", "validation": "dev", "test": "test"}
_MMLU_FILES = {"train": "dev", "validation": "val", "test": "test"}
_BOOLQ_SIZES = {"test": 1000, "validation": 500}  # train = the rest
_CSQA_VALIDATION = 1000


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _mmlu_subjects(dataset: str) -> tuple[str, ...] | None:
    """The subjects an MMLU dataset name covers, or None if it is not an MMLU name."""
    if dataset == "mmlu":
        return MMLU_SUBJECTS
    if dataset in MMLU_GROUPS:
        return MMLU_GROUPS[dataset]
    if dataset.startswith("mmlu:"):
        subject = dataset.split(":", 1)[1]
        if subject not in MMLU_CATEGORIES:
            raise ValueError(f"unknown MMLU subject {subject!r}; valid subjects: {', '.join(MMLU_SUBJECTS)}")
        return (subject,)
    return None


def _data_root(data_dir: _Dir) -> Path | None:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else None


def _locate(dataset: str, rel: str, data_dir: _Dir) -> Path:
    """The file ``rel`` under the data root; ARC-Easy falls back to the vendored copy."""
    root = _data_root(data_dir)
    if root is not None and (root / rel).is_file():
        return root / rel
    if dataset == "arc_easy" and (VENDORED_DIR / rel).is_file():
        return VENDORED_DIR / rel
    hint = (f"pass --data-dir (or set {DATA_DIR_ENV}) pointing at a folder laid out like the staged data/ "
            f"folder (see core/datasets.py)")
    if root is None:
        raise FileNotFoundError(f"dataset {dataset!r} needs a data directory holding {rel}; {hint}")
    raise FileNotFoundError(f"{rel} not found under {root}; {hint}")


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _shuffled(items: list[_T], seed: int) -> list[_T]:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _build(raw: Iterable[Any], make: Callable[[Any], Question], source: str) -> list[Question]:
    """Apply ``make`` to every record, skipping (and counting) those that fail validation."""
    out: list[Question] = []
    skipped = 0
    for item in raw:
        try:
            out.append(make(item))
        except (InvalidQuestionError, KeyError, ValueError, TypeError) as e:
            skipped += 1
            logger.debug("skipping malformed item in %s: %s", source, e)
    if skipped:
        logger.warning("skipped %d malformed item(s) in %s", skipped, source)
    return out


def _stem_choices(dataset: str, item: dict[str, Any]) -> Question:
    """ARC / OpenBookQA / CommonsenseQA schema; labels may be letters or digits."""
    choices = item["question"]["choices"]
    labels = [str(c["label"]) for c in choices]
    key = item.get("answerKey")
    answer = labels.index(str(key)) if key not in (None, "") else None
    return Question(question=item["question"]["stem"], choices=tuple(c["text"] for c in choices),
                    answer=answer, id=str(item["id"]), meta={"dataset": dataset})


def _load_stem_file(dataset: str, rel: str, data_dir: _Dir) -> list[Question]:
    return _build(_read_jsonl(_locate(dataset, rel, data_dir)), lambda d: _stem_choices(dataset, d), rel)


def _load_arc(dataset: str, split: str, data_dir: _Dir) -> list[Question]:
    name = "ARC-Easy" if dataset == "arc_easy" else "ARC-Challenge"
    return _load_stem_file(dataset, f"{dataset}/{name}-{_ARC_FILES[split]}.jsonl", data_dir)


def _load_obqa(split: str, data_dir: _Dir) -> list[Question]:
    return _load_stem_file("openbookqa", f"openbookqa/{_OBQA_FILES[split]}.jsonl", data_dir)


def _load_csqa(split: str, data_dir: _Dir) -> list[Question]:
    if split == "test":
        return _load_stem_file("commonsenseqa", "commonsenseqa/dev_rand_split.jsonl", data_dir)
    train = _shuffled(_load_stem_file("commonsenseqa", "commonsenseqa/train_rand_split.jsonl", data_dir), 0)
    cut = len(train) - _CSQA_VALIDATION
    return train[cut:] if split == "validation" else train[:cut]


def _boolq_question(item: dict[str, Any]) -> Question:
    text = str(item["question"]).strip()
    text = text[:1].upper() + text[1:]
    if not text.endswith("?"):
        text += "?"
    label = item["label"]
    if not isinstance(label, bool):
        raise ValueError(f"BoolQ label must be a boolean, got {label!r}")
    return Question(question=text, choices=("no", "yes"), answer=int(label), context=item["passage"],
                    id=f"boolq-{item['idx']}", meta={"dataset": "boolq"})


def _load_boolq(split: str, data_dir: _Dir) -> list[Question]:
    rel = "boolq/val.jsonl"
    items = _shuffled(_build(_read_jsonl(_locate("boolq", rel, data_dir)), _boolq_question, rel), 0)
    n_test, n_val = _BOOLQ_SIZES["test"], _BOOLQ_SIZES["validation"]
    if split == "test":
        return items[:n_test]
    if split == "validation":
        return items[n_test : n_test + n_val]
    return items[n_test + n_val :]


def _sciq_question(file_split: str, index: int, item: dict[str, Any], context: bool) -> Question:
    correct = str(item["correct_answer"])
    options = [correct]
    for k in ("distractor1", "distractor2", "distractor3"):
        d = str(item[k])
        if d.strip() and d not in options:
            options.append(d)
    options = _shuffled(options, _seed(item["question"]))
    support = str(item.get("support") or "").strip()
    return Question(question=item["question"], choices=tuple(options), answer=options.index(correct),
                    context=support if context and support else None, id=f"sciq-{file_split}-{index}",
                    meta={"dataset": "sciq"})


def _load_sciq(split: str, data_dir: _Dir, context: bool = True) -> list[Question]:
    if split == "train":
        raise ValueError("SciQ has no train split staged; use 'validation' or 'test'")
    file_split = "valid" if split == "validation" else "test"
    rel = f"sciq/{file_split}.json"
    raw = _read_json(_locate("sciq", rel, data_dir))
    return _build(enumerate(raw), lambda p: _sciq_question(file_split, p[0], p[1], context), rel)


def _mmlu_rows(path: Path) -> Iterator[list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        yield from csv.reader(f)


def _mmlu_question(subject: str, file_split: str, index: int, row: list[str]) -> Question:
    if len(row) != 6:
        raise ValueError(f"expected 6 CSV fields, got {len(row)}")
    return Question(question=row[0], choices=tuple(row[1:5]), answer="ABCD".index(row[5].strip()),
                    id=f"mmlu-{subject}-{file_split}-{index}", meta={"dataset": "mmlu", "subject": subject})


def _load_mmlu_subject(dataset: str, subject: str, file_split: str, data_dir: _Dir) -> list[Question]:
    rel = f"mmlu/{file_split}/{subject}_{file_split}.csv"
    rows = enumerate(_mmlu_rows(_locate(dataset, rel, data_dir)))
    return _build(rows, lambda p: _mmlu_question(subject, file_split, p[0], p[1]), rel)


def _load_mmlu(dataset: str, subjects: tuple[str, ...], split: str, data_dir: _Dir) -> list[Question]:
    return [q for s in subjects for q in _load_mmlu_subject(dataset, s, _MMLU_FILES[split], data_dir)]


def _truthfulqa_question(index: int, item: dict[str, Any]) -> Question:
    targets: dict[str, int] = item["mc1_targets"]
    correct = [text for text, value in targets.items() if value == 1]
    if len(correct) != 1:
        raise ValueError(f"MC1 needs exactly one true target, got {len(correct)}")
    options = _shuffled(list(targets), _seed(item["question"]))
    return Question(question=item["question"], choices=tuple(options), answer=options.index(correct[0]),
                    id=f"truthfulqa-{index}", meta={"dataset": "truthfulqa_mc1"})


def _load_truthfulqa(split: str, data_dir: _Dir) -> list[Question]:
    if split != "test":
        raise ValueError(f"TruthfulQA MC1 is evaluation-only: it has a 'test' split, not {split!r}")
    rel = "truthfulqa/mc_task.json"
    raw = _read_json(_locate("truthfulqa_mc1", rel, data_dir))
    return _build(enumerate(raw), lambda p: _truthfulqa_question(p[0], p[1]), rel)


def load_questions(dataset: str, split: str, data_dir: Path | str | None = None,
                   limit: int | None = None) -> list[Question]:
    """Load ``split`` of ``dataset`` (a name in :data:`DATASETS` or ``mmlu:<subject>``).

    ``data_dir`` defaults to ``$UQSERVE_DATA_DIR``; ARC-Easy falls back to the vendored copy. Raises
    ValueError for an unknown dataset or split, FileNotFoundError when a needed file is missing.
    """
    _check_split(split)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    subjects = _mmlu_subjects(dataset)
    if subjects is not None:
        questions = _load_mmlu(dataset, subjects, split, data_dir)
    elif dataset in ("arc_easy", "arc_challenge"):
        questions = _load_arc(dataset, split, data_dir)
    elif dataset == "openbookqa":
        questions = _load_obqa(split, data_dir)
    elif dataset == "boolq":
        questions = _load_boolq(split, data_dir)
    elif dataset == "sciq":
        questions = _load_sciq(split, data_dir)
    elif dataset == "commonsenseqa":
        questions = _load_csqa(split, data_dir)
    elif dataset == "truthfulqa_mc1":
        questions = _load_truthfulqa(split, data_dir)
    else:
        valid = ", ".join((*DATASETS, "mmlu:<subject>"))
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {valid}")
    return questions if limit is None else questions[:limit]


def data_hash(questions: list[Question]) -> str:
    """16 hex chars of the sha256 of a canonical JSON of (question, choices, answer, context), in order."""
    canon = [{"question": q.question, "choices": list(q.choices), "answer": q.answer, "context": q.context}
             for q in questions]
    blob = json.dumps(canon, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


_PROBE_FILES: dict[str, str] = {
    "arc_easy": "arc_easy/ARC-Easy-Test.jsonl",
    "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl",
    "openbookqa": "openbookqa/test.jsonl",
    "boolq": "boolq/val.jsonl",
    "sciq": "sciq/test.json",
    "commonsenseqa": "commonsenseqa/dev_rand_split.jsonl",
    "truthfulqa_mc1": "truthfulqa/mc_task.json",
}


def available_datasets(data_dir: Path | str | None = None) -> tuple[str, ...]:
    """The names in :data:`DATASETS` whose test files exist (under ``data_dir`` / ``$UQSERVE_DATA_DIR``)."""
    root = _data_root(data_dir)
    found: list[str] = []
    for name in DATASETS:
        subjects = _mmlu_subjects(name)
        rels = [f"mmlu/test/{s}_test.csv" for s in subjects] if subjects is not None else [_PROBE_FILES[name]]
        roots = [r for r in (root, VENDORED_DIR if name == "arc_easy" else None) if r is not None]
        if any(all((r / rel).is_file() for rel in rels) for r in roots):
            found.append(name)
    return tuple(found)
