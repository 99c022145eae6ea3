"""kernels.fused_projections: sibling LoRA projections as one matmul compute what peft computes.

- on the tiny Llama and the tiny Qwen2 (biased q/k/v): the same logits, loss and gradient of
  every LoRA parameter, under the same parameter names;
- gradients off, or adapters disabled (a frozen reference), run peft's own forward;
- a CLI run with it on pins the same losses as with it off.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import write_recipe


def _lora(path, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # the same random adapter (B not zero) in every copy
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)


def _ids():
    return torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_fused_projections_give_peft_s_outputs_and_gradients(name, request):
    from hwft_torch.compiling import decoder_layers
    from hwft_torch.fused_projections import fuse_sibling_projections

    path = request.getfixturevalue(name)
    plain, fused = _lora(path), _lora(path)
    layers = decoder_layers(fused)
    assert fuse_sibling_projections(layers) == 2 * len(layers)
    ids = _ids()
    outputs = {}
    for label, model in (("plain", plain), ("fused", fused)):
        logits = model(input_ids=ids, use_cache=False).logits
        logits.logsumexp(-1).mean().backward()
        outputs[label] = logits
    assert torch.allclose(outputs["fused"], outputs["plain"], atol=1e-5)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    fused_grads = {n: p.grad for n, p in fused.named_parameters() if p.requires_grad}
    assert fused_grads.keys() == grads.keys() and len(grads) == 7 * 2 * len(layers)
    for key, grad in grads.items():
        assert fused_grads[key] is not None, key
        assert torch.allclose(fused_grads[key], grad, atol=1e-5), key
    assert fused.state_dict().keys() == plain.state_dict().keys()


def test_without_gradients_or_with_adapters_disabled_peft_runs(tiny_llama):
    from hwft_torch.compiling import decoder_layers
    from hwft_torch.fused_projections import fuse_sibling_projections

    plain, fused = _lora(tiny_llama), _lora(tiny_llama)
    fuse_sibling_projections(decoder_layers(fused))
    ids = _ids()
    group = decoder_layers(fused)[0].self_attn.q_proj.hwft_siblings
    with torch.no_grad():
        assert not group.active()
        assert torch.allclose(fused(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)
        with fused.disable_adapter(), plain.disable_adapter():
            reference = plain(input_ids=ids).logits
            assert torch.allclose(fused(input_ids=ids).logits, reference, atol=1e-5)
    with fused.disable_adapter():
        assert not group.active()
    assert group.active()
    # dropout draws a mask per projection: not fused
    assert fuse_sibling_projections(decoder_layers(_lora(tiny_llama, dropout=0.1))) == 0


def test_cli_losses_are_the_same_with_fused_projections_on_and_off(tiny_llama, tmp_path, cli):
    losses, logs = {}, {}
    for fused in (False, None):
        folder = tmp_path / str(fused)
        folder.mkdir()
        path = write_recipe(folder, tiny_llama, kernels={"fused_projections": fused}, train={"max_steps": 4})
        code, out, err = cli("train", path)
        assert code == 0, err
        logs[fused] = out + err
        lines = (folder / "out" / "metrics.jsonl").read_text().splitlines()
        losses[fused] = [json.loads(x)["loss"] for x in lines]
    assert "kernels: 4 groups of sibling LoRA projections (q/k/v, gate/up) as one matmul each" in logs[None]
    assert "projections" not in logs[False]
    assert losses[None] == pytest.approx(losses[False], abs=1e-5)


def test_lora_dropout_says_why_projections_are_not_fused(tiny_llama, tmp_path, cli):
    path = write_recipe(
        tmp_path, tiny_llama, method={"lora": {"r": 8, "alpha": 16, "dropout": 0.05}}, train={"max_steps": 1}
    )
    code, out, err = cli("train", path)
    assert code == 0, err
    assert "kernels: hwft_sibling_projections off: method.lora.dropout 0.05 draws a mask per projection" in out + err
