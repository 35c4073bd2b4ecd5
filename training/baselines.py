"""The seeds' two cheap baselines, exported as ordinary ensemble bundles that every engine serves unchanged.

**Checkpoint ensemble** (Laplace-LoRA's baseline, method ``checkpoint_ensemble``). One LoRA is trained with one
seed and one data order (the ensemble trainer's loop with M = 1, :func:`training.ensemble.train_ensemble`);
its adapter is copied after K optimizer steps spread evenly over the last ``1 − snapshot_from`` of training,
the last one after the final step (:func:`snapshot_steps`: T = 100, K = 5, from 0.5 → steps 60, 70, 80, 90,
100). The K snapshots are the bundle's members, equal weights. The learning rate decays linearly to ~0 at
the end of training, so late snapshots lie close together: a checkpoint ensemble disagrees less than M
independently seeded members.

**MC dropout** (method ``mc_dropout``). One MAP LoRA is trained with LoRA dropout p on the input of A
(``EnsembleConfig.lora_dropout``: peft's ``lora_dropout``, each element of x, every token and feature,
dropped independently while training). At export S Bernoulli(1 − p) masks m_s are drawn with a fixed seed,
one per adapted projection per sample over its *input features*, **tied across token positions** (the
variational form of Gal & Ghahramani: the same units are dropped at every position of a pass), and folded
into a copy of the adapter:

    A_s = A · diag(m_s) / (1 − p)        (B_s = B)

so that x·diag(m_s)/(1 − p)·Aᵀ = x·A_sᵀ. Member s is then an ordinary deterministic LoRA, the bundle an
ensemble of S of them: both engines serve it with no new serving code, and the same request always gets the
same answer (the masks are fixed in the bundle, not drawn per request). Per-position masks (what training
used) would need a per-token sampler inside the engines; tied masks are what a bundle of adapters can hold.
The bundle's ``method_config`` records p, S, the mask seed and the mask form.

Both go through the normal export path (:func:`training.export.calibrate_members`,
:func:`training.export.export_bundle`): one temperature for all members, the served abstention rule,
the validation metrics and, in the CLIs, the guarantees from the held-out calibration split.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from core.answers import Question
from core.basemodel import BaseModel
from core.bundle import BundleManifest, LoraSpec, Method
from core.datasets import data_hash
from core.multilora import LoraLayout
from core.scoring import ChoiceScorer
from training.ensemble import EnsembleConfig, train_ensemble
from training.export import calibrate_members, export_bundle

MASK_FORM = ("tied across token positions: one Bernoulli(1 - p) mask per sample over each adapted projection's "
             "input features, folded into A as A * mask / (1 - p)")
TRAINING_DROPOUT = "per element (every token and feature independently), as peft's lora_dropout"


class CheckpointEnsembleConfig(EnsembleConfig):
    """One run (``members`` = 1) and where its snapshots are taken; saved verbatim in the manifest."""

    members: int = 1
    snapshots: int = Field(default=5, ge=2)  # K members
    snapshot_from: float = Field(default=0.5, ge=0, lt=1)  # snapshots spread over the steps after this fraction

    @model_validator(mode="after")
    def _one_run(self) -> CheckpointEnsembleConfig:
        if self.members != 1 or self.early_stopping:
            raise ValueError("a checkpoint ensemble snapshots one run: members = 1, no early stopping")
        return self


class McDropoutConfig(EnsembleConfig):
    """One MAP LoRA trained with LoRA dropout p, and the S export-time masks; saved verbatim in the manifest."""

    members: int = 1
    lora_dropout: float = Field(default=0.1, gt=0, lt=1)  # p, while training and in the export masks
    samples: int = Field(default=10, ge=2)  # S members
    mask_seed: int = 0

    @model_validator(mode="after")
    def _one_run(self) -> McDropoutConfig:
        if self.members != 1:
            raise ValueError("MC dropout folds masks into one MAP LoRA: members = 1")
        return self


def snapshot_steps(total_steps: int, snapshots: int, snapshot_from: float) -> list[int]:
    """K optimizer steps (1-based) evenly spaced over the steps after ``snapshot_from · T``, the last = T."""
    start = snapshot_from * total_steps
    steps = [round(start + (total_steps - start) * (i + 1) / snapshots) for i in range(snapshots)]
    if len(set(steps)) < snapshots or steps[0] < 1:
        raise ValueError(f"{snapshots} snapshots over the last {1 - snapshot_from:.0%} of {total_steps} steps would "
                         "repeat a step: train longer, take fewer or start earlier")
    return steps


def _total_steps(config: EnsembleConfig, n_train: int) -> int:
    """The number of optimizer steps :func:`train_ensemble` will take (same formula)."""
    return max(1, round(config.epochs * -(-n_train // config.batch_size)))


def train_checkpoint_ensemble(scorer: ChoiceScorer, config: CheckpointEnsembleConfig, train: Sequence[Question],
                              val: Sequence[Question], log: Any = print
                              ) -> tuple[dict[str, dict[str, torch.Tensor]], LoraLayout, dict[str, Any]]:
    """Train one LoRA and return its K snapshots (``snapshot-k`` → peft tensors, oldest first), the layout
    and the training log (``snapshot_steps`` added)."""
    steps = snapshot_steps(_total_steps(config, len(train)), config.snapshots, config.snapshot_from)
    multilora, history = train_ensemble(scorer, config, train, val, log=log, snapshot_steps=steps)
    layout = multilora.layout
    multilora.remove()
    members = {f"snapshot-{k}": history["snapshots"][step][0] for k, step in enumerate(steps)}
    history["snapshot_steps"] = steps
    return members, layout, history


def train_map_with_dropout(scorer: ChoiceScorer, config: McDropoutConfig, train: Sequence[Question],
                           val: Sequence[Question], log: Any = print
                           ) -> tuple[dict[str, torch.Tensor], LoraLayout, dict[str, Any]]:
    """Train the MAP LoRA with LoRA dropout p (dropout noise seeded by ``config.seed``); returns its peft
    tensors (float32), the layout and the training log."""
    devices = [scorer.device] if torch.device(scorer.device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # seed the dropout noise without touching the caller's RNG
        torch.manual_seed(config.seed)
        multilora, history = train_ensemble(scorer, config, train, val, log=log)
    layout = multilora.layout
    tensors = {k: v.float().cpu() for k, v in multilora.peft_state_dict(0).items()}
    multilora.remove()
    return tensors, layout, history


def mask_seed(seed: int, sample: int) -> int:
    """The generator seed of sample s's masks."""
    return seed * 1_000_003 + sample


def dropout_masks(adapter: dict[str, torch.Tensor], p: float, samples: int,
                  seed: int) -> list[dict[str, torch.Tensor]]:
    """S masks per adapted projection: sample s → {peft lora_A key → float mask [in] of 0/1, P(1) = 1 − p}.

    One mask over the input features per projection and sample, shared by every token position. Drawn from
    ``Generator(mask_seed(seed, s))`` over the lora_A keys in sorted order, so the masks depend only on
    (seed, s, the adapter's keys and shapes)."""
    keys = sorted(k for k in adapter if k.endswith("lora_A.weight"))
    out = []
    for s in range(samples):
        gen = torch.Generator().manual_seed(mask_seed(seed, s))
        out.append({k: (torch.rand(adapter[k].shape[1], generator=gen) >= p).float() for k in keys})
    return out


def fold_mask(adapter: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], p: float) -> dict[str, torch.Tensor]:
    """The deterministic adapter of one mask: A_s = A · diag(m) / (1 − p), B unchanged."""
    return {k: (v * masks[k][None, :] / (1 - p) if k in masks else v).contiguous() for k, v in adapter.items()}


def mc_dropout_members(adapter: dict[str, torch.Tensor], p: float, samples: int,
                       seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """``sample-s`` → the MAP adapter with mask s folded in, s = 0..S−1."""
    return {f"sample-{s}": fold_mask(adapter, masks, p)
            for s, masks in enumerate(dropout_masks(adapter, p, samples, seed))}


def export_members(*, base: BaseModel, config: EnsembleConfig, method: Method, layout: LoraLayout,
                   members: dict[str, dict[str, torch.Tensor]], seeds: dict[str, int | None],
                   method_config: dict[str, Any], history: dict[str, Any], train: list[Question],
                   val: list[Question], out_dir: Path, name: str, rule: dict[str, Any] | None = None,
                   data: Any = None, started: float | None = None) -> BundleManifest:
    """Calibrate equal-weight members on ``base`` (the float32 base the server loads) as served and write
    ``out_dir/name`` with ``method``: the export path of ``uqserve train ensemble``."""
    lora = LoraSpec(rank=layout.rank, alpha=layout.alpha, target_modules=layout.target_modules, layers=layout.layers)
    space = config.answer_space()
    weights = torch.full((len(members),), 1.0 / len(members))
    calibration, thresholds = calibrate_members(base, name=name, lora=lora, answer_space=space, members=members,
                                                weights=weights, val=val, **(rule or {}))
    training = {"config": config.model_dump(mode="json"), "steps": history["steps"],
                "train_seconds": history["seconds"], "history": history["history"],
                "data": None if data is None else data.provenance}
    if started is not None:
        training["total_seconds"] = round(time.perf_counter() - started, 1)
    return export_bundle(
        out_dir=out_dir, name=name, method=method, base=base.info, lora=lora, answer_space=space, members=members,
        seeds=seeds, weights=weights, calibration=calibration, thresholds=thresholds, training=training,
        data_hashes=data.hashes() if data else {"train": data_hash(train), "validation": data_hash(val)},
        method_config=method_config)


def build_checkpoint_ensemble(base: BaseModel, config: CheckpointEnsembleConfig, train: list[Question],
                              val: list[Question], out_dir: Path, name: str, *, serve_base: BaseModel | None = None,
                              rule: dict[str, Any] | None = None, data: Any = None,
                              log: Any = print) -> BundleManifest:
    """Train one run on ``base``, snapshot it, calibrate on ``serve_base`` (default ``base``, then float32) and
    write the ``checkpoint_ensemble`` bundle ``out_dir/name``."""
    started = time.perf_counter()
    scorer = ChoiceScorer(base.model, base.tokenizer, config.answer_format, config.max_tokens, config.prompt)
    members, layout, history = train_checkpoint_ensemble(scorer, config, train, val, log=log)
    seed = config.seed * 1000  # the run's init seed (train_ensemble's member 0): every snapshot shares it
    method_config = {"snapshot_steps": history["snapshot_steps"], "total_steps": history["steps"],
                     "snapshots": config.snapshots, "snapshot_from": config.snapshot_from,
                     "source": "snapshots of one training run (one seed, one data order)"}
    return export_members(base=serve_base or base, config=config, method=Method.CHECKPOINT_ENSEMBLE, layout=layout,
                          members=members, seeds=dict.fromkeys(members, seed), method_config=method_config,
                          history=history, train=train, val=val, out_dir=out_dir, name=name, rule=rule, data=data,
                          started=started)


def build_mc_dropout(base: BaseModel, config: McDropoutConfig, train: list[Question], val: list[Question],
                     out_dir: Path, name: str, *, serve_base: BaseModel | None = None,
                     rule: dict[str, Any] | None = None, data: Any = None,
                     log: Any = print) -> tuple[BundleManifest, dict[str, torch.Tensor]]:
    """Train the MAP LoRA with dropout on ``base``, fold S tied masks into members, calibrate on ``serve_base``
    and write the ``mc_dropout`` bundle ``out_dir/name``; returns the manifest and the MAP adapter."""
    started = time.perf_counter()
    scorer = ChoiceScorer(base.model, base.tokenizer, config.answer_format, config.max_tokens, config.prompt)
    adapter, layout, history = train_map_with_dropout(scorer, config, train, val, log=log)
    p, samples = config.lora_dropout, config.samples
    members = mc_dropout_members(adapter, p, samples, config.mask_seed)
    seeds: dict[str, int | None] = {f"sample-{s}": mask_seed(config.mask_seed, s) for s in range(samples)}
    method_config = {"dropout": p, "samples": samples, "mask_seed": config.mask_seed, "masks": MASK_FORM,
                     "training_dropout": TRAINING_DROPOUT}
    manifest = export_members(base=serve_base or base, config=config, method=Method.MC_DROPOUT, layout=layout,
                              members=members, seeds=seeds, method_config=method_config, history=history,
                              train=train, val=val, out_dir=out_dir, name=name, rule=rule, data=data,
                              started=started)
    return manifest, adapter
