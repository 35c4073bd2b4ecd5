"""Stacked multi-LoRA: many adapters live in slots of one base model and each batch row picks its slot.

For every adapted linear layer ``W0`` (shape ``[out, in]``) the container holds
``lora_A [S, r_max, in]``, ``lora_B [S, out, r_max]`` and ``scaling [S]``. A forward hook adds, for batch
row ``i`` with slot ``s_i``, ``scaling[s_i] · x_i A_{s_i}^T B_{s_i}^T`` to ``W0 x_i``: two batched matmuls
over gathered per-row factors, so rows of many adapters (ensemble members, bundles) share one forward.
Slot ``-1`` (or a slot with no weights at this layer) adds nothing. Ranks below ``r_max`` are zero-padded,
which is exact.

The same container trains M ensemble members at once (slots = members, parameters trainable) and
serves loaded bundles (slots filled from peft-format adapters). peft's on-disk format is the
interchange: :func:`peft_state_dict` / :func:`load_peft_state_dict` map slots to and from it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTENTION_MODULES + MLP_MODULES
_PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class LoraLayout:
    """Where adapters go: target module names, decoder layer indices, and the rank/alpha of the slots."""

    target_modules: tuple[str, ...]
    layers: tuple[int, ...]
    rank: int
    alpha: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def first_layer(self) -> int:
        return min(self.layers)


def parent_name(module: str) -> str:
    """The decoder-layer submodule holding a projection: ``self_attn`` or ``mlp``."""
    return "self_attn" if module in ATTENTION_MODULES else "mlp"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a Llama-family causal LM (Llama, Mistral, SmolLM2, Qwen2 …)."""
    return model.model.layers  # type: ignore[return-value,union-attr]


class SlotFactors(nn.Module):
    """LoRA factors for one linear layer, one slot per adapter.

    lora_A [S, r_max, in], lora_B [S, out, r_max], scaling [S]; ``present[s]`` marks slots with weights.
    """

    scaling: torch.Tensor
    present: torch.Tensor

    def __init__(self, base: nn.Linear, num_slots: int, max_rank: int) -> None:
        super().__init__()
        param = base.weight
        self.lora_A = nn.Parameter(torch.zeros(num_slots, max_rank, base.in_features, dtype=torch.float32,
                                               device=param.device), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(num_slots, base.out_features, max_rank, dtype=torch.float32,
                                               device=param.device), requires_grad=False)
        self.register_buffer("scaling", torch.zeros(num_slots, device=param.device))
        self.register_buffer("present", torch.zeros(num_slots, dtype=torch.bool, device=param.device))

    def delta(self, x: torch.Tensor, row_slots: torch.Tensor,
              blocks: torch.Tensor | None = None) -> torch.Tensor | None:
        """x [R, T, in], row_slots [R] → LoRA delta [R, T, out], or None when no row has weights here.

        ``blocks`` [G] (optional) says the rows are G equal contiguous blocks with slots ``blocks``; the
        factors are then gathered once per block instead of once per row (training's layout).
        """
        if blocks is not None:
            if not bool(self.present[blocks].all()):
                blocks = None
            else:
                g = blocks.shape[0]
                a = self.lora_A[blocks].to(x.dtype)  # [G, r, in]
                b = (self.lora_B[blocks] * self.scaling[blocks, None, None]).to(x.dtype)  # [G, out, r]
                xg = x.reshape(g, -1, x.shape[-1])  # [G, (R/G)·T, in]
                out = torch.bmm(torch.bmm(xg, a.transpose(1, 2)), b.transpose(1, 2))
                return out.reshape(*x.shape[:-1], out.shape[-1])
        safe = row_slots.clamp_min(0)
        live = self.present[safe] & (row_slots >= 0)
        if not bool(live.any()):
            return None
        scale = self.scaling[safe] * live  # [R]
        a = self.lora_A[safe].to(x.dtype)  # [R, r, in]
        b = (self.lora_B[safe] * scale[:, None, None]).to(x.dtype)  # [R, out, r]
        return torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


class MultiLora(nn.Module):
    """Slots of LoRA adapters hooked onto a frozen base model (the model itself is never modified).

    ``with multilora.rows(row_slots):`` makes every forward of the base model inside the block apply
    slot ``row_slots[i]`` to batch row ``i``. Outside such a block the hooks add nothing.
    """

    def __init__(self, model: nn.Module, layout: LoraLayout, num_slots: int) -> None:
        super().__init__()
        self.layout = layout
        self.num_slots = num_slots
        self.factors = nn.ModuleDict()
        self.factor_map: dict[str, SlotFactors] = {}  # typed view of self.factors
        self._row_slots: torch.Tensor | None = None
        self._blocks: torch.Tensor | None = None
        self._dropout = 0.0  # training only: dropout on the input of A (see rows)
        self._handles = []
        layers = decoder_layers(model)
        for layer in layout.layers:
            if not 0 <= layer < len(layers):
                raise ValueError(f"layer {layer} outside 0..{len(layers) - 1}")
            for name in layout.target_modules:
                base = getattr(getattr(layers[layer], parent_name(name)), name)
                factors = SlotFactors(base, num_slots, layout.rank)
                self.factors[f"{layer}_{name}"] = factors
                self.factor_map[f"{layer}_{name}"] = factors
                self._handles.append(base.register_forward_hook(self._hook(factors)))

    def _hook(self, factors: SlotFactors):
        def add_delta(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if self._row_slots is None:
                return output
            x = inputs[0]
            if self._dropout > 0:  # peft's lora_dropout: independent per element (token and feature)
                x = torch.nn.functional.dropout(x, self._dropout, training=True)
            delta = factors.delta(x, self._row_slots, self._blocks)
            return output if delta is None else output + delta

        return add_delta

    def remove(self) -> None:
        """Detach the hooks from the base model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def rows(self, row_slots: torch.Tensor | None, dropout: float = 0.0) -> Iterator[None]:
        """Apply slot ``row_slots[i]`` ([R] long, -1 = base model) to row i of forwards inside the block.

        ``dropout`` > 0 (training only) drops the LoRA branch's input x before A, each element independently
        with probability p and the rest scaled by 1 / (1 − p), as peft's ``lora_dropout``; W0 x is untouched."""
        previous = self._row_slots, self._blocks, self._dropout
        self._row_slots, self._blocks, self._dropout = row_slots, _equal_blocks(row_slots), dropout
        try:
            yield
        finally:
            self._row_slots, self._blocks, self._dropout = previous

    def slot_parameters(self, slot: int) -> list[torch.Tensor]:
        """Views of one slot's A and B factors (for the L2 prior term)."""
        out: list[torch.Tensor] = []
        for factors in self.factor_map.values():
            out.extend((factors.lora_A[slot], factors.lora_B[slot]))
        return out

    def init_for_training(self, slot: int, generator: torch.Generator, scale_a: float = 1.0) -> None:
        """peft's default init: A ~ Kaiming-uniform(a=√5), B = 0, so training starts at the base model.

        ``scale_a`` multiplies A's bound (1.0 = peft's): B = 0 keeps the start at the base model for any
        scale, but a larger A spreads the members' random subspaces further apart.
        """
        if scale_a <= 0:
            raise ValueError(f"scale_a must be positive, got {scale_a}")
        for factors in self.factor_map.values():
            fan_in = factors.lora_A.shape[-1]
            bound = scale_a / math.sqrt(fan_in)  # kaiming_uniform with a=sqrt(5) gives 1/sqrt(fan_in)
            with torch.no_grad():
                factors.lora_A[slot].uniform_(-bound, bound, generator=generator)
                factors.lora_B[slot].zero_()
                factors.scaling[slot] = self.layout.scaling
                factors.present[slot] = True

    def clear_slot(self, slot: int) -> None:
        with torch.no_grad():
            for factors in self.factor_map.values():
                factors.lora_A[slot].zero_()
                factors.lora_B[slot].zero_()
                factors.scaling[slot] = 0.0
                factors.present[slot] = False

    def peft_state_dict(self, slot: int) -> dict[str, torch.Tensor]:
        """One slot as peft's adapter_model.safetensors keys (``…layers.{i}.self_attn.q_proj.lora_A.weight``)."""
        out: dict[str, torch.Tensor] = {}
        rank = self.layout.rank
        for key, factors in self.factor_map.items():
            layer, name = key.split("_", 1)
            prefix = f"base_model.model.model.layers.{layer}.{parent_name(name)}.{name}"
            out[f"{prefix}.lora_A.weight"] = factors.lora_A[slot, :rank].detach().clone().contiguous()
            out[f"{prefix}.lora_B.weight"] = factors.lora_B[slot, :, :rank].detach().clone().contiguous()
        return out

    def load_peft_state_dict(self, slot: int, tensors: dict[str, torch.Tensor], scaling: float) -> None:
        """Fill ``slot`` from peft-format tensors; every key must map to a hooked layer of matching shape."""
        problems = check_peft_tensors(tensors, self)
        if problems:
            raise ValueError("; ".join(problems))
        self.clear_slot(slot)
        with torch.no_grad():
            for key, tensor in tensors.items():
                parts = peft_key_parts(key)
                assert parts is not None
                layer, _, name, which = parts
                factors = self.factor_map[f"{layer}_{name}"]
                if which == "A":
                    factors.lora_A[slot, : tensor.shape[0]].copy_(tensor)
                else:
                    factors.lora_B[slot, :, : tensor.shape[1]].copy_(tensor)
                factors.scaling[slot] = scaling
                factors.present[slot] = True


def _equal_blocks(row_slots: torch.Tensor | None) -> torch.Tensor | None:
    """Slots [G] if ``row_slots`` is G ≥ 2 equal contiguous runs of distinct non-negative slots, else None."""
    if row_slots is None or row_slots.numel() < 2:
        return None
    slots, counts = torch.unique_consecutive(row_slots, return_counts=True)
    if slots.numel() < 2 or bool((slots < 0).any()) or bool((counts != counts[0]).any()):
        return None
    if torch.unique(slots).numel() != slots.numel():
        return None
    return slots


def peft_key_parts(key: str) -> tuple[int, str, str, str] | None:
    """(layer, parent, module, "A"/"B") of a peft LoRA key of a decoder layer, or None for any other key."""
    match = _PEFT_KEY.match(key)
    if match is None:
        return None
    layer, parent, name, which = match.groups()
    return int(layer), parent, name, which


def check_peft_tensors(tensors: dict[str, torch.Tensor], multilora: MultiLora) -> list[str]:
    """Every problem that stops ``tensors`` loading into ``multilora``'s slots (empty when they fit): a key that
    is not a peft LoRA key, a module under the wrong parent, a layer or module the slots do not adapt (it would
    otherwise be ignored), a non-float tensor, or a shape that does not fit."""
    problems: list[str] = []
    for key, tensor in tensors.items():
        parts = peft_key_parts(key)
        if parts is None:
            problems.append(f"unexpected tensor {key!r}")
            continue
        layer, parent, name, which = parts
        if parent != parent_name(name):
            problems.append(f"{key}: {name} sits under {parent_name(name)}, not {parent}")
            continue
        factors = multilora.factor_map.get(f"{layer}_{name}")
        if factors is None:
            problems.append(f"{key}: layer {layer} {name} is not adapted in this engine's layout")
            continue
        if not tensor.is_floating_point():
            problems.append(f"{key}: dtype {tensor.dtype} is not a float type")
            continue
        max_rank = factors.lora_A.shape[1]
        want = (None, factors.lora_A.shape[2]) if which == "A" else (factors.lora_B.shape[1], None)
        if tensor.ndim != 2:
            problems.append(f"{key}: {tensor.ndim}-d tensor, a LoRA factor is 2-d")
            continue
        rank = tensor.shape[0] if which == "A" else tensor.shape[-1]
        if rank > max_rank or any(w is not None and w != s for w, s in zip(want, tensor.shape, strict=True)):
            problems.append(f"{key}: shape {tuple(tensor.shape)} does not fit (rank ≤ {max_rank}, dims {want})")
    return problems


def layout_of_peft_tensors(tensors: dict[str, torch.Tensor]) -> tuple[set[int], set[str], int]:
    """(layers, module names, rank) that a peft-format state dict adapts."""
    layers: set[int] = set()
    modules: set[str] = set()
    rank = 0
    for key, tensor in tensors.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            continue
        layers.add(int(match.group(1)))
        modules.add(match.group(3))
        if match.group(4) == "A":
            rank = max(rank, int(tensor.shape[0]))
    return layers, modules, rank
