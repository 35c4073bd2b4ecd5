"""One predictor class per uncertainty method, behind one interface, chosen through :data:`PREDICTORS`.

A predictor says which LoRA slots a bundle needs and what to put in them, which slot each of the R
rows of one question uses, and how the R rows' choice scores combine into a predictive distribution.
The engine does everything else (slot allocation, the shared forward, batching, abstention).

Adding a method = one subclass of :class:`Predictor` registered in :data:`PREDICTORS`. A bundle whose
method has no entry is refused at load with a clear error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from core.bundle import Bundle, Method
from core.predictive import BundlePrediction, ensemble_prediction
from service.engine.forward import CustomForward


@dataclass(frozen=True)
class SlotLoad:
    """What one LoRA slot holds: peft-format tensors and their scaling (alpha / rank)."""

    tensors: dict[str, torch.Tensor]
    scaling: float


Prediction = BundlePrediction
"""Combined output for Q questions of one bundle (see :class:`core.predictive.BundlePrediction`)."""


class Predictor(ABC):
    """Serving-side view of one bundle's uncertainty method."""

    method: ClassVar[Method]
    custom_forward: CustomForward | None = None
    """A method-specific forward for this bundle's questions (see RowWork.custom); None = shared forward."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.slots: list[int] = []  # assigned by the engine, one per entry of slot_loads()

    def attach(self, model: Any) -> None:
        """Attach method-specific hooks to the base model (engine worker thread, at load); default none."""
        return None

    def detach(self) -> None:
        """Remove what :meth:`attach` added (worker thread, when the loaded version is freed); default none."""
        return None

    @abstractmethod
    def slot_loads(self) -> list[SlotLoad]:
        """The adapters this bundle needs resident, one LoRA slot each."""

    @abstractmethod
    def row_slots(self) -> list[int]:
        """Slot of each of the R rows one question expands to (-1 = base model); needs ``self.slots``."""

    @abstractmethod
    def combine(self, scores: torch.Tensor) -> Prediction:
        """Choice scores [Q, R, K] of the rows (softmax = choice distribution; -inf = absent) → Prediction."""

    @property
    def first_layer(self) -> int:
        """Lowest decoder layer any row adapts: layers below it form the shared trunk."""
        return min(self.manifest.lora.layers)

    @property
    def num_rows(self) -> int:
        return len(self.row_slots())


class EnsemblePredictor(Predictor):
    """M LoRA members, one row each; member distributions softmax(scores / T) mixed by the bundle weights."""

    method = Method.ENSEMBLE

    def __init__(self, bundle: Bundle) -> None:
        super().__init__(bundle)
        self.weights = self.manifest.weights()  # [M]
        self.temperature = self.manifest.calibration.temperature

    def slot_loads(self) -> list[SlotLoad]:
        scaling = self.manifest.lora.alpha / self.manifest.lora.rank
        return [SlotLoad(self.bundle.members[m.name], scaling) for m in self.manifest.members]

    def row_slots(self) -> list[int]:
        return list(self.slots)

    def combine(self, scores: torch.Tensor) -> Prediction:
        return ensemble_prediction(scores, self.temperature, self.weights)  # scores [Q, M, K]


from service.engine.laplace_predictor import LaplacePredictor  # noqa: E402 - subclasses Predictor above
from service.engine.moe_predictor import MoePredictor  # noqa: E402 - subclasses Predictor above

PREDICTORS: dict[Method, type[Predictor]] = {
    Method.ENSEMBLE: EnsemblePredictor,
    Method.LAPLACE: LaplacePredictor,
    Method.MOE: MoePredictor,
    Method.CHECKPOINT_ENSEMBLE: EnsemblePredictor,  # snapshots of one run: an ensemble of plain LoRAs
    Method.MC_DROPOUT: EnsemblePredictor,  # fixed dropout masks folded into A: an ensemble of plain LoRAs
}


def overrides_hook(predictor: Predictor, method: str) -> bool:
    """True when the predictor's class replaces a no-op hook of :class:`Predictor` (``attach``/``detach``)."""
    return getattr(type(predictor), method) is not getattr(Predictor, method)


def predictor_for(bundle: Bundle) -> Predictor:
    """Build the bundle's predictor; raises LookupError naming the supported methods when there is none."""
    cls = PREDICTORS.get(bundle.manifest.method)
    if cls is None:
        supported = ", ".join(sorted(m.value for m in PREDICTORS))
        raise LookupError(f"method {bundle.manifest.method.value!r} has no serving predictor yet "
                          f"(this server serves: {supported})")
    return cls(bundle)
