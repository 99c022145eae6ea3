"""Which modules ``method.lora.target_modules`` names: one meaning on every engine (PEFT's).

- ``all-linear``: every linear layer but the output layer;
- a list: the modules whose path is an entry or ends with ``.`` + entry (``q_proj``, or
  ``self_attn.q_proj``);
- any other string: a regular expression the whole module path must match
  (``.*layers\\.[01]\\..*_proj``).

An engine hands :func:`check` the paths of the modules it can adapt; an entry that names none
of them is refused before training, with the model's linear module names to choose from (PEFT
would raise for a list of which nothing matches, and silently skip one typo among good names).
"""

from __future__ import annotations

import re

from hwft.errors import RecipeError, did_you_mean

ALL_LINEAR = "all-linear"


def matches(targets: str | list[str], path: str) -> bool:
    """Does ``targets`` name the module at ``path`` (a candidate the engine can adapt)?"""
    if targets == ALL_LINEAR:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def check(targets: str | list[str], linear: list[str], others: tuple[str, ...] | list[str] = ()) -> None:
    """Refuse entries that name no module. ``linear``: paths of the linear layers LoRA can adapt
    (the output layer left out); ``others``: further paths the engine can adapt (embeddings)."""
    if targets == ALL_LINEAR:
        if not linear:
            raise RecipeError("method.lora.target_modules all-linear: the model has no linear layer to adapt")
        return
    names = sorted({p.rsplit(".", 1)[-1] for p in linear})
    choices = f"Its linear modules are {', '.join(names)}; or give {ALL_LINEAR}"
    paths = [*linear, *others]
    if isinstance(targets, str):
        try:
            found = any(re.fullmatch(targets, p) for p in paths)
        except re.error as exc:
            raise RecipeError(
                f"method.lora.target_modules {targets!r} is not a valid regular expression ({exc}). {choices}"
            ) from None
        if not found:
            raise RecipeError(
                f"method.lora.target_modules {targets!r} matches no module of this model (a string is a regular "
                f"expression over whole paths such as {min(linear) if linear else 'model.layers.0.mlp.up_proj'})"
                f"{_then(did_you_mean(targets, names))}{choices}"
            )
        return
    for entry in targets:
        if not any(matches([entry], p) for p in paths):
            raise RecipeError(
                f"method.lora.target_modules: {entry!r} names no module of this model"
                f"{_then(did_you_mean(entry, names))}{choices}"
            )


def _then(hint: str) -> str:
    """A did-you-mean (it ends with its question mark) or a full stop, before the next sentence."""
    return f"{hint} " if hint else ". "
