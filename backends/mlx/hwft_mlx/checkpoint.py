"""The MLX engine's part of a checkpoint (the format is :mod:`hwft.checkpoint`'s).

Besides the user-facing ``adapter/`` or ``model/`` (PEFT / HF layout, converted from MLX's),
a checkpoint keeps the trained parameters in MLX's own names and layout
(``trainable.safetensors``), so resuming loads exactly what was trained, and the optimizer
state tree (``optimizer.safetensors``: moments, step count, learning rate). MLX's random key
cannot be set back, so the MLX loop reseeds it at every step from (seed, step)
(:func:`step_seed`): a resumed run draws the same dropout masks with no state to restore.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from hwft.checkpoint import Checkpoint, EngineState
from hwft.errors import UserError
from hwft_mlx.arrays import flat, load_arrays


def step_seed(seed: int, step: int) -> int:
    """The MLX random seed of optimizer step ``step``: a function of the step alone."""
    return (seed * 1_000_003 + step) % 2**63


class MlxState(EngineState):
    name = "mlx"

    def __init__(self, model, optimizer, write_result):
        self.model, self.optimizer, self.write_result = model, optimizer, write_result

    def write(self, folder: Path, gathered) -> dict:
        self.write_result(folder)
        mx.save_safetensors(str(folder / "trainable.safetensors"), dict(flat(self.model.trainable_parameters())))
        mx.save_safetensors(str(folder / "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))
        return {}

    def load(self, checkpoint: Checkpoint) -> None:
        folder = checkpoint.path
        weights = load_arrays(folder / "trainable.safetensors")
        expected = {k for k, _ in flat(self.model.trainable_parameters())}
        if set(weights) != expected:
            missing = sorted(expected - set(weights)) or sorted(set(weights) - expected)
            raise UserError(
                f"{folder}: trainable.safetensors does not fit this model ({missing[0]}); it was "
                "written for another model or tuning"
            )
        self.model.load_weights(list(weights.items()), strict=False)
        self.optimizer.state = tree_unflatten(list(load_arrays(folder / "optimizer.safetensors").items()))
        mx.eval(self.model.parameters(), self.optimizer.state)
