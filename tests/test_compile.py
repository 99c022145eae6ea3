"""kernels.compile on the torch engine (hwft_torch.compiling): each decoder layer's training
forward through torch.compile computes what the eager model computes, leaves the saved result
unchanged, and is chosen by the auto rule only where it pays."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hwft_torch import compiling
from tests.conftest import write_recipe
from tests.test_train import metrics


def test_auto_rule():
    from hwft.select import compile_decision

    assert compile_decision(None, True, False, 394) == (True, "auto: 394 steps on the CPU")
    on, why = compile_decision(None, True, False, 36)
    assert not on and "36 steps are too few" in why
    assert not compile_decision(None, True, True, 1000)[0]  # opt-in on accelerators until measured there
    assert not compile_decision(None, False, False, 1000)[0]
    assert compile_decision(True, True, True, 3) == (True, "kernels.compile: true")
    assert compile_decision(False, True, False, 1000)[0] is False


@pytest.mark.skipif(compiling.cpp_compiler() is None, reason="no C++ compiler for Inductor's CPU code")
def test_compiled_training_matches_eager(tiny_llama, tmp_path, cli):
    """Packed sft/lora for 3 steps, eager and compiled: the same losses and gradient norms
    (1e-4), the same adapter tensors under the same names, and no compile for generation. With
    LoRA the embeddings are frozen, so layer 0 runs eagerly and the rest compile once: Dynamo
    refuses to recompile here. The rows are chosen so that they can compile once: every batch
    holds 2 rows and transformers gives each a mask tensor. A batch of 1 row (Dynamo specialises
    sizes 0 and 1), or a batch of plainly causal rows (no padding, one example each: the mask is
    None) among the others, compiles each layer's graphs a second time; a cold Inductor cache
    makes that about 25 s more of this test.
    """
    runs = {}
    for setting in (False, True):
        out = tmp_path / f"compile-{setting}"
        out.mkdir()
        recipe = write_recipe(
            out,
            tiny_llama,
            kernels={"compile": setting, "attention": "sdpa"},
            train={"max_steps": 3, "micro_batch_size": 2, "max_length": 192},
            eval={"prompts": ["Hi"], "max_new_tokens": 4},
        )
        with torch._dynamo.config.patch(error_on_recompile=True):
            code, _, err = cli("train", recipe)
        assert code == 0, err
        runs[setting] = metrics(out / "out"), load_file(out / "out" / "adapter" / "adapter_model.safetensors"), err
    (eager, eager_weights, _), (compiled, compiled_weights, log) = runs[False], runs[True]
    assert (
        "kernels: torch.compile on the training forward of 1 of 2 decoder layers (the first one's input needs "
        "no gradient: it runs eagerly) (kernels.compile: true)"
    ) in log
    for a, b in zip(eager, compiled, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    assert compiled_weights.keys() == eager_weights.keys()
    for name, tensor in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], tensor, atol=1e-4, rtol=1e-3, msg=name)
    config = json.loads((tmp_path / "compile-True" / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8


def test_auto_stays_off_for_short_runs(tiny_llama, tmp_path, cli):
    recipe = write_recipe(tmp_path, tiny_llama, train={"max_steps": 1})
    code, _, err = cli("train", recipe)
    assert code == 0, err
    assert "kernels: torch.compile off (auto: 1 steps are too few to repay the compile time (from 100))" in err
