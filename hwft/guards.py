"""What stops a run from inside a step, for every engine: steps with a NaN or Inf loss or
gradient norm (:class:`NonFinite`: skipped, then refused past ``train.nonfinite_limit``) and an
allocation that fails (:func:`is_out_of_memory`, :func:`out_of_memory`: the step, the device and
the settings that would use less)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from hwft.errors import RunFailed


class NonFinite:
    """Steps with a NaN or Inf loss or gradient norm: the engine skips their update; after
    ``limit`` of them the run stops, naming the step. The last good checkpoint stays."""

    def __init__(self, limit: int, log: Callable[[str], None]):
        self.limit, self.log, self.count = limit, log, 0

    def check(
        self, step: int, loss: float, grad_norm: float, skipped: bool = True, checkpoint: Path | None = None
    ) -> None:
        """After a step: count it if its loss or gradient norm is NaN or Inf (``skipped``: the
        engine left the weights alone), and stop once there are too many."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        self.count += 1
        what = f"loss {loss}, gradient norm {grad_norm}"
        if not skipped or self.count > self.limit:
            why = (
                "the engine had already applied it"
                if not skipped
                else f"{self.count} such steps, more than train.nonfinite_limit={self.limit}"
            )
            kept = f"the last checkpoint, {checkpoint}, is kept" if checkpoint else "no checkpoint was written yet"
            raise RunFailed(
                f"step {step}: non-finite {what} ({why}); stopping: {kept}. "
                "Lower train.lr, set train.max_grad_norm, or use bf16 rather than fp16",
                1,
            )
        self.log(f"step {step}: non-finite {what}; update skipped ({self.count} of at most {self.limit})")


def out_of_memory(step: int, recipe, device: str) -> RunFailed:
    """The message for an allocation that failed during a step, with what would lower memory."""
    t, p, m = recipe.train, recipe.parallel, recipe.method
    hints = [
        f"train.micro_batch_size {t.micro_batch_size} -> {max(1, t.micro_batch_size // 2)} "
        "(raise train.gradient_accumulation_steps to keep the batch)",
        f"train.max_length {t.max_length} -> {max(2, t.max_length // 2)}",
    ]
    if not p.activation_checkpointing:
        hints.append("parallel.activation_checkpointing: true")
    if m.tuning == "lora":
        hints.append("method.tuning: qlora (a 4-bit base, where the backend has it)")
    if m.tuning in ("full", "freeze"):
        hints.append("method.tuning: lora")
    return RunFailed(f"out of memory on {device} at step {step}; to use less: " + "; ".join(hints), 1)


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocator's failure, as torch raises it on any device (CPU under an address-space
    limit, CUDA's OutOfMemoryError) or numpy/MLX as MemoryError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text
        for s in (
            "DefaultCPUAllocator: can't allocate memory",
            "DefaultCPUAllocator: not enough memory",
            "out of memory",
            "Out of memory",
            "[Errno 12] Cannot allocate memory",
        )
    )
