"""Liger's Triton kernels (``liger-kernel``) behind the recipe's ``kernels`` switches, on CUDA
and ROCm: ``fused_rms_norm`` -> LigerRMSNorm, ``fused_rope`` -> liger_rotary_pos_emb,
``fused_swiglu`` -> LigerSwiGLUMLP, patched into the loaded model by Liger's own
``apply_liger_kernel_to_<family>(model=...)``.

``fused_cross_entropy`` takes Liger's fused linear cross-entropy where liger-kernel is installed
(:func:`fused_linear_cross_entropy`), on the hidden states of the label positions only, as hwft's
own chunked kernel (:func:`hwft_torch.losses.linear_cross_entropy`) does everywhere else: the
same number, never the full logits.
"""

from __future__ import annotations

import importlib.util

from hwft.errors import UserError

#: kernels.fused_<name> switches Liger provides here.
LIGER_KERNELS = ("rms_norm", "rope", "swiglu")


def installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def patch(model, recipe) -> list[str]:
    """Apply the switched-on Liger kernels to ``model`` (a PEFT model's base is patched in
    place); returns what was applied, for the run's log."""
    k = recipe.kernels
    wanted = {"rms_norm": k.fused_rms_norm is True, "rope": k.fused_rope is True, "swiglu": k.fused_swiglu is True}
    if not any(wanted.values()):
        return []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = base.config.model_type
    if family not in ("llama", "qwen2"):
        raise UserError(f"kernels.fused_rms_norm/fused_rope/fused_swiglu: hwft applies Liger to the llama and qwen2 "
                        f"families, not to model_type {family}; turn those switches off")
    import liger_kernel.transformers as lk

    apply = {"llama": lk.apply_liger_kernel_to_llama, "qwen2": lk.apply_liger_kernel_to_qwen2}[family]
    apply(rope=wanted["rope"], rms_norm=wanted["rms_norm"], swiglu=wanted["swiglu"], cross_entropy=False,
          fused_linear_cross_entropy=False, model=base)
    return [f"liger {name}" for name, on in wanted.items() if on]


def fused_linear_cross_entropy():
    """Liger's fused linear cross-entropy with hwft's signature, or None where liger-kernel is
    not installed (hwft's chunked kernel is used):

    .. math:: L = \\frac{1}{N} \\sum_i \\left( \\log \\sum_v e^{(W h_i)_v} - (W h_i)_{y_i} \\right)

    over the label positions i, N = ``num_items``; the matmuls in ``dtype`` (autocast's)."""
    if not installed():
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    summed = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def loss(hidden, weight, targets, num_items, dtype=None):
        dtype = dtype or hidden.dtype
        return summed(weight.to(dtype), hidden.to(dtype), targets).float() / num_items

    loss.name = "Liger's fused linear cross-entropy"
    return loss
