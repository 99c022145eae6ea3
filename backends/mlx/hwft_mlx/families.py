"""The MLX engine's model-family table (hwft.families), registered through
``hwft_register_model_families`` as a plugin's would be.

The key is the mlx-lm architecture a checkpoint loads as (the module under ``mlx_lm.models``
that mlx-lm picks for its ``model_type``). Fast path (``Family.paths``):

- ``mlx_packing``: the decoder layers take ``(x, mask, cache)`` and the positions are rotary,
  so hwft's own forward (:func:`hwft_mlx.modeling.hidden_states`) can give them a
  block-diagonal mask and packed rows keep their examples apart.

The generic record (``"*"``) packs nothing: a family without the path trains unpacked rows
(``data.packing: false``), and a packed recipe is refused in one line.
"""

from __future__ import annotations

from hwft.families import GENERIC, Family

ENGINE = "mlx"
PACKS = frozenset({"mlx_packing"})

FAMILIES = (
    Family("llama", ENGINE, "Llama 2/3, SmolLM2 (and what mlx-lm loads as llama)", PACKS),
    Family("qwen2", ENGINE, "Qwen2, Qwen2.5", PACKS),
    Family("qwen3", ENGINE, "Qwen3", PACKS),
    Family(GENERIC, ENGINE, "any other family mlx-lm loads"),
)
