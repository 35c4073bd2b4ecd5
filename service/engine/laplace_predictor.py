"""Serving Laplace-LoRA bundles: the linearized predictive over the K choice scores, online.

Per question: one forward of the MAP adapter with autograd through the adapted layers and K backwards
give the scores μ [K] and their Jacobian w.r.t. every LoRA matrix (:func:`core.laplace_tap.linearize`);
the bundle's posterior turns them into ``Σ_f = J Σ Jᵀ`` [K, K] (:meth:`core.laplace.LaplacePosterior.
covariance`), batched over the questions of one forward. This needs gradients, so the predictor brings
its own forward (``custom_forward``, run by the engine's worker instead of the shared no-grad multi-LoRA
forward; see :class:`service.engine.forward.RowWork`). It returns, per question, a [1 + S, K] tensor:
row 0 the log of the probit predictive, rows 1..S the joint MC samples of the linearized scores (fixed
draws per bundle, so answers are reproducible). :meth:`LaplacePredictor.combine` reads them back:

- link ``probit``: probabilities and predictive entropy from the probit; mutual information from the MC
  samples (``H[mean] − mean H``); expected entropy = predictive entropy − MI (clamped at 0).
- link ``mc``: everything from the S samples through :func:`core.uncertainty.decompose`.
- link ``samples``: the bundle's weight-sample members as an ordinary ensemble (shared forward).

``members`` in a response are the S sample distributions.
"""

from __future__ import annotations

import torch

from core.answers import MAX_CHOICES, pack_questions
from core.bundle import Bundle, Method
from core.laplace import LaplaceConfig, LaplacePosterior, mc_logits, probit, standard_normal
from core.laplace_tap import LoraTap, linearize
from core.scoring import ChoiceScorer
from core.uncertainty import UncertaintyScores, decompose, entropy, tempered_probabilities
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
        self.eps = standard_normal(self.config.mc_samples, MAX_CHOICES, self.config.seed)
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
        """Per item: [1 + S, K_i] = log probit probabilities, then S joint samples of the scores."""
        if self._tap is None:
            with torch.inference_mode(False):  # the engine's forward thread runs in inference mode
                self._tap = LoraTap(scorer.model, self.map_tensors, self.scaling)
        out: list[torch.Tensor] = []
        split = self.first_layer
        t = self.temperature
        for lo in range(0, len(items), CHUNK):
            chunk = items[lo : lo + CHUNK]
            batch = pack_questions([item.encoded for item in chunk], chunk[0].answer_format).to(scorer.device)
            with torch.inference_mode(False):
                with torch.no_grad():
                    hidden = scorer.trunk(batch, split)
                scores, jacobians = linearize(scorer, self._tap, batch, hidden, split)
                cov = self.posterior.covariance(jacobians)[0] / (t * t)  # [Q, K, K]
            mean = scores.double() / t
            log_probs = probit(mean, cov).clamp_min(1e-300).log().masked_fill(torch.isneginf(mean), float("-inf"))
            samples = mc_logits(mean, cov, self.eps)  # [Q, S, K]
            rows = torch.cat([log_probs[:, None, :], samples], dim=1).float().cpu()
            out.extend(rows[i, :, : len(item.encoded.choice_ids)] for i, item in enumerate(chunk))
        return out

    def combine(self, scores: torch.Tensor) -> Prediction:
        if self.config.link == "samples":
            member_probs = tempered_probabilities(scores.double(), self.temperature)
            return Prediction(scores=decompose(member_probs), member_probs=member_probs)
        member_probs = torch.softmax(scores[:, 1:].double(), dim=-1)  # [Q, S, K]
        mc = decompose(member_probs)
        notes = [f"laplace {self.config.structure}/{self.config.link}: MI from {member_probs.shape[1]} joint "
                 "samples of the linearized choice scores"]
        if self.config.link == "mc":
            return Prediction(scores=mc, member_probs=member_probs, notes=notes)
        probs = torch.softmax(scores[:, 0].double(), dim=-1)  # the probit predictive
        total = entropy(probs)
        combined = UncertaintyScores(probabilities=probs, predictive_entropy=total,
                                     expected_entropy=(total - mc.mutual_information).clamp_min(0.0),
                                     mutual_information=mc.mutual_information,
                                     max_probability=probs.max(-1).values)
        return Prediction(scores=combined, member_probs=member_probs, notes=notes)
