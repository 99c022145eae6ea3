"""The ``xpu`` backend: hwft's torch engine on Intel GPUs (``torch.xpu``), written as any vendor
writes a device plugin, with the public API only (hwft.records, hwft_torch.runtime).

- **Detection** (:func:`probe`): no torch import when the plugin registers; a CPU-only torch
  wheel (``+cpu``) is answered from its version alone; otherwise the probe imports torch, then asks
  ``torch.xpu.is_available()`` and reads each device's properties (name,
  memory, bf16 from ``torch.xpu.is_bf16_supported()``). Unavailable: the reason (no XPU build of
  torch, no device or driver).
- **Collective:** ``xccl``, built into torch's XPU builds from 2.8; older builds use oneCCL's
  ``ccl`` from ``oneccl_bindings_for_pytorch``.
- **Dtypes:** fp32, fp16, and bf16 where the device has it.
- **QLoRA:** bitsandbytes' multi-backend release supports XPU from 0.48; earlier releases do not,
  and the record says so.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from functools import cache

import pluggy

from hwft.records import PRIORITY_ACCELERATOR, Availability, Backend, Capability

HWFT_PLUGIN_API = "2.0"
hookimpl = pluggy.HookimplMarker("hwft")

#: bitsandbytes' first release with an XPU backend.
BNB_XPU = (0, 48)


@cache
def probe() -> Availability:
    if importlib.util.find_spec("torch") is None:
        return Availability(
            False, "torch is not installed (pip install torch --index-url https://download.pytorch.org/whl/xpu)"
        )
    version = importlib.metadata.version("torch")
    if version.endswith("+cpu"):
        # A CPU-only wheel has no XPU runtime: say so without importing torch (seconds, cold).
        return Availability(
            False,
            f"no Intel XPU: torch {version} is a CPU-only build (install torch's XPU build and Intel's GPU driver)",
        )
    import torch

    xpu = getattr(torch, "xpu", None)
    if xpu is None:
        return Availability(False, f"torch {torch.__version__} has no torch.xpu (needs torch 2.5 or newer)")
    if not xpu.is_available():
        build = "a CPU-only build" if torch.__version__.endswith("+cpu") else "built without XPU or sees no device"
        return Availability(
            False,
            f"no Intel XPU: torch.xpu.is_available() is False (torch {torch.__version__} is "
            f"{build}; install torch's XPU build and Intel's GPU driver)",
        )
    devices = []
    for i in range(xpu.device_count()):
        props = xpu.get_device_properties(i)
        devices.append({"index": i, "name": props.name, "memory_gb": round(props.total_memory / 2**30, 1)})
    return Availability(
        True,
        devices=tuple(devices),
        details={"torch": torch.__version__, "bf16": bool(xpu.is_bf16_supported()), "collective": collective()},
    )


def collective() -> str:
    """xccl where torch has it built in (2.8+ XPU builds), else oneCCL's ccl."""
    import torch.distributed as dist

    if getattr(dist, "is_xccl_available", lambda: False)():
        return "xccl"
    return "ccl"


def bitsandbytes_xpu() -> str | None:
    """None when bitsandbytes can quantise on XPU; else why not."""
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return "bitsandbytes is not installed (pip install 'bitsandbytes>=0.48')"
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < BNB_XPU:
        return f"bitsandbytes {version} has no XPU backend (0.48 and newer have)"
    return None


def capability() -> Capability:
    from hwft_torch.devices import torch_fields

    avail = probe()
    fields = torch_fields(bitsandbytes_xpu())
    bf16 = ("bf16",) if avail.details.get("bf16", True) else ()
    return Capability(
        **fields,
        dtypes=("fp32", *bf16, "fp16"),
        attention=("eager", "sdpa"),
        optimizers=("adamw", "fused_adamw", "sgd"),
        collective=avail.details.get("collective", "xccl"),
        packing=True,
    )


def _bf16() -> bool:
    return bool(probe().details.get("bf16"))


def _peak_memory() -> int:
    import torch

    return torch.xpu.max_memory_allocated()


def _runtime():
    from hwft_torch.runtime import DeviceRuntime

    return DeviceRuntime("xpu", bf16=_bf16, peak_memory=_peak_memory)


def train(job):
    return _runtime().train(job)


def inference(trained, precision: str = "auto"):
    return _runtime().inference("xpu")(trained, precision)


def launch(spec, argv: list[str]) -> int:
    from hwft_torch.launch import launch as torchrun

    return torchrun(spec, argv)


@hookimpl
def hwft_register_backends(register):
    register(
        Backend(
            "xpu",
            "torch",
            "torch on Intel GPUs (torch.xpu), from the hwft-xpu plugin",
            PRIORITY_ACCELERATOR,
            probe,
            capability,
            train,
            accelerator=True,
            launch=launch,
            inference=inference,
        )
    )
