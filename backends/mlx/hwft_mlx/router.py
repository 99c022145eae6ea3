"""The router's load-balancing loss on MLX (the maths: :mod:`hwft.router_balance`).

mlx-lm's MoE models route with a plain ``nn.Linear`` gate and keep no router logits. The gates
named by the family's ``options["router"]`` (hwft_mlx.families: ``mlp.gate`` in Qwen3-MoE,
``block_sparse_moe.gate`` in Mixtral) become :class:`RecordingGate`, an ``nn.Linear`` whose
call also hands its output to the loss being traced (:func:`recorded_gates`). Weights and
their names stay as they are.
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

_RECORDING: list[list[mx.array]] = []


class RecordingGate(nn.Linear):
    """An MoE gate whose logits are kept while :func:`recorded_gates` is open."""

    def __call__(self, x: mx.array) -> mx.array:
        out = super().__call__(x)
        if _RECORDING:
            _RECORDING[-1].append(out)
        return out


@contextmanager
def recorded_gates():
    """Every recording gate's logits of the forward passes run inside, in call order."""
    gates: list[mx.array] = []
    _RECORDING.append(gates)
    try:
        yield gates
    finally:
        _RECORDING.pop()


def install(model: nn.Module, suffix: str) -> int:
    """Make every ``nn.Linear`` whose path ends with ``suffix`` a :class:`RecordingGate`;
    returns how many."""
    count = 0
    for path, module in model.named_modules():
        if type(module) is nn.Linear and (path == suffix or path.endswith("." + suffix)):
            module.__class__ = RecordingGate
            count += 1
    return count
