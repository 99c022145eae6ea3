"""Entry point of the Ascend backend (group ``hwft``, name ``ascend``), as a vendor writes one.

The ``npu`` backend runs hwft's torch engine on ``torch.device("npu")`` with its own
:class:`~hwft_torch.runtime.DeviceRuntime`: bf16 where the chip has it, the fused-operator
operators of :mod:`hwft_ascend.kernels` registered as kernels (``npu_fusion_attention``
registered with transformers before the model loads), and collective ``hccl``.
"""

from __future__ import annotations

import pluggy

from hwft.kernels import Kernel
from hwft.records import PRIORITY_ACCELERATOR, Backend, Capability
from hwft_ascend.probe import probe_npu
from hwft_torch.devices import torch_fields
from hwft_torch.launch import launch
from hwft_torch.runtime import DeviceRuntime

HWFT_PLUGIN_API = "2.0"
hookimpl = pluggy.HookimplMarker("hwft")


def _bf16() -> bool:
    return bool(probe_npu().details.get("bf16"))


def _optimizer(params, recipe):
    """train.optimizer fused_adamw: torch_npu's NpuFusedAdamW (one fused update over all
    parameters, AdamW's maths); None: the engine's default for adamw and sgd."""
    if recipe.train.optimizer != "fused_adamw":
        return None
    from torch_npu.optim import NpuFusedAdamW  # pyright: ignore[reportMissingImports] - installed only on Ascend hosts

    t = recipe.train
    return NpuFusedAdamW(params, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay)


def _peak_memory() -> int:
    import torch

    return torch.npu.max_memory_allocated()  # pyright: ignore[reportAttributeAccessIssue] - torch_npu adds torch.npu


NPU = DeviceRuntime("npu", bf16=_bf16, optimizer=_optimizer, peak_memory=_peak_memory)

#: torch-npu's fused operators (hwft_ascend.kernels), for the families whose modules have the
#: Llama shapes they replace (the torch engine's family path npu_ops); none is recommended:
#: a recipe switches each on (kernels.use, or the fused_* switches and kernels.attention).
KERNELS = (
    Kernel(
        "npu_rms_norm",
        "rms_norm",
        "torch",
        "torch_npu.npu_rms_norm for each RMSNorm",
        "hwft_ascend.kernels:NpuRmsNorm",
        backends=("npu",),
        path="npu_ops",
    ),
    Kernel(
        "npu_rotary_mul",
        "rope",
        "torch",
        "torch_npu.npu_rotary_mul for the rotary embedding",
        "hwft_ascend.kernels:NpuRotaryMul",
        backends=("npu",),
        path="npu_ops",
    ),
    Kernel(
        "npu_swiglu",
        "swiglu",
        "torch",
        "torch_npu.npu_swiglu for each gated SiLU MLP",
        "hwft_ascend.kernels:NpuSwiglu",
        backends=("npu",),
        path="npu_ops",
    ),
    Kernel(
        "npu_fusion_attention",
        "attention",
        "torch",
        "torch_npu.npu_fusion_attention as the attention",
        "hwft_ascend.kernels:NpuFusionAttention",
        backends=("npu",),
    ),
)


def capability_npu() -> Capability:
    """bitsandbytes has no NPU build in the release hwft pins, so no qlora (and no
    quantisation); bf16 only where the chip has it (910B yes, 910A no)."""
    avail = probe_npu()
    bf16 = ("bf16",) if not avail.available or avail.details.get("bf16") else ()
    return Capability(
        # DDP and FSDP2 over hccl; DeepSpeed picks its npu accelerator when torch_npu is present.
        **torch_fields("bitsandbytes has no Ascend NPU backend in the release hwft pins"),
        dtypes=("fp32", "fp16", *bf16),
        attention=("eager", "sdpa", "npu_fusion_attention"),
        optimizers=("adamw", "fused_adamw", "sgd"),  # fused_adamw: torch-npu's NpuFusedAdamW
        collective="hccl",
        packing=True,
    )


@hookimpl
def hwft_register_backends(register):
    register(
        Backend(
            "npu",
            "torch",
            "torch on Huawei Ascend NPUs (torch-npu, CANN)",
            PRIORITY_ACCELERATOR,
            probe_npu,
            capability_npu,
            NPU.train,
            accelerator=True,
            launch=launch,
            inference=NPU.inference("npu"),
            bench="hwft_torch.bench",
        )
    )


@hookimpl
def hwft_register_kernels(register):
    for kernel in KERNELS:
        register(kernel)
