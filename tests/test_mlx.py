"""The MLX backend on MLX's CPU build: every objective x tuning cell through the real CLI, the
config normalisation mlx-lm needs, parity with the torch engine (logits, loss, gradients, and
20-step loss curves), adapters that travel both ways between MLX and PEFT, full models that
transformers loads, and the refusals. The same tests run on Apple silicon, where MLX uses Metal.

Tolerances (fp32): logits and losses 1e-4 absolute (measured about 1e-6), gradients 1e-4
relative to their norm, loss curves 1e-4 per step (measured 2.4e-6 at most over 20 steps).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import SAMPLE_ROWS, build_tiny_model, write_recipe
from tests.test_methods import PROMPTS, cell_recipe, metrics, vowels  # noqa: F401  (vowels is a fixture)
from tests.test_plugins import site  # noqa: F401  (a fixture vowels needs)

mx = pytest.importorskip("mlx.core")

STEPS = 20  #: the loss-curve comparison's length


# --------------------------------------------------------------------------------------------
# Every cell through the CLI


@pytest.mark.parametrize("tuning", ["full", "lora", "qlora"])
@pytest.mark.parametrize("objective", ["sft", "cpt", "dpo", "grpo"])
def test_every_cell_trains_on_mlx(tiny_llama, tmp_path, cli, vowels, objective, tuning):  # noqa: F811
    """The torch engine's cell recipes, with backend: mlx; the loss falls in 4 steps."""
    recipe = cell_recipe(tmp_path, tiny_llama, objective, tuning, backend="mlx")
    code, _, err = cli("train", recipe)
    assert code == 0, err
    assert "backend mlx (mlx engine)" in err
    run = metrics(tmp_path / "out")
    assert len(run) == 4
    assert run[-1]["loss"] < run[0]["loss"], [m["loss"] for m in run]
    if objective == "grpo":
        assert {"reward", "reward_std", "completion_length", "rewards/vowels/mean"} <= set(run[0])
        assert run[0]["clip_ratio"] == 0 and run[-1]["clip_ratio"] > 0 and run[-1]["kl"] > 0
        assert len((tmp_path / "out" / "rollouts.jsonl").read_text().splitlines()) == len(PROMPTS) * 4
    if objective == "dpo":
        assert run[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference at step 1
        assert run[-1]["rewards/margins"] > 0 and run[-1]["rewards/accuracy"] > 0.5
    if objective == "cpt":
        assert "packing on" in err
    if tuning == "qlora":
        assert "4-bit (MLX affine, group 64)" in err
    out = tmp_path / "out" / ("model" if tuning == "full" else "adapter")
    assert (out / ("model.safetensors" if tuning == "full" else "adapter_model.safetensors")).is_file()


# --------------------------------------------------------------------------------------------
# Loading: configs mlx-lm misreads


def test_rope_theta_from_transformers5_config_is_normalised(tmp_path, embedded_dir):
    """transformers 5 writes rope_theta inside rope_parameters; mlx-lm reads the top level only
    and would use 10000. With hwft's override the logits match torch; without it they do not."""
    from mlx_lm.utils import load_model as mlx_load
    from transformers import AutoModelForCausalLM

    from hwft_mlx.modeling import config_overrides, load_model

    folder = build_tiny_model("llama", tmp_path / "m", embedded_dir, rope_theta=100000.0)
    config = json.loads((folder / "config.json").read_text())
    assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == 100000.0
    assert config_overrides(config) == {"rope_theta": 100000.0}
    ids = [[1, 420, 9100, 57, 300, 12, 9, 2000, 31, 2]]
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(folder)(torch.tensor(ids)).logits.numpy()
    model, _ = load_model(folder)
    assert np.abs(np.array(model(mx.array(ids))) - expected).max() < 1e-4
    naive, _ = mlx_load(folder)
    assert np.abs(np.array(naive(mx.array(ids))) - expected).max() > 1e-3


def test_the_embedded_model_answers_on_mlx(embedded_dir):
    """SmolLM2-135M-Instruct, loaded by the MLX backend, answers as on torch (greedy)."""
    from transformers import AutoTokenizer

    from hwft.data.chat import ChatRenderer
    from hwft.models import stop_token_ids
    from hwft_mlx.engine import answer
    from hwft_mlx.modeling import load_model

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    model, _ = load_model(embedded_dir)
    text = answer(model, tokenizer, ChatRenderer(tokenizer, tokenizer.chat_template), "What is the capital of France?", 12,
                  stop_token_ids(tokenizer))
    assert "Paris" in text, text
