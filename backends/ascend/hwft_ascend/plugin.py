"""Entry point of the Ascend backend (group ``hwft``, name ``ascend``), as a vendor writes one.

The ``npu`` backend runs hwft's torch engine on ``torch.device("npu")`` with its own
:class:`~hwft_torch.runtime.DeviceRuntime`: bf16 where the chip has it, the fused-operator
patches of :mod:`hwft_ascend.kernels`, ``npu_fusion_attention`` registered before the model
loads, and collective ``hccl``.
"""

from __future__ import annotations

import pluggy

from hwft.records import PRIORITY_ACCELERATOR, Backend, Capability
from hwft_ascend.probe import probe_npu
from hwft_torch.devices import torch_fields
from hwft_torch.launch import launch
from hwft_torch.runtime import DeviceRuntime

HWFT_PLUGIN_API = "1.1"
hookimpl = pluggy.HookimplMarker("hwft")


def _bf16() -> bool:
    return bool(probe_npu().details.get("bf16"))


def _before_load(recipe) -> None:
    if recipe.kernels.attention == "npu_fusion_attention":
        from hwft_ascend.kernels import register_attention

        register_attention()


def _patch(model, recipe) -> list[str]:
    from hwft_ascend.kernels import apply

    return apply(model, recipe)


def _optimizer(params, recipe):
    """train.optimizer fused_adamw: torch_npu's NpuFusedAdamW (one fused update over all
    parameters, AdamW's maths); None: the engine's default for adamw and sgd."""
    if recipe.train.optimizer != "fused_adamw":
        return None
    from torch_npu.optim import NpuFusedAdamW

    t = recipe.train
    return NpuFusedAdamW(params, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay)


def _peak_memory() -> int:
    import torch

    return torch.npu.max_memory_allocated()


NPU = DeviceRuntime("npu", bf16=_bf16, before_load=_before_load, patch_model=_patch, optimizer=_optimizer,
                    peak_memory=_peak_memory)


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
        fused_kernels=("rms_norm", "rope", "swiglu", "cross_entropy", "adamw", "projections"),
        collective="hccl",
        packing=True,
    )


@hookimpl
def hwft_register_backends(register):
    register(Backend(
        "npu", "torch", "torch on Huawei Ascend NPUs (torch-npu, CANN)", PRIORITY_ACCELERATOR,
        probe_npu, capability_npu, NPU.train, accelerator=True, launch=launch, inference=NPU.inference("npu"),
        bench="hwft_torch.bench",
    ))
