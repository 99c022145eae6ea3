"""torch-npu's fused operators, patched into Hugging Face Llama/Qwen-family models.

Each is switched on by the recipe's ``kernels`` section and computes what the module it
replaces computes:

=================  ==================================  ===========================================
kernels.           replaces                            with
=================  ==================================  ===========================================
fused_rms_norm     ``*RMSNorm.forward`` (per module)   ``npu_rms_norm(x, w, epsilon)[0]``:
                                                       ``x / sqrt(mean(x^2) + eps) * w``
fused_rope         ``apply_rotary_pos_emb`` of the     ``npu_rotary_mul(x, cos, sin)`` (rotary
                   model's modeling module             mode 'half'): ``x*cos + rotate_half(x)*sin``
fused_swiglu       ``*MLP.forward`` (per module)       ``down(npu_swiglu(cat[gate(x), up(x)]))``:
                                                       ``silu(gate) * up``
attention:         an attention implementation         ``npu_fusion_attention`` (below)
npu_fusion_attention registered with transformers
=================  ==================================  ===========================================

``torch_npu`` is imported when a kernel runs, never at hwft import. The MLP keeps calling
``gate_proj`` and ``up_proj`` as modules, so LoRA adapters on them still apply. RoPE is a
module-level function in transformers, so its patch is global to that modeling module for the
process (one model trains per process); :func:`restore` undoes every patch.
"""

from __future__ import annotations

import importlib
import math
import sys
import types

ATTENTION = "npu_fusion_attention"
#: Causal masks for npu_fusion_attention's compressed sparse modes are always 2048 x 2048.
COMPRESSED_MASK = 2048

_saved_rope: dict[str, object] = {}  #: modeling module -> original apply_rotary_pos_emb


def _npu():
    import torch_npu  # pyright: ignore[reportMissingImports] - installed only on Ascend hosts

    return torch_npu


# --- RMSNorm ---------------------------------------------------------------------------------


def fused_rms_norm_forward(self, hidden_states):
    weight = self.weight.to(hidden_states.dtype)
    return _npu().npu_rms_norm(hidden_states, weight, epsilon=self.variance_epsilon)[0]


def _is_rms_norm(module) -> bool:
    return (
        type(module).__name__.endswith("RMSNorm")
        and hasattr(module, "variance_epsilon")
        and getattr(module, "weight", None) is not None
    )


# --- Rotary embedding --------------------------------------------------------------------------


def fused_apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """transformers' ``apply_rotary_pos_emb`` with torch-npu's fused rotary multiply."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    npu = _npu()
    return npu.npu_rotary_mul(q, cos, sin), npu.npu_rotary_mul(k, cos, sin)


# --- SwiGLU MLP --------------------------------------------------------------------------------


def fused_swiglu_forward(self, x):
    import torch

    gate_up = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
    return self.down_proj(_npu().npu_swiglu(gate_up, dim=-1))


def _is_swiglu_mlp(module) -> bool:
    """A gated MLP whose activation is SiLU (torch's, or transformers' SiLUActivation)."""
    act = type(getattr(module, "act_fn", None)).__name__
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) and act in ("SiLU", "SiLUActivation")


# --- Attention ---------------------------------------------------------------------------------


def npu_fusion_attention_forward(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs
):
    """An attention implementation for transformers' AttentionInterface.

    Layout BNSD (query ``[batch, heads, seq, head_dim]``, key/value with fewer heads for GQA,
    which the kernel handles itself). ``scale`` is passed explicitly (1/sqrt(head_dim) unless the
    model says otherwise). The kernel's mask is boolean with True = masked, the opposite of
    transformers' (True = attend): a padded or packed batch passes its full mask inverted
    (``sparse_mode`` 0); an unpadded batch passes the compressed 2048 x 2048 upper-triangular
    mask with ``sparse_mode`` 3 (right-down causal, which is also right for a KV cache where
    the queries are the last positions). Returns ``[batch, seq, heads, head_dim]``.
    """
    import torch

    heads, head_dim = query.shape[1], query.shape[-1]
    scale = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
    if attention_mask is None:
        mask = torch.ones(COMPRESSED_MASK, COMPRESSED_MASK, dtype=torch.bool, device=query.device).triu(1)
        sparse_mode = 3
    else:
        mask = ~attention_mask if attention_mask.dtype == torch.bool else attention_mask < 0
        sparse_mode = 0
    out = _npu().npu_fusion_attention(
        query, key, value, heads, "BNSD", atten_mask=mask, scale=scale, keep_prob=1.0 - dropout, sparse_mode=sparse_mode
    )[0]
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make ``attn_implementation="npu_fusion_attention"`` loadable, with transformers' sdpa
    mask builder (a 4D boolean mask, or none when the batch needs none)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, npu_fusion_attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


# --- The kernels, as hwft registers them (hwft.kernels) ----------------------------------------


class NpuRmsNorm:
    """Kernel ``npu_rms_norm`` (slot rms_norm): every RMSNorm module's forward."""

    def __init__(self, job):
        self.job = job

    def check(self, model) -> str | None:
        return None if any(_is_rms_norm(m) for m in model.modules()) else "the model has no RMSNorm module"

    def apply(self, model) -> str:
        norms = [m for m in model.modules() if _is_rms_norm(m)]
        for m in norms:
            m.forward = types.MethodType(fused_rms_norm_forward, m)
        return f"npu_rms_norm x{len(norms)}"


class NpuSwiglu(NpuRmsNorm):
    """Kernel ``npu_swiglu`` (slot swiglu): every gated SiLU MLP's forward."""

    def check(self, model) -> str | None:
        return None if any(_is_swiglu_mlp(m) for m in model.modules()) else "the model has no gated SiLU MLP"

    def apply(self, model) -> str:
        mlps = [m for m in model.modules() if _is_swiglu_mlp(m)]
        for m in mlps:
            m.forward = types.MethodType(fused_swiglu_forward, m)
        return f"npu_swiglu x{len(mlps)}"


class NpuRotaryMul(NpuRmsNorm):
    """Kernel ``npu_rotary_mul`` (slot rope): the model's modeling module's
    ``apply_rotary_pos_emb``, for the process; :meth:`undo` puts it back."""

    def check(self, model) -> str | None:
        return None if _rope_modules(model) else "the model's modeling module has no apply_rotary_pos_emb"

    def apply(self, model) -> str:
        patched = []
        for name in _rope_modules(model):
            mod = sys.modules[name]
            _saved_rope.setdefault(name, mod.apply_rotary_pos_emb)
            mod.apply_rotary_pos_emb = fused_apply_rotary_pos_emb  # pyright: ignore[reportAttributeAccessIssue]
            patched.append(name.rsplit(".", 1)[-1])
        return f"npu_rotary_mul in {', '.join(patched)}"

    def undo(self) -> None:
        restore()


class NpuFusionAttention(NpuRmsNorm):
    """Kernel ``npu_fusion_attention`` (slot attention, chosen by ``kernels.attention``):
    registered with transformers before the weights load, which then load with it."""

    def before_load(self) -> None:
        register_attention()

    def check(self, model) -> str | None:
        return None

    def apply(self, model) -> str:
        return ATTENTION


def _rope_modules(model) -> list[str]:
    """The transformers modeling modules of ``model``'s classes that define apply_rotary_pos_emb."""
    out = []
    for name in sorted({type(m).__module__ for m in model.modules()}):
        mod = sys.modules.get(name) or importlib.import_module(name)
        if name.startswith("transformers.models.") and callable(getattr(mod, "apply_rotary_pos_emb", None)):
            out.append(name)
    return out


def restore() -> None:
    """Undo the module-level RoPE patches (per-module patches go with their model)."""
    for name, original in _saved_rope.items():
        sys.modules[name].apply_rotary_pos_emb = original  # pyright: ignore[reportAttributeAccessIssue]
    _saved_rope.clear()
