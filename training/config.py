"""Fields every adapter-training recipe shares (dataset, base, LoRA shape, layers, optimizer budget, dtype)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from core.answers import DEFAULT_ANSWER_FORMAT, AnswerFormat
from core.bundle import AnswerSpaceSpec
from core.multilora import ALL_MODULES
from core.prompt import PromptSpec


class AdapterTrainingConfig(BaseModel):
    """Base of :class:`~training.ensemble.EnsembleConfig` and :class:`~training.uq4ct.UQ4CTConfig`.

    Subclasses add their method's fields and may override defaults (e.g. epochs, lr); the resolved config is
    saved verbatim in the bundle manifest.
    """

    model_config = ConfigDict(extra="forbid")

    dataset: str = "arc_easy"
    base_model: str = "smollm2-135m"
    answer_format: AnswerFormat = DEFAULT_ANSWER_FORMAT
    rank: int = 16
    alpha: float = 32.0
    target_modules: tuple[str, ...] = ALL_MODULES
    top_layers: int = 8  # adapters on the top k layers (shared frozen trunk below); 0 = every layer
    epochs: float = 1.0
    batch_size: int = 8
    lr: float = 5e-4
    seed: int = 0
    train_limit: int | None = None
    val_limit: int | None = None
    max_tokens: int = 768
    row_tokens: int = 256  # training packs several questions per row up to this many tokens
    dtype: str = "bfloat16"  # compute dtype of the frozen base during training (adapter weights stay fp32)
    threads: int = 0  # torch threads (0 = leave torch's default)
    prompt: PromptSpec = PromptSpec()  # the built-in prompt unless the user gives a template / chat template
    labels: tuple[str, ...] | None = None  # a label set: every question's choices, in this order

    def answer_space(self) -> AnswerSpaceSpec:
        """What the bundle records of the prompt and choices (and the server then uses)."""
        return AnswerSpaceSpec(answer_format=self.answer_format, max_tokens=self.max_tokens, prompt=self.prompt,
                               labels=self.labels)
