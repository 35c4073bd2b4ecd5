"""Serving UQ4CT / MixLoRA bundles (method ``moe``): a routed forward with the bundle's experts and routers.

The experts and routers live in the bundle's own :class:`~core.moe.MixLora` hooks (attached on the
engine's worker thread by :meth:`MoePredictor.attach`, removed by :meth:`MoePredictor.detach`), not in
multi-LoRA slots, so the bundle takes no slot. Its questions run through ``custom_forward``: the engine
groups every queued question of this bundle into one packed forward (trunk below its first layer, then
the routed layers); a mixed batch is thus split by method inside the worker, the API is unchanged.

Per question the forward returns a [2, K] tensor: row 0 the choice scores, row 1 the question's FEU
(repeated over K). :meth:`MoePredictor.combine` reads them back: probabilities ``softmax(s / T)``, their
entropy and max, ``feu`` (a confidence in [k/N, 1], see :func:`core.moe.feu_per_question`) and its
complement ``1 − feu`` as an epistemic uncertainty score. Mutual information is undefined for a single
routed model (there are no members to disagree): it is reported as null with a note.
"""

from __future__ import annotations

from typing import Any

import torch

from core.answers import pack_questions
from core.bundle import Bundle, Method
from core.moe import ARTIFACT_ROLE, MixLora, MoeLayout, layout_from_manifest, routed_scores
from core.predictive import MOE_MI_NOTE, moe_prediction
from core.scoring import ChoiceScorer
from service.engine.errors import BundleRefusedError
from service.engine.forward import RowWork
from service.engine.predictors import Prediction, Predictor, SlotLoad

MI_NOTE = MOE_MI_NOTE


class MoePredictor(Predictor):
    """Mixture of LoRA experts with top-k routers; one row per question, no LoRA slots."""

    method = Method.MOE

    def __init__(self, bundle: Bundle) -> None:
        super().__init__(bundle)
        try:
            self.layout: MoeLayout = layout_from_manifest(self.manifest)
        except ValueError as err:
            raise BundleRefusedError(f"moe bundle {self.manifest.name!r}: {err}", reason="invalid_bundle") from None
        artifact = bundle.artifacts.get(ARTIFACT_ROLE)
        if not isinstance(artifact, dict) or not all(isinstance(t, torch.Tensor) for t in artifact.values()):
            raise BundleRefusedError(f"moe bundle {self.manifest.name!r}: artifact {ARTIFACT_ROLE!r} is not a "
                                     "safetensors file of routers and experts", reason="invalid_bundle")
        self.tensors: dict[str, torch.Tensor] = artifact
        self.temperature = self.manifest.calibration.temperature
        self.moe: MixLora | None = None
        self.custom_forward = self.forward

    def slot_loads(self) -> list[SlotLoad]:
        return []  # the experts are not plain LoRA slots; they live in this predictor's MixLora hooks

    def row_slots(self) -> list[int]:
        return [-1]  # one row per question (counts for batching and queue limits)

    def attach(self, model: Any) -> None:
        """Hook routers and experts onto the base model; refuses tensors that do not fit it (worker thread)."""
        if self.moe is not None:
            return
        moe = MixLora(model, self.layout).to(next(model.parameters()).device)
        problems = moe.check_tensors(self.tensors)
        if problems:
            moe.remove()
            raise BundleRefusedError(f"moe bundle {self.manifest.name!r}: " + "; ".join(problems[:20]),
                                     reason="layout")
        moe.load_artifact(self.tensors)
        self.moe = moe  # experts stay float32; each hook casts them to the activations' dtype

    def detach(self) -> None:
        if self.moe is not None:
            self.moe.remove()
            self.moe = None

    def forward(self, scorer: ChoiceScorer, items: list[RowWork]) -> list[torch.Tensor]:
        """Per item: [2, K_i] = (choice scores, FEU repeated). All items belong to this bundle."""
        if self.moe is None:
            raise RuntimeError(f"moe bundle {self.manifest.name!r} is not attached to the base model")
        batch = pack_questions([item.encoded for item in items], items[0].answer_format).to(scorer.device)
        split = self.layout.first_layer
        hidden = scorer.trunk(batch, split)
        scores, feu, _, _ = routed_scores(scorer, self.moe, hidden, batch, split)
        scores, feu = scores.float().cpu(), feu.float().cpu()
        out = []
        for i, item in enumerate(items):
            k = len(item.encoded.choice_ids)
            out.append(torch.stack([scores[i, :k], feu[i].expand(k)]))
        return out

    def combine(self, scores: torch.Tensor) -> Prediction:
        """scores [Q, 2, K] from :meth:`forward` (padded with -inf past each K) → Prediction with FEU."""
        return moe_prediction(scores[:, 0], scores[:, 1, 0], self.temperature)
