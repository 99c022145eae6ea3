"""How the torch engine runs on one device family.

The engine's loop is the same on every torch device; what differs is collected here: the torch
device type, whether it computes in bf16, what to do before the model loads (register an
attention implementation), how to patch the loaded model (fused kernels) and the optimizer.
A device plugin (``hwft-ascend``, a vendor's package) builds a :class:`DeviceRuntime` and
registers a Backend whose ``train`` is ``runtime.train``; the engine never imports a device
plugin. Nothing here imports torch at module import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _never() -> bool:
    return False


@dataclass(frozen=True)
class DeviceRuntime:
    type: str  #: torch device type: cpu, cuda (also ROCm), npu, xpu, ...
    bf16: Callable[[], bool] = _never  #: does the device compute in bf16 (precision: auto)
    before_load: Callable[[Any], None] | None = None  #: (recipe) -> None, before from_pretrained
    patch_model: Callable[[Any, Any], list[str]] | None = None  #: (model, recipe) -> kernels applied
    optimizer: Callable[[list, Any], Any] | None = None  #: (params, recipe) -> optimizer, or None

    def device(self):
        import torch

        return torch.device(self.type)

    def train(self, job) -> dict:
        from hwft_torch.engine import train

        return train(job, self)


def _cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


CPU = DeviceRuntime("cpu")
CUDA = DeviceRuntime("cuda", bf16=_cuda_bf16)  # ROCm builds of torch use the cuda namespace too
