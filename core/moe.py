"""Mixture of LoRA experts with top-k routers (MixLoRA-style), the layer math of UQ4CT training and serving.

Layout: every adapted decoder layer ℓ has ONE router ``W_r^ℓ [N, D]`` shared by its adapted linears, and
every adapted linear ``W0 [out, in]`` of that layer has N experts ``A_i [r, in]``, ``B_i [out, r]`` with
peft's scaling ``s = alpha / r``. Per token, with ``h = input_layernorm(x)`` of layer ℓ (the normalized
hidden state the attention projections read):

    p   = softmax(W_r h)                             [N], float32
    K   = indices of the top-k entries of p           (torch.topk; ties by index order)
    g_i = p_i / Σ_{j∈K} p_j  (i ∈ K), else 0         the gates: RENORMALIZED over the kept experts
    y   = W0 x + s · Σ_i g_i B_i A_i x                for every adapted linear of the layer

Renormalization (as in MixLoRA and Mixtral) makes the mixture of N identical experts exactly one LoRA and
keeps the update's scale independent of how peaked the router is. The raw kept mass ``m = Σ_{i∈K} p_i``
(Eq. 2 read literally, no renormalization) is what FEU aggregates (see :func:`feu_per_question`).

The experts are evaluated densely (all N, gates zero outside K), which is exact, differentiable through
the kept gates into the router, and faster on CPU than gathering per-token expert subsets.
:class:`MixLora` attaches all this to a frozen base model with forward hooks, like
:class:`~core.multilora.MultiLora`; the model itself is never modified.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from core.answers import AnswerFormat, PackedBatch
from core.multilora import decoder_layers, parent_name

LOAD_BALANCE_COEF = 1e-2  # the paper's a
ARTIFACT_ROLE = "moe"
ARTIFACT_FILE = "moe.safetensors"


@dataclass(frozen=True)
class MoeLayout:
    """Where experts go (modules × layers), how many (N), their rank/alpha, and the router's top-k."""

    target_modules: tuple[str, ...]
    layers: tuple[int, ...]
    num_experts: int
    rank: int
    alpha: float
    top_k: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k {self.top_k} outside 1..num_experts ({self.num_experts})")
        if not self.layers or not self.target_modules:
            raise ValueError("a MoE layout needs at least one layer and one target module")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def first_layer(self) -> int:
        return min(self.layers)


# --- the math (pure functions) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Routing:
    """Top-k routing of M tokens (any leading shape ``[...]``).

    probs [..., N] full softmax; gates [..., N] renormalized kept weights (0 elsewhere, sum 1);
    kept_mass [...] Σ of the kept raw probabilities, in [k/N, 1]; top1 [...] index of the largest p.
    """

    probs: torch.Tensor
    gates: torch.Tensor
    kept_mass: torch.Tensor
    top1: torch.Tensor


def route(logits: torch.Tensor, top_k: int) -> Routing:
    """Router logits [..., N] → :class:`Routing` (computed in float32)."""
    probs = torch.softmax(logits.float(), dim=-1)
    kept, index = torch.topk(probs, top_k, dim=-1)
    mass = kept.sum(-1)
    gates = torch.zeros_like(probs).scatter(-1, index, kept / mass[..., None])
    return Routing(probs=probs, gates=gates, kept_mass=mass, top1=index[..., 0])


def mixture_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, gates: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """``s · Σ_i g_i B_i A_i x``. x [..., in], lora_a [N, r, in], lora_b [N, out, r], gates [..., N] → [..., out]."""
    n, r, d_in = lora_a.shape
    a = lora_a.reshape(n * r, d_in).to(x.dtype)
    b = (lora_b.permute(1, 0, 2).reshape(-1, n * r) * scaling).to(x.dtype)  # [out, N·r], expert-major
    xa = (x @ a.T).unflatten(-1, (n, r)) * gates.to(x.dtype)[..., None]  # [..., N, r]
    return xa.flatten(-2) @ b.T


def load_balance_loss(probs: torch.Tensor, top1: torch.Tensor, coef: float = LOAD_BALANCE_COEF) -> torch.Tensor:
    """Switch/MixLoRA auxiliary loss ``a · N · Σ_i F_i P_i`` over M tokens of one layer.

    probs [M, N] full router softmax, top1 [M] each token's top-1 expert. F_i = fraction of tokens whose
    top-1 is i (not differentiable), P_i = mean router probability of i (the full softmax, as in Switch
    Transformer, so every expert's logit gets gradient). Equals ``a`` under perfect balance, ``a · N`` when
    one expert takes every token with probability 1.
    """
    n = probs.shape[-1]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    fraction = torch.bincount(top1, minlength=n).to(probs.dtype) / probs.shape[0]
    return coef * n * (fraction * probs.mean(0)).sum()


def question_token_owner(batch: PackedBatch) -> torch.Tensor:
    """Packed question owning each token: [B, T] long, -1 for padding (prefix and, in cloze, choice tokens).

    Derived from the batch alone: the prefix's last token sits at ``score_pos[q, 0, 0]`` with position
    ``P - 1``, so the question starts P - 1 tokens earlier and spans P (+ its choice tokens in cloze).
    """
    b, t = batch.input_ids.shape
    last = batch.score_pos[:, 0, 0]
    rows = batch.question_row
    p_minus_1 = batch.position_ids[rows, last]
    start = last - p_minus_1
    length = p_minus_1 + 1
    if batch.answer_format == AnswerFormat.CLOZE:
        length = length + batch.score_mask.sum((1, 2))
    ar = torch.arange(t, device=start.device)
    inside = (ar >= start[:, None]) & (ar < (start + length)[:, None])  # [Q, T]
    owner = torch.full((b * t,), -1, dtype=torch.long, device=start.device)
    flat = (rows[:, None] * t + ar)[inside]
    owner[flat] = torch.arange(rows.shape[0], device=start.device)[:, None].expand(-1, t)[inside]
    return owner.reshape(b, t)


def feu_per_question(kept_mass: list[torch.Tensor], owner: torch.Tensor, num_questions: int) -> torch.Tensor:
    """FEU(x): the functional-level confidence of each packed question, in [k/N, 1] ⊂ [0, 1].

    kept_mass: one [B, T] tensor per routed layer (L of them); owner [B, T] from
    :func:`question_token_owner`. Returns [Q] = mean over the question's s tokens and the L layers of the
    kept top-k router mass ``Σ_{i∈K} softmax(W_r^ℓ h_t^ℓ)_i`` (differentiable into the routers).

    Why this scalar: Eq. 9 averages the routers' kept outputs ``R^ℓ(h) = KeepTopk(Softmax(W_r^ℓ h))``
    over tokens and layers, giving a vector over experts; its sum is the only expert-permutation-invariant
    linear read-out, and it is a probability: 1 when every router commits all its mass to the experts it
    uses (exploitation, low epistemic uncertainty), k/N when routing is uniform (exploration, high). This is
    the behavior Fig. 1 asks ``L_cal = (1{pred = y} − FEU)²`` to align with correctness. It must use the
    raw softmax mass: the renormalized gates always sum to 1.
    """
    mass = torch.stack([m.float() for m in kept_mass]).mean(0).reshape(-1)  # mean over layers, [B·T]
    flat_owner = owner.reshape(-1)
    real = flat_owner >= 0
    total = torch.zeros(num_questions, dtype=mass.dtype, device=mass.device).index_add(0, flat_owner[real],
                                                                                        mass[real])
    count = torch.bincount(flat_owner[real], minlength=num_questions).to(mass.dtype)
    return total / count.clamp_min(1.0)


def calibration_loss(scores: torch.Tensor, labels: torch.Tensor, feu: torch.Tensor) -> torch.Tensor:
    """UQ4CT's ``L_cal = mean_q (1{argmax_k s_qk = y_q} − FEU(x_q))²``. scores [Q, K], labels [Q], feu [Q]."""
    correct = (scores.detach().argmax(-1) == labels).to(feu.dtype)
    return (correct - feu).pow(2).mean()


# --- hooks on a base model -------------------------------------------------------------------------------


@dataclass
class RoutingRecord:
    """What the routers did during one forward: per routed layer, in execution order."""

    probs: list[torch.Tensor] = field(default_factory=list)  # [B, T, N]
    top1: list[torch.Tensor] = field(default_factory=list)  # [B, T]
    kept_mass: list[torch.Tensor] = field(default_factory=list)  # [B, T]

    def load_balance(self, owner: torch.Tensor, coef: float = LOAD_BALANCE_COEF) -> torch.Tensor:
        """Mean over routed layers of :func:`load_balance_loss` on the real (non-padding) tokens."""
        real = owner >= 0
        losses = [load_balance_loss(p[real], i[real], coef) for p, i in zip(self.probs, self.top1, strict=True)]
        return torch.stack(losses).mean()

    def feu(self, owner: torch.Tensor, num_questions: int) -> torch.Tensor:
        return feu_per_question(self.kept_mass, owner, num_questions)


class ExpertFactors(nn.Module):
    """N experts of one linear: lora_A [N, r, in], lora_B [N, out, r] (float32)."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(self, base: nn.Linear, num_experts: int, rank: int) -> None:
        super().__init__()
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(num_experts, rank, base.in_features, device=device),
                                   requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, base.out_features, rank, device=device),
                                   requires_grad=False)


class MixLora(nn.Module):
    """Routers and experts hooked onto a frozen base model; they act only inside :meth:`active`.

    Artifact tensor names (:meth:`artifact_tensors`): ``layers.{ℓ}.router.weight`` [N, D] and
    ``layers.{ℓ}.{self_attn|mlp}.{module}.experts.lora_A`` [N, r, in] / ``….lora_B`` [N, out, r].
    """

    def __init__(self, model: nn.Module, layout: MoeLayout) -> None:
        super().__init__()
        self.layout = layout
        self.routers = nn.ParameterDict()
        self.experts = nn.ModuleDict()
        self._gates: dict[int, torch.Tensor] = {}
        self._active = False
        self._record: RoutingRecord | None = None
        self._handles: list[Any] = []
        layers = decoder_layers(model)
        for layer in layout.layers:
            if not 0 <= layer < len(layers):
                raise ValueError(f"layer {layer} outside 0..{len(layers) - 1}")
            block: Any = layers[layer]
            norm = block.input_layernorm
            hidden = int(norm.weight.shape[0])
            self.routers[str(layer)] = nn.Parameter(
                torch.zeros(layout.num_experts, hidden, device=norm.weight.device), requires_grad=False)
            self._handles.append(norm.register_forward_hook(self._router_hook(layer)))
            for name in layout.target_modules:
                base = getattr(getattr(block, parent_name(name)), name)
                factors = ExpertFactors(base, layout.num_experts, layout.rank)
                self.experts[f"{layer}_{name}"] = factors
                self._handles.append(base.register_forward_hook(self._delta_hook(layer, factors)))

    def _router_hook(self, layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not self._active:
                return
            routing = route(torch.nn.functional.linear(output.float(), self.router(layer)),
                            self.layout.top_k)
            self._gates[layer] = routing.gates
            if self._record is not None:
                self._record.probs.append(routing.probs)
                self._record.top1.append(routing.top1)
                self._record.kept_mass.append(routing.kept_mass)

        return hook

    def _delta_hook(self, layer: int, factors: ExpertFactors) -> Callable[..., torch.Tensor]:
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if not self._active:
                return output
            gates = self._gates.get(layer)
            if gates is None or gates.shape[:-1] != inputs[0].shape[:-1]:
                raise RuntimeError(f"layer {layer}: the router did not run on these tokens before the experts")
            return output + mixture_delta(inputs[0], factors.lora_A, factors.lora_B, gates, self.layout.scaling)

        return hook

    def router(self, layer: int) -> nn.Parameter:
        return cast(nn.Parameter, self.routers[str(layer)])

    def factors(self, layer: int, module: str) -> ExpertFactors:
        return cast(ExpertFactors, self.experts[f"{layer}_{module}"])

    @contextmanager
    def active(self, record: bool = False) -> Iterator[RoutingRecord | None]:
        """Apply the mixture to every row of forwards inside the block; yields a RoutingRecord if ``record``."""
        previous = self._active, self._record
        self._active, self._record = True, RoutingRecord() if record else None
        try:
            yield self._record
        finally:
            self._active, self._record = previous
            self._gates.clear()

    def remove(self) -> None:
        """Detach every hook from the base model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def trainable(self) -> list[nn.Parameter]:
        return [cast(nn.Parameter, p) for _, p in self._names()]

    def init_for_training(self, generator: torch.Generator, router_std: float = 0.02) -> None:
        """Experts: peft's init per expert (A Kaiming-uniform, B = 0, so training starts at the base model);
        routers: N(0, router_std²) (MixLoRA's init)."""
        with torch.no_grad():
            for key in self.experts:
                factors = cast(ExpertFactors, self.experts[key])
                bound = 1.0 / math.sqrt(factors.lora_A.shape[-1])
                factors.lora_A.copy_(torch.empty(factors.lora_A.shape).uniform_(-bound, bound, generator=generator))
                factors.lora_B.zero_()
            for layer in self.layout.layers:
                router = self.router(layer)
                router.copy_(torch.randn(router.shape, generator=generator) * router_std)

    # --- (de)serialization --------------------------------------------------------------------------------

    def _names(self) -> Iterator[tuple[str, torch.Tensor]]:
        for layer in self.layout.layers:
            yield f"layers.{layer}.router.weight", self.router(layer)
            for name in self.layout.target_modules:
                factors = self.factors(layer, name)
                prefix = f"layers.{layer}.{parent_name(name)}.{name}.experts"
                yield f"{prefix}.lora_A", factors.lora_A
                yield f"{prefix}.lora_B", factors.lora_B

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        """Routers and experts as flat safetensors-ready tensors (float32, CPU)."""
        return {k: v.detach().float().cpu().contiguous() for k, v in self._names()}

    def check_tensors(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Every problem that stops ``tensors`` loading into this layout and base model (empty when they fit)."""
        want = dict(self._names())
        problems = [f"missing tensor {k!r}" for k in want if k not in tensors]
        problems += [f"unexpected tensor {k!r}" for k in tensors if k not in want]
        for key, tensor in tensors.items():
            if key in want and tuple(tensor.shape) != tuple(want[key].shape):
                problems.append(f"{key}: shape {tuple(tensor.shape)} ≠ expected {tuple(want[key].shape)}")
            elif key in want and not bool(torch.isfinite(tensor).all()):
                problems.append(f"{key}: non-finite values")
        return problems

    def load_artifact(self, tensors: dict[str, torch.Tensor]) -> None:
        """Fill routers and experts; raises ValueError listing every problem if they do not fit."""
        problems = self.check_tensors(tensors)
        if problems:
            raise ValueError("; ".join(problems[:20]))
        with torch.no_grad():
            for key, param in self._names():
                param.copy_(tensors[key])

    def expert_peft_state_dict(self, expert: int) -> dict[str, torch.Tensor]:
        """Expert ``expert`` of every adapted linear as a plain peft LoRA (``…q_proj.lora_A.weight`` keys)."""
        out: dict[str, torch.Tensor] = {}
        for layer in self.layout.layers:
            for name in self.layout.target_modules:
                factors = self.factors(layer, name)
                prefix = f"base_model.model.model.layers.{layer}.{parent_name(name)}.{name}"
                out[f"{prefix}.lora_A.weight"] = factors.lora_A[expert].detach().float().cpu().contiguous()
                out[f"{prefix}.lora_B.weight"] = factors.lora_B[expert].detach().float().cpu().contiguous()
        return out


def routed_scores(scorer: Any, moe: MixLora, hidden: torch.Tensor, batch: PackedBatch, start: int,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RoutingRecord]:
    """Layers ``start..L-1`` with the mixture on packed rows, then the answer head.

    scorer: a :class:`~core.scoring.ChoiceScorer`; hidden [B, T, D] the packed rows entering layer ``start``.
    Returns (choice scores [Q, K], FEU [Q], token owner [B, T], the routing record); differentiable.
    """
    owner = question_token_owner(batch)
    with moe.active(record=True) as record:
        hidden = scorer.run_layers(hidden, batch, start, scorer.num_layers)
    assert record is not None
    return scorer.head(hidden, batch), record.feu(owner, batch.num_questions), owner, record


# --- bundle layout ----------------------------------------------------------------------------------------


def method_config(layout: MoeLayout, **extra: Any) -> dict[str, Any]:
    """The manifest's ``method_config`` for a MoE bundle (what :func:`layout_from_manifest` reads back)."""
    return {
        "num_experts": layout.num_experts,
        "top_k": layout.top_k,
        "router": "one linear router per adapted decoder layer on its input_layernorm output",
        "gates": "softmax, keep top-k, renormalize the kept weights to sum 1",
        "feu": "mean over the question's tokens and the routed layers of the kept top-k softmax mass",
        "artifact": {"role": ARTIFACT_ROLE, "file": ARTIFACT_FILE,
                     "keys": "layers.{l}.router.weight [N, D]; layers.{l}.{self_attn|mlp}.{module}.experts."
                             "lora_A [N, r, in] / lora_B [N, out, r]"},
        "placeholder_member": "expert-0: expert 0 as a plain peft LoRA, only because bundles need >= 1 "
                              "member; never served on its own",
        **extra,
    }


def layout_from_manifest(manifest: Any) -> MoeLayout:
    """MoeLayout of a ``method=moe`` BundleManifest; raises ValueError naming every problem."""
    config, lora = manifest.method_config, manifest.lora
    problems = [f"method_config lacks {key!r}" for key in ("num_experts", "top_k") if key not in config]
    if manifest.artifacts.get(ARTIFACT_ROLE) is None:
        problems.append(f"manifest.artifacts lacks the {ARTIFACT_ROLE!r} role")
    if problems:
        raise ValueError("; ".join(problems))
    return MoeLayout(tuple(lora.target_modules), tuple(lora.layers), int(config["num_experts"]), lora.rank,
                     lora.alpha, int(config["top_k"]))
