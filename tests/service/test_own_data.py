"""Your own data and prompt, on the tiny model: a bundle trained with a custom format template, a Jinja
template or the base model's chat template scores the very tokens training scored (the server's encoder and
the training scorer agree token for token, and served numbers equal ``uqserve eval``'s); a chat-template
mismatch is refused at load; a label-set bundle is served without choices; ``uqserve train --train FILE``
records splits, row counts, hashes, drops, labels and the prompt in the manifest."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from core.answers import AnswerFormat, Question, encode_question
from core.basemodel import BaseModel
from core.bundle import read_bundle
from core.prompt import PromptSpec
from service.app import create_app
from service.engine.errors import BundleRefusedError
from service.engine.types import AnswerOptions
from training.ensemble import EnsembleConfig
from training.ensemble_cli import train_and_export
from training.evaluate import bundle_prediction

SMALL = dict(rank=4, alpha=8.0, top_layers=2, epochs=2, batch_size=4, lr=3e-2, dtype="float32", row_tokens=128)
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEAMS = ("billing", "technical", "account")
PROMPTS = {
    "format": PromptSpec(template="Ticket: {question}\nOptions: {labels}\nTeam:", instruction="Route the ticket."),
    "jinja": PromptSpec(template="{% if context %}Note: {{ context }}\n{% endif %}Q: {{ question }}\n{{ choices }}\nA:",
                        syntax="jinja"),
    "chat": PromptSpec(instruction="You route support tickets.", chat=True),
}


def tickets(n: int, seed: int) -> list[Question]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        team = rng.randrange(3)
        out.append(Question(f"ticket {i}: my {TEAMS[team]} problem {i % 5}", TEAMS, answer=team,
                            context="urgent" if i % 4 == 0 else None, id=f"t{i}"))
    return out


@pytest.fixture
def chat_tokenizer(tiny_base: BaseModel) -> Any:
    """The tiny tokenizer with a chat template for the test's duration."""
    tokenizer = tiny_base.tokenizer
    before = getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = CHAT
    yield tokenizer
    tokenizer.chat_template = before


def _serve(engine: Any, name: str, questions: list[Question]) -> tuple[Any, list[Any]]:
    async def main() -> tuple[Any, list[Any]]:
        await engine.start()
        await engine.load_bundle(name)
        entry = engine.registry.get(name)
        answers = await engine.answer(name, questions, AnswerOptions())
        await engine.stop()
        return entry, answers

    return asyncio.run(main())


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_training_and_serving_score_the_same_tokens(kind: str, tiny_base: BaseModel, chat_tokenizer: Any,
                                                    engine_factory: Any, tmp_path: Path) -> None:
    prompt = PROMPTS[kind].with_tokenizer(chat_tokenizer)
    questions = tickets(24, seed=1)
    config = EnsembleConfig(members=2, prompt=prompt, **SMALL)
    manifest = train_and_export(tiny_base, config, questions, questions, tmp_path, "p", log=lambda _: None)
    assert manifest.answer_space.prompt == prompt and manifest.answer_space.prompt_text() == prompt.text()
    entry, served = _serve(engine_factory(tmp_path), "p", questions)
    for q in questions:  # what the server encodes = what the training scorer encoded
        training = encode_question(chat_tokenizer, q, config.answer_format, config.max_tokens, config.prompt)
        assert entry.space.prompt == config.prompt
        serving = encode_question(chat_tokenizer, q, entry.answer_format, entry.max_tokens, entry.space.prompt)
        assert (serving.prefix_ids, serving.choice_ids) == (training.prefix_ids, training.choice_ids)
        plain = encode_question(chat_tokenizer, q, config.answer_format, config.max_tokens)
        assert training.prefix_ids != plain.prefix_ids  # the template really is in the tokens
    text = chat_tokenizer.decode(training.prefix_ids)
    assert {"format": "Route the ticket.", "jinja": "Q: ", "chat": "<|system|>You route"}[kind] in text
    offline = bundle_prediction(tiny_base, read_bundle(tmp_path / "p", expect_base=tiny_base.info), questions)
    for i, answer in enumerate(served):
        torch.testing.assert_close(torch.tensor(answer.probabilities, dtype=torch.float64),
                                   offline.scores.probabilities[i, :3], atol=1e-5, rtol=0)
        assert answer.bundle.prompt_hash == manifest.answer_space.prompt_hash()


def test_a_chat_template_mismatch_is_refused(tiny_base: BaseModel, chat_tokenizer: Any, engine_factory: Any,
                                             tmp_path: Path) -> None:
    config = EnsembleConfig(members=1, prompt=PROMPTS["chat"].with_tokenizer(chat_tokenizer), **{**SMALL, "epochs": 1})
    train_and_export(tiny_base, config, tickets(12, 2), tickets(12, 3), tmp_path, "chat", log=lambda _: None)
    chat_tokenizer.chat_template = CHAT.replace("<|assistant|>", "<|bot|>")  # the server's base has another one
    with pytest.raises(BundleRefusedError, match="chat template differs") as refused:
        asyncio.run(engine_factory(tmp_path).load_bundle("chat"))
    assert refused.value.reason == "prompt_mismatch"


def test_a_label_set_bundle_is_served_without_choices(tiny_base: BaseModel, engine_factory: Any, bundle_maker: Any,
                                                      tmp_path: Path) -> None:
    root = tmp_path / "bundles"
    config = EnsembleConfig(members=2, labels=TEAMS, prompt=PROMPTS["format"], **SMALL)
    manifest = train_and_export(tiny_base, config, tickets(24, 4), tickets(12, 5), root, "teams", log=lambda _: None)
    bundle_maker(root, "plain", members=2)
    engine = engine_factory(root, preload_bundles=["teams", "plain"])
    with TestClient(create_app(engine.settings, engine)) as client:
        r = client.post("/v1/answer", json={"bundle": "teams", "question": "my invoice is wrong"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["probabilities"]) == 3 and body["answer"]["text"] in TEAMS
        assert body["bundle"]["prompt_hash"] == manifest.answer_space.prompt_hash()
        same = client.post("/v1/answer", json={"bundle": "teams", "question": "my invoice is wrong",
                                               "choices": list(TEAMS)})
        assert same.json()["probabilities"] == body["probabilities"]
        other = client.post("/v1/answer", json={"bundle": "teams", "question": "x", "choices": ["billing", "sales"]})
        assert other.status_code == 422 and other.json()["error"]["code"] == "choices_mismatch"
        batch = client.post("/v1/answer/batch", json={"bundle": "teams", "questions": [
            {"question": "login fails"}, {"question": "x", "choices": ["a", "b"]}]})
        assert batch.status_code == 422 and batch.json()["error"]["param"] == "questions.1.choices"
        missing = client.post("/v1/answer", json={"bundle": "plain", "question": "which?"})
        assert missing.status_code == 422 and missing.json()["error"]["code"] == "choices_required"
        listed = {b["name"]: b for b in client.get("/v1/bundles").json()["bundles"]}
        assert listed["teams"]["labels"] == list(TEAMS) and listed["plain"]["labels"] is None
        assert listed["teams"]["prompt"].startswith("Ticket: {question}")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_from_a_file_records_its_data_and_prompt(tmp_path: Path) -> None:
    from replicas import tiny_model_dir

    from uqserve.cli import main

    model_dir, _ = tiny_model_dir(tmp_path / "model")
    rng = random.Random(0)
    rows = [{"text": f"ticket {i} on {TEAMS[t]}", "team": TEAMS[t], "ref": f"r{i}"}
            for i, t in enumerate(rng.randrange(3) for _ in range(60))]
    rows[7]["team"] = "sales"  # not a label: dropped with --skip-invalid, and recorded
    train = _write_jsonl(tmp_path / "tickets.jsonl", rows)
    argv = ["train", "ensemble", "--train", str(train), "--question-column", "text", "--answer-column", "team",
            "--id-column", "ref", "--labels", ",".join(TEAMS), "--test-fraction", "0.2", "--split-seed", "3",
            "--prompt-template", "Ticket: {question}\nTeam:", "--base-model", str(model_dir), "--members", "2",
            "--epochs", "0.5", "--top-layers", "2", "--rank", "4", "--dtype", "float32", "--out", str(tmp_path / "b"),
            "--name", "t", "--min-coverage", "0.05"]
    with pytest.raises(SystemExit, match="row 8: answer 'sales'"):
        main(argv)
    assert main([*argv, "--skip-invalid"]) == 0
    manifest = read_bundle(tmp_path / "b" / "t").manifest
    data = manifest.training["data"]
    assert data["files"]["train"]["rows"] == 60 and data["files"]["train"]["dropped"] == {"answer_not_in_choices": 1}
    assert data["rows"] == {"train": 41, "validation": 3, "test": 12, "calibration": 3}
    assert data["split_off"]["seed"] == 3
    assert set(manifest.data_hashes) == {"train", "validation", "test", "calibration"}
    assert manifest.answer_space.labels == TEAMS
    assert manifest.answer_space.prompt.template == "Ticket: {question}\nTeam:"
    assert manifest.answer_space.answer_format == AnswerFormat.CLOZE
    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "b" / "t"), "--data", str(train), "--question-column", "text",
                 "--answer-column", "team", "--id-column", "ref", "--skip-invalid", "--base-model", str(model_dir),
                 "--no-plots", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["n"] == 59
