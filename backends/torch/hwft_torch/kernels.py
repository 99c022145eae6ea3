"""The torch engine's kernels (hwft.kernels), registered through ``hwft_register_kernels`` as
a plugin's would be. Each class lives beside the maths it runs; this module imports none of
them (nor torch): a run imports the ones it applies.

=================================  =============  ===========  ========================  ===========
id                                 slot           backends     needs                     auto
=================================  =============  ===========  ========================  ===========
liger_fused_linear_cross_entropy   cross_entropy  cuda, rocm   liger-kernel              yes
hwft_chunked_cross_entropy         cross_entropy  every torch  -                         yes
hwft_sibling_projections           projections    every torch  family path               yes
                                                               fused_projections
liger_rms_norm, liger_rope,        rms_norm,      cuda, rocm   liger-kernel, family      no
liger_swiglu                       rope, swiglu                path liger
=================================  =============  ===========  ========================  ===========

``auto`` takes a kernel only for a slot the backend's capability record claims; where two fill
a slot, the first listed that is installed wins (Liger's cross-entropy on a GPU with
liger-kernel, hwft's chunked one elsewhere). Ascend's operators are the ascend plugin's
(hwft_ascend.kernels).
"""

from __future__ import annotations

import importlib.util

from hwft.kernels import Kernel

ENGINE = "torch"
GPUS = ("cuda", "rocm")
#: kernels.fused_<name> switches Liger's module patches serve (the slots they fill).
LIGER_KERNELS = ("rms_norm", "rope", "swiglu")
LIGER_INSTALL = "pip install liger-kernel"


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


KERNELS = (
    Kernel(
        "liger_fused_linear_cross_entropy",
        "cross_entropy",
        ENGINE,
        "Liger's fused linear cross-entropy on the label positions' hidden states (Triton)",
        "hwft_torch.liger:LigerCrossEntropy",
        backends=GPUS,
        requires=("liger_kernel",),
        install=LIGER_INSTALL,
        recommended=True,
    ),
    Kernel(
        "hwft_chunked_cross_entropy",
        "cross_entropy",
        ENGINE,
        "cross-entropy from the label positions' hidden states in chunks: no full logits",
        "hwft_torch.objective:ChunkedCrossEntropy",
        recommended=True,
    ),
    Kernel(
        "hwft_sibling_projections",
        "projections",
        ENGINE,
        "LoRA: q/k/v and gate/up as one matmul each (frozen weights and A matrices concatenated)",
        "hwft_torch.fused_projections:SiblingProjectionsKernel",
        path="fused_projections",
        recommended=True,
    ),
    Kernel(
        "liger_rms_norm",
        "rms_norm",
        ENGINE,
        "Liger's RMSNorm (Triton)",
        "hwft_torch.liger:LigerRmsNorm",
        backends=GPUS,
        path="liger",
        requires=("liger_kernel",),
        install=LIGER_INSTALL,
    ),
    Kernel(
        "liger_rope",
        "rope",
        ENGINE,
        "Liger's rotary embedding (Triton)",
        "hwft_torch.liger:LigerRope",
        backends=GPUS,
        path="liger",
        requires=("liger_kernel",),
        install=LIGER_INSTALL,
    ),
    Kernel(
        "liger_swiglu",
        "swiglu",
        ENGINE,
        "Liger's SwiGLU MLP (Triton)",
        "hwft_torch.liger:LigerSwiglu",
        backends=GPUS,
        path="liger",
        requires=("liger_kernel",),
        install=LIGER_INSTALL,
    ),
)
