"""The router's load-balancing loss on MLX (the maths: :mod:`hwft.router_balance`).

mlx-lm's MoE models route with a plain ``nn.Linear`` gate and keep no router logits. The gates
named by the family's ``options["router"]`` (hwft_mlx.families: ``mlp.gate`` in Qwen3-MoE,
``block_sparse_moe.gate`` in Mixtral) are given a recording subclass of their own class: its
call also hands its output to the loss being traced (:func:`recorded_gates`). A gate LoRA
wraps is recorded at the LoRA layer, so the logits are the adapted router's, as torch's are.
Weights and their names stay as they are.
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

_RECORDING: list[list[mx.array]] = []
_CLASSES: dict[type, type] = {}


class Recording:
    """Mixed in before a gate's own class: its output is kept while :func:`recorded_gates` is open."""

    def __call__(self, x: mx.array) -> mx.array:
        out = super().__call__(x)  # pyright: ignore[reportAttributeAccessIssue] - the gate class follows in the MRO
        if _RECORDING:
            _RECORDING[-1].append(out)
        return out


def recording(cls: type) -> type:
    if issubclass(cls, Recording):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Recording{cls.__name__}", (Recording, cls), {})
    return _CLASSES[cls]


def plain(cls: type) -> type:
    return next(c for c in cls.__mro__[1:] if not issubclass(c, Recording)) if issubclass(cls, Recording) else cls


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
    """Make the outermost module at every path ending with ``suffix`` record (a LoRA layer over
    a gate rather than the gate inside it); returns how many. Safe to run again after tuning."""
    count = 0
    for path, module in model.named_modules():
        if not (path == suffix or path.endswith("." + suffix)):
            continue
        inner = getattr(module, "linear", None)
        if isinstance(inner, nn.Module):
            inner.__class__ = plain(type(inner))
        if isinstance(module, nn.Linear) or isinstance(inner, nn.Linear):
            module.__class__ = recording(type(module))
            count += 1
    return count
