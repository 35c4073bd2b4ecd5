"""Shared fixtures: a tiny random Llama and a tiny byte-level BPE tokenizer, built offline from configs."""

from __future__ import annotations

import string

import pytest
import torch

from core.answers import Question
from core.basemodel import BaseModel, BaseModelInfo, fingerprint_module

_CORPUS = [
    "Question: Which gas do plants take in from the air? Answer: carbon dioxide",
    "Question: What is the boiling point of water at sea level? Answer: 100 degrees",
    "Passage: The moon orbits the earth once a month. Question: is the moon a planet Answer: no",
    "Answer: yes no true false A B C D E",
] + [f"{letter}. choice {letter}\nAnswer: {letter}" for letter in string.ascii_uppercase]


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>", "<eos>"], show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.add_tokens([f" {c}" for c in string.ascii_uppercase])
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, attn_implementation="eager")
    model = LlamaForCausalLM(config)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_base(tiny_tokenizer) -> BaseModel:
    model = build_tiny_model(len(tiny_tokenizer))
    cfg = model.config
    info = BaseModelInfo(model_id="tiny-llama", weight_hash=fingerprint_module(model), num_layers=cfg.num_hidden_layers,
                         hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size)
    return BaseModel(model=model, tokenizer=tiny_tokenizer, info=info)


@pytest.fixture(scope="session")
def tiny_questions() -> list[Question]:
    return [
        Question("Which gas do plants take in?", ("oxygen", "carbon dioxide", "helium"), answer=1, id="q0"),
        Question("What is the boiling point of water?", ("100 degrees", "0 degrees"), answer=0, id="q1"),
        Question("Is the moon a planet", ("yes", "no"), answer=1, context="The moon orbits the earth.", id="q2"),
        Question("Pick the letter", tuple(f"choice {c}" for c in "ABCDE"), answer=3, id="q3"),
    ]


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(autouse=True)
def _no_leaked_hooks(request: pytest.FixtureRequest):
    """A test that leaves hooks (MultiLora slots, MoE routers, taps) on the shared tiny model fails: later
    tests would silently run an adapted model."""
    if "tiny_base" not in request.fixturenames:
        yield
        return
    model = request.getfixturevalue("tiny_base").model
    before = _hook_count(model)
    yield
    leaked = _hook_count(model) - before
    if leaked > 0:
        pytest.fail(f"{request.node.nodeid} left {leaked} hook(s) on the shared tiny model")


@pytest.fixture(autouse=True, scope="session")
def _prediction_log_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """Servers built in tests (and their subprocesses) log answers under a temporary state directory, never
    into the checkout, unless a test sets its own."""
    import os

    previous = os.environ.get("UQSERVE_STATE_DIR")
    os.environ["UQSERVE_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    yield
    if previous is None:
        os.environ.pop("UQSERVE_STATE_DIR", None)
    else:
        os.environ["UQSERVE_STATE_DIR"] = previous
