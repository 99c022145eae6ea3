"""Sibling LoRA projections that read the same input, computed as one matmul.

A decoder layer feeds one normalised hidden state x to ``q_proj``, ``k_proj`` and ``v_proj``,
and another to ``gate_proj`` and ``up_proj``. With LoRA on each (peft), that is one frozen GEMM
and one rank-r GEMM per projection, several of them thin (k and v of a grouped-query model, the
r-wide A products). For a group of n siblings with frozen weights W_i, biases b_i and adapters
(A_i, B_i, scaling s_i) this computes

.. math::
    [y_1 \\dots y_n] = x\\,[W_1; \\dots; W_n]^T + [b_1 \\dots b_n], \\qquad
    [h_1 \\dots h_n] = x\\,[A_1; \\dots; A_n]^T, \\qquad
    \\mathrm{out}_i = y_i + s_i\\, h_i B_i^T

which is peft's ``W_i x + b_i + s_i B_i A_i x`` for each i, in two matmuls instead of 2n (and
two for the input's gradient instead of 2n). The frozen weights are concatenated once, and
each frozen weight becomes a view into it, so no tensor is held twice (on the CPU freed
originals would leave holes between the other weights that glibc keeps, raising the peak RSS:
docs/benchmarks.md). The A's are concatenated every step (a few KiB) so their gradients flow to
peft's own parameters: parameter names, saved adapters and optimizer state are unchanged. Parameters must stay where
they are afterwards (not
sharded, cast or moved), hence one process or ddp.

The layer's code calls the siblings one after another. The first call computes all of them and
hands the others theirs; a later sibling takes its output only when it is called on the very
same input tensor, and otherwise runs peft's own forward. So does every sibling whenever the
fused path does not apply: gradients off (generation, evaluation, a frozen reference), adapters
disabled or merged, or more than one active adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: sibling projections by the attribute that holds them, as Llama-family decoder layers name them
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def fusable(module, adapter: str | None = None) -> str | None:
    """The single adapter of a plain peft LoRA Linear (frozen nn.Linear base, no dropout, no
    DoRA), or None when ``module`` is anything else."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(module, LoraLinear) or type(module.base_layer) is not torch.nn.Linear:
        return None
    names = list(module.lora_A.keys())
    if len(names) != 1 or (adapter is not None and names[0] != adapter):
        return None
    name = names[0]
    if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False):
        return None
    if not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return None  # each sibling draws its own dropout mask
    if module.base_layer.weight.requires_grad:
        return None
    return name


class SiblingProjections:
    """One group of sibling LoRA projections (see the module docstring)."""

    def __init__(self, members: list, adapter: str):
        self.members = members
        self.adapter = adapter
        bases = [m.base_layer for m in members]
        self.sizes = [b.out_features for b in bases]
        self.weight = self._concatenate(bases, "weight")
        has_bias = [b.bias is not None for b in bases]
        self.bias = self._concatenate(bases, "bias") if all(has_bias) else None
        self.mixed_bias = any(has_bias) and not all(has_bias)
        self.ranks = [m.lora_A[adapter].out_features for m in members]
        self.pending: tuple[torch.Tensor, list] | None = None
        self.peft_forward = [m.forward for m in members]
        for index, member in enumerate(members):
            member.forward = self._forward_of(index)
            member.hwft_siblings = self

    def _concatenate(self, bases, name: str) -> torch.Tensor:
        """The frozen tensors ``name`` of the bases, one after another in one tensor; each base's
        own becomes a view into it."""
        whole = torch.cat([getattr(b, name).detach() for b in bases])
        for base, part in zip(bases, whole.split(self.sizes), strict=True):
            setattr(base, name, torch.nn.Parameter(part, requires_grad=False))
        return whole

    def active(self) -> bool:
        return (
            torch.is_grad_enabled()
            and not self.mixed_bias
            and all(
                not m.disable_adapters and not m.merged and list(m.active_adapters) == [self.adapter]
                for m in self.members
            )
        )

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.adapter
        base = F.linear(x, self.weight, self.bias)
        stacked_a = torch.cat([m.lora_A[a].weight for m in self.members])
        low_rank = F.linear(x.to(stacked_a.dtype), stacked_a)
        outs = []
        for m, y, h in zip(self.members, base.split(self.sizes, -1), low_rank.split(self.ranks, -1), strict=True):
            outs.append((y + m.lora_B[a](h) * m.scaling[a]).to(y.dtype))
        return outs

    def _forward_of(self, index: int):
        def first(x, *args, **kwargs):
            if args or kwargs or not self.active():
                self.pending = None
                return self.peft_forward[0](x, *args, **kwargs)
            outs = self.outputs(x)
            self.pending = (x, outs)
            return outs[0]

        def later(x, *args, **kwargs):
            pending = self.pending
            if pending is not None and pending[0] is x and pending[1][index] is not None and not (args or kwargs):
                out = pending[1][index]
                pending[1][index] = None
                if all(o is None for o in pending[1][1:]):
                    self.pending = None
                return out
            return self.peft_forward[index](x, *args, **kwargs)

        return first if index == 0 else later


def fuse_sibling_projections(layers) -> int:
    """Fuse each decoder layer's sibling LoRA projections; returns how many groups."""
    fused = 0
    for layer in layers:
        for holder_name, names in GROUPS:
            holder = getattr(layer, holder_name, None)
            members = [m for n in names if (m := getattr(holder, n, None)) is not None]
            if len(members) != len(names):
                continue
            adapter = fusable(members[0])
            if adapter is None or not all(fusable(m, adapter) for m in members[1:]):
                continue
            if len({m.in_features for m in members}) != 1:
                continue
            SiblingProjections(members, adapter)
            fused += 1
    return fused


class SiblingProjectionsKernel:
    """Kernel ``hwft_sibling_projections`` (slot projections, hwft.kernels): the decoder layers'
    sibling LoRA projections as one matmul each group. LoRA only; parameters must stay where
    they are (one process or ddp); dropout draws a mask per projection."""

    def __init__(self, job):
        self.job = job

    def needed(self, tuning: str) -> bool:
        return tuning == "lora"

    def check(self, model) -> str | None:
        recipe = self.job.recipe
        if recipe.parallel.strategy not in ("none", "ddp"):
            return (
                f"parallel.strategy {recipe.parallel.strategy} shards or casts the frozen weights they "
                "concatenate (on with none and ddp)"
            )
        dropout = recipe.method.lora.dropout
        if dropout and not recipe.model.adapter:
            return (
                f"method.lora.dropout {dropout} draws a mask per projection (dropout 0 lets q/k/v and "
                "gate/up run as one matmul each)"
            )
        return None

    def apply(self, model) -> str:
        from hwft_torch.compiling import decoder_layers

        groups = fuse_sibling_projections(decoder_layers(model))
        if not groups:
            return (
                "hwft_sibling_projections found no decoder layer with plain LoRA on q/k/v or gate/up "
                "(quantised, DoRA, dropout, or other module names)"
            )
        return f"{groups} groups of sibling LoRA projections (q/k/v, gate/up) as one matmul each"
