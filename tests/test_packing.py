"""Packing, length grouping and streaming: packed rows compute exactly what their examples
compute alone, on real Llama and Qwen2 architectures."""

from __future__ import annotations

import json
import random

import pytest
import torch

from hwft.data.batching import batch_order, efficiency, make_rows, pack_groups
from hwft.data.chat import IGNORE_INDEX, ChatRenderer, Tokenized, tokenize_examples
from hwft.data.formats import Example
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
    examples = [Example("chat", r["messages"], source=str(i)) for i, r in enumerate(SAMPLE_ROWS)]
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
                got = packed[0, offset + start : offset + start + n] if attention == "flash_attention_2" \
                    else packed[b, start : start + n]
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


def test_per_example_attention_has_the_masked_calls_gradients(tiny_llama, tokenizer, monkeypatch):
    """SDPA once per packed example (no mask) against one masked call per row: the same loss and
    gradients, and the per-example path really ran (one causal call per example and layer)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from hwft_torch import packed_attention
    from hwft_torch.objective import to_tensors

    renderer = ChatRenderer(tokenizer, tokenizer.chat_template)
    examples = [Example("chat", r["messages"], source=str(i)) for i, r in enumerate(SAMPLE_ROWS)]
    rows = make_rows(tokenize_examples(examples, renderer, 512)[0], 160, packing=True)
    results = {}
    for attention in ("sdpa", packed_attention.register()):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation=attention)
        calls = []
        real = F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention",
                            lambda *a, **k: calls.append(k.get("is_causal")) or real(*a, **k))
        batch = to_tensors(rows, tokenizer.pad_token_id, attention, torch.device("cpu"))
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        monkeypatch.undo()
        results[attention] = loss.item(), {n: p.grad for n, p in model.named_parameters()}, calls
    (loss_a, grads_a, calls_a), (loss_b, grads_b, calls_b) = results.values()
    segments = sum(len(packed_attention.segments(torch.tensor(r.position_ids + [0]))) - 1 for r in rows)
    padded = sum(len(r.input_ids) < max(len(x.input_ids) for x in rows) for r in rows)
    assert calls_b == [True] * (2 * (segments + padded))  # 2 layers x (examples + padding blocks)
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-5, rtol=1e-4, msg=name)


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
    data = {"streaming": True, "shuffle_buffer": 4,
            "train": [{"path": "train.jsonl", "weight": 1}, {"path": "extra.jsonl", "weight": 1}]}
    recipe = write_recipe(tmp_path, tiny_llama, data=data, train={"max_steps": 3, "micro_batch_size": 2})
    code, _, err = cli("train", recipe)
    assert code == 0, err
    assert [m["step"] for m in metrics(tmp_path / "out")] == [1, 2, 3] and "streaming, packing on" in err
    recipe = write_recipe(tmp_path, tiny_llama, data=data, train={"max_steps": None}, output={"dir": str(tmp_path / "o2")})
    code, _, err = cli("train", recipe, "--dry-run")
    assert code == 2 and "data.streaming needs train.max_steps" in err


def test_cpt_on_text_trains(tiny_llama, tmp_path, cli):
    write_jsonl(tmp_path / "text.jsonl", [{"text": "hwft trains models. " * (i + 1)} for i in range(8)])
    recipe = write_recipe(tmp_path, tiny_llama, data={"train": ["text.jsonl"]},
                          method={"objective": "cpt", "tuning": "full"}, train={"max_steps": 2, "max_length": 32})
    code, _, err = cli("train", recipe)
    assert code == 0, err
    assert "long texts split into max_length chunks" in err
    assert json.loads((tmp_path / "out" / "model" / "config.json").read_text())["model_type"] == "llama"
