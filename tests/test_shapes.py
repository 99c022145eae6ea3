"""Benchmarks at real sizes without the checkpoint: ``model.shape`` (random weights built from a
config.json on the device), ``data.train: random_tokens`` and the ``tokens`` format (rows of
token ids), ``train.frozen_weights`` (frozen linears stored in the compute dtype), and the bench
baselines' settings from the recipe (configs/bench/)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, write_jsonl, write_recipe

#: A 2-layer Llama of the embedded tokenizer's vocabulary, as a model.shape.
TINY_SHAPE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 49152,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def shape_recipe(folder: Path, **sections) -> Path:
    (folder / "shape.json").write_text(json.dumps(TINY_SHAPE), encoding="utf-8")
    recipe = {
        "model": {"name": "smollm2-135m", "shape": "shape.json"},
        "data": {"train": [{"random_tokens": {"rows": 6, "length": 32}}]},
        "method": {"objective": "cpt", "tuning": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "train": {"lr": 1e-4, "max_steps": 3, "micro_batch_size": 2, "max_length": 32, "precision": "fp32"},
        "backend": "cpu",
        "output": {"dir": str(folder / "out")},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and key in recipe else value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_random_tokens_are_seeded_ordinary_ids_of_the_tokenizer(tmp_path):
    from hwft.data.loading import load_train_data
    from hwft.models import load_tokenizer
    from hwft.plugins import get_host
    from hwft.recipe import load_recipe
    from hwft.testing.tiny import embedded_tokenizer_dir

    def rows(seed: int) -> list[list[int]]:
        recipe = load_recipe(shape_recipe(tmp_path), [f"train.seed={seed}"])
        return [e.token_ids for e in load_train_data(recipe, get_host().data_formats()).examples]

    first = rows(1)
    assert len(first) == 6 and {len(r) for r in first} == {32}
    assert rows(1) == first and rows(2) != first  # the seed decides them, on every machine alike
    tokenizer = load_tokenizer(embedded_tokenizer_dir(), False)
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    drawn = {i for r in first for i in r}
    assert not drawn & special and max(drawn) < len(tokenizer)
    # 192 draws from ~49k ids: repeats are rare, so the rows are not one token over and over
    assert len(drawn) > 180


def test_the_tokens_format_reads_token_ids_and_names_a_bad_row(tmp_path):
    from hwft.data.chat import IGNORE_INDEX
    from hwft.data.loading import load_examples

    good = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10]}])
    examples = load_examples(good, objective="cpt")
    assert [e.token_ids for e in examples] == [[5, 6, 7, 8], [9, 10]]
    from hwft.data.chat import ChatRenderer
    from hwft.models import load_tokenizer
    from hwft.testing.tiny import embedded_tokenizer_dir

    renderer = ChatRenderer(load_tokenizer(embedded_tokenizer_dir(), False), None)
    from hwft.data.chat import TokenizeStats
    from hwft.data.kinds.tokens import encode

    (chunk,) = encode(examples[0], renderer, 16, TokenizeStats())
    assert chunk.input_ids == [5, 6, 7, 8] and chunk.labels == [IGNORE_INDEX, 6, 7, 8]  # as given: no eos added
    for row, field_error in (
        ({"input_ids": [1, "a"]}, "must be a list of token ids"),
        ({"input_ids": [3]}, r"holds 1 token\(s\)"),
    ):
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [1, 2]}, row])
        with pytest.raises(Exception, match=rf"bad.jsonl row 2 \(tokens format\): field 'input_ids' {field_error}"):
            load_examples(bad, objective="cpt")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"method": {"objective": "sft"}},
            "data.train[0].random_tokens: rows of token ids, every one a label, train cpt",
        ),
        ({"method": {"tuning": "qlora"}}, "model.shape builds random weights; method.tuning qlora quantises"),
        ({"model": {"name": "smollm2-135m", "shape": "missing.json"}}, "model.shape: "),
        ({"model": {"name": "smollm2-135m", "shape": "recipe.yaml"}}, "is not a JSON file"),
        (
            {"model": {"name": "smollm2-135m", "shape": "shape.json", "adapter": "a"}},
            "model.shape builds random weights; an adapter trained on real ones",
        ),
    ],
)
def test_shape_recipes_that_cannot_run_are_refused_before_any_weight(tmp_path, cli, change, message):
    code, _, err = cli("train", shape_recipe(tmp_path, **change))
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("backend", "logit_variance", "tolerance"), [("cpu", 64 * 0.02**2, 0.1), ("mlx", 1 / 3, 0.25)])
def test_a_shape_trains_from_random_weights_made_from_its_config(tmp_path, cli, backend, logit_variance, tolerance):
    """Random weights give logits z about N(0, s^2) for every token, so the loss starts at about
    E[logsumexp z] - E[z_y] = ln V + s^2 / 2 (V = 49152). transformers draws linears from
    N(0, 0.02^2): s^2 = 64 x 0.02^2 over the 64-wide normed hidden state; MLX from U(+-1/sqrt(64)):
    s^2 = 1/3. Each step's 62 labels average the target logit, a noise of s / sqrt(62) on top."""
    code, _, err = cli("train", shape_recipe(tmp_path, backend=backend))
    assert code == 0, err
    assert "smollm2-135m shaped as shape.json" in err
    folder = next(Path(line.split(" -> ")[1].split(",")[0]) for line in err.splitlines() if " -> " in line)
    assert json.loads((folder / "config.json").read_text()) == TINY_SHAPE
    assert (folder / "tokenizer.json").is_file() and not list(folder.glob("*.safetensors"))
    losses = [json.loads(x)["loss"] for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    expected = math.log(49152) + logit_variance / 2
    assert len(losses) == 3 and all(abs(x - expected) < tolerance for x in losses), (losses, expected)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_frozen_weights_in_bf16_train_exactly_as_autocast_does(tiny_llama, tmp_path, cli):
    """train.frozen_weights compute stores the frozen linears in bf16: autocast casts them to bf16
    in every forward anyway, so the steps' losses and gradient norms are bit-for-bit those of the
    fp32-stored run, and so is the adapter."""
    from safetensors.torch import load_file

    runs = {}
    for stored in ("fp32", "compute"):
        folder = tmp_path / stored
        folder.mkdir()
        path = write_recipe(folder, tiny_llama, train={"precision": "bf16", "frozen_weights": stored})
        code, _, err = cli("train", path)
        assert code == 0, err
        assert ("frozen weights: 14 linear layers stored in bfloat16" in err) is (stored == "compute")
        metrics = [json.loads(x) for x in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
        runs[stored] = (
            [(m["loss"], m["grad_norm"]) for m in metrics],
            load_file(folder / "out" / "adapter" / "adapter_model.safetensors"),
        )
    assert runs["compute"][0] == runs["fp32"][0]
    assert all((runs["compute"][1][k] == v).all() for k, v in runs["fp32"][1].items())


def test_frozen_weights_are_cast_once_and_only_where_they_may_be():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hwft.recipe import Recipe
    from hwft_torch import frozen_weights

    recipe = Recipe.model_validate({"data": "x.jsonl", "method": {"tuning": "lora"}})
    cuda, cpu = "cuda", "cpu"
    assert frozen_weights.wanted(recipe, "lora", torch.bfloat16, cuda) == torch.bfloat16  # auto: accelerators
    assert frozen_weights.wanted(recipe, "lora", torch.bfloat16, cpu) is None
    assert frozen_weights.wanted(recipe, "lora", torch.float32, cuda) is None
    assert frozen_weights.wanted(recipe, "full", torch.bfloat16, cuda) is None  # full and freeze save the weights
    for change in (
        {"parallel": {"strategy": "fsdp2"}},
        {"method": {"tuning": "lora", "lora": {"dora": True}}},
        {"train": {"frozen_weights": "fp32"}},
    ):
        other = Recipe.model_validate({"data": "x.jsonl", "method": {"tuning": "lora"}, **change})
        assert frozen_weights.wanted(other, "lora", torch.bfloat16, cuda) is None, change
    forced = Recipe.model_validate({"data": "x.jsonl", "train": {"frozen_weights": "compute"}})
    assert frozen_weights.wanted(forced, "lora", torch.bfloat16, cpu) == torch.bfloat16

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=1,
        vocab_size=100,
        tie_word_embeddings=True,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules="all-linear"))
    tied = model.get_output_embeddings().weight
    saved = frozen_weights.store(model, torch.bfloat16)
    assert saved == 2 * (
        2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32
    )  # 2 bytes each: q, o; k, v (one kv head); gate, up, down
    assert frozen_weights.count(model, torch.bfloat16) == 7
    assert tied.dtype == torch.float32 and model.get_input_embeddings().weight is tied
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert frozen_weights.stored_dtype(model) == torch.bfloat16
    ids = torch.tensor([[1, 2, 3]])
    with frozen_weights.autocast_for(model, torch.device("cpu")):  # generation and evaluation outside a training step
        assert model(input_ids=ids).logits.shape == (1, 3, 100)


def test_the_baseline_takes_its_settings_from_the_recipe_and_builds_the_same_shape(tmp_path):
    """The Trainer baseline on a model.shape: the recipe's micro-batch and gradient checkpointing,
    and the very random weights the hwft arm builds (both seeded by train.seed on the device)."""
    import torch

    from hwft.models import materialise
    from hwft.recipe import load_recipe
    from hwft.train import plan_run
    from hwft_torch.bench import baseline_arguments, baseline_model
    from hwft_torch.modeling import load_model

    recipe = load_recipe(
        shape_recipe(tmp_path, bench={"baseline": {"micro_batch_size": 3, "gradient_checkpointing": True}})
    )
    arguments = baseline_arguments(recipe.bench.baseline, recipe.train.max_length, "hf-liger")
    assert (
        arguments["per_device_train_batch_size"],
        arguments["gradient_checkpointing"],
        arguments["max_length"],
        arguments["use_liger_kernel"],
        arguments["attn_implementation"],
    ) == (3, True, 32, True, "sdpa")
    path = materialise(plan_run(recipe).model)
    cpu = torch.device("cpu")
    torch.manual_seed(recipe.train.seed)
    ours = load_model(path, recipe, cpu, "full", torch.float32)
    theirs = baseline_model(path, cpu, False, recipe.train.seed)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True))
    assert baseline_model(path, cpu, True, recipe.train.seed).dtype == torch.bfloat16  # the config says bf16


def test_the_bench_workloads_name_real_shapes_and_their_baseline_settings():
    """configs/bench/: the exact configs (vocabulary included) and the baseline settings every arm
    shares, validated as recipes."""
    from hwft.recipe import load_recipe

    shapes = {"llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256), "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936)}
    for name, dims in shapes.items():
        config = json.loads((REPO / "configs" / "bench" / f"{name}.config.json").read_text())
        assert (
            tuple(
                config[k]
                for k in (
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "vocab_size",
                )
            )
            == dims
        )
        recipe = load_recipe(REPO / "configs" / "bench" / f"{name}-lora.yaml")
        assert recipe.model.shape == f"{name}.config.json"
        assert (recipe.method.tuning, recipe.method.lora.r, recipe.method.lora.target_modules) == (
            "lora",
            16,
            "all-linear",
        )
        assert recipe.train.max_length == recipe.data.train[0].random_tokens.length == 2048
        assert recipe.bench.baseline.micro_batch_size == recipe.train.micro_batch_size
        assert recipe.bench.baseline.gradient_checkpointing == recipe.parallel.activation_checkpointing
        assert recipe.bench.baseline.dtypes == ["bf16"] and recipe.train.precision == "bf16"


@pytest.mark.cuda
def test_a_lora_run_on_cuda_stores_its_frozen_weights_in_bf16(tmp_path, cli):
    code, _, err = cli("train", shape_recipe(tmp_path, backend="cuda", train={"precision": "auto"}))
    assert code == 0, err
    assert "frozen weights: 15 linear layers stored in bfloat16" in err
