"""The MLX device: a probe that imports mlx only when asked, and the capability record.

MLX runs on Apple silicon through Metal (priority 200: above the torch CPU, below CUDA or an
NPU) and, with the ``mlx[cpu]`` build, on any CPU (priority 50: chosen by ``backend: auto``
only where nothing else runs; name ``backend: mlx`` to use it). Everything the record claims
runs on both; on the CPU build it is slow but exact, which is how CI tests it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from functools import cache

from hwft.hardware import cpu_name, host_memory_gb
from hwft.records import PRIORITY_APPLE_GPU, PRIORITY_CPU_FALLBACK, Availability, Backend, Capability
from hwft_mlx.media import MEDIA_DATA_KINDS, MEDIA_FAMILIES

#: Every method the MLX engine implements (hwft_mlx.methods) runs with these tunings.
TUNINGS = ("full", "lora", "qlora")
#: MLX's affine quantisation of the frozen base (qlora), by method.qlora.bits.
QUANTIZATION = ("mlx-q4", "mlx-q8")


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@cache
def probe() -> Availability:
    missing = [m for m in ("mlx", "mlx_lm") if importlib.util.find_spec(m) is None]
    if missing:
        return Availability(False, f"{', '.join(missing)} not installed (pip install -e backends/mlx)")
    try:
        import mlx.core as mx
    except (ImportError, OSError) as exc:  # a Linux mlx without its cpu/cuda extra
        return Availability(False, f"mlx does not load: {exc} (on Linux: pip install 'mlx[cpu]')")
    metal = mx.metal.is_available()
    details = {"mlx": version("mlx"), "mlx-lm": version("mlx-lm"), "device": "metal" if metal else "cpu"}
    if metal:
        info = mx.metal.device_info()
        devices = (
            {
                "name": info.get("device_name", "Apple GPU"),
                "memory_gb": round(int(info.get("memory_size", 0)) / 2**30, 1),
                "metal": True,
            },
        )
        return Availability(True, devices=devices, details=details, priority=PRIORITY_APPLE_GPU)
    devices = ({"name": cpu_name(), "memory_gb": host_memory_gb(), "metal": False},)
    return Availability(True, devices=devices, details=details, priority=PRIORITY_CPU_FALLBACK)


def capability() -> Capability:
    return Capability(
        methods={},
        tunings=TUNINGS,
        dtypes=("fp32", "bf16", "fp16"),
        quantization=QUANTIZATION,
        attention=("sdpa",),  # mx.fast.scaled_dot_product_attention
        collective="mlx-ring",
        parallel=("none", "ddp"),  # mx.distributed; hwft_mlx.distributed
        packing=True,
        media=("image",) if importlib.util.find_spec("mlx_vlm") is not None else (),
        media_families=MEDIA_FAMILIES,
        media_data_kinds=MEDIA_DATA_KINDS,
        media_packing=False,  # mlx-vlm's forward takes no packed mask
        # packing: llama, qwen2 and qwen3 families (hwft's forward with a block-diagonal mask);
        # qlora: MLX's affine quantisation of the base (group size 64), not bitsandbytes' NF4.
        notes={
            "dora": "the MLX backend has no DoRA (method.lora.dora)",
            "image": "images reach a vision-language model on MLX through mlx-vlm (pip install mlx-vlm)",
            "video": (
                "mlx-vlm's Qwen forward takes a batch's images or its videos, not both, so hwft feeds it images only"
            ),
        },
    )


def train(job):
    from hwft_mlx.engine import train as run

    return run(job)


def launch(spec, argv: list[str]) -> int:
    from hwft_mlx.distributed import launch as run

    return run(spec, argv)


def inference(trained, precision: str = "auto"):
    from hwft_mlx.inference import MlxSession

    return MlxSession(trained, "mlx", precision)


def backend() -> Backend:
    return Backend(
        "mlx",
        "mlx",
        "MLX (mlx-lm) on Apple silicon via Metal, or MLX's CPU build",
        PRIORITY_CPU_FALLBACK,
        probe,
        capability,
        train,
        launch=launch,
        inference=inference,
        bench="hwft_mlx.bench",
    )
