"""The load-time proof that mlx-lm computes what transformers computes, for a family outside the
MLX table (hwft_mlx.families).

A family in the table is held to transformers by the tests (tests/test_families.py). For any
other, hwft translates the config generically (hwft_mlx.loading: rope keys, synonyms, head sizes)
and cannot know that mlx-lm's module reads every key transformers' does the same way: a key
mlx-lm reads under another name, or not at all, trains a different model without a word. So
before such a family trains, a small model of the checkpoint's own config (:func:`hwft.shrink.
shrink`: two layers, 64 wide, everything else as the checkpoint has it) is built by transformers
with random weights, saved, loaded by mlx-lm through the same translation, and the logits of one
row must agree within :data:`TOLERANCE` of the largest. Where they do not, or mlx-lm cannot load
it, the family is refused in one line naming what differs.

The proof needs torch and transformers, which the MLX engine otherwise does not; where they are
missing, the refusal says so. It runs once per config in a process, in about a second.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from hwft.shrink import shrink

#: max |mlx-lm - transformers| / max |transformers| on one row, fp32: the families in the table
#: agree to 7e-7 (tests/test_families.py).
TOLERANCE = 1e-4
_PROVEN: dict[str, str | None] = {}


def agreement_problem(config: dict) -> str | None:
    """None where mlx-lm's forward of a small model of ``config`` gives transformers' logits; else why not."""
    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _PROVEN:
        _PROVEN[key] = _prove(config)
    return _PROVEN[key]


def disagreement(config: dict, architecture: str) -> str | None:
    """None where mlx-lm's ``architecture`` agrees with transformers on a small model of
    ``config`` (:func:`agreement_problem`); else the refusal's words, which the MLX engine and
    ``--to mlx`` each end with the way on."""
    problem = agreement_problem(config)
    if problem is None:
        return None
    return (
        f"{config.get('model_type')} is not in hwft's MLX family table, and mlx-lm's {architecture} "
        f"does not compute what transformers does: {problem}"
    )


def _prove(config: dict) -> str | None:
    try:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:
        return "torch and transformers are not installed here to check mlx-lm's forward against (pip install torch)"
    from hwft_mlx.loading import load_model

    model_type = str(config.get("model_type"))
    small = {**config, **shrink(config)}
    small.pop("quantization_config", None)
    try:
        hf_config = CONFIG_MAPPING[model_type].from_dict(small)
        torch.manual_seed(0)
        reference = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").float().eval()
        ids = np.random.default_rng(0).integers(3, int(hf_config.vocab_size), (1, 12))
        with torch.no_grad():
            expected = reference(input_ids=torch.tensor(ids), use_cache=False).logits.float().numpy()
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build or run small: say so
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return f"transformers cannot run a small {model_type} to check against ({type(exc).__name__}: {reason})"
    with tempfile.TemporaryDirectory(prefix="hwft-agreement-") as folder:
        reference.save_pretrained(folder)
        try:
            model, _ = load_model(Path(folder))
            got = np.array(model(mx.array(ids)).astype(mx.float32))
        except Exception as exc:  # noqa: BLE001 - mlx-lm cannot load or run it: that is the answer
            return f"mlx-lm cannot run a small model of this config ({type(exc).__name__}: {str(exc)[:200]})"
    if got.shape != expected.shape:
        return f"mlx-lm gives logits of shape {got.shape}, transformers {expected.shape}"
    scale = float(np.abs(expected).max()) or 1.0
    difference = float(np.abs(got - expected).max()) / scale
    if not difference <= TOLERANCE:
        return (
            f"on a small model of this config its logits differ from transformers' by {difference:.1e} of the "
            f"largest (allowed {TOLERANCE:.0e})"
        )
    return None
