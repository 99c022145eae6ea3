"""The MLX engine's part of ``hwft bench``: model dimensions for the FLOP model, the device's
peak FLOP/s (a measured matmul probe: no spec-sheet figure is kept for Apple GPUs), and the
held-out loss, with the same names the worker calls on the torch engine. The baseline arm
(transformers + peft) is torch's; on MLX only the hwft arm runs.
"""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn

from hwft_mlx.arrays import flat
from hwft_mlx.loading import DTYPES
from hwft_mlx.objective import held_out_loss as _held_out_loss

DTYPE_NAMES = {mx.float32: "fp32", mx.bfloat16: "bf16", mx.float16: "fp16"}


def device_of(model) -> str:
    return "gpu" if mx.default_device() == mx.gpu else "cpu"


def dtype_named(name: str):
    return DTYPES[name]


def held_out_loss(model, rows: list, pad_id: int, attention: str = "sdpa", device=None) -> float:
    """Mean cross-entropy per label token (``attention`` and ``device`` are the torch side's)."""
    return _held_out_loss(model, rows, pad_id)


def _linear_size(module) -> int:
    """in x out features of a Linear, or of a QuantizedLinear from its scales (one per group)."""
    if isinstance(module, nn.QuantizedLinear):
        return module.scales.shape[0] * module.scales.shape[1] * module.group_size
    return module.weight.shape[0] * module.weight.shape[1]


def model_dims(model) -> dict:
    """The counts hwft.bench.flops needs, as on torch: frozen or trained linear weights of the body
    (``linear``), LoRA weights (``adapter``), the output layer (``head``), attention width x
    layers (``attention``), and the trained parameters."""
    from mlx_lm.tuner.lora import LoRALinear

    linear = adapter = 0
    for path, module in model.named_modules():
        if path.endswith("lm_head"):
            continue
        if isinstance(module, LoRALinear):
            adapter += module.lora_a.size + module.lora_b.size
        elif isinstance(module, nn.Linear | nn.QuantizedLinear):
            linear += _linear_size(module)
    args = model.args
    heads = args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    return {
        "linear": linear,
        "adapter": adapter,
        "head": args.vocab_size * args.hidden_size,
        "attention": heads * head_dim * args.num_hidden_layers,
        "trainable": sum(v.size for _, v in flat(model.trainable_parameters())),
    }


def peak_flops(device, dtype, device_name: str = "") -> tuple[float, str]:
    """Measured: the best of 4 rounds of 3 square matmuls, 8192 on Metal, 512 on the CPU build
    (which multiplies slowly enough that a 2048 probe takes minutes: docs/benchmarks.md)."""
    n = 512 if device == "cpu" else 8192
    a = mx.random.normal((n, n)).astype(dtype)
    b = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a, b)
    best = float("inf")
    for _ in range(4):
        start = time.perf_counter()
        for _ in range(3):
            mx.eval(a @ b)
        best = min(best, (time.perf_counter() - start) / 3)
    return 2 * n**3 / best, f"measured ({n}x{n} {DTYPE_NAMES.get(dtype, dtype)} matmul on MLX {device}, best of 4)"


def memory_kind(backend: str) -> str:
    """MLX reports its allocator's peak (Metal's, or the CPU build's)."""
    return "device"
