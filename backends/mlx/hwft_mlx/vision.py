# mlx's nn.Module.__getattr__ has no return annotation, so pyright reads each child module as
# possibly None:
# pyright: reportOptionalMemberAccess=false, reportOptionalCall=false
"""Vision-language models on MLX, through mlx-vlm's model code: a Hugging Face folder of a
family in :data:`FAMILIES` loads as mlx-vlm's model (its transformers-5 config.json put where
mlx-vlm reads it), and its forward takes the pixels hwft.vision made beside the token ids.

Which families: those whose mlx-vlm forward is held to transformers' logits by the tests
(``tests/test_mlx_vision.py``); another vision-language family is refused on MLX in one line at
the dry run (``Capability.media_families``) and trains on the torch engine.

The language model is mlx-vlm's ``language_model``; LoRA's all-linear adapts only it (the
vision tower and projector stay as they are), and the adapter is saved with transformers'
names (``model.language_model.layers...``), so PEFT and the torch engine load it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from hwft.errors import ModelError
from hwft.vision import FAMILIES as FAMILIES_OF_HWFT
from hwft.vision import frozen_parts
from hwft_mlx.media import MEDIA_FAMILIES, VISION_MARK

#: The vision-language families (transformers' model_type) MLX feeds images to, through
#: mlx-vlm's module of the same name: held to transformers' logits with an image row.
FAMILIES = MEDIA_FAMILIES


def wanted(config: dict) -> bool:
    """Whether a folder of this config loads here (a family of :data:`FAMILIES`)."""
    return config.get("model_type") in FAMILIES


def mlx_vlm_config(config: dict) -> dict:
    """transformers 5's config.json as mlx-vlm reads it: the text model's settings at the top
    level too (where the released Qwen2-VL configs keep them) and the root's in the text config
    where it has none, its rope parameters where mlx-lm and mlx-vlm look (rope_theta,
    rope_scaling: hwft_mlx.loading), the sub-configs transformers 5 calls X_text and X_vision
    called X, and the root's tied embeddings on the text model."""
    from hwft_mlx.loading import shared_overrides, synonym_overrides

    kind = config["model_type"]
    # the root's own settings where the text config has none (Gemma 3's mm_tokens_per_image:
    # mlx-vlm reads it from the text config)
    text = {
        **{k: v for k, v in config.items() if not isinstance(v, dict) and k != "architectures"},
        **(config.get("text_config") or {}),
    }
    text.update(shared_overrides(text))
    text.update(synonym_overrides(text))
    rope = text.get("rope_parameters") or {}
    if "mrope_section" in rope:  # Qwen's 3-D positions, as the released configs' rope_scaling holds them
        text["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    if (config.get("text_config") or {}).get("model_type") in (None, f"{kind}_text"):
        text["model_type"] = kind  # transformers 5 names Qwen's text model X_text; mlx-vlm, X
    if "tie_word_embeddings" in config:  # the root's decides, as in transformers' composite models
        text["tie_word_embeddings"] = config["tie_word_embeddings"]
    tower = dict(config.get("vision_config") or {})
    if tower.get("model_type") in (None, f"{kind}_vision"):  # transformers 5 names Qwen's tower X_vision
        tower["model_type"] = kind
    return {**text, **config, "text_config": text, "vision_config": tower}


def load_model(path: Path, config: dict) -> nn.Module:
    """mlx-vlm's model of the folder, in fp32 as stored; its config put where mlx-vlm reads it
    (:func:`mlx_vlm_config`: a copy beside links to the folder's files, the folder untouched)."""
    from mlx_vlm.utils import load_model as mlx_vlm_load

    with tempfile.TemporaryDirectory(prefix="hwft-mlx-vlm-") as shadow:
        for item in path.iterdir():
            if item.name != "config.json":
                os.symlink(item.resolve(), Path(shadow) / item.name)
        (Path(shadow) / "config.json").write_text(json.dumps(mlx_vlm_config(config)), encoding="utf-8")
        try:
            model = mlx_vlm_load(Path(shadow))
        except Exception as exc:  # noqa: BLE001 - mlx-vlm's words, one line
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ModelError(f"mlx-vlm cannot load {path} (model_type {config.get('model_type')}): {first}") from None
    object.__setattr__(model, VISION_MARK, True)
    return model


#: The attribute a loaded model keeps the parts method.vision trains in (tower, projector,
#: language): LoRA's all-linear adapts their linear layers only.
_TRAINED = "_hwft_trained_parts"


def part_of(model: nn.Module, path: str) -> str:
    """Which part of an mlx-vlm model a module path is in: language, projector or tower."""
    if path.startswith("language_model."):
        return "language"
    projector = FAMILIES_OF_HWFT[model_type_of(model)].projector_modules
    return "projector" if any(p in path.split(".") for p in projector) else "tower"


def model_type_of(model: nn.Module) -> str:
    return str(model.config.model_type)


def train_parts(model: nn.Module, spec) -> set[str]:
    """Record the parts method.vision (``spec``) trains on the model, and return them."""
    parts = {"tower", "projector", "language"} - frozen_parts(spec)
    object.__setattr__(model, _TRAINED, parts)
    return parts


def adapted(model: nn.Module, path: str) -> bool:
    """Whether LoRA's all-linear adapts the linear layer at ``path``: one of a trained part's,
    never the output layer."""
    trained = getattr(model, _TRAINED, {"language"})
    return not path.endswith("lm_head") and part_of(model, path) in trained


def media_arrays(rows, width: int) -> dict[str, mx.array]:
    """The rows' processor outputs (hwft.vision), as the forward takes them: each concatenated
    over the rows with images, in order (hwft_torch.objective.media_tensors is the torch twin)."""
    media = [r.inputs for r in rows if r.inputs]
    if not media:
        return {}
    return {key: mx.array(np.concatenate([np.asarray(m[key]) for m in media])) for key in media[0]}


def logits(model: nn.Module, ids: mx.array, mask: mx.array, rows=None) -> mx.array:
    """The model's next-token logits of right-padded rows (``mask``: 1 real, 0 padding), their
    images in (mlx-vlm's forward: the tower's features in the image tokens' places, Qwen's 3-D
    positions from the grid and the mask)."""
    media = media_arrays(rows or [], ids.shape[1])
    pixels = media.pop("pixel_values", None)
    # The positions given, never the ones the language model keeps from its previous call
    # (mlx-vlm's generation state): each batch's own, from its ids, grids and mask.
    if hasattr(model.language_model, "get_rope_index"):  # Qwen's 3-D positions
        media["position_ids"], _ = model.language_model.get_rope_index(ids, media.get("image_grid_thw"), None, mask)
    out = model(ids, pixels, mask, **media)
    return getattr(out, "logits", out)


class TextModel:
    """What mlx-lm's generation calls a model: ids (and a cache) in, logits out; for answering
    text prompts with a vision-language model's language model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = model.language_model.model.layers

    def __call__(self, ids: mx.array, cache=None, **kwargs) -> mx.array:
        out = self.model(ids, cache=cache, **kwargs)
        return getattr(out, "logits", out)

    def make_cache(self) -> list:
        """The language model's own cache (mlx-vlm's: Qwen3.5's linear-attention layers keep a
        state, not keys and values)."""
        from mlx_vlm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model.language_model)  # pyright: ignore[reportArgumentType]


#: mlx-vlm's module paths and transformers 5's, by prefix: the language model, and the Qwen
#: families' vision tower (mlx-vlm's ``vision_tower`` is their ``visual``).
PREFIXES = (("language_model.model.", "model.language_model."), ("vision_tower.", "model.visual."))


def peft_path(path: str) -> str:
    """An mlx-vlm module path as transformers 5 names it (``language_model.model.layers`` is
    ``model.language_model.layers``, ``vision_tower.merger`` is ``model.visual.merger``)."""
    for ours, theirs in PREFIXES:
        if path.startswith(ours):
            return theirs + path.removeprefix(ours)
    return path


def mlx_path(path: str) -> str:
    """The mlx-vlm module a transformers 5 path names (:func:`peft_path` inverted)."""
    for ours, theirs in PREFIXES:
        if path.startswith(theirs):
            return ours + path.removeprefix(theirs)
    return path


def excluded(model: nn.Module) -> str:
    """PEFT's exclude_modules for an adapter of the parts the model trains (the language model,
    and the projector where method.vision trains it): every module outside them (a vision
    tower's MLP has the language model's layer names: Qwen2.5-VL's down_proj)."""
    trained = getattr(model, _TRAINED, {"language"})
    kept = ["language_model"]
    if "projector" in trained:
        kept += list(FAMILIES_OF_HWFT[model_type_of(model)].projector_modules)
    return rf"^(?!.*(?:{'|'.join(kept)})).*"
