"""A full fine-tune saved from MLX as transformers reads it: HF safetensors (mlx-lm keeps HF's
names for these families) with the source folder's config, a reward model as its
sequence-classification model, the method's extras apart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from hwft_mlx.arrays import flat
from hwft_mlx.heads import score_config


def save_full_model(model: nn.Module, source: Path, out: Path, pad_id: int | None = None, apart: tuple = ()) -> None:
    """The model's weights as HF safetensors (mlx-lm keeps HF's names for these families),
    with the source folder's config.json and generation_config.json, for transformers. A reward
    model (a ``score`` head) is saved as its sequence-classification model: no output layer,
    the config's architecture ``...ForSequenceClassification`` with one label. ``apart``: the
    method's extras (hwft.objective.Extra), saved in their own files, not in the model."""
    prefixes = tuple(e.prefix for e in apart)
    weights = {k: v for k, v in flat(model.parameters()) if not (prefixes and k.startswith(prefixes))}
    scored = "score" in model
    if scored:
        weights.pop("lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    if scored and (source / "config.json").is_file():
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
        (out / "config.json").write_text(json.dumps(score_config(config, pad_id), indent=2), encoding="utf-8")
