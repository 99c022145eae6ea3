"""The torch engine's devices: probes (cheap, no CUDA initialisation) and capability records.

The probes look at installed distributions before importing anything; torch is imported only
when a GPU device is probed, with ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` so that asking whether a
GPU exists does not initialise CUDA (forked workers stay usable).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
from collections.abc import Mapping
from functools import cache
from typing import Any

from hwft.hardware import cpu_name, host_memory_gb
from hwft.records import PRIORITY_ACCELERATOR, PRIORITY_CPU, Availability, Backend, Capability
from hwft_torch import compiling
from hwft_torch.launch import launch
from hwft_torch.runtime import CPU, CUDA, cpu_bf16_units

#: Every torch device runs every method the torch engine implements (hwft_torch.methods), with
#: these tunings; qlora only where bitsandbytes can run (see :func:`tunings`).
TUNINGS = ("full", "lora", "qlora")
#: train.optimizer values where torch has a fused AdamW kernel (CPU, CUDA, and ROCm through
#: torch's cuda namespace): adamw takes it too (hwft_torch.engine.make_optimizer).
TORCH_OPTIMIZERS = ("adamw", "fused_adamw", "sgd")
#: The torch engine's hwft bench tools (Backend.bench).
BENCH = "hwft_torch.bench"
#: bitsandbytes' formats, as Capability.quantization names them.
BNB_FORMATS = ("bnb-nf4", "bnb-fp4", "bnb-int8")


def bitsandbytes_missing() -> str | None:
    """Why qlora cannot run with this torch engine, or None."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    return None


def tunings(without_qlora: str | None) -> tuple[str, ...]:
    return tuple(t for t in TUNINGS if t != "qlora" or without_qlora is None)


def quantised(device_note: str | None = None) -> dict:
    """Capability fields for bitsandbytes QLoRA: the tunings every implemented method runs
    with (methods claims none beyond them), quantization, notes."""
    why = device_note or bitsandbytes_missing()
    return {
        "methods": {},
        "tunings": tunings(why),
        "quantization": () if why else BNB_FORMATS,
        "notes": {"qlora": why} if why else {},
    }


def dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_engine() -> str | None:
    missing = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed (pip install -e backends/torch)" if missing else None


def engine_details() -> dict:
    return {k: dist_version(k) for k in ("torch", "transformers", "peft")}


@cache
def probe_cpu() -> Availability:
    missing = missing_engine()
    if missing:
        return Availability(False, missing)
    cores = os.cpu_count() or 1
    bf16 = cpu_bf16_units()
    return Availability(
        True,
        devices=(
            {
                "name": cpu_name(),
                "cores": cores,
                "memory_gb": host_memory_gb(),
                "bf16": f"native ({bf16})" if bf16 else "emulated (precision auto: fp32)",
            },
        ),
        details=engine_details(),
    )


def _gpu_torch():
    """torch, imported so that asking about GPUs does not initialise them."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return torch


def _probe_gpu(runtime: str, vendor: str) -> Availability:
    """A torch GPU device: ``runtime`` is the torch.version attribute of its build (cuda, hip)."""
    missing = missing_engine()
    if missing:
        return Availability(False, missing)
    version = dist_version("torch") or ""
    if version.endswith("+cpu"):
        return Availability(False, f"torch {version} is a CPU-only build")
    torch = _gpu_torch()
    build = getattr(torch.version, runtime, None)
    if build is None:
        return Availability(False, f"torch {version} is not a {vendor} build")
    if not torch.cuda.is_available():
        return Availability(False, f"no {vendor} device")
    devices = _nvidia_smi() if runtime == "cuda" else ()
    return Availability(
        True,
        devices=devices or tuple({"index": i} for i in range(torch.cuda.device_count())),
        details={**engine_details(), runtime: build},
    )


@cache
def probe_cuda() -> Availability:
    return _probe_gpu("cuda", "CUDA")


@cache
def probe_rocm() -> Availability:
    return _probe_gpu("hip", "ROCm")


def _nvidia_smi() -> tuple[dict, ...]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ()
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,driver_version,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return parse_nvidia_smi(out)


def parse_nvidia_smi(out: str) -> tuple[dict, ...]:
    """Rows of ``nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap``."""
    rows = []
    for i, line in enumerate(out.strip().splitlines()):
        name, mem, driver, cc = (x.strip() for x in line.split(","))
        rows.append(
            {
                "index": i,
                "name": name,
                "memory_gb": round(float(mem) / 1024, 1),
                "driver": driver,
                "compute_capability": cc,
            }
        )
    return tuple(rows)


def torch_fields(device_note: str | None = None) -> dict:
    """Capability fields every torch device shares: bitsandbytes QLoRA (:func:`quantised`) and
    the parallel strategies — DDP and FSDP2 come with torch, DeepSpeed where it is installed (and
    with it Ulysses sequence parallelism, parallel.sequence_parallel)."""
    fields = quantised(device_note)
    strategies = ("none", "ddp", "fsdp2")
    if importlib.util.find_spec("deepspeed") is None:
        fields["notes"] = {**fields["notes"], "deepspeed": "DeepSpeed is not installed (pip install deepspeed)"}
    else:
        strategies += ("deepspeed",)
    return {**fields, "parallel": strategies}


def _attention(*extra: str) -> tuple[str, ...]:
    flash = ("flash_attention_2",) if importlib.util.find_spec("flash_attn") else ()
    return ("eager", "sdpa", *extra, *flash)


def cuda_record(devices: tuple[Mapping[str, Any], ...], flash2: bool, flash3: bool) -> Capability:
    """The CUDA capability record of these devices (the smallest compute capability decides):
    bf16 from Ampere (8.0); flash-attn 2 from Ampere where installed; flash-attn 3 (its Hopper
    build, ``flash_attn_interface``) on 9.x where installed; SDPA everywhere."""
    caps = [float(d["compute_capability"]) for d in devices if d.get("compute_capability")]
    cc = min(caps) if caps else None
    notes: dict[str, str] = {}
    bf16 = cc is None or cc >= 8.0
    if not bf16:
        notes["bf16"] = f"compute capability {cc} has no bf16 (Ampere, 8.0, and newer have it); use fp16 or fp32"
    attention = ["eager", "sdpa"]
    if flash2 and (cc is None or cc >= 8.0):
        attention.append("flash_attention_2")
    elif flash2:
        notes["flash_attention_2"] = f"flash-attn 2 needs compute capability 8.0 (this device: {cc})"
    if flash3 and cc is not None and 9.0 <= cc < 10.0:
        attention.append("flash_attention_3")
    fields = torch_fields()
    fields["notes"] = {**fields["notes"], **notes}
    return Capability(
        **fields,
        dtypes=("fp32", "bf16", "fp16") if bf16 else ("fp32", "fp16"),
        attention=tuple(attention),
        optimizers=TORCH_OPTIMIZERS,
        collective="nccl",
        packing=True,
        media=("image", "video"),  # hwft.vision: image and video rows for the vision-language families
        compile=compiling.triton_installed(),
    )


def capability_cpu() -> Capability:
    return Capability(
        **torch_fields(),
        dtypes=("fp32", "bf16"),
        attention=("eager", "sdpa"),
        optimizers=TORCH_OPTIMIZERS,
        collective="gloo",
        packing=True,
        media=("image", "video"),  # hwft.vision: image and video rows for the vision-language families
        compile=compiling.cpp_compiler() is not None,
    )


def capability_cuda() -> Capability:
    return cuda_record(
        probe_cuda().devices,
        importlib.util.find_spec("flash_attn") is not None,
        importlib.util.find_spec("flash_attn_interface") is not None,
    )


def capability_rocm() -> Capability:
    """ROCm: RCCL under torch's nccl name; SDPA, and flash-attn 2 where its ROCm (Composable
    Kernel) build is installed; bitsandbytes 4-bit from its ROCm build (multi-backend
    bitsandbytes >= 0.45 on supported Instinct and Radeon parts)."""
    return Capability(
        **torch_fields(),
        dtypes=("fp32", "bf16", "fp16"),
        attention=_attention(),
        optimizers=TORCH_OPTIMIZERS,
        collective="rccl",
        packing=True,
        media=("image", "video"),  # hwft.vision: image and video rows for the vision-language families
        compile=compiling.triton_installed(),
    )


def backends() -> list[Backend]:
    return [
        Backend(
            "cpu",
            "torch",
            "torch on the host CPU",
            PRIORITY_CPU,
            probe_cpu,
            capability_cpu,
            CPU.train,
            launch=launch,
            inference=CPU.inference("cpu"),
            bench=BENCH,
        ),
        Backend(
            "cuda",
            "torch",
            "torch on NVIDIA GPUs (CUDA)",
            PRIORITY_ACCELERATOR,
            probe_cuda,
            capability_cuda,
            CUDA.train,
            accelerator=True,
            launch=launch,
            inference=CUDA.inference("cuda"),
            bench=BENCH,
        ),
        Backend(
            "rocm",
            "torch",
            "torch on AMD GPUs (ROCm/HIP)",
            PRIORITY_ACCELERATOR,
            probe_rocm,
            capability_rocm,
            CUDA.train,
            accelerator=True,
            launch=launch,
            inference=CUDA.inference("rocm"),
            bench=BENCH,
        ),
    ]
