"""The speed and memory levers of the torch engine compute what the plain path computes.

- the chunked cross-entropy on the label positions equals transformers' own loss, with the same
  gradients (LoRA and full tuning, where the tied output weight gets a gradient too);
- a CLI run with it on pins the same losses as with it off;
- precision: auto picks bf16 on a CPU only where the CPU has bf16 units (or HWFT_CPU_BF16 says so);
- data.eval gives eval.jsonl and the held-out loss.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import SAMPLE_ROWS, write_jsonl, write_recipe


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    labels[1, 9:] = -100  # padding
    return ids, labels


#: fp32's unit roundoff.
FP32_U = 2.0**-24


@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_linear_cross_entropy_equals_the_logits_loss(tiny_llama, tuning):
    """The chunked loss and its gradients against transformers' logits loss, both in fp32, each
    held to the same loss computed in fp64. Not to each other: two fp32 summation orders (the
    chunks here, AVX-512 against AVX2 kernels on another CPU) differ by their rounding, which
    the fp64 reference bounds from one side for both."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hwft_torch.losses import CHUNK_ELEMENTS, SOFTMAX_ELEMENTS, causal_lm_loss, linear_cross_entropy
    from hwft_torch.objective import output_head

    def model(dtype=torch.float32):
        torch.manual_seed(0)  # the same random adapter in each
        m = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=dtype)
        if tuning == "lora":
            m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        return m.to(dtype)

    plain, fused, exact = model(), model(), model(torch.float64)
    ids, labels = _batch(plain.get_output_embeddings().weight.shape[0])
    n = int((labels[:, 1:] != -100).sum())
    reference = causal_lm_loss(plain(input_ids=ids).logits, labels, n)
    reference.backward()
    assert torch.allclose(reference, plain(input_ids=ids, labels=labels).loss, atol=1e-6)
    exact_loss = causal_lm_loss(exact(input_ids=ids).logits, labels, n)
    exact_loss.backward()

    decoder, weight = output_head(fused)
    hidden = decoder(input_ids=ids).last_hidden_state
    keep = labels[:, 1:] != -100
    import hwft_torch.losses as losses

    # 5 positions a chunk, its softmax 2 positions at a time: several chunks and row blocks, the
    # last of each short
    losses.CHUNK_ELEMENTS, losses.SOFTMAX_ELEMENTS = 5 * weight.shape[0], 2 * weight.shape[0]
    try:
        value = linear_cross_entropy(hidden[:, :-1][keep], weight, labels[:, 1:][keep], n)
    finally:
        losses.CHUNK_ELEMENTS, losses.SOFTMAX_ELEMENTS = CHUNK_ELEMENTS, SOFTMAX_ELEMENTS
    value.backward()
    # The loss: a log-sum-exp over V logits per position (V = 4096, the tiny models'); fp32 sums
    # of V terms are off by about sqrt(V) * u relative (random rounding), ~3.8e-6 of the loss.
    vocab = weight.shape[0]
    bound = vocab**0.5 * FP32_U
    for got in (value, reference):
        assert abs(got.item() - exact_loss.item()) <= bound * exact_loss.item()
    # Every gradient element is a chain of such sums: the output layer's over V, then back through
    # 2 layers of about 6 products each 64-128 wide. Random rounding adds over the chain as
    # sqrt(V + 12 * 128) * u of the tensor's largest element (75 u; 66 u measured), doubled for
    # a CPU whose kernels sum in another order. Elementwise rtol would fail where terms cancel to
    # near zero.
    gradient_bound = 2 * (vocab + 12 * 128) ** 0.5 * FP32_U
    exact_grads = {k: p.grad for k, p in exact.named_parameters() if p.requires_grad}
    checked = 0
    for path in (plain, fused):
        for name, p in path.named_parameters():
            if p.requires_grad:
                want = exact_grads[name]
                scale = want.abs().max().item()
                torch.testing.assert_close(p.grad.double(), want, rtol=0, atol=gradient_bound * scale, msg=name)
                checked += 1
    assert checked == 2 * len(exact_grads) > 0
    if tuning == "full":  # the tied embedding's gradient includes the output layer's share
        assert fused.get_input_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.parametrize("head", ["frozen", "trained"])
def test_linear_cross_entropy_under_bf16_autocast_is_close(head, monkeypatch):
    """bf16 logits (the matmul's output rounded to 8 bits of mantissa), the softmax in fp32 over
    blocks of 3 rows: the loss within 2% of fp32's and the gradients within 2% of their largest
    element (logits of size ~1 rounded by 2^-9 relative move each softmax term by about that,
    and the products of bf16 gradients add as much again)."""
    import hwft_torch.losses as losses
    from hwft_torch.losses import linear_cross_entropy

    monkeypatch.setattr(losses, "SOFTMAX_ELEMENTS", 3 * 500)
    torch.manual_seed(0)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = (torch.randn(500, 32) * 0.1).requires_grad_(head == "trained")
    targets = torch.randint(0, 500, (40,))
    exact = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum") / 40
    wanted = torch.autograd.grad(exact, [hidden] + [weight] * weight.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approx = linear_cross_entropy(hidden, weight, targets, 40, torch.bfloat16)
    got = torch.autograd.grad(approx, [hidden] + [weight] * weight.requires_grad)
    assert approx.dtype == torch.float32
    assert abs(approx.item() - exact.item()) < 0.02 * exact.item()  # bf16 matmul, fp32 softmax
    for g, w in zip(got, wanted, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0, atol=0.02 * w.abs().max().item())


def test_model_with_soft_capped_logits_keeps_the_plain_loss():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from hwft_torch.objective import output_head

    config = Gemma2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    why = output_head(Gemma2ForCausalLM(config))
    assert why == "the model transforms its logits (final_logit_softcapping)"


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_cli_losses_are_the_same_with_the_fused_loss_on_and_off(tiny_llama, tmp_path, cli, backend):
    curves = {}
    for fused in (True, False):
        folder = tmp_path / str(fused)
        folder.mkdir()
        path = write_recipe(
            folder,
            tiny_llama,
            kernels={"fused_cross_entropy": fused},
            backend=backend,
            data={"train": [{"path": "train.jsonl"}], "packing": False},
        )
        code, _, err = cli("train", path)
        assert code == 0, err
        assert ("chunked cross-entropy" in err) is fused
        curves[fused] = [json.loads(x)["loss"] for x in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    print("fused", curves[True], "plain", curves[False])
    assert curves[True] == pytest.approx(curves[False], abs=1e-5)


def test_cpu_precision_auto_follows_the_bf16_units(monkeypatch):
    import hwft_torch.runtime as runtime
    from hwft.errors import UserError
    from hwft.recipe import Recipe
    from hwft_torch.engine import compute_dtype

    recipe = Recipe.model_validate({"data": "x.jsonl"})
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: None)
    assert compute_dtype(recipe, runtime.CPU) == torch.float32
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: "amx_bf16")
    assert compute_dtype(recipe, runtime.CPU) == torch.bfloat16
    recipe.train.precision = "fp32"
    assert compute_dtype(recipe, runtime.CPU) == torch.float32
    monkeypatch.undo()
    # HWFT_CPU_BF16 overrides what /proc/cpuinfo says, either way
    monkeypatch.setenv("HWFT_CPU_BF16", "native")
    assert runtime.cpu_bf16_units() == "HWFT_CPU_BF16=native" and runtime.CPU.bf16()
    monkeypatch.setenv("HWFT_CPU_BF16", "emulated")
    assert runtime.cpu_bf16_units() is None and not runtime.CPU.bf16()
    monkeypatch.setenv("HWFT_CPU_BF16", "yes")
    with pytest.raises(UserError, match="HWFT_CPU_BF16='yes': expected native or emulated"):
        runtime.cpu_bf16_units()


#: bf16 keeps 8 significant bits: each factor of a bf16 matmul is rounded to within 2^-8 of
#: itself, so each product (accumulated in fp32) is within 2^-7 of the fp32 one, and the mean
#: cross-entropy of step 1 inherits at most that relative error. Step 2 adds an update computed
#: from those gradients, whose own error is of second order. Not a pin: emulated bf16 (a CPU
#: without bf16 units) rounds differently from native bf16.
BF16_REL = 2.0**-7


def test_precision_auto_takes_the_path_the_cpu_probe_gives(tiny_llama, tmp_path, cli, monkeypatch):
    """The same recipe with precision auto, the CPU probe switched to "no bf16 units" and then to
    "bf16 units": fp32 first, then bf16 autocast, whose losses stay within bf16's rounding of
    the fp32 ones."""
    losses = {}
    for probe, dtype in (("emulated", "float32"), ("native", "bfloat16")):
        monkeypatch.setenv("HWFT_CPU_BF16", probe)
        folder = tmp_path / probe
        folder.mkdir()
        path = write_recipe(folder, tiny_llama, train={"precision": "auto", "max_steps": 2, "log_every": 1})
        code, _, err = cli("train", path)
        assert code == 0, err
        assert f"compute {dtype} on cpu" in err
        losses[probe] = [json.loads(x)["loss"] for x in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    print(losses)
    assert losses["native"] == pytest.approx(losses["emulated"], rel=BF16_REL)
    assert losses["native"] != losses["emulated"]  # bf16 did run


def test_data_eval_writes_the_held_out_loss(tiny_llama, tmp_path, cli):
    write_jsonl(tmp_path / "held_out.jsonl", SAMPLE_ROWS[:3])
    path = write_recipe(
        tmp_path,
        tiny_llama,
        train={"max_steps": 4, "eval_every": 2},
        data={"train": ["train.jsonl"], "eval": ["held_out.jsonl"]},
    )
    code, _, err = cli("train", path)
    assert code == 0, err
    lines = [json.loads(x) for x in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    assert all(x["examples"] == 3 and 0 < x["eval_loss"] < 20 for x in lines)
    assert lines[1]["eval_loss"] < lines[0]["eval_loss"]  # the held-out rows repeat trained ones
