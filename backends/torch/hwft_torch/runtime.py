"""How the torch engine runs on one device family.

The engine's loop is the same on every torch device; what differs is collected here: the torch
device type, whether it computes in bf16, what to do before the model loads (register an
attention implementation), the optimizer and the peak memory. Fused kernels are registered,
not patched in here (hwft.kernels).
A device plugin (``hwft-ascend``, a vendor's package) builds a :class:`DeviceRuntime` and
registers a Backend whose ``train`` is ``runtime.train``; the engine never imports a device
plugin, and this module names the engine's loop rather than importing it (the engine reads a
runtime; a runtime only hands itself to the engine). Nothing here imports torch at module import.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hwft.errors import UserError
from hwft.methods.record import resolve
from hwft_torch.host_memory import cpu_peak_rss


def _never() -> bool:
    return False


@dataclass(frozen=True)
class DeviceRuntime:
    type: str  #: torch device type: cpu, cuda (also ROCm), npu, xpu, ...
    bf16: Callable[[], bool] = _never  #: does the device compute in bf16 (precision: auto)
    before_load: Callable[[Any], None] | None = None  #: (recipe) -> None, before from_pretrained
    optimizer: Callable[[list, Any], Any] | None = None  #: (params, recipe) -> optimizer, or None
    peak_memory: Callable[[], int | None] = lambda: None  #: bytes at the high-water mark, or None

    def device(self, index: int = 0):
        """The torch device of a process (``index``: its local rank), made current."""
        import torch

        if self.type == "cpu":
            return torch.device("cpu")
        getattr(torch, self.type).set_device(index)
        return torch.device(self.type, index)

    def train(self, job):
        """The Backend.train hook: the torch engine's loop on this device."""
        return resolve("hwft_torch.engine:train")(job, self)

    def inference(self, name: str):
        """The Backend.inference hook of the backend ``name`` on this device family."""

        def load(trained, precision: str = "auto"):
            from hwft_torch.inference import TorchSession

            return TorchSession(trained, name, self, precision)

        return load


def _cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


#: CPU flags (Linux /proc/cpuinfo) of units that compute bf16 natively.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: Overrides the CPU probe: ``native`` (take bf16 as if the CPU had bf16 units) or ``emulated``
#: (as if it had none), so both paths of ``precision: auto`` can be run and tested on any CPU.
CPU_BF16_ENV = "HWFT_CPU_BF16"


def cpu_bf16_units() -> str | None:
    """The CPU's native bf16 unit (a /proc/cpuinfo flag, or the HWFT_CPU_BF16 switch), or None
    where bf16 would be emulated."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if forced == "native":
        return f"{CPU_BF16_ENV}=native"
    if forced == "emulated":
        return None
    if forced:
        raise UserError(
            f"{CPU_BF16_ENV}={os.environ[CPU_BF16_ENV]!r}: expected native or emulated (or unset it "
            "to read the CPU's flags)"
        )
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return next((f for f in CPU_BF16_FLAGS if f in flags), None)
    except OSError:
        pass
    return None


def _cuda_peak() -> int:
    import torch

    return torch.cuda.max_memory_allocated()


CPU = DeviceRuntime("cpu", bf16=lambda: cpu_bf16_units() is not None, peak_memory=cpu_peak_rss)
# ROCm builds of torch use the cuda namespace too. Their fused kernels (Liger's) are registered
# kernels (hwft_torch.kernels).
CUDA = DeviceRuntime("cuda", bf16=_cuda_bf16, peak_memory=_cuda_peak)
