"""Users' question files (training/datafiles.py): formats, answer encodings, mappings, label sets, splits,
every bad-row reason with its row number, and clear errors."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from core.answers import Question  # noqa: E402
from training.datafiles import (  # noqa: E402
    TOKEN_BATCH,
    Columns,
    DataFileError,
    parse_labels,
    read_question_file,
    resolve_answer,
    split_questions,
)

RECORDS: list[dict[str, Any]] = [
    {"id": "q1", "question": "Which is a mammal?", "choices": ["shark", "whale", "trout"], "answer": 1,
     "context": "Whales breathe air."},
    {"id": "q2", "question": "2 + 2 = ?", "choices": ["3", "4"], "answer": 1, "context": None},
    {"id": "q3", "question": "Sky colour?", "choices": ["blue", "green", "red", "NA"], "answer": 0,
     "context": ""},
]


def write_jsonl(path: Path, records: list[dict[str, Any]], trailer: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + trailer, encoding="utf-8")
    return path


def write_json(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_csv(path: Path, records: list[dict[str, Any]], header: list[str] | None = None) -> Path:
    header = header or list(records[0])
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in records:
            w.writerow(["" if r.get(h) is None else json.dumps(r[h]) if isinstance(r[h], list) else r[h]
                        for h in header])
    return path


def write_parquet(path: Path, records: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


WRITERS = {"jsonl": write_jsonl, "json": write_json, "csv": write_csv, "parquet": write_parquet}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_each_format_reads_the_same_questions(tmp_path: Path, fmt: str) -> None:
    path = WRITERS[fmt](tmp_path / f"mine.{fmt}", RECORDS)
    qf = read_question_file(path)
    assert qf.rows == 3 and qf.dropped == {} and qf.problems == []
    assert qf.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert qf.questions == [
        Question("Which is a mammal?", ("shark", "whale", "trout"), 1, "Whales breathe air.", "q1"),
        Question("2 + 2 = ?", ("3", "4"), 1, None, "q2"),
        Question("Sky colour?", ("blue", "green", "red", "NA"), 0, None, "q3"),  # "NA" stays text in CSV
    ]
    assert qf.questions[0].meta == {"dataset": "mine", "row": "1"}


def test_ids_default_to_stem_and_row(tmp_path: Path) -> None:
    records = [{k: v for k, v in r.items() if k != "id"} for r in RECORDS]
    qf = read_question_file(write_csv(tmp_path / "plain.csv", records))
    assert [q.id for q in qf.questions] == ["plain-1", "plain-2", "plain-3"]


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_answer_encodings(tmp_path: Path, fmt: str) -> None:
    choices = ["red", "green", "blue", "A"]
    answers: list[Any] = [2, "2", "C", "c", "blue", " blue ", "A", 2.0]
    if fmt in ("csv", "parquet"):  # one Arrow type per column: the mixed answers travel as text there
        answers = [str(a) for a in answers]
    records = [{"question": f"q{i}", "choices": choices, "answer": a} for i, a in enumerate(answers)]
    qf = read_question_file(WRITERS[fmt](tmp_path / f"a.{fmt}", records))
    # "A" is a choice's text: text beats letter. 2.0 (or "2.0" in CSV) is index 2.
    assert [q.answer for q in qf.questions] == [2, 2, 2, 2, 2, 2, 3, 2]


def test_answer_precedence() -> None:
    assert resolve_answer("B", ["B", "A"]) == (0, None)  # text before letter
    assert resolve_answer("0", ["1", "0"]) == (1, None)  # text before digit
    assert resolve_answer("b", ["x", "y"]) == (1, None)  # lower-case letter
    assert resolve_answer("1", ["x", "y"]) == (1, None)  # digit string: 0-based
    assert resolve_answer("3", ["a", "b", "c", "d"], labels=["1", "2", "3", "4"]) == (2, None)  # label first
    assert resolve_answer("E", ["a", "b", "c", "d"]) == (
        None, ("answer_not_in_choices", "answer 'E' is not one of the 4 choices"))
    assert resolve_answer(4, ["a", "b"])[1] == ("answer_not_in_choices",
                                                "answer index 4 is not one of the 2 choices (0..1)")
    assert resolve_answer(1.5, ["a", "b"])[1] == ("bad_value", "answer 1.5 is not a whole number")
    assert resolve_answer(True, ["a", "b"])[1][0] == "bad_value"  # type: ignore[index]


def test_column_mapping(tmp_path: Path) -> None:
    records = [{"qid": "x1", "prompt": "Pick one", "options": ["a", "b"], "label": "b", "passage": "p"}]
    cols = Columns(question="prompt", choices="options", answer="label", context="passage", id="qid")
    (q,) = read_question_file(write_jsonl(tmp_path / "m.jsonl", records), cols).questions
    assert (q.question, q.choices, q.answer, q.context, q.id) == ("Pick one", ("a", "b"), 1, "p", "x1")
    # A renamed optional column must exist; under its default name it is simply unused when absent.
    with pytest.raises(DataFileError, match=r"'ctx' not in the file; its columns are 'qid', 'prompt'"):
        read_question_file(tmp_path / "m.jsonl", Columns(question="prompt", choices="options", answer="label",
                                                         context="ctx"))


def test_choice_columns(tmp_path: Path) -> None:
    header = ["question", "A", "B", "C", "D", "answer"]
    rows = [
        {"question": "four", "A": "w", "B": "x", "C": "y", "D": "z", "answer": "D"},
        {"question": "two", "A": "yes", "B": "no", "C": "", "D": "", "answer": "no"},  # empty tail: 2 choices
        {"question": "gap", "A": "1", "B": "", "C": "3", "D": "", "answer": "0"},
    ]
    path = write_csv(tmp_path / "mmlu.csv", rows, header)
    qf = read_question_file(path, Columns(choice_columns=("A", "B", "C", "D")), skip_invalid=True)
    assert [(q.choices, q.answer) for q in qf.questions] == [(("w", "x", "y", "z"), 3), (("yes", "no"), 1)]
    assert [(p.row, p.kind, p.reason) for p in qf.problems] == [(3, "empty_text", "empty choice 2")]


def test_arc_layout_choice_labels(tmp_path: Path) -> None:
    records = [{"id": "arc1", "question": "q", "choices": {"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]},
                "answerKey": "3"}]
    (q,) = read_question_file(write_parquet(tmp_path / "arc.parquet", records), Columns(answer="answerKey")).questions
    assert q.choices == ("a", "b", "c", "d") and q.answer == 2


def test_label_sets(tmp_path: Path) -> None:
    records: list[dict[str, Any]] = [
        {"question": "Great film!", "answer": "positive"},
        {"question": "Awful.", "answer": 0},
        {"question": "Meh.", "answer": "C"},
    ]
    labels = ("negative", "positive", "neutral")
    qf = read_question_file(write_jsonl(tmp_path / "sentiment.jsonl", records), labels=labels)
    assert [(q.choices, q.answer) for q in qf.questions] == [(labels, 1), (labels, 0), (labels, 2)]
    # A choices column may be present; a row whose choices differ from the labels is a problem.
    records = [{"question": "a", "choices": list(labels), "answer": 1},
               {"question": "b", "choices": ["negative", "positive"], "answer": 1},
               {"question": "c", "choices": None, "answer": "neutral"}]
    with pytest.raises(DataFileError) as err:
        read_question_file(write_jsonl(tmp_path / "with_choices.jsonl", records), labels=labels)
    assert [(p.row, p.kind) for p in err.value.problems] == [(2, "bad_value")]
    assert "differ from the labels" in err.value.problems[0].reason
    with pytest.raises(DataFileError, match="answer 'D' is not one of the 3 choices"):
        read_question_file(write_jsonl(tmp_path / "d.jsonl", [{"question": "x", "answer": "D"}]), labels=labels)


def test_unlabeled_eval_file(tmp_path: Path) -> None:
    records: list[dict[str, Any]] = [{"question": "x", "choices": ["a", "b"]}, {"question": "y", "choices": ["a", "b"]}]
    path = write_jsonl(tmp_path / "unlabeled.jsonl", records)
    with pytest.raises(DataFileError, match="'answer' not in the file"):
        read_question_file(path)
    assert [q.answer for q in read_question_file(path, require_answer=False).questions] == [None, None]
    records += [{"question": "z", "choices": ["a", "b"], "answer": 1}]
    path = write_jsonl(tmp_path / "some.jsonl", records)
    assert [q.answer for q in read_question_file(path, require_answer=False).questions] == [None, None, 1]
    with pytest.raises(DataFileError) as err:
        read_question_file(path)
    assert [(p.row, p.reason) for p in err.value.problems] == [(1, "missing field 'answer'"),
                                                               (2, "missing field 'answer'")]


def _bad_rows() -> list[dict[str, Any]]:
    four = ["a", "b", "c", "d"]
    return [
        {"id": "q1", "question": "fine", "choices": four, "answer": 0},                        # 1 ok
        {"id": "q2", "question": "no answer", "choices": four},                                # 2 missing_field
        {"id": "q3", "question": "E?", "choices": four, "answer": "E"},                        # 3 answer_not_in_choices
        {"id": "q4", "question": "one", "choices": ["a"], "answer": 0},                        # 4 choice_count
        {"id": "q5", "question": "many", "choices": [f"c{i}" for i in range(27)], "answer": 0},  # 5 choice_count
        {"id": "q6", "question": "  ", "choices": four, "answer": 0},                          # 6 empty_text
        {"id": "q7", "question": "gap", "choices": ["a", "b", " ", "d"], "answer": 0},         # 7 empty_text
        {"id": "q1", "question": "again", "choices": four, "answer": 0},                       # 8 duplicate_id
        {"id": "q9", "question": "half", "choices": four, "answer": 1.5},                      # 9 bad_value
        {"id": "q10", "choices": four, "answer": 0},                                           # 10 missing_field
        {"id": "q11", "question": "word " * 40, "choices": four, "answer": 0},                 # 11 too_long
        {"id": "q12", "question": "", "choices": ["a", ""], "answer": 5},                      # 12 three at once
        {"id": "q13", "question": "ok too", "choices": four, "answer": "d"},                   # 13 ok
    ]


def word_count(questions: list[Question]) -> list[int]:
    return [len(q.question.split()) + sum(len(c.split()) for c in q.choices) for q in questions]


EXPECTED = [(2, "missing_field"), (3, "answer_not_in_choices"), (4, "choice_count"), (5, "choice_count"),
            (6, "empty_text"), (7, "empty_text"), (8, "duplicate_id"), (9, "bad_value"), (10, "missing_field"),
            (11, "too_long"), (12, "empty_text"), (12, "empty_text"), (12, "answer_not_in_choices")]


def test_every_bad_row_reason_with_its_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", _bad_rows())
    with pytest.raises(DataFileError) as err:
        read_question_file(path, token_count=word_count, max_tokens=20)
    e = err.value
    assert e.path == path
    assert [(p.row, p.kind) for p in e.problems] == EXPECTED
    reasons = {p.row: p.reason for p in e.problems}
    assert reasons[2] == "missing field 'answer'"
    assert reasons[3] == "answer 'E' is not one of the 4 choices"
    assert reasons[4] == "1 choice: need 2..26" and reasons[5] == "27 choices: need 2..26"
    assert reasons[6] == "empty question text" and reasons[7] == "empty choice 3"
    assert reasons[8] == "duplicate id 'q1' (first at row 1)"
    assert reasons[10] == "missing field 'question'"
    assert reasons[11] == "the prompt needs 44 tokens, more than the model's 20"
    assert [p.reason for p in e.problems if p.row == 12] == [
        "empty question text", "empty choice 2", "answer index 5 is not one of the 2 choices (0..1)"]
    # All at once, in one message naming the file.
    msg = str(e)
    assert msg.startswith(f"{path}: 13 problem(s) in 11 of 13 row(s)")
    assert all(f"row {r}: " in msg for r, _ in EXPECTED)


def test_skip_invalid_counts_and_keeps_the_problems(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "bad.csv", _bad_rows(), ["id", "question", "choices", "answer"])
    qf = read_question_file(path, skip_invalid=True, token_count=word_count, max_tokens=20)
    assert [q.id for q in qf.questions] == ["q1", "q13"] and qf.rows == 13 and qf.rows_dropped == 11
    # In CSV 1.5 is the text "1.5" (not an index, letter or choice) and an empty cell is a missing field.
    expected = [(r, "answer_not_in_choices" if r == 9 else k) for r, k in EXPECTED]
    expected[10] = (12, "missing_field")
    assert [(p.row, p.kind) for p in qf.problems] == expected
    # Each dropped row counted once, under its first problem's kind (row 12: its missing question).
    assert qf.dropped == {"missing_field": 3, "answer_not_in_choices": 2, "choice_count": 2, "empty_text": 2,
                          "duplicate_id": 1, "too_long": 1}
    assert sum(qf.dropped.values()) == qf.rows_dropped


def test_many_problems_list_the_first_fifty_and_the_counts(tmp_path: Path) -> None:
    records = [{"question": "", "choices": ["a", "b"], "answer": 0 if i % 2 else 9} for i in range(60)]
    with pytest.raises(DataFileError) as err:
        read_question_file(write_jsonl(tmp_path / "many.jsonl", records))
    msg = str(err.value)
    assert len(err.value.problems) == 90
    assert "(answer_not_in_choices: 30, empty_text: 60)" in msg.splitlines()[0]
    assert msg.count("\n  row ") == 50 and "... and 40 more" in msg


def test_token_count_is_called_in_batches(tmp_path: Path) -> None:
    n = TOKEN_BATCH + 100
    records = [{"question": "w " * (i % 7 + 1), "choices": ["a", "b"], "answer": 0} for i in range(n)]
    sizes: list[int] = []

    def count(qs: list[Question]) -> list[int]:
        sizes.append(len(qs))
        return [len(q.question.split()) for q in qs]

    qf = read_question_file(write_parquet(tmp_path / "big.parquet", records), token_count=count, max_tokens=5,
                            skip_invalid=True)
    assert sizes[0] == TOKEN_BATCH and sum(sizes) == n
    assert qf.dropped == {"too_long": sum(1 for i in range(n) if i % 7 + 1 > 5)}
    assert all(len(q.question.split()) <= 5 for q in qf.questions)
    with pytest.raises(ValueError, match="go together"):
        read_question_file(tmp_path / "big.parquet", token_count=count)


def test_jsonl_blank_lines_and_mixed_answer_types(tmp_path: Path) -> None:
    records = [{"question": "x", "choices": ["a", "b"], "answer": 1}, {"question": "y", "choices": ["a", "b"],
                                                                       "answer": "a"}]
    qf = read_question_file(write_jsonl(tmp_path / "mixed.jsonl", records, trailer="\n\n"))
    assert [q.answer for q in qf.questions] == [1, 0]


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown extension '\.txt'"):
        read_question_file(tmp_path / "q.txt")
    with pytest.raises(FileNotFoundError, match="question file not found"):
        read_question_file(tmp_path / "absent.jsonl")
    path = write_csv(tmp_path / "cols.csv", [{"prompt": "x", "options": "[]", "gold": 0}])
    with pytest.raises(DataFileError, match=r"'question', 'choices', 'answer' not in the file; its columns are "
                                            r"'prompt', 'options', 'gold'"):
        read_question_file(path)
    (tmp_path / "zero.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n \n")
    (tmp_path / "header.csv").write_text("question,choices,answer\n")
    (tmp_path / "list.json").write_text("[]")
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.int64())}),
                   tmp_path / "none.parquet")
    for name in ("zero.jsonl", "blank.jsonl", "header.csv", "list.json", "none.parquet"):
        with pytest.raises(DataFileError, match=r"(empty|no records)"):
            read_question_file(tmp_path / name)
    (tmp_path / "broken.jsonl").write_text('{"question": "x", "choices": ["a", "b"], "answer": 0}\n{"question": \n')
    with pytest.raises(DataFileError, match=r"broken\.jsonl: cannot read it as JSON Lines"):
        read_question_file(tmp_path / "broken.jsonl")
    (tmp_path / "ragged.csv").write_text('question,choices,answer\nx,"[""a"",""b""]",0\ny,"[""a""]",0,extra\n')
    with pytest.raises(DataFileError, match=r"ragged\.csv: cannot read it as CSV"):
        read_question_file(tmp_path / "ragged.csv")
    (tmp_path / "latin1.csv").write_bytes("question,choices,answer\ncaf\xe9,a,0\n".encode("latin-1"))
    with pytest.raises(DataFileError, match="cannot read it as UTF-8 CSV"):
        read_question_file(tmp_path / "latin1.csv")
    (tmp_path / "notparquet.parquet").write_text("hello")
    with pytest.raises(DataFileError, match="cannot read it as Parquet"):
        read_question_file(tmp_path / "notparquet.parquet")
    (tmp_path / "wrapped.json").write_text('{"data": [{"question": "x"}]}')
    with pytest.raises(DataFileError, match=r"its columns are 'data' \(a JSON file holds a list of records"):
        read_question_file(tmp_path / "wrapped.json")
    (tmp_path / "choices.csv").write_text("question,choices,answer\nx,a|b,0\n")
    with pytest.raises(DataFileError, match="not a JSON list"):
        read_question_file(tmp_path / "choices.csv")


def test_split_questions() -> None:
    qs = [Question(f"q{i}", ("a", "b"), 0, id=f"q{i}") for i in range(100)]
    parts = split_questions(qs, validation=0.2, test=0.1, seed=3)
    assert {k: len(v) for k, v in parts.items()} == {"train": 70, "validation": 20, "test": 10}
    ids = [{q.id for q in v} for v in parts.values()]
    assert set.union(*ids) == {q.id for q in qs} and sum(map(len, ids)) == 100  # disjoint, union = all
    assert parts == split_questions(qs, validation=0.2, test=0.1, seed=3)
    assert parts["validation"] != split_questions(qs, validation=0.2, test=0.1, seed=4)["validation"]
    assert parts["train"] == sorted(parts["train"], key=lambda q: int(q.id[1:]))  # file order kept
    assert set(split_questions(qs, validation=0.5)) == {"train", "validation"}
    with pytest.raises(ValueError, match=r"empty split \(train=9, validation=0\)"):
        split_questions(qs[:9], validation=0.01)
    with pytest.raises(ValueError, match=r"train=0"):
        split_questions(qs[:2], validation=0.5, test=0.5 - 1e-9)
    with pytest.raises(ValueError, match="fraction"):
        split_questions(qs, validation=1.0)


def test_parse_labels(tmp_path: Path) -> None:
    assert parse_labels() is None
    assert parse_labels(" no , yes ") == ("no", "yes")
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\ufeffneg, with comma\n\n  neutral \npos\n")
    assert parse_labels(file=labels_file) == ("neg, with comma", "neutral", "pos")
    for text, msg in [("a,,b", "empty label at position"), ("a,b,a", "duplicate label"), ("a", "need 2..26"),
                      ("", "empty label"), (",".join(f"l{i}" for i in range(27)), "27 label")]:
        with pytest.raises(ValueError, match=msg):
            parse_labels(text)
    labels_file.write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="duplicate label"):
        parse_labels(file=labels_file)
    with pytest.raises(ValueError, match="not both"):
        parse_labels("a,b", labels_file)
    with pytest.raises(FileNotFoundError):
        parse_labels(file=tmp_path / "none.txt")
