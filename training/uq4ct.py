"""UQ4CT (arXiv 2410.06431): a mixture of LoRA experts trained with a calibration loss on its routers.

One :class:`~core.moe.MixLora` (N experts per adapted linear, one top-k router per adapted layer) is
trained on the cached frozen trunk with, per mini-batch of questions,

    L = CE  +  α · L_b  +  β_t · L_cal
    L_b   = mean over routed layers of a · N · Σ_i F_i P_i          (load balance, a = 1e-2)
    L_cal = mean_q (1{argmax p(x_q) = y_q} − FEU(x_q))²             (FEU: :func:`core.moe.feu_per_question`)

with ``β_t = β`` (the paper's default, β = 1) or the incremental schedule ``β_t = β · min(1, t / w)``
(Eq. 12, w = 50 in the paper) when ``beta_warmup_steps = w > 0``. β = 0 is the MixLoRA baseline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from core.answers import Question
from core.moe import (
    ARTIFACT_ROLE,
    LOAD_BALANCE_COEF,
    MixLora,
    MoeLayout,
    calibration_loss,
    layout_from_manifest,
    routed_scores,
)
from core.scoring import ChoiceScorer
from training.config import AdapterTrainingConfig
from training.trunk import TrunkCache


class UQ4CTConfig(AdapterTrainingConfig):
    """Resolved training configuration; saved verbatim in the bundle manifest.

    Defaults fit the CPU budget (about 30 min on ARC-E on 2 cores); the paper's setting is
    ``top_layers=0`` (every layer) with the same N = 8, top-2, rank 16, alpha 32 on all seven projections.
    """

    num_experts: int = 8
    top_k: int = 2
    beta: float = 1.0  # weight of L_cal (0 = MixLoRA)
    beta_warmup_steps: int = 0  # > 0: incremental β, min(1, step / w) · β (Eq. 12)
    aux_weight: float = 1.0  # α, the weight of L_b
    load_balance_coef: float = LOAD_BALANCE_COEF  # a inside L_b
    router_init_std: float = 0.02

    def layout(self, num_layers: int) -> MoeLayout:
        k = num_layers if self.top_layers <= 0 else min(self.top_layers, num_layers)
        return MoeLayout(tuple(self.target_modules), tuple(range(num_layers - k, num_layers)), self.num_experts,
                         self.rank, self.alpha, self.top_k)

    def beta_at(self, step: int) -> float:
        if self.beta_warmup_steps <= 0:
            return self.beta
        return self.beta * min(1.0, step / self.beta_warmup_steps)


@torch.no_grad()
def moe_scores(scorer: ChoiceScorer, moe: MixLora, cache: TrunkCache, batch_size: int = 16,
               desc: str = "score") -> tuple[torch.Tensor, torch.Tensor]:
    """Choice scores [N, K_max] (-inf for absent choices) and FEU [N] of every cached question."""
    n = len(cache)
    k_max = max(len(q.choices) for q in cache.questions)
    scores_out = torch.full((n, k_max), float("-inf"))
    feu_out = torch.zeros(n)
    for lo in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False):
        idx = list(range(lo, min(lo + batch_size, n)))
        hidden, packed, order, _ = cache.packed_batch([idx])
        scores, feu, _, _ = routed_scores(scorer, moe, hidden, packed, cache.split)
        where = torch.tensor(order)
        scores_out[where, : scores.shape[-1]] = scores.float().cpu()
        feu_out[where] = feu.float().cpu()
    return scores_out, feu_out


def train_uq4ct(scorer: ChoiceScorer, config: UQ4CTConfig, train: Sequence[Question], val: Sequence[Question],
                log: Any = print, train_cache: TrunkCache | None = None) -> tuple[MixLora, dict[str, Any]]:
    """Train the mixture; returns it (hooks attached, inactive) and a training log with the trunk caches.

    ``train_cache``: a prebuilt trunk cache of ``train`` at this layout's split (sweeps share one)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    layout = config.layout(scorer.num_layers)
    split = layout.first_layer
    moe = MixLora(scorer.model, layout).to(scorer.device)
    moe.init_for_training(torch.Generator().manual_seed(config.seed), config.router_init_std)
    params = moe.trainable()
    for p in params:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    if train_cache is None or train_cache.split != split:
        train_cache = TrunkCache(scorer, train, split, desc="trunk(train)")
        log(f"[train] trunk cache: {len(train)} train questions through layers 0..{split - 1} "
            f"in {time.perf_counter() - t0:.1f} s")
    n = len(train_cache)
    total_steps = max(1, round(config.epochs * math.ceil(n / config.batch_size)))
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, total_steps // 20)) * max(0.0, 1 - s / total_steps) + 1e-3)
    orders: dict[int, torch.Tensor] = {}
    history: list[dict[str, float]] = []
    window: dict[str, float] = {"ce": 0.0, "lb": 0.0, "cal": 0.0, "feu": 0.0, "acc": 0.0, "count": 0.0}
    log_every = max(1, total_steps // 20)
    bar = tqdm(range(total_steps), desc=f"train uq4ct N={config.num_experts} top-{config.top_k} "
                                        f"β={config.beta:g}", unit="step")
    for step in bar:
        idx = []
        for j in range(config.batch_size):
            epoch, pos = divmod(step * config.batch_size + j, n)
            if epoch not in orders:
                orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 9973 + epoch))
            idx.append(int(orders[epoch][pos]))
        hidden, packed, order, _ = train_cache.packed_batch([idx], config.row_tokens)
        labels = train_cache.labels(order)
        scores, feu, owner, record = routed_scores(scorer, moe, hidden, packed, split)
        ce = torch.nn.functional.cross_entropy(scores, labels)
        lb = record.load_balance(owner, config.load_balance_coef)
        cal = calibration_loss(scores, labels, feu)
        loss = ce + config.aux_weight * lb + config.beta_at(step) * cal
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        acc = (scores.detach().argmax(-1) == labels).float().mean()
        for key, value in (("ce", ce), ("lb", lb), ("cal", cal), ("feu", feu.mean()), ("acc", acc)):
            window[key] += value.item()
        window["count"] += 1
        bar.set_postfix(ce=f"{ce.item():.3f}", cal=f"{cal.item():.3f}", feu=f"{feu.mean().item():.3f}")
        if (step + 1) % log_every == 0 or step + 1 == total_steps:
            count = window.pop("count")
            entry = {"step": step + 1, **{k: round(v / count, 4) for k, v in window.items()}}
            history.append(entry)
            window = dict.fromkeys(window, 0.0) | {"count": 0.0}
    for p in params:
        p.requires_grad_(False)
    seconds = time.perf_counter() - t0
    log(f"[train] {total_steps} steps in {seconds:.0f} s; last window {history[-1] if history else {}}")
    return moe, {"steps": total_steps, "seconds": round(seconds, 1), "history": history, "train_cache": train_cache}


def attach_moe_bundle(model: Any, bundle: Any) -> MixLora:
    """A MixLora on ``model`` filled from a ``method=moe`` bundle's artifact (shapes checked)."""
    layout = layout_from_manifest(bundle.manifest)
    moe = MixLora(model, layout).to(next(model.parameters()).device)
    try:
        moe.load_artifact(bundle.artifacts[ARTIFACT_ROLE])
    except (ValueError, KeyError):
        moe.remove()
        raise
    return moe


def moe_bundle_scores(base: Any, bundle: Any, questions: list[Question], batch_size: int = 16,
                      desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [N, K] and FEU [N] of a MoE bundle on ``questions`` (shared trunk below its layers)."""
    space = bundle.manifest.answer_space
    scorer = ChoiceScorer(base.model, base.tokenizer, space.answer_format, space.max_tokens, space.prompt)
    moe = attach_moe_bundle(base.model, bundle)
    try:
        cache = TrunkCache(scorer, questions, moe.layout.first_layer, desc=f"trunk({desc})")
        return moe_scores(scorer, moe, cache, batch_size, desc=desc)
    finally:
        moe.remove()
