"""Liger's Triton kernels (``liger-kernel``) as hwft kernels (hwft.kernels), on CUDA and ROCm:

=================================  =============  ===========================================
kernel id                          slot           what it patches in
=================================  =============  ===========================================
liger_rms_norm                     rms_norm       LigerRMSNorm
liger_rope                         rope           liger_rotary_pos_emb
liger_swiglu                       swiglu         LigerSwiGLUMLP
liger_fused_linear_cross_entropy   cross_entropy  LigerFusedLinearCrossEntropyLoss, on the
                                                  hidden states of the label positions
=================================  =============  ===========================================

The first three go in through Liger's own ``apply_liger_kernel_to_<family>(model=...)``, where
``<family>`` is the model family's ``liger`` option (hwft_torch.families: llama, qwen2, qwen3,
mistral); the family needs the ``liger`` path. The cross-entropy one computes what hwft's
chunked kernel (:func:`hwft_torch.losses.linear_cross_entropy`) computes: the same number,
never the full logits.
"""

from __future__ import annotations

from hwft.plugins import get_host
from hwft_torch.kernels import LIGER_KERNELS
from hwft_torch.objective import ChunkedCrossEntropy
from hwft_torch.unwrap import base_model


class LigerPatch:
    """One of Liger's module patches (``slot`` rms_norm, rope or swiglu) for the model's family.
    Liger swaps the modules of the model it is given; its RoPE patch replaces the modeling
    module's function for the process (one model trains per process)."""

    slot = ""

    def __init__(self, job):
        self.job = job

    def check(self, model) -> str | None:
        base = base_model(model)
        family = get_host().families().lookup("torch", base.config.model_type)
        target = family.options.get("liger")
        import liger_kernel.transformers as lk  # pyright: ignore[reportMissingImports] - optional: pip install liger-kernel

        if not hasattr(lk, f"apply_liger_kernel_to_{target}"):
            return f"this liger-kernel has no apply_liger_kernel_to_{target}"
        return None

    def apply(self, model) -> str:
        import liger_kernel.transformers as lk  # pyright: ignore[reportMissingImports] - optional: pip install liger-kernel

        base = base_model(model)
        target = get_host().families().lookup("torch", base.config.model_type).options["liger"]
        switches = {name: name == self.slot for name in LIGER_KERNELS}
        getattr(lk, f"apply_liger_kernel_to_{target}")(
            **switches, cross_entropy=False, fused_linear_cross_entropy=False, model=base
        )
        return f"liger {self.slot}"


class LigerRmsNorm(LigerPatch):
    slot = "rms_norm"


class LigerRope(LigerPatch):
    slot = "rope"


class LigerSwiglu(LigerPatch):
    slot = "swiglu"


class LigerCrossEntropy(ChunkedCrossEntropy):
    """Liger's fused linear cross-entropy with hwft's signature:

    .. math:: L = \\frac{1}{N} \\sum_i \\left( \\log \\sum_v e^{(W h_i)_v} - (W h_i)_{y_i} \\right)

    over the label positions i, N = ``num_items``; the matmuls in ``dtype`` (autocast's)."""

    name = "Liger's fused linear cross-entropy"

    def loss(self):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # pyright: ignore[reportMissingImports] - optional: pip install liger-kernel

        summed = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def loss(hidden, weight, targets, num_items, dtype=None):
            dtype = dtype or hidden.dtype
            return summed(weight.to(dtype), hidden.to(dtype), targets).float() / num_items

        return loss
