"""The vLLM engine: the same bundles, predictors and API, with rows scored by vLLM's multi-LoRA engine.

vLLM's ``AsyncLLM`` runs in this process (its engine core and workers are its own processes). Every
bundle member (or Laplace weight sample) becomes one vLLM LoRA adapter with a name unique to this load
(vLLM's caches key on the name: reusing one for other weights corrupts them, vllm-project/vllm#30931).
One row (question × member) becomes vLLM requests on the token ids ``core`` built, so both engines
score identical sequences:

``cloze``   K requests, prefix + choice k, with ``prompt_logprobs=0``: the log-prob of each choice token
            given the prefix and the earlier choice tokens; score = their mean (``core.answers.choice_scores``).
            core's packed block-mask sequence attends exactly like these K separate sequences.
``letter``  One request on the prefix with ``max_tokens=1``, ``allowed_token_ids`` = the K letter tokens and
            ``logprobs=K`` under ``logprobs_mode="processed_logprobs"``: the log-softmax over the K letters,
            all K of them, never a top-k truncation. It differs from core's letter logits by one constant per
            row, which the softmax over choices removes.

Only :class:`VllmEngine` methods ``_score``, ``_check_fit``, ``_place`` and ``_release`` differ from the
torch engine; everything else is :class:`~service.engine.serving.ServingEngine`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from core.answers import AnswerFormat
from core.basemodel import DEFAULT_BASE_MODEL, BaseModelInfo, resolve_model_dir, weight_hash
from core.bundle import Bundle
from core.multilora import ALL_MODULES
from service.engine.errors import (
    BundleRefusedError,
    CapacityError,
    EngineUnavailableError,
    QueueFullError,
)
from service.engine.forward import RowWork
from service.engine.predictors import Predictor, SlotLoad, overrides_hook
from service.engine.registry import BundleEntry
from service.engine.serving import ServingEngine
from service.engine.types import Timings
from service.settings import Settings

log = logging.getLogger("uqserve.engine.vllm")

# vLLM's packed Llama-family module names. The LM head is left out on purpose: with it, batched prompt
# log-probs under LoRA crash the engine (vllm-project/vllm#16668); no bundle adapts the head.
LLAMA_LORA_MODULES = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def engine_args(settings: Settings, model_dir: Path) -> Any:
    """vLLM ``AsyncEngineArgs`` from the ``UQSERVE_*`` settings (the scale knobs pass straight through)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    max_resident = settings.vllm_max_cpu_loras or settings.max_slots
    kwargs: dict[str, Any] = dict(
        model=str(model_dir), tokenizer=str(model_dir), dtype=settings.dtype,
        max_model_len=settings.vllm_max_model_len, enable_lora=True, max_lora_rank=settings.max_lora_rank,
        max_loras=settings.vllm_max_loras, max_cpu_loras=max(max_resident, settings.vllm_max_loras),
        lora_target_modules=settings.vllm_lora_target_modules or LLAMA_LORA_MODULES,
        max_logprobs=26, logprobs_mode="processed_logprobs",
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        tensor_parallel_size=settings.vllm_tensor_parallel_size,
        pipeline_parallel_size=settings.vllm_pipeline_parallel_size,
        distributed_executor_backend=settings.vllm_distributed_executor_backend,
        enable_prefix_caching=False,  # prompt log-prob requests bypass the prefix cache anyway
        seed=0,
    )
    return AsyncEngineArgs(**kwargs)


def write_peft_adapter(directory: Path, load: SlotLoad) -> None:
    """One slot's peft tensors → a peft adapter directory vLLM loads (config + safetensors)."""
    directory.mkdir(parents=True)
    modules = sorted({key.split(".")[-3] for key in load.tensors} & set(ALL_MODULES))
    rank = max(int(t.shape[0]) for key, t in load.tensors.items() if ".lora_A." in key)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": load.scaling * rank,
              "target_modules": modules, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.detach().float().contiguous() for k, v in load.tensors.items()},
              str(directory / "adapter_model.safetensors"))


class VllmEngine(ServingEngine):
    """Scores rows with vLLM; see the module docstring."""

    name = "vllm"

    def __init__(self, llm: Any, tokenizer: Any, info: BaseModelInfo, settings: Settings) -> None:
        super().__init__(tokenizer, info, settings)
        self.llm = llm
        self.adapter_root = Path(tempfile.mkdtemp(prefix="uqserve-vllm-adapters-"))
        self._lora_ids = itertools.count(1)
        self._adapters: dict[int, Any] = {}  # lora id → LoRARequest
        self._in_flight_rows = 0
        self._dead: str | None = None
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> VllmEngine:
        """Start vLLM on the configured base model (a safetensors directory; GGUF is converted by core)."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.vllm_cpu_kv_cache_gb))
        if settings.device == "cpu":
            os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        from transformers import AutoConfig, AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        model_dir = resolve_model_dir(settings.base_model)
        config = AutoConfig.from_pretrained(str(model_dir))
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        info = BaseModelInfo(
            model_id=settings.base_model if settings.base_model == DEFAULT_BASE_MODEL else model_dir.name,
            weight_hash=weight_hash(model_dir), num_layers=int(config.num_hidden_layers),
            hidden_size=int(config.hidden_size), vocab_size=int(config.vocab_size))
        started = time.perf_counter()
        llm = AsyncLLM.from_engine_args(engine_args(settings, model_dir))
        log.info("vLLM engine up on %s in %.1f s", model_dir.name, time.perf_counter() - started)
        return cls(llm, tokenizer, info, settings)

    # --- lifecycle ------------------------------------------------------------------------------------

    async def _start_scoring(self) -> None:
        pass  # AsyncLLM runs from construction

    async def _stop_scoring(self) -> None:
        deadline = time.monotonic() + self.settings.request_timeout_s
        while self._in_flight_rows and time.monotonic() < deadline:  # let running requests finish
            await asyncio.sleep(0.05)
        self.llm.shutdown()
        shutil.rmtree(self.adapter_root, ignore_errors=True)

    @property
    def ready(self) -> bool:
        if self._accepting and self._dead is None and self.llm.errored:
            self._dead = "the vLLM engine died"
        return self._accepting and self._dead is None

    @property
    def queue_depth_rows(self) -> int:
        return self._in_flight_rows

    # --- rows → choice scores -------------------------------------------------------------------------

    async def _score(self, works: list[RowWork], client: str) -> list[tuple[torch.Tensor, Timings]]:
        rows = sum(work.rows for work in works)
        if self._in_flight_rows + rows > self.settings.max_queue_rows:
            raise QueueFullError(f"queue full: {self._in_flight_rows} rows in vLLM, this request needs {rows}, "
                                 f"the limit is {self.settings.max_queue_rows}; retry later")
        self._in_flight_rows += rows
        started = time.perf_counter()
        try:
            scores = await asyncio.gather(*(self._row(work, lora_id) for work in works for lora_id in work.row_slots))
        except Exception as err:
            if self.llm.errored or type(err).__name__ == "EngineDeadError":
                self._dead = f"the vLLM engine died: {type(err).__name__}: {err}"
                log.error("%s", self._dead)
                raise EngineUnavailableError(self._dead) from None
            raise
        finally:
            self._in_flight_rows -= rows
        elapsed_ms = 1000 * (time.perf_counter() - started)
        self.observer.batch_done(rows, [0.0] * len(works))
        out, start = [], 0
        for work in works:
            block = torch.stack(scores[start : start + work.rows])  # [R, K]
            out.append((block, Timings(queue_ms=0.0, forward_ms=elapsed_ms, batch_rows=rows)))
            start += work.rows
        return out

    async def _row(self, work: RowWork, lora_id: int) -> torch.Tensor:
        """One row's K choice scores [K] float32."""
        lora = self._adapters.get(lora_id) if lora_id >= 0 else None
        prefix, choices = work.encoded.prefix_ids, work.encoded.choice_ids
        if work.answer_format == AnswerFormat.LETTER:
            letters = [ids[0] for ids in choices]
            output = await self._generate(prefix, self._letter_params(letters), lora)
            logprobs = output.outputs[0].logprobs[0]  # {token id: Logprob}, exactly the K allowed letters
            return torch.tensor([logprobs[t].logprob for t in letters], dtype=torch.float32)
        outputs = await asyncio.gather(*(self._generate(prefix + ids, self._cloze_params(), lora) for ids in choices))
        scores = []
        for ids, output in zip(choices, outputs, strict=True):
            per_token = output.prompt_logprobs[len(prefix):]  # position p + l scores choice token l
            scores.append(sum(entry[t].logprob for entry, t in zip(per_token, ids, strict=True)) / len(ids))
        return torch.tensor(scores, dtype=torch.float32)

    @staticmethod
    def _cloze_params() -> Any:
        from vllm import SamplingParams

        return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)

    @staticmethod
    def _letter_params(letters: list[int]) -> Any:
        from vllm import SamplingParams

        return SamplingParams(max_tokens=1, temperature=0.0, logprobs=len(letters), allowed_token_ids=letters,
                              detokenize=False)

    async def _generate(self, token_ids: list[int], params: Any, lora: Any) -> Any:
        from vllm.inputs import TokensPrompt

        final = None
        async for output in self.llm.generate(TokensPrompt(prompt_token_ids=token_ids), params,
                                              uuid.uuid4().hex, lora_request=lora):
            final = output
        return final

    # --- adapters as vLLM LoRAs -----------------------------------------------------------------------

    def _check_fit(self, bundle: Bundle, predictor: Predictor, loads: list[SlotLoad]) -> None:
        manifest = bundle.manifest
        method = manifest.method.value
        if predictor.custom_forward is not None or overrides_hook(predictor, "attach"):
            link = getattr(getattr(predictor, "config", None), "link", None)
            detail = f"link {link!r}" if link else "its own forward hooks (routers)"
            hint = (" (or export it with --link samples, whose weight samples vLLM serves as LoRAs)"
                    if method == "laplace" else "")
            raise BundleRefusedError(
                f"bundle {manifest.name!r}: method {method!r} with {detail} needs the in-process forward that only "
                f"the torch engine runs; serve it with UQSERVE_ENGINE=torch{hint}", reason="unsupported_engine")
        problems = self._lora_problems(bundle)
        if problems:
            reason = "rank" if manifest.lora.rank > self.settings.max_lora_rank else "layout"
            raise BundleRefusedError(f"bundle {manifest.name!r}: " + "; ".join(problems), reason=reason)
        capacity = self.settings.vllm_max_cpu_loras or self.settings.max_slots
        if len(self._adapters) + len(loads) > capacity:
            raise CapacityError(f"needs {len(loads)} LoRA adapters, {capacity - len(self._adapters)} of {capacity} "
                                "are free (adapters of replaced versions free up when their in-flight requests "
                                "finish; raise UQSERVE_VLLM_MAX_CPU_LORAS)")

    async def _place(self, predictor: Predictor, loads: list[SlotLoad]) -> list[int]:
        from vllm.lora.request import LoRARequest

        manifest, ids = predictor.manifest, []
        try:
            for load in loads:
                lora_id = next(self._lora_ids)
                name = f"{manifest.name}-v{manifest.version}-{lora_id}"  # unique per load (vllm#30931)
                directory = self.adapter_root / name
                await asyncio.to_thread(write_peft_adapter, directory, load)
                request = LoRARequest(name, lora_id, str(directory))
                self._adapters[lora_id] = request
                ids.append(lora_id)
                await self.llm.add_lora(request)
        except Exception as err:
            self._remove(ids)
            if self.llm.errored:
                self._dead = f"the vLLM engine died while loading adapters: {err}"
                raise EngineUnavailableError(self._dead) from None
            raise BundleRefusedError(f"bundle {manifest.name!r}: vLLM refused its adapters: {err}",
                                     reason="layout") from None
        return ids

    def _release(self, entry: BundleEntry) -> None:
        self._remove(list(entry.slots))

    def _remove(self, lora_ids: list[int]) -> None:
        """Forget the adapters now and remove them from vLLM in the background (no request uses them)."""
        requests = [self._adapters.pop(i) for i in lora_ids if i in self._adapters]
        if not requests:
            return

        async def remove() -> None:
            for request in requests:
                try:
                    await self.llm.remove_lora(request.lora_int_id)
                except Exception as err:  # a dead engine holds nothing any more
                    log.warning("could not remove LoRA %s from vLLM: %s", request.lora_name, err)
                shutil.rmtree(request.lora_path, ignore_errors=True)

        try:
            task = asyncio.get_running_loop().create_task(remove())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        except RuntimeError:  # no loop (shutdown): the engine goes away with its adapters
            for request in requests:
                shutil.rmtree(request.lora_path, ignore_errors=True)
