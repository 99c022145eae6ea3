"""Which weights ``method.tuning: freeze`` trains: LLaMA-Factory's freeze tuning, one rule by
parameter path for every engine (PEFT-free; the saved result is the whole model, as full's).

- ``trainable_layers`` N > 0: the last N decoder layers train; N < 0: the first |N|
  (LLaMA-Factory's ``freeze_trainable_layers``, same signs).
- ``trainable_modules``: within those layers, ``all`` or the module names that train
  (``mlp``, ``self_attn``, ``q_proj``, ...: a path segment; ``freeze_trainable_modules``).
- ``extra_modules``: modules outside the decoder layers that train too (``embed_tokens``,
  ``lm_head``, ``norm``: ``freeze_extra_modules``).

A decoder layer is a path with ``layers.<i>.`` in it, as transformers and mlx-lm name them
(``model.layers.3.mlp.up_proj.weight``).
"""

from __future__ import annotations

import re

from hwft.errors import RecipeError

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(path: str) -> int | None:
    found = LAYER.search(path)
    return int(found.group(1)) if found else None


def chosen_layers(trainable_layers: int, count: int) -> range:
    """The indices of the decoder layers that train, of ``count``."""
    n = min(abs(trainable_layers), count)
    return range(count - n, count) if trainable_layers > 0 else range(n)


def trainable(paths: list[str], spec) -> set[str]:
    """The parameter paths of ``paths`` that train under ``spec`` (hwft.recipe.FreezeSpec); a
    module name that matches no parameter is refused, naming what the model has."""
    layers = [i for i in map(layer_of, paths) if i is not None]
    if not layers:
        raise RecipeError(
            "method.tuning freeze: the model has no decoder layers named layers.<i> "
            "to choose from; use tuning: full or lora"
        )
    chosen = set(chosen_layers(spec.trainable_layers, max(layers) + 1))
    modules = None if spec.trainable_modules == "all" else set(spec.trainable_modules)
    extra = set(spec.extra_modules)
    segments = {s for p in paths for s in p.split(".")[:-1] if not s.isdigit()}
    unknown = sorted(((modules or set()) | extra) - segments)
    if unknown:
        raise RecipeError(
            f"method.freeze: {', '.join(unknown)} names no module of this model (it has: {', '.join(sorted(segments))})"
        )
    out = set()
    for path in paths:
        parts = set(path.split(".")[:-1])
        layer = layer_of(path)
        if layer is None:
            if parts & extra:
                out.add(path)
        elif layer in chosen and (modules is None or parts & modules):
            out.add(path)
    return out
