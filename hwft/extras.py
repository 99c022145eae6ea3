"""What a method trains beside the model (ppo's value head), declared by its objective and
treated alike by every engine: attached, sharded, saved and checkpointed without the engine
knowing what it is. Files are written and read with safetensors' numpy API, so this module
imports no engine."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Extra:
    """A module a method trains beside the model (ppo's value head), declared by its objective
    (``Objective.extras``). Each engine treats every one alike without knowing what it is: it
    joins the model as the child ``name`` (so the optimizer, the parallel strategy and the
    gradients see it), its weights stay out of the saved model, and they are written to ``file``
    beside the result and in every checkpoint, named ``saved_prefix`` + the module's own
    parameter names (TRL's ``v_head.summary.weight``), from which a resume reads them back."""

    name: str  #: the child's name on the model (``model.v_head``)
    module: Any  #: the engine's module (a torch ``nn.Module``, an MLX ``nn.Module``)
    file: str  #: saved as this file in the result folder (adapter/ or model/) and checkpoints
    saved_prefix: str = ""  #: prefix of the weights' names in ``file`` (else ``name + "."``)

    @property
    def prefix(self) -> str:
        """The prefix of its parameters among the model's: ``name.``."""
        return f"{self.name}."

    def saved_name(self, parameter: str) -> str:
        """A parameter's name in ``file``, from its name among the model's (``v_head.weight``)."""
        return (self.saved_prefix or self.prefix) + parameter.removeprefix(self.prefix)

    def model_name(self, saved: str) -> str:
        """The model's name of a weight read from ``file``."""
        return self.prefix + saved.removeprefix(self.saved_prefix or self.prefix)


def write_extras(folder: Path, extras: tuple[Extra, ...], weights: Callable[[Extra], Mapping[str, Any]]) -> None:
    """Each extra's ``file`` in ``folder``: ``weights(extra)`` (the model's parameter names ->
    arrays numpy can take, e.g. ``tensor.float().numpy()``) in fp32, under its saved names."""
    if not extras:
        return
    import numpy as np
    from safetensors.numpy import save_file

    for extra in extras:
        arrays = {
            extra.saved_name(k): np.ascontiguousarray(np.asarray(v, dtype=np.float32))
            for k, v in weights(extra).items()
        }
        save_file(arrays, str(folder / extra.file), metadata={"format": "pt"})


def read_extras(folder: Path, extras: tuple[Extra, ...]) -> dict[str, Any]:
    """The weights ``write_extras`` wrote into ``folder``, under the model's parameter names
    (numpy arrays); a ``file`` that is missing is skipped (the caller names what it lacks)."""
    from safetensors.numpy import load_file

    out: dict[str, Any] = {}
    for extra in extras:
        if (folder / extra.file).is_file():
            out.update({extra.model_name(k): v for k, v in load_file(str(folder / extra.file)).items()})
    return out
