"""Bundle format: write → read → identical predictions; peft loads members natively; the reader collects errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from core.answers import AnswerFormat
from core.bundle import (
    BundleManifest,
    LoraSpec,
    MemberSpec,
    Method,
    base_ref,
    bundle_path,
    read_bundle,
    write_bundle,
)
from core.errors import BundleError, IncompatibleBundleError
from core.multilora import ALL_MODULES, LoraLayout, MultiLora
from core.scoring import ChoiceScorer

LAYOUT = LoraLayout(ALL_MODULES, (2, 3), rank=4, alpha=8.0)


def _random_members(model, count: int) -> tuple[MultiLora, dict[str, dict[str, torch.Tensor]]]:
    """A MultiLora with random members and their peft tensors; the caller removes its hooks (or uses
    :func:`_members_only`)."""
    multilora = MultiLora(model, LAYOUT, num_slots=count)
    for slot in range(count):
        multilora.init_for_training(slot, torch.Generator().manual_seed(slot))
        with torch.no_grad():
            for factors in multilora.factors.values():
                factors.lora_B[slot].normal_(0, 0.5, generator=torch.Generator().manual_seed(100 + slot))
    return multilora, {f"member-{m}": multilora.peft_state_dict(m) for m in range(count)}


def _members_only(model, count: int) -> dict[str, dict[str, torch.Tensor]]:
    """Random members' peft tensors, leaving no hooks on the shared model."""
    multilora, members = _random_members(model, count)
    multilora.remove()
    return members


def _manifest(info, count: int, name: str = "tiny") -> BundleManifest:
    return BundleManifest(
        name=name, method=Method.ENSEMBLE, base_model=base_ref(info),
        members=tuple(MemberSpec(name=f"member-{m}", weight=1.0) for m in range(count)),
        lora=LoraSpec(rank=LAYOUT.rank, alpha=LAYOUT.alpha, target_modules=LAYOUT.target_modules, layers=LAYOUT.layers),
    )


def test_round_trip_gives_identical_predictions(tiny_base, tiny_questions, tmp_path: Path) -> None:
    multilora, members = _random_members(tiny_base.model, 3)
    scorer = ChoiceScorer(tiny_base.model, tiny_base.tokenizer, AnswerFormat.CLOZE)
    batch = scorer.pack(tiny_questions)
    rows = torch.arange(len(tiny_questions)).repeat_interleave(3)
    slots = torch.arange(3).repeat(len(tiny_questions))
    with torch.no_grad(), multilora.rows(slots):
        before = scorer.scores(batch, rows)
    multilora.remove()
    write_bundle(tmp_path / "tiny", _manifest(tiny_base.info, 3), members)
    bundle = read_bundle(tmp_path / "tiny", expect_base=tiny_base.info)
    reloaded = MultiLora(tiny_base.model, bundle.manifest.lora.layout(), num_slots=3)
    for slot, member in enumerate(bundle.manifest.members):
        reloaded.load_peft_state_dict(slot, bundle.members[member.name], LAYOUT.scaling)
    with torch.no_grad(), reloaded.rows(slots):
        after = scorer.scores(batch, rows)
    reloaded.remove()
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert not torch.allclose(before[0::3], before[1::3])  # members differ


def test_members_load_with_plain_peft(tiny_base, tiny_questions, tmp_path: Path) -> None:
    from peft import PeftModel

    multilora, members = _random_members(tiny_base.model, 2)
    write_bundle(tmp_path / "tiny", _manifest(tiny_base.info, 2), members)
    scorer = ChoiceScorer(tiny_base.model, tiny_base.tokenizer, AnswerFormat.CLOZE)
    batch = scorer.pack(tiny_questions)
    with torch.no_grad(), multilora.rows(torch.ones(len(tiny_questions), dtype=torch.long)):
        ours = scorer.scores(batch)
    multilora.remove()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_base.model), str(tmp_path / "tiny/members/member-1"))
    merged = peft_model.merge_and_unload()
    peft_scorer = ChoiceScorer(merged, tiny_base.tokenizer, AnswerFormat.CLOZE)
    with torch.no_grad():
        theirs = peft_scorer.scores(peft_scorer.pack(tiny_questions))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_reader_collects_every_problem(tiny_base, tmp_path: Path) -> None:
    members = _members_only(tiny_base.model, 2)
    path = write_bundle(tmp_path / "tiny", _manifest(tiny_base.info, 2), members)
    (path / "members/member-0/adapter_model.safetensors").unlink()
    (path / "members/member-1/adapter_model.bin").write_bytes(b"pickle")
    config = json.loads((path / "members/member-1/adapter_config.json").read_text())
    config["r"] = 99
    (path / "members/member-1/adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError) as err:
        read_bundle(path)
    problems = err.value.problems
    assert any("member-0" in p and "adapter_model.safetensors" in p for p in problems)
    assert any("pickle" in p for p in problems)
    assert any("r/alpha" in p for p in problems)


def test_bad_manifest_and_base_mismatch(tiny_base, tmp_path: Path) -> None:
    members = _members_only(tiny_base.model, 1)
    path = write_bundle(tmp_path / "tiny", _manifest(tiny_base.info, 1), members)
    other = type(tiny_base.info)(**{**vars(tiny_base.info), "weight_hash": "0" * 64})
    with pytest.raises(IncompatibleBundleError, match="weight hash"):
        read_bundle(path, expect_base=other)
    (path / "manifest.json").write_text(json.dumps({"name": "x", "method": "nope"}))
    with pytest.raises(BundleError, match="manifest"):
        read_bundle(path)


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 80, "a\\b"])
def test_bundle_names_are_never_paths(tmp_path: Path, name: str) -> None:
    with pytest.raises(BundleError):
        bundle_path(tmp_path, name)
    assert bundle_path(tmp_path, "ok-name_1.2") == (tmp_path / "ok-name_1.2").resolve()
