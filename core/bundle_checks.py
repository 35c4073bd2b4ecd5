"""The checks :func:`core.bundle.read_bundle` runs on each file of a bundle directory.

Every function here is *total*: whatever a file holds (bytes that are not UTF-8, JSON of the wrong shape, a
truncated safetensors file, a directory or a FIFO where a file belongs, a permission error), it appends a
problem string that starts with the file's path inside the bundle and returns ``None`` instead of raising, so
the reader can go on and report every problem in one :class:`~core.errors.BundleError`.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import stat
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from core.answers import Question, encode_question
from core.multilora import ATTENTION_MODULES, MLP_MODULES, parent_name, peft_key_parts

if TYPE_CHECKING:  # core.bundle imports this module
    from core.bundle import AnswerSpaceSpec, BundleManifest, LoraSpec

MAX_JSON_BYTES = 64 * 2**20  # a manifest (with its calibration references) or an adapter config
MAX_PROBLEMS_PER_FILE = 8
FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")  # pickle-capable
_IN_IS_HIDDEN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # lora_A [r, hidden]
_OUT_IS_HIDDEN = ("o_proj", "down_proj")  # lora_B [hidden, r]
_KNOWN_MODULES = ATTENTION_MODULES + MLP_MODULES
PROBE_QUESTION = "Which of these is the answer?"  # encoded at load through a bundle's answer space
PROBE_CONTEXT = "A short passage."
PROBE_CHOICES = ("yes", "no")


def file_problem(file: Path, rel: str) -> str | None:
    """Why ``file`` cannot be read as a plain file (missing, a symlink, a directory, a FIFO …), or None."""
    try:
        mode = os.lstat(file).st_mode
    except FileNotFoundError:
        return f"{rel}: missing"
    except OSError as err:
        return f"{rel}: cannot be read ({type(err).__name__}: {err.strerror or err})"
    if stat.S_ISLNK(mode):
        return f"{rel}: symlinks are refused"
    if stat.S_ISDIR(mode):
        return f"{rel}: is a directory, not a file"
    if not stat.S_ISREG(mode):
        return f"{rel}: not a regular file"
    return None


def _read_raw(file: Path, limit: int) -> bytes:
    with open(file, "rb") as handle:
        return handle.read(limit + 1)


def read_json(file: Path, rel: str, problems: list[str], *, want_object: bool = True) -> Any | None:
    """The JSON value of ``file`` (an object unless ``want_object`` is false), or None with the problem recorded.

    Strict: UTF-8 only, standard JSON only (``NaN`` and ``Infinity`` are refused), at most MAX_JSON_BYTES."""
    problem = file_problem(file, rel)
    if problem is not None:
        problems.append(problem)
        return None
    try:
        data = _read_raw(file, MAX_JSON_BYTES)
    except OSError as err:
        problems.append(f"{rel}: cannot be read ({type(err).__name__}: {err.strerror or err})")
        return None
    if len(data) > MAX_JSON_BYTES:
        problems.append(f"{rel}: larger than {MAX_JSON_BYTES} bytes")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        problems.append(f"{rel}: not UTF-8 (invalid byte at offset {err.start})")
        return None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        problems.append(f"{rel}: not valid JSON ({err})")
        return None
    if want_object and not isinstance(value, dict):
        problems.append(f"{rel}: must hold a JSON object, not {_json_type(value)}")
        return None
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not standard JSON")


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def read_safetensors(file: Path, rel: str, problems: list[str]) -> dict[str, torch.Tensor] | None:
    """The tensors of a safetensors file (never unpickles anything), or None with the problem recorded."""
    problem = file_problem(file, rel)
    if problem is not None:
        problems.append(problem)
        return None
    try:
        return load_file(str(file))
    except Exception as err:  # SafetensorError (truncated, empty, bad header), OSError, unsupported dtypes …
        problems.append(f"{rel}: unreadable safetensors ({type(err).__name__}: {err})")
        return None


def scan_tree(path: Path) -> list[str]:
    """Pickle-capable files and symlinks anywhere in the bundle."""
    problems: list[str] = []
    try:
        for file in path.rglob("*"):
            if file.suffix.lower() in FORBIDDEN_SUFFIXES:
                problems.append(f"{file.relative_to(path)}: pickle-capable files are refused; use safetensors")
            if file.is_symlink():
                problems.append(f"{file.relative_to(path)}: symlinks are refused")
    except OSError as err:
        problems.append(f"cannot list the bundle directory ({type(err).__name__}: {err.strerror or err})")
    return problems


def member_dirs(path: Path, problems: list[str]) -> list[str]:
    """Names of the member directories present under ``members/``."""
    root = path / "members"
    if not root.exists():
        return []
    if not root.is_dir() or root.is_symlink():
        problems.append("members: must be a directory")
        return []
    try:
        return sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.is_symlink())
    except OSError as err:
        problems.append(f"members: cannot be listed ({type(err).__name__}: {err.strerror or err})")
        return []


def check_member(member_dir: Path, name: str, lora: LoraSpec | None, hidden_size: int | None,
                  problems: list[str]) -> dict[str, torch.Tensor] | None:
    """One member's adapter config and tensors, checked against the manifest's LoRA spec (``lora``, None when the
    manifest itself is unreadable) and the base's hidden size; its tensors only when they have no problem."""
    rel = f"members/{name}"
    if member_dir.is_symlink() or not member_dir.is_dir():
        problems.append(f"{rel}: missing directory (needs adapter_config.json and adapter_model.safetensors)")
        return None
    config = read_json(member_dir / "adapter_config.json", f"{rel}/adapter_config.json", problems)
    if config is not None:
        problems.extend(adapter_config_problems(config, f"{rel}/adapter_config.json", lora))
    weights = f"{rel}/adapter_model.safetensors"
    tensors = read_safetensors(member_dir / "adapter_model.safetensors", weights, problems)
    if tensors is None:
        return None
    found = tensor_problems(tensors, weights, lora, hidden_size)
    problems.extend(found)
    return None if found else tensors


def read_artifacts(path: Path, files: dict[str, str], problems: list[str]) -> dict[str, Any]:
    """Each artifact role's tensors (safetensors) or JSON value; file-name problems are the manifest's."""
    artifacts: dict[str, Any] = {}
    for role, filename in files.items():
        if not filename or Path(filename).name != filename or filename in (".", ".."):
            continue  # reported by manifest_problems
        if filename.endswith(".safetensors"):
            tensors = read_safetensors(path / filename, filename, problems)
            if tensors is not None:
                bad = [k for k, t in tensors.items()
                       if t.is_floating_point() and not bool(torch.isfinite(t.float()).all())]
                if bad:
                    problems.append(f"{filename}: artifact {role!r}: non-finite values in {bad[:5]}")
                artifacts[role] = tensors
        elif filename.endswith(".json"):
            value = read_json(path / filename, filename, problems, want_object=False)
            if value is not None:
                artifacts[role] = value
    return artifacts


def manifest_problems(manifest: BundleManifest) -> list[str]:
    """What a schema-valid manifest still gets wrong: a bundle that would not do what it says is refused."""
    where = "manifest.json"
    problems: list[str] = []
    names = Counter(m.name for m in manifest.members)
    duplicates = sorted(n for n, count in names.items() if count > 1)
    if duplicates:
        problems.append(f"{where}: members listed more than once: {duplicates}")
    weights = [m.weight for m in manifest.members]
    bad = [i for i, w in enumerate(weights) if not math.isfinite(w) or w <= 0]
    if bad:
        problems.append(f"{where}: members {bad}: weights must be finite and positive")
    elif weights and not (math.isfinite(total := sum(weights)) and total > 0  # sum, not fsum: it overflows to inf
                          and all(math.isfinite(w / total) and w / total > 0 for w in weights)):
        problems.append(f"{where}: member weights {weights} do not normalize to a distribution")
    lora = manifest.lora
    if not lora.layers or min(lora.layers) < 0 or len(set(lora.layers)) != len(lora.layers):
        problems.append(f"{where}: lora.layers {list(lora.layers)} must be distinct, non-negative and not empty")
    if not lora.target_modules or len(set(lora.target_modules)) != len(lora.target_modules):
        problems.append(f"{where}: lora.target_modules {list(lora.target_modules)} must be distinct and not empty")
    if not math.isfinite(lora.alpha):
        problems.append(f"{where}: lora.alpha {lora.alpha} is not finite")
    if not math.isfinite(manifest.calibration.temperature):
        problems.append(f"{where}: calibration.temperature {manifest.calibration.temperature} is not finite")
    space = manifest.answer_space
    if space.max_tokens < 1:
        problems.append(f"{where}: answer_space.max_tokens {space.max_tokens} leaves no room for a question")
    if space.prompt.chat and not space.prompt.chat_template:
        problems.append(f"{where}: answer_space.prompt has chat=true but records no chat_template")
    for role, filename in manifest.artifacts.items():
        if not filename or Path(filename).name != filename or filename in (".", ".."):
            problems.append(f"{where}: artifact {role!r}: {filename!r} is not a plain file name")
        elif not filename.endswith((".safetensors", ".json")):
            problems.append(f"{filename}: artifact {role!r}: only .safetensors and .json are allowed")
    return problems


def answer_space_problem(space: AnswerSpaceSpec, tokenizer: Any) -> str | None:
    """Why no question can be encoded through ``space`` with ``tokenizer`` (None when a probe question can).

    Probe questions, without and with a passage, go through the space's own prompt, format and token budget:
    letters the tokenizer splits, a template that does not render, a chat template the tokenizer lacks or
    refuses, a budget too small for any question all make every question fail."""
    errors: list[str] = []
    for context in (None, PROBE_CONTEXT):
        try:
            question = Question(PROBE_QUESTION, space.labels or PROBE_CHOICES, context=context)
            encode_question(tokenizer, question, space.answer_format, space.max_tokens, space.prompt)
            return None
        except Exception as err:  # InvalidQuestionError, or a tokenizer or template failing in its own way
            errors.append(f"{type(err).__name__}: {err}")
    return (f"answer_space cannot encode a probe question with this server's tokenizer, so every question "
            f"would fail ({errors[0]})")


def adapter_config_problems(config: dict[str, Any], rel: str, lora: LoraSpec | None) -> list[str]:
    """A member's peft ``adapter_config.json`` against the manifest's LoRA spec (types first, then values)."""
    problems: list[str] = []
    if config.get("peft_type") != "LORA":
        problems.append(f"{rel}: peft_type {_short(config.get('peft_type'))} is not LORA")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not _is_int(r) or not _finite_number(alpha):
        problems.append(f"{rel}: r must be an integer and lora_alpha a finite number, got {_short(r)} and "
                        f"{_short(alpha)}")
    elif lora is not None and (r != lora.rank or alpha != lora.alpha):
        problems.append(f"{rel}: r/alpha {r}/{alpha} ≠ manifest {lora.rank}/{lora.alpha}")
    if config.get("use_dora") or config.get("modules_to_save"):
        problems.append(f"{rel}: DoRA and modules_to_save are not supported")
    if config.get("bias", "none") != "none":
        problems.append(f"{rel}: bias {config.get('bias')!r} is not supported (only 'none')")
    targets = config.get("target_modules")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        if lora is not None and set(targets) != set(lora.target_modules):
            problems.append(f"{rel}: target_modules {sorted(targets)} ≠ manifest {sorted(lora.target_modules)}")
    elif targets is not None and not isinstance(targets, str):
        problems.append(f"{rel}: target_modules must be a list of names or a pattern, got {_short(targets)}")
    layers = config.get("layers_to_transform")
    if isinstance(layers, list) and all(_is_int(n) for n in layers):
        if lora is not None and set(layers) != set(lora.layers):
            problems.append(f"{rel}: layers_to_transform {sorted(layers)} ≠ manifest {sorted(lora.layers)}")
    elif layers is not None and not _is_int(layers):
        problems.append(f"{rel}: layers_to_transform must be a list of layer indices, got {_short(layers)}")
    return problems


def _short(value: Any) -> str:
    """A bounded repr for messages (a config may hold anything, e.g. a 400-digit integer)."""
    return reprlib.repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_number(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond float range
        return False


def tensor_problems(tensors: dict[str, torch.Tensor], rel: str, lora: LoraSpec | None,
                    hidden_size: int | None) -> list[str]:
    """A member's peft tensors against the manifest: peft LoRA keys only, each (layer, module) inside the
    manifest's layout with both factors, float and finite, 2-d, of the manifest's rank and the base's width."""
    if not tensors:
        return [f"{rel}: no tensors"]
    problems: list[str] = []
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parts = peft_key_parts(key)
        if parts is None:
            problems.append(f"{rel}: unexpected tensor {key!r} (not a peft LoRA factor of a decoder layer)")
            continue
        layer, parent, module, which = parts
        if module in _KNOWN_MODULES and parent != parent_name(module):
            problems.append(f"{rel}: {key}: {module} sits under {parent_name(module)}, not {parent}")
        if lora is not None and (layer not in lora.layers or module not in lora.target_modules):
            problems.append(f"{rel}: {key}: layer {layer} {module} is outside the manifest's lora layers "
                            f"{list(lora.layers)} / target_modules {list(lora.target_modules)}")
        if not tensor.is_floating_point():
            problems.append(f"{rel}: {key}: dtype {tensor.dtype} is not a float type")
        elif not bool(torch.isfinite(tensor.float()).all()):
            problems.append(f"{rel}: {key}: non-finite weights")
        if tensor.ndim != 2:
            problems.append(f"{rel}: {key}: {tensor.ndim}-d tensor, a LoRA factor is 2-d")
            continue
        pairs.setdefault((layer, module), {})[which] = tensor
    for (layer, module), factors in sorted(pairs.items()):
        a, b = factors.get("A"), factors.get("B")
        if a is None or b is None:
            problems.append(f"{rel}: layer {layer} {module} has lora_{'A' if b is None else 'B'} but no "
                            f"lora_{'B' if b is None else 'A'}")
            continue
        want = lora.rank if lora is not None else a.shape[0]
        if a.shape[0] != want or b.shape[1] != want:
            problems.append(f"{rel}: layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                            f"are not of rank {want}")
        if hidden_size is not None and ((module in _IN_IS_HIDDEN and a.shape[1] != hidden_size)
                                        or (module in _OUT_IS_HIDDEN and b.shape[0] != hidden_size)):
            problems.append(f"{rel}: layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                            f"do not fit the base's hidden size {hidden_size}")
    if len(problems) > MAX_PROBLEMS_PER_FILE:
        more = len(problems) - MAX_PROBLEMS_PER_FILE
        problems = [*problems[:MAX_PROBLEMS_PER_FILE], f"{rel}: … and {more} more tensor problems"]
    return problems
