"""Mutations of a good bundle directory, one per way a bundle can be corrupt or wrong (see test_corrupt_bundles).

Each :class:`Case` names the file the reader must blame (None: well-formed, only the serving engine refuses it),
the HTTP status and the ``uqserve_bundle_load_failures_total`` reason the server must answer with.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.errors import BundleError, IncompatibleBundleError

# the server's chat template: refuses a system message, as some instruct models' templates do
SERVER_CHAT = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
               "{% endif %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
               "{% if add_generation_prompt %}<assistant>{% endif %}")
KEY = "base_model.model.model.layers.{layer}.{parent}.{module}.lora_{which}.weight"


@dataclass(frozen=True)
class Case:
    name: str  # also the bundle's (directory and manifest) name
    mutate: Callable[[Path], None]
    file: str | None  # what read_bundle's error names; None: the reader accepts it, only this server refuses
    status: int
    reason: str
    error: type[BundleError] = BundleError
    needs_non_root: bool = False  # permission bits do not stop root


CASES: list[Case] = []


def case(file: str | None, status: int = 422, reason: str = "invalid_bundle", **options: Any) -> Callable[..., Any]:
    def register(mutate: Callable[[Path], None]) -> Callable[[Path], None]:
        CASES.append(Case(mutate.__name__, mutate, file, status, reason, **options))
        return mutate

    return register


# --- helpers that edit a copied bundle -------------------------------------------------------------------------


def edit_json(file: Path, edit: Callable[[Any], Any]) -> None:
    value = json.loads(file.read_text())
    file.write_text(json.dumps(edit(value) or value))


def edit_manifest(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    edit_json(path / "manifest.json", edit)


def edit_configs(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    for config in sorted(path.glob("members/*/adapter_config.json")):
        edit_json(config, edit)


def edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], Any], member: str = "m1") -> None:
    file = path / "members" / member / "adapter_model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def key(layer: int = 2, module: str = "q_proj", which: str = "A", parent: str | None = None) -> str:
    parent = parent or ("mlp" if module.endswith(("gate_proj", "up_proj", "down_proj", "fc_proj")) else "self_attn")
    return KEY.format(layer=layer, parent=parent, module=module, which=which)


def weights_file(path: Path, member: str = "m1") -> Path:
    return path / "members" / member / "adapter_model.safetensors"


def config_file(path: Path, member: str = "m1") -> Path:
    return path / "members" / member / "adapter_config.json"


def replace_text(file: Path, old: str, new: str, count: int = -1) -> None:
    text = file.read_text()
    assert old in text
    file.write_text(text.replace(old, new, count))


# --- manifest.json ---------------------------------------------------------------------------------------------


@case("manifest.json")
def manifest_not_utf8(path: Path) -> None:
    (path / "manifest.json").write_bytes(b"\xff\xfe" + (path / "manifest.json").read_bytes())


@case("manifest.json")
def manifest_truncated(path: Path) -> None:
    data = (path / "manifest.json").read_bytes()
    (path / "manifest.json").write_bytes(data[: len(data) // 2])


@case("manifest.json")
def manifest_is_array(path: Path) -> None:
    (path / "manifest.json").write_text("[1, 2]")


@case("manifest.json")
def manifest_missing(path: Path) -> None:
    (path / "manifest.json").unlink()


@case("manifest.json")
def manifest_is_directory(path: Path) -> None:
    (path / "manifest.json").unlink()
    (path / "manifest.json").mkdir()


@case("manifest.json")
def manifest_is_fifo(path: Path) -> None:  # opening it would block the loader forever
    (path / "manifest.json").unlink()
    os.mkfifo(path / "manifest.json")


@case("manifest.json")
def manifest_nan_literal(path: Path) -> None:
    replace_text(path / "manifest.json", '"weight": 1.0', '"weight": NaN', 1)


@case("manifest.json")
def manifest_wrong_type(path: Path) -> None:
    edit_manifest(path, lambda m: m["lora"].update(rank="four"))


@case("manifest.json")
def duplicate_member(path: Path) -> None:
    edit_manifest(path, lambda m: m["members"].append(dict(m["members"][0])))


@case("manifest.json")
def member_weight_infinite(path: Path) -> None:
    replace_text(path / "manifest.json", '"weight": 1.0', '"weight": 1e999', 1)


@case("manifest.json")
def member_weight_negative(path: Path) -> None:
    edit_manifest(path, lambda m: m["members"][0].update(weight=-1.0))


@case("manifest.json")
def member_weights_overflow(path: Path) -> None:  # each finite, their sum is not: weights would be 0/inf
    replace_text(path / "manifest.json", '"weight": 1.0', '"weight": 1e308')


@case("manifest.json")
def member_name_is_path(path: Path) -> None:
    edit_manifest(path, lambda m: m["members"][0].update(name="../m0"))


@case("manifest.json")
def lora_layers_empty(path: Path) -> None:
    edit_manifest(path, lambda m: m["lora"].update(layers=[]))


@case("manifest.json")
def max_tokens_zero(path: Path) -> None:
    edit_manifest(path, lambda m: m["answer_space"].update(max_tokens=0))


@case("manifest.json")
def chat_without_template(path: Path) -> None:
    edit_manifest(path, lambda m: m["answer_space"]["prompt"].update(chat=True))


@case("manifest.json")
def artifact_name_is_path(path: Path) -> None:
    edit_manifest(path, lambda m: m.update(artifacts={"extra": "../outside.json"}))


@case("manifest.json", status=409, reason="incompatible_base", error=IncompatibleBundleError)
def base_hash_mismatch(path: Path) -> None:
    edit_manifest(path, lambda m: m["base_model"].update(weight_hash="0" * 64))


@case("manifest.json", status=409, reason="incompatible_base", error=IncompatibleBundleError)
def layer_beyond_base(path: Path) -> None:  # consistent everywhere, but the tiny base has 4 layers
    edit_manifest(path, lambda m: m["lora"].update(layers=[2, 3, 7]))
    edit_configs(path, lambda c: c.update(layers_to_transform=[2, 3, 7]))
    for member in ("m0", "m1"):
        edit_tensors(path, lambda t: t.update({key(7, which="A"): torch.zeros(4, 64),
                                               key(7, which="B"): torch.zeros(64, 4)}), member)


# --- members and other files -----------------------------------------------------------------------------------


@case("members/m1")
def member_dir_missing(path: Path) -> None:
    shutil.rmtree(path / "members" / "m1")


@case("members/m9")
def member_dir_unlisted(path: Path) -> None:  # would be silently ignored
    shutil.copytree(path / "members" / "m0", path / "members" / "m9")


@case("adapter_model.bin")
def pickle_beside_member(path: Path) -> None:
    (path / "members" / "m0" / "adapter_model.bin").write_bytes(b"\x80\x04")


@case("members/m1/adapter_model.safetensors")
def weights_symlink(path: Path) -> None:
    weights_file(path).unlink()
    weights_file(path).symlink_to(Path("..") / "m0" / "adapter_model.safetensors")


@case("extra.json")
def artifact_bad_json(path: Path) -> None:
    edit_manifest(path, lambda m: m.update(artifacts={"extra": "extra.json"}))
    (path / "extra.json").write_text('{"a": ')


@case("extra.json")
def artifact_not_utf8(path: Path) -> None:
    edit_manifest(path, lambda m: m.update(artifacts={"extra": "extra.json"}))
    (path / "extra.json").write_bytes(b'{"a": "\xff"}')


@case("extra.safetensors")
def artifact_is_directory(path: Path) -> None:
    edit_manifest(path, lambda m: m.update(artifacts={"extra": "extra.safetensors"}))
    (path / "extra.safetensors").mkdir()


# --- adapter_config.json ---------------------------------------------------------------------------------------


@case("members/m1/adapter_config.json")
def config_not_utf8(path: Path) -> None:
    config_file(path).write_bytes(b"\xc3\x28" + config_file(path).read_bytes())


@case("members/m1/adapter_config.json")
def config_is_array(path: Path) -> None:
    config_file(path).write_text("[]")


@case("members/m1/adapter_config.json")
def config_is_directory(path: Path) -> None:
    config_file(path).unlink()
    config_file(path).mkdir()


@case("members/m1/adapter_config.json")
def config_r_string(path: Path) -> None:
    edit_json(config_file(path), lambda c: c.update(r="4"))


@case("members/m1/adapter_config.json")
def config_alpha_list(path: Path) -> None:
    edit_json(config_file(path), lambda c: c.update(lora_alpha=[8]))


@case("members/m1/adapter_config.json")
def config_alpha_huge_int(path: Path) -> None:  # not representable as a float
    edit_json(config_file(path), lambda c: c.update(lora_alpha=10**400))


@case("members/m1/adapter_config.json")
def config_rank_mismatch(path: Path) -> None:
    edit_json(config_file(path), lambda c: c.update(r=8))


@case("members/m1/adapter_config.json")
def config_dora(path: Path) -> None:
    edit_json(config_file(path), lambda c: c.update(use_dora=True))


# --- adapter_model.safetensors ---------------------------------------------------------------------------------

WEIGHTS = "members/m1/adapter_model.safetensors"


@case(WEIGHTS)
def weights_truncated(path: Path) -> None:
    data = weights_file(path).read_bytes()
    weights_file(path).write_bytes(data[: len(data) // 2])


@case(WEIGHTS)
def weights_empty(path: Path) -> None:
    weights_file(path).write_bytes(b"")


@case(WEIGHTS)
def weights_header_lies(path: Path) -> None:
    data = weights_file(path).read_bytes()
    weights_file(path).write_bytes(b"\xff" * 8 + data[8:])


@case(WEIGHTS)
def weights_missing(path: Path) -> None:
    weights_file(path).unlink()


@case(WEIGHTS, needs_non_root=True)
def weights_unreadable(path: Path) -> None:
    weights_file(path).chmod(0)


@case(WEIGHTS)
def tensor_int_dtype(path: Path) -> None:
    edit_tensors(path, lambda t: t.update({key(): t[key()].to(torch.int32)}))


@case(WEIGHTS)
def tensor_3d(path: Path) -> None:
    edit_tensors(path, lambda t: t.update({key(): t[key()][None]}))


@case(WEIGHTS)
def tensor_rank_short(path: Path) -> None:  # consistent A/B of rank 2 under a manifest of rank 4
    edit_tensors(path, lambda t: t.update({key(): t[key()][:2].clone(),
                                           key(which="B"): t[key(which="B")][:, :2].clone()}))


@case(WEIGHTS)
def tensor_ranks_disagree(path: Path) -> None:
    edit_tensors(path, lambda t: t.update({key(which="B"): t[key(which="B")][:, :3].clone()}))


@case(WEIGHTS)
def tensor_wrong_width(path: Path) -> None:
    edit_tensors(path, lambda t: t.update({key(): t[key()][:, :32].clone()}))


@case(WEIGHTS)
def tensor_nan(path: Path) -> None:
    edit_tensors(path, lambda t: t[key()].view(-1).__setitem__(0, float("nan")))


@case(WEIGHTS)
def tensor_unknown_key(path: Path) -> None:  # not a decoder-layer LoRA factor: would be silently ignored
    edit_tensors(path, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}))


@case(WEIGHTS)
def tensor_outside_layout(path: Path) -> None:  # layer 0 is not in the manifest's layers (2, 3)
    edit_tensors(path, lambda t: t.update({key(0): torch.zeros(4, 64), key(0, which="B"): torch.zeros(64, 4)}))


@case(WEIGHTS)
def tensor_missing_b(path: Path) -> None:
    edit_tensors(path, lambda t: t.pop(key(which="B")))


@case(WEIGHTS)
def tensor_wrong_parent(path: Path) -> None:  # q_proj under mlp would load into the attention's q_proj
    edit_tensors(path, lambda t: t.update({key(parent="mlp"): t.pop(key()),
                                           key(which="B", parent="mlp"): t.pop(key(which="B"))}))


# --- wrong for this server only: the reader accepts them ------------------------------------------------------


@case(None, reason="layout")
def module_the_engine_lacks(path: Path) -> None:
    edit_manifest(path, lambda m: m["lora"]["target_modules"].append("fc_proj"))
    edit_configs(path, lambda c: c.update(target_modules=[*c["target_modules"], "fc_proj"]))
    for member in ("m0", "m1"):
        edit_tensors(path, lambda t: t.update({key(layer, "fc_proj", "A"): torch.zeros(4, 64) for layer in (2, 3)}
                                              | {key(layer, "fc_proj", "B"): torch.zeros(64, 4) for layer in (2, 3)}),
                     member)


@case(None, reason="answer_space")
def max_tokens_too_small(path: Path) -> None:
    edit_manifest(path, lambda m: m["answer_space"].update(max_tokens=3))


@case(None, reason="answer_space")
def chat_template_refuses_instruction(path: Path) -> None:  # the server's own template, with a system message
    edit_manifest(path, lambda m: m["answer_space"]["prompt"].update(chat=True, chat_template=SERVER_CHAT,
                                                                       instruction="Answer briefly."))


@case(None, reason="prompt_mismatch")
def chat_template_differs(path: Path) -> None:
    edit_manifest(path, lambda m: m["answer_space"]["prompt"].update(chat=True, chat_template="{{ messages }}"))


def corrupt_copy(good: Path, root: Path, item: Case) -> Path:
    path = root / item.name
    shutil.copytree(good, path)
    edit_manifest(path, lambda m: m.update(name=item.name))
    item.mutate(path)
    return path
