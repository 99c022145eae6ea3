# mlx's nn.Module.__getattr__ has no return annotation, so pyright reads each child module
# (``model.args``, ``glu.gate_proj``) as possibly None:
# pyright: reportOptionalMemberAccess=false, reportOptionalCall=false
"""LoRA on a mixture-of-experts layer's experts and router, in PEFT's layout.

transformers 5 holds each MoE layer's experts as two fused parameters, ``experts.gate_up_proj``
(E, 2I, H) and ``experts.down_proj`` (E, H, I), and PEFT 0.21 adapts them (``all-linear``
targets them through ``target_parameters``) with one low-rank update per expert::

    delta_e = s * B_e A_e,   A = lora_A (E*r, in) read as (E, r, in),
                             B = lora_B (out, r*E) read as (out, r, E)   [note: r-major]

On an MoE model PEFT's all-linear leaves the dense and shared-expert MLPs' Linears alone
(:data:`MLP_NAMES`: PEFT folds those names into the fused experts when it converts a config),
and so does hwft's on MLX, so that both engines adapt the same weights.

The fused gate_up update has twice the rank (and alpha), so that the gate and up halves keep r
each: PEFT writes ``rank_pattern`` / ``alpha_pattern`` for ``gate_up_proj``. The router's weight
(E, H) takes a plain LoRA (``target_parameters: gate.weight``).

mlx-lm keeps the experts as a ``SwitchGLU`` of three ``SwitchLinear`` (gate_proj, up_proj,
down_proj, each (E, out, in)). :class:`LoRASwitchGLU` wraps one: the gate and up projections
share the fused update's A (B's first I rows go to gate, the rest to up), and every term runs
through ``mx.gather_mm`` on the experts each token was routed to: no per-token or per-expert
Python loop. An adapter trained here loads in PEFT and one trained by PEFT loads here
(tests/test_families.py holds the logits to each other).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

#: Linear names an all-linear LoRA on an MoE model leaves out, as PEFT's does.
MLP_NAMES = frozenset({"gate_proj", "up_proj", "down_proj"})


class LoRASwitchGLU(nn.Module):
    """A frozen ``SwitchGLU`` with one LoRA update per expert on the fused gate/up projection
    (rank 2r) and on the down projection (rank r), scaled by ``scale`` (alpha / r)."""

    def __init__(self, glu: nn.Module, r: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.glu = glu
        experts, inner, hidden = glu.gate_proj.weight.shape
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)
        bound_in, bound_mid = 1 / math.sqrt(hidden), 1 / math.sqrt(inner)
        self.gate_up_a = mx.random.uniform(-bound_in, bound_in, (experts, 2 * r, hidden))
        self.gate_up_b = mx.zeros((experts, 2 * inner, 2 * r))
        self.down_a = mx.random.uniform(-bound_mid, bound_mid, (experts, r, inner))
        self.down_b = mx.zeros((experts, hidden, r))

    def _low_rank(self, x, a, b, idx, sort):
        down = mx.gather_mm(x, a.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sort)
        return self.scale * mx.gather_mm(down, b.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sort)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        from mlx_lm.models.switch_layers import _gather_sort, _scatter_unsort

        glu = self.glu
        inner = glu.gate_proj.weight.shape[1]
        x = mx.expand_dims(x, (-2, -3))
        indices = mx.stop_gradient(indices)
        sort = indices.size >= 64  # tokens grouped by expert, as mlx-lm's SwitchGLU does
        idx, inv_order = indices, None
        if sort:
            x, idx, inv_order = _gather_sort(x, indices)
        update = self._low_rank(self.dropout(x), self.gate_up_a, self.gate_up_b, idx, sort)
        gate = glu.gate_proj(x, idx, sorted_indices=sort) + update[..., :inner]
        up = glu.up_proj(x, idx, sorted_indices=sort) + update[..., inner:]
        h = glu.activation(up, gate)
        out = glu.down_proj(h, idx, sorted_indices=sort) + self._low_rank(
            self.dropout(h), self.down_a, self.down_b, idx, sort
        )
        if sort:
            out = _scatter_unsort(out, inv_order, indices.shape)
        return out.squeeze(-2)


class LoRAGate(nn.Module):
    """LoRA on a router that is not an ``nn.Linear`` but holds its (E, H) ``weight`` and
    computes from it (DeepSeek-V3's ``MoEGate``, whose call also picks the experts): for the
    call, the gate's weight is W + s * B A, so its own routing runs on the adapted weight."""

    def __init__(self, gate: nn.Module, r: int, scale: float):
        super().__init__()
        self.gate = gate
        experts, hidden = gate.weight.shape
        self.scale = scale
        bound = 1 / math.sqrt(hidden)
        self.lora_a = mx.random.uniform(-bound, bound, (hidden, r))  # as LoRALinear stores them
        self.lora_b = mx.zeros((r, experts))

    def __call__(self, x: mx.array):
        base = self.gate["weight"]
        self.gate["weight"] = base + self.scale * (self.lora_a @ self.lora_b).T
        try:
            return self.gate(x)
        finally:
            self.gate["weight"] = base


def is_router_gate(module: nn.Module) -> bool:
    """A router with an (E, H) weight that is not a Linear (those take mlx-lm's LoRALinear)."""
    weight = module.get("weight") if isinstance(module, nn.Module) else None
    return not isinstance(module, nn.Linear | nn.QuantizedLinear) and isinstance(weight, mx.array) and weight.ndim == 2


def wrap_routers(model: nn.Module, suffix: str, r: int, scale: float) -> list[str]:
    """Every non-Linear router at a path ending with ``suffix`` wrapped in a new :class:`LoRAGate`."""
    from mlx.utils import tree_unflatten

    found = [
        (p, m) for p, m in model.named_modules() if (p == suffix or p.endswith("." + suffix)) and is_router_gate(m)
    ]
    model.update_modules(tree_unflatten([(p, LoRAGate(m, r, scale)) for p, m in found]))
    return [p for p, _ in found]


def is_switch_glu(module: nn.Module) -> bool:
    return type(module).__name__ == "SwitchGLU" and hasattr(module, "gate_proj") and hasattr(module, "down_proj")


def wrap_experts(model: nn.Module, r: int, scale: float, dropout: float) -> list[str]:
    """Every ``SwitchGLU`` of the (frozen) model wrapped in a new :class:`LoRASwitchGLU`;
    returns their paths."""
    from mlx.utils import tree_unflatten

    found = [(path, m) for path, m in model.named_modules() if is_switch_glu(m)]
    model.update_modules(tree_unflatten([(path, LoRASwitchGLU(m, r, scale, dropout)) for path, m in found]))
    return [path for path, _ in found]


def expert_modules(model: nn.Module):
    return ((p, m) for p, m in model.named_modules() if isinstance(m, LoRASwitchGLU))


# PEFT's layout, both ways. A: (E*r, in), expert-major rows; B: (out, r*E), r-major columns.


def to_peft(a: mx.array, b: mx.array) -> tuple[np.ndarray, np.ndarray]:
    """(E, r, in), (E, out, r) -> PEFT's lora_A (E*r, in) and lora_B (out, r*E)."""
    down, up = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    experts, r, _ = down.shape
    return down.reshape(experts * r, -1), up.transpose(1, 2, 0).reshape(up.shape[1], r * experts)


def from_peft(a: np.ndarray, b: np.ndarray, experts: int) -> tuple[mx.array, mx.array]:
    """PEFT's lora_A (E*r, in) and lora_B (out, r*E) -> (E, r, in), (E, out, r)."""
    r = a.shape[0] // experts
    return (mx.array(a.reshape(experts, r, a.shape[1])), mx.array(b.reshape(b.shape[0], r, experts).transpose(2, 0, 1)))


# DeepSeek's MLA: PEFT's LoRA on kv_b_proj, which mlx-lm keeps as two per-head layers.


class LoRAEmbedQ(nn.Module):
    """LoRA on the key half of DeepSeek's ``kv_b_proj``, which mlx-lm's deepseek_v3 holds as
    ``embed_q`` (H, latent, nope): W_k,h + s B_k,h A per head, with A (r, latent) shared with
    the value half (:class:`LoRAUnembedOut` reads it from here, so it is one parameter)."""

    def __init__(self, base: nn.Module, r: int, scale: float):
        super().__init__()
        self.base = base
        heads, latent, nope = base.weight.shape
        self.scale = scale
        bound = 1 / math.sqrt(latent)
        self.lora_a = mx.random.uniform(-bound, bound, (r, latent))
        self.lora_b = mx.zeros((heads, nope, r))

    def __call__(self, x: mx.array, transpose: bool = True) -> mx.array:
        y = self.base(x, transpose=transpose)
        if transpose:  # a query's nope part into the latent space: q @ (W_k + s B_k A)
            return y + self.scale * ((x @ self.lora_b) @ self.lora_a)
        return y + self.scale * ((x @ self.lora_a.T) @ self.lora_b.swapaxes(-1, -2))  # keys from the latent


class LoRAUnembedOut(nn.Module):
    """LoRA on the value half of ``kv_b_proj`` (mlx-lm's ``unembed_out``, (H, v, latent)), with
    the A of the key half's :class:`LoRAEmbedQ`."""

    def __init__(self, base: nn.Module, keys: LoRAEmbedQ, r: int, scale: float):
        super().__init__()
        self.base = base
        heads, values, _ = base.weight.shape
        self.scale = scale
        self.lora_b = mx.zeros((heads, values, r))
        object.__setattr__(self, "_keys", keys)  # not a child: its A is a parameter once, there

    def __call__(self, x: mx.array, transpose: bool = True) -> mx.array:
        return self.base(x, transpose=transpose) + self.scale * (
            (x @ self._keys.lora_a.T) @ self.lora_b.swapaxes(-1, -2)
        )


def mla_attentions(model: nn.Module):
    """(path, module) of every attention that holds DeepSeek's kv_b_proj as mlx-lm's two
    per-head layers (``embed_q``, ``unembed_out``)."""
    return [(p, m) for p, m in model.named_modules() if "embed_q" in m and "unembed_out" in m]


def wrap_mla(model: nn.Module, r: int, scale: float) -> list[str]:
    """LoRA on every MLA attention's kv_b_proj (its two halves); returns the kv_b_proj paths."""
    done = []
    for path, attention in mla_attentions(model):
        keys = LoRAEmbedQ(attention.embed_q, r, scale)
        attention.embed_q = keys
        attention.unembed_out = LoRAUnembedOut(attention.unembed_out, keys, r, scale)
        done.append(f"{path}.kv_b_proj")
    return done


def mla_to_peft(attention: nn.Module) -> tuple[mx.array, mx.array]:
    """PEFT's kv_b_proj lora_A (r, latent) and lora_B (H * (nope + v), r)."""
    keys, values = attention.embed_q, attention.unembed_out
    b = mx.concatenate([keys.lora_b, values.lora_b], axis=1)
    return keys.lora_a.astype(mx.float32), b.reshape(-1, b.shape[-1]).astype(mx.float32)


def mla_from_peft(attention: nn.Module, a: mx.array, b: mx.array, scale: float) -> None:
    """Put a PEFT kv_b_proj adapter on an MLA attention's two halves."""
    embed_q, unembed_out = attention["embed_q"], attention["unembed_out"]
    heads, _, nope = embed_q.weight.shape
    keys = LoRAEmbedQ(embed_q, a.shape[0], scale)
    values = LoRAUnembedOut(unembed_out, keys, a.shape[0], scale)
    per_head = b.astype(mx.float32).reshape(heads, -1, a.shape[0])
    keys.lora_a, keys.lora_b, values.lora_b = a.astype(mx.float32), per_head[:, :nope], per_head[:, nope:]
    attention.embed_q, attention.unembed_out = keys, values
