"""Time the CPU kernels docs/benchmarks.md quotes for the bf16 bench (not a test, not a benchmark
of a run: `hwft bench` is that). On SmolLM2-135M's shapes:

- one packed example's causal attention, forward and backward: torch's flash kernel (SDPA)
  against hwft_torch.blocked_attention at several block sizes, in bf16 and fp32;
- one chunk of the chunked cross-entropy (565 label positions x the 49,152-token vocabulary,
  frozen output layer), forward and backward.

    .venv/bin/python ci/bench/cpu_kernels.py            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from hwft_torch import blocked_attention, losses

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, VOCAB, POSITIONS = 9, 3, 64, 576, 49152, 565


def timed(step, repeats: int = 10) -> float:
    """Median milliseconds of ``step`` after two warm-up calls."""
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


def attention(length: int, dtype: torch.dtype, block: int | None) -> float:
    q = torch.randn(1, HEADS, length, HEAD_DIM, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, KV_HEADS, length, HEAD_DIM, dtype=dtype, requires_grad=True) for _ in range(2))
    grad = torch.randn(1, HEADS, length, HEAD_DIM, dtype=dtype)

    def step():
        if block is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = blocked_attention.causal(q, k, v, block=block)
        out.backward(grad)

    return timed(step)


def cross_entropy(dtype: torch.dtype) -> float:
    hidden = torch.randn(POSITIONS, HIDDEN, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN) * 0.05
    targets = torch.randint(0, VOCAB, (POSITIONS,))

    def step():
        hidden.grad = None
        losses.linear_cross_entropy(hidden, weight, targets, POSITIONS, dtype).backward()

    return timed(step, repeats=5)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    blocks = (32, 64, 128, 256)
    for dtype in (torch.bfloat16, torch.float32):
        print(f"\nattention, forward and backward of one example, {str(dtype).removeprefix('torch.')}, ms")
        print("| tokens | flash (SDPA) | " + " | ".join(f"blocked, {b} rows" for b in blocks) + " |")
        print("|---" * (len(blocks) + 2) + "|")
        for length in (64, 128, 256, 512, 1024, 2048):
            row = [attention(length, dtype, None)] + [attention(length, dtype, b) for b in blocks]
            print(f"| {length} | " + " | ".join(f"{t:.2f}" for t in row) + " |", flush=True)
    for dtype in (torch.bfloat16, torch.float32):
        print(
            f"\ncross-entropy of one chunk ({POSITIONS} x {VOCAB}), {str(dtype).removeprefix('torch.')}: "
            f"{cross_entropy(dtype):.1f} ms",
            flush=True,
        )


if __name__ == "__main__":
    main()
