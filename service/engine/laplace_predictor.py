"""Serving Laplace-LoRA bundles: the linearized predictive over the K choice scores, online.

Per question: one forward of the MAP adapter with autograd through the adapted layers and K backwards
give the scores μ [K] and their Jacobian w.r.t. every LoRA matrix (:func:`core.laplace_tap.linearize`);
the bundle's posterior turns them into ``Σ_f = J Σ Jᵀ`` [K, K] (:meth:`core.laplace.LaplacePosterior.
covariance`), batched over the questions of one forward. This needs gradients, so the predictor brings
its own forward (``custom_forward``, run by the engine's worker instead of the shared no-grad multi-LoRA
forward; see :class:`service.engine.forward.RowWork`). It returns, per question, a [1 + S, K] tensor:
row 0 the log of the probit predictive, rows 1..S the joint MC samples of the linearized scores, drawn
from a seed of the bundle and the question's tokens (same question → same answer, whatever else is in
the batch). :meth:`LaplacePredictor.combine` reads them back through :mod:`core.predictive`, the code
``uqserve eval`` and the exporter call too:

- link ``probit``: probabilities and predictive entropy from the probit; mutual information from the MC
  samples (``H[mean] − mean H``); expected entropy = predictive entropy − MI (clamped at 0).
- link ``mc``: everything from the S samples through :func:`core.uncertainty.decompose`.
- link ``samples``: the bundle's weight-sample members as an ordinary ensemble (shared forward).

``members`` in a response are the S sample distributions.
"""

from __future__ import annotations

import torch

from core.answers import pack_questions
from core.bundle import Bundle, Method
from core.laplace import LaplaceConfig, LaplacePosterior
from core.laplace_tap import LoraTap, linearize
from core.predictive import ensemble_prediction, laplace_outputs, laplace_prediction, question_normals
from core.scoring import ChoiceScorer
from service.engine.forward import RowWork
from service.engine.predictors import Prediction, Predictor, SlotLoad

CHUNK = 8  # questions per linearized forward (bounds the Jacobian memory: CHUNK · K · #LoRA params floats)


class LaplacePredictor(Predictor):
    """MAP LoRA + block-diagonal Laplace posterior (KFAC, diagonal or last-layer)."""

    method = Method.LAPLACE

    def __init__(self, bundle: Bundle) -> None:
        super().__init__(bundle)
        self.config = LaplaceConfig.model_validate(self.manifest.method_config)
        structure = self.config.structure
        role = self.config.artifact.get(structure, "")
        table = self.config.blocks.get(structure)
        artifact = bundle.artifacts.get(role)
        if not isinstance(artifact, dict) or not table:
            raise LookupError(f"laplace bundle lacks the {structure!r} posterior (artifact {role!r})")
        if self.config.map_member not in bundle.members:
            raise LookupError(f"laplace bundle lacks its MAP member {self.config.map_member!r}")
        self.posterior = LaplacePosterior.from_tensors(artifact, table, self.config.prior_precision[structure])
        self.map_tensors = bundle.members[self.config.map_member]
        self.scaling = self.manifest.lora.alpha / self.manifest.lora.rank
        self.temperature = self.manifest.calibration.temperature
        self._tap: LoraTap | None = None
        if self.config.link != "samples":
            self.custom_forward = self.forward
        elif not self.config.sample_members:
            raise LookupError("link 'samples' needs weight-sample members in the bundle")

    def slot_loads(self) -> list[SlotLoad]:
        names = self.config.sample_members if self.config.link == "samples" else [self.config.map_member]
        return [SlotLoad(self.bundle.members[n], self.scaling) for n in names]

    def row_slots(self) -> list[int]:
        # probit/mc: one row per question for batching and queue limits (the slot holds the MAP adapter;
        # the custom forward applies it through its own hooks); samples: one row per weight sample
        return list(self.slots) if self.config.link == "samples" else self.slots[:1]

    def forward(self, scorer: ChoiceScorer, items: list[RowWork]) -> list[torch.Tensor]:
        """Per item: [1 + S, K_i] raw Laplace outputs (:func:`core.predictive.laplace_outputs`): the log probit
        predictive, then S joint samples of the scores, drawn from the question's own seed."""
        if self._tap is None:
            with torch.inference_mode(False):  # the engine's forward thread runs in inference mode
                self._tap = LoraTap(scorer.model, self.map_tensors, self.scaling)
        out: list[torch.Tensor] = []
        split = self.first_layer
        for lo in range(0, len(items), CHUNK):
            chunk = items[lo : lo + CHUNK]
            encoded = [item.encoded for item in chunk]
            batch = pack_questions(encoded, chunk[0].answer_format).to(scorer.device)
            with torch.inference_mode(False):
                with torch.no_grad():
                    hidden = scorer.trunk(batch, split)
                scores, jacobians = linearize(scorer, self._tap, batch, hidden, split)
                cov = self.posterior.covariance(jacobians)[0]  # [Q, K, K]
            eps = question_normals(encoded, self.config.seed, self.config.mc_samples, scores.shape[-1])
            rows = laplace_outputs(scores.double().cpu(), cov.cpu(), self.temperature, eps).float()
            out.extend(rows[i, :, : len(item.encoded.choice_ids)] for i, item in enumerate(chunk))
        return out

    def combine(self, scores: torch.Tensor) -> Prediction:
        if self.config.link == "samples":
            return ensemble_prediction(scores, self.temperature, None)
        return laplace_prediction(scores, self.config.link, f"laplace {self.config.structure}/{self.config.link}")
