"""LoRA ensembles (Balabanov & Linander 2024): M members trained together, each its own seed and data order.

All M members live in the slots of one :class:`~core.multilora.MultiLora`, so one forward trains them
all: a step stacks one mini-batch per member (rows of member m use slot m) on top of the cached trunk.
Member m minimizes its own negative log posterior per example

    L_m = mean_i −log softmax(s_m(x_i))[y_i]  +  λ / (2 N) · R(θ_m)

(the NLL over the K-choice distribution plus a Gaussian prior of precision λ, scaled by the N training
examples). ``EnsembleConfig.prior`` says what the prior is on:

- ``"delta"``: R = Σ_l ‖ΔW_l‖²_F with ΔW_l = (α/r)·B_l A_l, the update each adapted linear layer l
  adds to its frozen weight, i.e. N(0, λ⁻¹ I) on W − W0 around the pre-trained weights. This is the
  seeds' prior: Balabanov & Linander (arXiv 2402.12264) regularize the fine-tuning update with λ/2 = 1
  (§5.3 on its variance), and their code (github.com/oleksandr-balabanov/equivariant-posteriors,
  ``lib/models/mistral_generative.py``, ``lora_l2_loss``) adds ``lora_l2 · Σ_l ‖B_l A_l‖²_F`` with
  ``lora_l2 = 1`` to the mean token NLL.
  Here ΔW carries the α/r of the update that is really added (their code leaves it out), and the term
  is divided by N, as for the factors prior, so λ keeps its meaning. ‖BA‖²_F = trace((BᵀB)(AAᵀ)) is
  computed from two r×r Gram matrices, never the out×in ΔW. Its gradient in A, 2(α/r)²(BᵀB)A, is
  zero while B = 0: A keeps its random init until the likelihood has moved B.
- ``"factors"`` (the default): R = Σ_l ‖A_l‖² + ‖B_l‖², plain L2 on the LoRA factors. B starts at 0,
  so early on A gets no likelihood gradient, only the prior's. Adam rescales even a tiny gradient to
  steps of size lr, so the prior shrinks A for almost any λ.

Which prior, measured (``benchmarks/results/compare_priors.md``). Same budget for both: M = 3, 2 epochs,
lr 1e-3, λ = 2, the first 600 training questions, seed 0. factors vs delta:

- ARC-E test (first 1000): NLL 0.913 vs 0.915, ECE 0.044 vs 0.046, mean MI 0.0075 vs 0.0065,
  AUROC(MI) 0.552 vs 0.543.
- OBQA test (500): NLL 1.297 vs 1.300, ECE 0.037 vs 0.042, MI 0.0027 vs 0.0021, AUROC(MI) 0.501 vs 0.511.

The delta prior does keep A at its init norm (‖A‖/‖A₀‖ 1.01 vs 0.37). It ends at the same ‖ΔW‖, and the
members disagree no more: the shrinking of A is not what keeps MI small. ``factors`` wins NLL/ECE
narrowly (within one seed's noise) and the MI tie-breaker on both datasets, so it stays the default.
A 4× larger A init (``init_scale_a = 4``, OBQA) did not raise MI either (0.0021).

``init_scale_a`` multiplies the bound of A's Kaiming-uniform init (B = 0 still starts every member at
the base model). Parameters of different members are disjoint slices and AdamW is element-wise, so
summing the M losses trains M independent models. M = 1 is the MAP LoRA baseline. Bundle manifests
written before ``prior`` existed have no such field; they were trained with ``"factors"``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from core.answers import Question
from core.multilora import LoraLayout, MultiLora
from core.scoring import ChoiceScorer
from training.config import AdapterTrainingConfig
from training.trunk import TrunkCache

PriorKind = Literal["delta", "factors"]


class EnsembleConfig(AdapterTrainingConfig):
    """Resolved training configuration; saved verbatim in the bundle manifest."""

    members: int = 5
    epochs: float = 2.0  # members must travel from the prior for the ensemble to disagree (1 epoch: MI ≈ 0.008)
    lr: float = 1e-3
    prior_precision: float = 2.0  # λ; the seeds' λ/2 = 1
    prior: PriorKind = "factors"  # prior on A and B ("factors") or on ΔW = (α/r)·BA ("delta"); measured: module doc
    init_scale_a: float = Field(default=1.0, gt=0)  # multiplier on the bound of A's Kaiming-uniform init
    early_stopping: bool = False
    eval_every: int = 0  # steps between validation checks when early stopping (0 = once per epoch)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)  # peft's lora_dropout on A's input, training only

    def layout(self, num_layers: int) -> LoraLayout:
        k = num_layers if self.top_layers <= 0 else min(self.top_layers, num_layers)
        return LoraLayout(tuple(self.target_modules), tuple(range(num_layers - k, num_layers)), self.rank, self.alpha)


def member_scores(scorer: ChoiceScorer, multilora: MultiLora | None, slots: Sequence[int], cache: TrunkCache,
                  batch_size: int = 16, desc: str = "score") -> torch.Tensor:
    """Choice scores of every member on every cached question: [N, M, K_max] (-inf for absent choices)."""
    n, m = len(cache), len(slots)
    k_max = max(len(q.choices) for q in cache.questions)
    out = torch.full((n, m, k_max), float("-inf"))
    slot_tensor = torch.tensor(list(slots), device=scorer.device)
    with torch.no_grad():
        for lo in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False):
            idx = list(range(lo, min(lo + batch_size, n)))
            hidden, packed, order, row_group = cache.packed_batch([idx] * m)
            rows = hidden
            if multilora is None:
                rows = scorer.run_layers(rows, packed, cache.split, scorer.num_layers)
            else:
                with multilora.rows(slot_tensor[row_group]):
                    rows = scorer.run_layers(rows, packed, cache.split, scorer.num_layers)
            scores = scorer.head(rows, packed).float().cpu()  # [M·b, K], member-major, packed order
            scores = scores.reshape(m, len(idx), -1)
            for member in range(m):
                where = torch.tensor(order[member * len(idx) : (member + 1) * len(idx)])
                out[where, member, : scores.shape[-1]] = scores[member]
    return out


def nll_of_scores(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-member mean NLL. scores [N, M, K], labels [N] → [M]."""
    logp = torch.log_softmax(scores, dim=-1)
    return -logp.gather(-1, labels[:, None, None].expand(-1, scores.shape[1], 1))[..., 0].mean(0)


def prior_sq_norms(multilora: MultiLora, prior: PriorKind) -> torch.Tensor:
    """R(θ_s) of every slot: [S]. ``delta``: Σ_l ‖(α/r)·B A‖²_F via r×r Grams; ``factors``: Σ_l ‖A‖² + ‖B‖²."""
    terms = []
    for factors in multilora.factor_map.values():
        a, b = factors.lora_A, factors.lora_B  # [S, r, in], [S, out, r]
        if prior == "factors":
            terms.append(a.pow(2).sum((1, 2)) + b.pow(2).sum((1, 2)))
        elif prior == "delta":
            gram_a = torch.bmm(a, a.transpose(1, 2))  # A Aᵀ  [S, r, r]
            gram_b = torch.bmm(b.transpose(1, 2), b)  # Bᵀ B  [S, r, r]
            terms.append(factors.scaling.pow(2) * (gram_a * gram_b).sum((1, 2)))  # trace of a symmetric product
        else:
            raise ValueError(f"unknown prior {prior!r}")
    return torch.stack(terms).sum(0)


def train_ensemble(scorer: ChoiceScorer, config: EnsembleConfig, train: Sequence[Question],
                   val: Sequence[Question], log: Any = print,
                   snapshot_steps: Sequence[int] = ()) -> tuple[MultiLora, dict[str, Any]]:
    """Train ``config.members`` LoRA members; returns the MultiLora (slot m = member m) and a training log.

    ``snapshot_steps`` (1-based optimizer step counts): after each of these steps every member's adapter is
    copied into the log's ``snapshots`` (step → [peft tensors of member m], float32), the checkpoint
    ensemble's members (:mod:`training.baselines`). Not with early stopping, which rewinds members."""
    if snapshot_steps and config.early_stopping:
        raise ValueError("snapshots are taken from one uninterrupted run: not with early stopping")
    if config.threads:
        torch.set_num_threads(config.threads)
    layout = config.layout(scorer.num_layers)
    split = layout.first_layer
    multilora = MultiLora(scorer.model, layout, num_slots=config.members).to(scorer.device)
    for m in range(config.members):
        multilora.init_for_training(m, torch.Generator().manual_seed(config.seed * 1000 + m), config.init_scale_a)
    params = [p for f in multilora.factor_map.values() for p in (f.lora_A, f.lora_B)]
    for p in params:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    train_cache = TrunkCache(scorer, train, split, desc="trunk(train)")
    val_cache = TrunkCache(scorer, val, split, desc="trunk(val)")
    log(f"[train] trunk cache: {len(train)} train + {len(val)} val questions through layers 0..{split - 1} "
        f"in {time.perf_counter() - t0:.1f} s")
    n = len(train_cache)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, total_steps // 20)) * max(0.0, 1 - s / total_steps) + 1e-3)
    def member_order(member: int, epoch: int) -> torch.Tensor:
        """Member m's data order in a given epoch: its own seeded permutation."""
        seed = (config.seed * 1_000_003 + member) * 9973 + epoch
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    orders: dict[tuple[int, int], torch.Tensor] = {}
    history: list[dict[str, float]] = []
    best_nll = torch.full((config.members,), float("inf"))
    best_state = copy.deepcopy(multilora.state_dict()) if config.early_stopping else None
    eval_every = config.eval_every or steps_per_epoch
    labels_val = torch.tensor([q.answer for q in val])
    wanted = set(snapshot_steps)
    if wanted and not wanted <= set(range(1, total_steps + 1)):
        raise ValueError(f"snapshot steps {sorted(wanted)} outside 1..{total_steps}")
    snapshots: dict[int, list[dict[str, torch.Tensor]]] = {}
    bar = tqdm(range(total_steps), desc=f"train {config.members} member(s)", unit="step")
    for step in bar:
        groups: list[list[int]] = []
        for m in range(config.members):
            group = []
            for j in range(config.batch_size):
                epoch, pos = divmod(step * config.batch_size + j, n)
                if (m, epoch) not in orders:
                    orders[(m, epoch)] = member_order(m, epoch)
                group.append(int(orders[(m, epoch)][pos]))
            groups.append(group)
        hidden, packed, order, row_group = train_cache.packed_batch(groups, config.row_tokens)
        labels = train_cache.labels(order)
        with multilora.rows(row_group, dropout=config.lora_dropout):
            hidden = scorer.run_layers(hidden, packed, split, scorer.num_layers)
        scores = scorer.head(hidden, packed)  # [M·bs, K], member-major
        nll = torch.nn.functional.cross_entropy(scores, labels, reduction="none")
        nll_per_member = nll.reshape(config.members, config.batch_size).mean(1)
        prior = prior_sq_norms(multilora, config.prior)  # [M]: slot m = member m
        loss = (nll_per_member + config.prior_precision / (2 * n) * prior).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step + 1 in wanted:
            snapshots[step + 1] = [{k: v.float().cpu() for k, v in multilora.peft_state_dict(m).items()}
                                   for m in range(config.members)]
        bar.set_postfix(nll=f"{nll_per_member.mean().item():.3f}")
        if config.early_stopping and ((step + 1) % eval_every == 0 or step + 1 == total_steps):
            val_nll = nll_of_scores(member_scores(scorer, multilora, range(config.members), val_cache), labels_val)
            history.append({"step": step + 1, **{f"val_nll_{m}": float(v) for m, v in enumerate(val_nll)}})
            improved = val_nll < best_nll
            best_nll = torch.where(improved, val_nll, best_nll)
            assert best_state is not None
            current = multilora.state_dict()
            for key, value in current.items():  # keep each member's best slot
                if value.ndim and value.shape[0] == config.members:
                    best_state[key][improved] = value[improved].detach().clone()
            log(f"[train] step {step + 1}: val NLL per member {[round(float(v), 4) for v in val_nll]}")
    if best_state is not None:
        multilora.load_state_dict(best_state)
    for p in params:
        p.requires_grad_(False)
    seconds = time.perf_counter() - t0
    log(f"[train] {total_steps} steps × {config.members} member(s) in {seconds:.0f} s")
    return multilora, {"steps": total_steps, "seconds": round(seconds, 1), "history": history,
                       "train_cache": train_cache, "val_cache": val_cache, "snapshots": snapshots}
