# mlx's nn.Module.__getattr__ has no return annotation, so pyright reads each child module
# (``model.args``, ``glu.gate_proj``) as possibly None:
# pyright: reportOptionalMemberAccess=false, reportOptionalCall=false
"""The score head of a reward model (hwft.methods.rm) on MLX: a scalar on the last real token's
hidden state, added, initialised and saved as transformers' sequence-classification model has it."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

#: PEFT's SEQ_CLS task saves these beside the adapter, trained in full (its modules_to_save).
SCORE_MODULES = ["classifier", "score"]


def add_score_head(model: nn.Module, seed: int) -> None:
    """A new ``score`` layer (hidden -> 1, no bias), initialised as transformers initialises
    it (normal, std = the config's initializer_range), trainable."""
    hidden = model.args.hidden_size
    std = getattr(model.args, "initializer_range", None) or 0.02
    mx.random.seed(seed)
    score = nn.Linear(hidden, 1, bias=False)
    score.weight = mx.random.normal((1, hidden)) * std
    model.score = score


def last_tokens(ids: list[list[int]], pad_id: int) -> list[int]:
    """Each right-padded row's last position that does not hold ``pad_id``: where transformers'
    sequence-classification models read their score."""
    out = []
    for row in ids:
        real = [t for t, token in enumerate(row) if token != pad_id]
        out.append(real[-1] if real else len(row) - 1)
    return out


def score_config(config: dict, pad_id: int | None) -> dict:
    """A causal LM's config.json as its sequence-classification model's, one label."""
    architectures = [a.replace("ForCausalLM", "ForSequenceClassification") for a in config.get("architectures", [])]
    return {
        **config,
        "architectures": architectures,
        "num_labels": 1,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "pad_token_id": pad_id,
    }
