"""Packing, length grouping and streaming: packed rows compute exactly what their examples
compute alone, on real Llama and Qwen2 architectures."""

from __future__ import annotations

import json
import random

import pytest
import torch

from hwft.data.batching import batch_order, efficiency, make_rows, pack_groups
from hwft.data.chat import IGNORE_INDEX, ChatRenderer, Tokenized
from hwft.data.kinds.chat import ChatExample
from hwft.data.kinds.sequences import tokenize_examples
from tests.conftest import SAMPLE_ROWS, write_jsonl, write_recipe
from tests.test_train import metrics, reference_first_loss


def test_best_fit_packing_fills_rows():
    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(300)]
    groups = pack_groups(lengths, 64)
    assert sorted(i for g in groups for i in g) == list(range(300))
    assert all(sum(lengths[i] for i in g) <= 64 for g in groups)
    assert sum(lengths) / (64 * len(groups)) > 0.95  # nearly full rows
    assert groups == pack_groups(lengths, 64)  # deterministic


def test_packed_rows_restart_positions_and_mask_the_seam():
    a = Tokenized([1, 2, 3], [IGNORE_INDEX, 2, 3])
    b = Tokenized([4, 5], [IGNORE_INDEX, 5])
    (row,) = make_rows([a, b], 8, packing=True)
    assert row.lengths == [3, 2] and row.position_ids == [0, 1, 2, 0, 1]
    # the first token of the second example is not a label: nothing in the first predicts it
    assert row.labels == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5] and row.num_labels == 3


def test_length_grouping_cuts_padding():
    rows = make_rows([Tokenized([1] * n, [IGNORE_INDEX] * n) for n in range(4, 404, 4)], 512, packing=False)
    plain = efficiency(batch_order(rows, 4, random.Random(0), group_by_length=False))
    grouped = efficiency(batch_order(rows, 4, random.Random(0), group_by_length=True))
    assert grouped > 0.95 > 0.8 > plain


def check_packed_logits(model_dir, tokenizer, attention: str, device: str, atol: float, dtype=torch.float32):
    """Logits of packed rows (as the engine builds them) against each example run alone."""
    from transformers import AutoModelForCausalLM

    from hwft_torch.objective import to_tensors

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attention)
    model = model.to(device).eval()
    renderer = ChatRenderer(tokenizer, tokenizer.chat_template)
    examples = [ChatExample(r["messages"], source=str(i)) for i, r in enumerate(SAMPLE_ROWS)]
    data, _ = tokenize_examples(examples, renderer, 512)
    rows = make_rows(data, 160, packing=True)
    assert max(len(r.lengths) for r in rows) >= 3  # really packed
    batch = to_tensors(rows, tokenizer.pad_token_id, attention, torch.device(device))
    # no mask: transformers builds each layer's from where the position ids restart
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        offset = 0  # flash_attention_2: one padding-free sequence
        for b, row in enumerate(rows):
            start = 0
            for n in row.lengths:
                alone = model(torch.tensor([row.input_ids[start : start + n]], device=device)).logits[0]
                got = (
                    packed[0, offset + start : offset + start + n]
                    if attention == "flash_attention_2"
                    else packed[b, start : start + n]
                )
                torch.testing.assert_close(got.float(), alone.float(), atol=atol, rtol=0)
                start += n
            offset += len(row.input_ids)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager", "hwft_packed_sdpa"])
def test_packed_logits_equal_separate_runs(family, attention, tiny_llama, tiny_qwen2, tokenizer):
    if attention == "hwft_packed_sdpa":  # what sft/cpt use for sdpa (hwft_torch.packed_attention)
        from hwft_torch.packed_attention import register

        register()
    check_packed_logits({"llama": tiny_llama, "qwen2": tiny_qwen2}[family], tokenizer, attention, "cpu", 1e-5)


def _masked_and_packed(tiny_llama, tokenizer, monkeypatch, module, name: str, packed_bf16: bool = False):
    """One forward and backward of the sample rows, packed into rows of 160 tokens, through
    transformers' masked sdpa call in fp32 and through the per-example path (in fp32, or under
    bf16 autocast), with ``module.name`` counting its calls (their first argument's dtype, or
    their is_causal argument). -> (loss, gradients, calls) of each, and the per-example path's
    attention calls: 2 layers x (examples + padding blocks)."""
    from transformers import AutoModelForCausalLM

    from hwft_torch import packed_attention
    from hwft_torch.objective import to_tensors

    renderer = ChatRenderer(tokenizer, tokenizer.chat_template)
    examples = [ChatExample(r["messages"], source=str(i)) for i, r in enumerate(SAMPLE_ROWS)]
    rows = make_rows(tokenize_examples(examples, renderer, 512)[0], 160, packing=True)
    results = []
    for attention, bf16 in (("sdpa", False), (packed_attention.register(), packed_bf16)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation=attention)
        calls = []
        real = getattr(module, name)

        def counted(*a, calls=calls, real=real, **k):
            calls.append(k.get("is_causal", a[0].dtype))
            return real(*a, **k)

        monkeypatch.setattr(module, name, counted)
        batch = to_tensors(rows, tokenizer.pad_token_id, attention, torch.device("cpu"))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        monkeypatch.undo()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}, calls))
    segments = sum(len(packed_attention.segments(torch.tensor(r.position_ids + [0]))) - 1 for r in rows)
    padded = sum(len(r.input_ids) < max(len(x.input_ids) for x in rows) for r in rows)
    return *results, 2 * (segments + padded)


def test_per_example_attention_has_the_masked_calls_gradients(tiny_llama, tokenizer, monkeypatch):
    """SDPA once per packed example (no mask) against one masked call per row: the same loss and
    gradients, and the per-example path really ran (one causal call per example and layer)."""
    import torch.nn.functional as F

    masked, packed, calls = _masked_and_packed(tiny_llama, tokenizer, monkeypatch, F, "scaled_dot_product_attention")
    (loss_a, grads_a, _), (loss_b, grads_b, calls_b) = masked, packed
    assert calls_b == [True] * calls
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def _qkv(heads: int, groups: int, length: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1, n, length, 16, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        for n in (heads, groups, groups)
    ]


@pytest.mark.parametrize("heads,groups", [(4, 2), (3, 3)])
@pytest.mark.parametrize("length", [1, 7, 128, 300])
def test_blocked_attention_is_sdpas_causal_attention(heads, groups, length):
    """hwft_torch.blocked_attention in float64 against SDPA's causal, grouped-query attention:
    the same outputs and gradients to float64 rounding (1e-15 measured; 1e-12 allows a few
    hundred roundings), for one block and several (128 rows each, the last one short), with
    grouped heads and without, and a scale of the model's own."""
    import torch.nn.functional as F

    from hwft_torch import blocked_attention

    q, k, v = _qkv(heads, groups, length, torch.float64)
    grad = torch.randn(1, heads, length, 16, dtype=torch.float64)
    for scale in (None, 0.3):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=heads != groups)
        got = blocked_attention.causal(q, k, v, scale)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        for a, b in zip(
            torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad), strict=True
        ):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_blocked_attention_in_bf16_is_as_close_as_the_flash_kernel():
    """In bf16, both the blocked attention and torch's flash kernel against float64, relative to
    each tensor's largest element, with u = 2^-8 (bf16's spacing at 1): the output within 4 u,
    since rounding S, P and the inputs to bf16 moves each output by about u of the values it
    averages; the gradients within 8 u, since they chain two such products. Measured: up to
    1.6 u for the blocked attention, and 3.4 u for the flash kernel (dK)."""
    import torch.nn.functional as F

    from hwft_torch import blocked_attention

    exact = _qkv(6, 2, 300, torch.float64)
    grad = torch.randn(1, 6, 300, 16, dtype=torch.float64)
    want = F.scaled_dot_product_attention(*exact, is_causal=True, enable_gqa=True)
    wanted = torch.autograd.grad(want, exact, grad)
    u = 2.0**-8
    for attend in (
        blocked_attention.causal,
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    ):
        q, k, v = (t.detach().bfloat16().requires_grad_() for t in exact)
        out = attend(q, k, v)
        assert out.dtype == torch.bfloat16
        got = torch.autograd.grad(out, (q, k, v), grad.bfloat16())
        for a, b, bound in zip((out, *got), (want, *wanted), (4 * u, 8 * u, 8 * u, 8 * u), strict=True):
            torch.testing.assert_close(a.double(), b, atol=bound * b.abs().max().item(), rtol=0)


def test_blocked_attention_serves_bf16_on_the_cpu_only():
    from hwft_torch.blocked_attention import MAX_KEPT, serves

    cpu = torch.device("cpu")
    assert serves(torch.bfloat16, cpu, 9, 512, 0.0)
    assert not serves(torch.float32, cpu, 9, 512, 0.0)  # fp32: the flash kernel is as fast
    assert not serves(torch.bfloat16, torch.device("meta"), 9, 512, 0.0)
    assert not serves(torch.bfloat16, cpu, 9, 512, 0.1)  # attention dropout: SDPA's
    assert not serves(torch.bfloat16, cpu, 32, int((MAX_KEPT / 32) ** 0.5) + 1, 0.0)  # P too big to keep


def test_packed_bf16_training_takes_the_blocked_attention(tiny_llama, tokenizer, monkeypatch):
    """Under bf16 autocast the per-example path runs the blocked attention, once per example and
    layer, and its loss and gradients are bf16's of the masked fp32 call: the loss within 1%,
    each gradient at a cosine similarity of 0.999 or more."""
    from hwft_torch import blocked_attention

    masked, packed, calls = _masked_and_packed(
        tiny_llama, tokenizer, monkeypatch, blocked_attention, "causal", packed_bf16=True
    )
    (loss_a, grads_a, calls_a), (loss_b, grads_b, calls_b) = masked, packed
    assert calls_a == [] and calls_b == [torch.bfloat16] * calls
    assert loss_b == pytest.approx(loss_a, rel=0.01)
    for name, grad in grads_a.items():
        similarity = _cosine(grads_b[name].flatten().double(), grad.flatten().double())
        assert similarity >= 0.999, name


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.cuda
@pytest.mark.parametrize("attention", ["sdpa", "flash_attention_2"])
def test_packed_logits_on_cuda(attention, tiny_llama, tokenizer):
    """The same on an NVIDIA GPU, with varlen flash attention where flash_attn is installed."""
    import importlib.util

    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attn is not installed")
    dtype = torch.bfloat16 if attention == "flash_attention_2" else torch.float32
    check_packed_logits(tiny_llama, tokenizer, attention, "cuda", 1e-4 if dtype == torch.float32 else 5e-2, dtype)


def test_padding_free_layout_for_varlen_kernels():
    from hwft_torch.objective import to_tensors

    rows = make_rows([Tokenized([7, 8, 9], [IGNORE_INDEX, 8, 9]), Tokenized([5, 6], [IGNORE_INDEX, 6])], 4, True)
    batch = to_tensors(rows, 0, "flash_attention_2", torch.device("cpu"))
    assert "attention_mask" not in batch  # the kernel reads the examples from position_ids
    assert batch["input_ids"].tolist() == [[7, 8, 9, 5, 6]] and batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def test_packed_training_matches_separate_examples(tiny_llama, tmp_path, cli):
    recipe = write_recipe(tmp_path, tiny_llama, train={"max_length": 256, "micro_batch_size": 2, "max_steps": 2})
    code, _, err = cli("train", recipe)
    assert code == 0, err
    assert "rows (" in err and "packing on" in err
    first = metrics(tmp_path / "out")[0]["loss"]
    assert first == pytest.approx(reference_first_loss(tiny_llama, recipe), abs=1e-5)


def test_streaming_run_with_weights(tiny_llama, tmp_path, cli):
    write_jsonl(tmp_path / "extra.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(9)])
    data = {
        "streaming": True,
        "shuffle_buffer": 4,
        "train": [{"path": "train.jsonl", "weight": 1}, {"path": "extra.jsonl", "weight": 1}],
    }
    recipe = write_recipe(tmp_path, tiny_llama, data=data, train={"max_steps": 3, "micro_batch_size": 2})
    code, _, err = cli("train", recipe)
    assert code == 0, err
    assert [m["step"] for m in metrics(tmp_path / "out")] == [1, 2, 3] and "streaming, packing on" in err
    recipe = write_recipe(
        tmp_path, tiny_llama, data=data, train={"max_steps": None}, output={"dir": str(tmp_path / "o2")}
    )
    code, _, err = cli("train", recipe, "--dry-run")
    assert code == 2 and "data.streaming needs train.max_steps" in err


def test_cpt_on_text_trains(tiny_llama, tmp_path, cli):
    write_jsonl(tmp_path / "text.jsonl", [{"text": "hwft trains models. " * (i + 1)} for i in range(8)])
    recipe = write_recipe(
        tmp_path,
        tiny_llama,
        data={"train": ["text.jsonl"]},
        method={"objective": "cpt", "tuning": "full"},
        train={"max_steps": 2, "max_length": 32},
    )
    code, _, err = cli("train", recipe)
    assert code == 0, err
    assert "long texts split into max_length chunks" in err
    assert json.loads((tmp_path / "out" / "model" / "config.json").read_text())["model_type"] == "llama"
