"""Jacobians of the K choice scores w.r.t. one LoRA adapter's A and B, for a batch of questions.

:class:`LoraTap` adds one adapter (peft-format tensors) to the adapted linears of a frozen base model
with forward hooks: for module input ``x`` [R, T, in] it computes ``u = x Aᵀ`` [R, T, r] and the delta
``v = s · u Bᵀ`` [R, T, out] with A, B leaves that require grad, so ``v`` is in the autograd graph. One
backward of ``Σ_{q,k} d[q, k] · f[q, k]`` *to the v's* (not to A and B) gives each module's output
gradient ``e_t = ∂/∂v_t`` per row and token; the per-row (= per-question) Jacobian blocks are then

    ∂/∂B = s · Σ_t e_t u_tᵀ   [out, r]        ∂/∂A = Σ_t (s · Bᵀ e_t) x_tᵀ   [r, in]

two batched matmuls per module. C directions ``d`` (one-hot rows for the K choice scores, or the
columns of the softmax Hessian's square root for the GGN) cost one forward and C backwards.

Rows must hold one question each (``pack_questions``), so summing over a row's tokens is per question.
The hooks live only inside :meth:`LoraTap.attach`; an engine's MultiLora hooks add nothing there as
long as no ``multilora.rows(...)`` block is active.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.answers import PackedBatch
from core.multilora import ATTENTION_MODULES, decoder_layers

_PEFT_A = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_A\.weight$")
INPUT_GROUPS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
"""Modules of one layer that read the same input tensor (their A blocks share the activation factor)."""


@dataclass
class Record:
    """One adapted module during a recorded forward. x [R, T, in], u [R, T, r], v [R, T, out]."""

    layer: int
    module: str
    key_a: str  # peft key of lora_A
    key_b: str
    a: torch.Tensor  # [r, in], requires grad
    b: torch.Tensor  # [out, r], requires grad
    x: torch.Tensor | None = None
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @property
    def group(self) -> str:
        """Name of the activation factor this module's A block shares with its layer's siblings."""
        return f"{self.layer}.{INPUT_GROUPS.get(self.module, self.module)}"


def peft_modules(tensors: dict[str, torch.Tensor]) -> list[tuple[int, str, str, str]]:
    """(layer, parent, module, key prefix) of every adapted module in peft tensors, in layer order."""
    out = []
    for key in tensors:
        match = _PEFT_A.match(key)
        if match:
            out.append((int(match.group(1)), match.group(2), match.group(3), key[: -len(".lora_A.weight")]))
    return sorted(out)


class LoraTap:
    """One LoRA adapter as recording forward hooks (see the module docstring)."""

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor], scaling: float) -> None:
        self.model = model
        self.scaling = float(scaling)
        param = next(model.parameters())
        self.records: list[Record] = []
        for layer, _parent, module, prefix in peft_modules(tensors):
            a = tensors[f"{prefix}.lora_A.weight"].detach().to(param.device, torch.float32).clone()
            b = tensors[f"{prefix}.lora_B.weight"].detach().to(param.device, torch.float32).clone()
            self.records.append(Record(layer, module, f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight",
                                       a.requires_grad_(True), b.requires_grad_(True)))
        if not self.records:
            raise ValueError("no peft LoRA tensors to attach")

    @property
    def first_layer(self) -> int:
        return min(r.layer for r in self.records)

    def _hook(self, rec: Record) -> Callable[..., torch.Tensor]:
        def add_delta(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            rec.x = x.detach()
            u = x @ rec.a.to(x.dtype).T
            rec.u = u.detach()
            rec.v = (u @ rec.b.to(x.dtype).T) * self.scaling
            return output + rec.v

        return add_delta

    @contextmanager
    def attach(self) -> Iterator[LoraTap]:
        """Inside the block every forward of the base model adds this adapter to every row and records."""
        layers = decoder_layers(self.model)
        handles = []
        try:
            for rec in self.records:
                parent = getattr(layers[rec.layer], "self_attn" if rec.module in ATTENTION_MODULES else "mlp")
                handles.append(getattr(parent, rec.module).register_forward_hook(self._hook(rec)))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for rec in self.records:
                rec.x = rec.u = rec.v = None

    def output_grads(self, scores: torch.Tensor, direction: torch.Tensor,
                     retain_graph: bool) -> list[torch.Tensor]:
        """∂(Σ direction ⊙ scores)/∂v per module: [R, T, out] each. scores, direction [R, K]."""
        vs = [rec.v for rec in self.records]
        if any(v is None for v in vs):
            raise RuntimeError("no recorded forward: run the model inside attach() first")
        grads = torch.autograd.grad(scores, vs, grad_outputs=direction.to(scores.dtype),  # type: ignore[arg-type]
                                    retain_graph=retain_graph, allow_unused=True)
        return [torch.zeros_like(v) if g is None else g  # type: ignore[arg-type]
                for v, g in zip(vs, grads, strict=True)]

    def block_jacobians(self, rec: Record, grad_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return block_jacobians(rec, grad_v, self.scaling)

    def jacobians(self, scores: torch.Tensor, directions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Jacobian blocks of the C directional outputs: peft key → [R, C, out, in]. directions [C, R, K]."""
        parts: dict[str, list[torch.Tensor]] = {}
        c = directions.shape[0]
        for i in range(c):
            grads = self.output_grads(scores, directions[i], retain_graph=i < c - 1)
            for rec, grad_v in zip(self.records, grads, strict=True):
                jac_a, jac_b = self.block_jacobians(rec, grad_v)
                parts.setdefault(rec.key_a, []).append(jac_a)
                parts.setdefault(rec.key_b, []).append(jac_b)
        return {key: torch.stack(blocks, dim=1) for key, blocks in parts.items()}

    def weights(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors (peft keys), detached."""
        out = {}
        for rec in self.records:
            out[rec.key_a], out[rec.key_b] = rec.a.detach(), rec.b.detach()
        return out


def block_jacobians(rec: Record, grad_v: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row Jacobian blocks (∂/∂A [R, r, in], ∂/∂B [R, out, r]) from grad_v = ∂/∂v [R, T, out]."""
    assert rec.x is not None and rec.u is not None
    g = grad_v.float() * scaling
    jac_b = g.transpose(1, 2) @ rec.u.float()  # [R, out, r]
    grad_u = g @ rec.b.detach()  # [R, T, r]
    jac_a = grad_u.transpose(1, 2) @ rec.x.float()  # [R, r, in]
    return jac_a, jac_b


def linearize(scorer: Any, tap: LoraTap, batch: PackedBatch, hidden: torch.Tensor,
              split: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MAP choice scores [Q, K] and their Jacobian blocks (peft key → [Q, K, out, in]) for one packed
    batch (one question per row); hidden [Q, T, D] = the trunk output below ``split`` (the tap's first
    layer or lower). One forward of the upper layers and K backwards; runs outside inference mode."""
    with torch.inference_mode(False), torch.enable_grad(), tap.attach():
        rows = scorer.run_layers(hidden.clone(), batch, split, scorer.num_layers)
        scores = scorer.head(rows, batch)  # [Q, K]
        q, k = scores.shape
        directions = torch.eye(k, dtype=scores.dtype, device=scores.device)[:, None, :].expand(k, q, k)
        jacobians = tap.jacobians(scores, directions)
    return scores.detach(), jacobians
