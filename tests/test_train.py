"""The real CLI training tiny Llama and Qwen2 models on the CPU, with the numbers pinned."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from hwft.data.chat import ChatRenderer
from hwft.data.loading import load_train_data
from hwft.data.pipeline import training_batches
from hwft.output import METRIC_KEYS
from hwft.plugins import get_host
from hwft.recipe import load_recipe
from hwft.train import plan_run, run
from tests.conftest import write_recipe


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def reference_first_loss(model_dir, recipe_path) -> float:
    """transformers' own ``labels=`` loss on the examples of the run's first step, each example
    run on its own (so packing must not change a thing): the sum over examples of mean loss
    times label count, over the step's label count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = load_recipe(recipe_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    renderer = ChatRenderer.for_recipe(recipe, tokenizer)
    host = get_host()
    batches = training_batches(load_train_data(recipe, host.data_formats()), renderer, recipe, host.capability("cpu"))
    rows = [row for _ in range(recipe.train.gradient_accumulation_steps) for row in next(batches.iterator)[1]]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total = count = 0.0
    with torch.no_grad():
        for row in rows:
            start = 0
            for n in row.lengths:
                ids = torch.tensor([row.input_ids[start : start + n]])
                labels = torch.tensor([row.labels[start : start + n]])
                k = int((labels[0, 1:] != -100).sum())
                total += model(input_ids=ids, labels=labels).loss.item() * k
                count += k
                start += n
    return total / count


def test_cli_lora_end_to_end(tiny_llama, tmp_path, cli):
    recipe = write_recipe(
        tmp_path,
        tiny_llama,
        train={"max_steps": 3, "save_every": 2},
        eval={"prompts": ["Who are you?"], "max_new_tokens": 4},
    )
    code, out, err = cli("train", recipe)
    assert code == 0, err
    run_dir = tmp_path / "out"
    assert {p.name for p in run_dir.iterdir()} >= {"recipe.yaml", "metrics.jsonl", "adapter", "checkpoints", "loss.png"}
    assert {p.name for p in (run_dir / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert (run_dir / "checkpoints" / "step-2" / "adapter" / "adapter_model.safetensors").is_file()
    saved = load_recipe(run_dir / "recipe.yaml")  # the resolved recipe runs again from anywhere
    assert saved.train.max_steps == 3 and saved.resolve_path(saved.data.train[0].path) == tmp_path / "train.jsonl"
    assert saved.data.train[0].path == str(tmp_path / "train.jsonl") and saved.model.name == str(tiny_llama)

    lines = metrics(run_dir)
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert set(METRIC_KEYS) <= set(m)
        assert m["tokens_per_second"] > m["trained_tokens_per_second"] > 0
    # The first step's loss is transformers' own loss on the same batch (LoRA starts at B = 0).
    assert lines[0]["loss"] == pytest.approx(reference_first_loss(tiny_llama, recipe), abs=1e-5)
    assert lines[0]["lr"] == pytest.approx(1e-3)
    # Before/after answers on stdout; plain progress lines on a non-terminal.
    assert "[before training] Q: Who are you?" in out and "[after training] A:" in out
    assert "step 3/3  loss" in err


def test_gradient_accumulation_equals_one_big_batch(tiny_llama, tmp_path, cli):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    big = write_recipe(tmp_path / "a", tiny_llama, train={"max_steps": 1, "micro_batch_size": 3})
    acc = write_recipe(
        tmp_path / "b", tiny_llama, train={"max_steps": 1, "micro_batch_size": 1, "gradient_accumulation_steps": 3}
    )
    assert cli("train", big, "--quiet")[0] == 0 and cli("train", acc, "--quiet")[0] == 0
    one, three = metrics(tmp_path / "a" / "out")[0], metrics(tmp_path / "b" / "out")[0]
    assert three["loss"] == pytest.approx(one["loss"], abs=1e-5)
    assert three["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)


def test_saved_adapter_reloads_through_plain_peft(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path, tiny_llama, train={"max_steps": 4, "lr": 1e-2})
    job = run(plan_run(load_recipe(recipe)), quiet=True)
    trained = job.results.model.eval()
    ids = torch.tensor([[1, 4093, 198, 1576, 359, 346, 47, 2, 198, 1, 520, 3531, 198]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        reloaded = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
        reloaded_logits = reloaded(ids).logits
        live_logits = trained(ids).logits
    torch.testing.assert_close(reloaded_logits, live_logits, atol=1e-5, rtol=0)
    # A zero (untrained) adapter would pass the check above; it must fail this one.
    assert (reloaded_logits - base_logits).abs().max().item() > 1e-2


def test_full_tuning_qwen2_with_template_override(tiny_qwen2, tmp_path, cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = write_recipe(
        tmp_path,
        tiny_qwen2,
        template="chatml",
        method={"objective": "sft", "tuning": "full"},
        train={"max_steps": 6, "micro_batch_size": 6, "lr": 3e-3},
    )
    code, _, err = cli("train", recipe)
    assert code == 0, err
    out = tmp_path / "out" / "model"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.model_type == "qwen2"
    assert AutoTokenizer.from_pretrained(out).pad_token_id == 2
    losses = [m["loss"] for m in metrics(tmp_path / "out")]
    assert losses[0] == pytest.approx(reference_first_loss(tiny_qwen2, recipe), abs=1e-5)
    assert losses[-1] < losses[0] * 0.9  # the same six rows every step: it must learn them


def test_checkpoints_keep_the_newest(tiny_llama, tmp_path, cli):
    recipe = write_recipe(
        tmp_path, tiny_llama, train={"max_steps": 5, "micro_batch_size": 2, "save_every": 1, "keep_checkpoints": 2}
    )
    assert cli("train", recipe, "--quiet") == (0, "", "")  # --quiet: not even progress lines
    steps = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert steps == ["step-3", "step-4"]  # step 5 is the final save, in adapter/
    state = json.loads((tmp_path / "out" / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["step"] == 4


def test_non_empty_output_folder_is_kept(tiny_llama, tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    recipe = write_recipe(tmp_path, tiny_llama)
    code, _, err = cli("train", recipe)
    assert code == 2 and f"output folder {out} is not empty" in err and "output.overwrite=true" in err
    assert (out / "precious.txt").read_text() == "keep me"


def test_dry_run_plans_without_training(tiny_llama, tmp_path, cli):
    code, out, _ = cli("train", write_recipe(tmp_path, tiny_llama), "--dry-run")
    assert code == 0 and "backend cpu (torch engine), sft/lora" in out and "6 training examples" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.cuda
def test_cuda_lora_bf16(tiny_llama, tmp_path, cli):
    """The same CLI run on an NVIDIA GPU in bf16 autocast; skipped where there is none."""
    recipe = write_recipe(tmp_path, tiny_llama, backend="cuda", train={"precision": "bf16", "max_steps": 3})
    code, _, err = cli("train", recipe)
    assert code == 0, err
    lines = metrics(tmp_path / "out")
    assert lines[0]["loss"] == pytest.approx(reference_first_loss(tiny_llama, recipe), abs=5e-2)  # bf16


@pytest.mark.rocm
def test_rocm_lora_bf16(tiny_llama, tmp_path, cli):
    recipe = write_recipe(tmp_path, tiny_llama, backend="rocm", train={"precision": "bf16", "max_steps": 3})
    code, _, err = cli("train", recipe)
    assert code == 0, err


def test_refusal_inside_the_backend_leaves_no_folder(tiny_llama, tmp_path, cli):
    """A model without a chat template is refused once its tokenizer loads; no folder stays."""
    bare = tmp_path / "bare-model"
    shutil.copytree(tiny_llama, bare, ignore=shutil.ignore_patterns("chat_template.jinja"))
    recipe = write_recipe(tmp_path, bare)
    code, _, err = cli("train", recipe)
    assert code == 2 and "tokenizer has no chat template; set template:" in err
    assert not (tmp_path / "out").exists()
    code, _, err = cli("train", recipe, "template=chatml", "train.max_steps=1", "--quiet")
    assert code == 0, err


def test_logged_loss_averages_the_interval(tiny_llama, tmp_path, cli):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    every = write_recipe(tmp_path / "a", tiny_llama, train={"max_steps": 4, "log_every": 1})
    pairs = write_recipe(tmp_path / "b", tiny_llama, train={"max_steps": 4, "log_every": 2})
    assert cli("train", every, "--quiet")[0] == 0 and cli("train", pairs, "--quiet")[0] == 0
    each = [m["loss"] for m in metrics(tmp_path / "a" / "out")]
    two = metrics(tmp_path / "b" / "out")
    assert [m["step"] for m in two] == [2, 4]
    assert [m["loss"] for m in two] == pytest.approx([(each[0] + each[1]) / 2, (each[2] + each[3]) / 2], abs=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "mlx"])
def test_early_stopping_ends_the_run_after_patience_evaluations(tiny_llama, tmp_path, cli, backend):
    """train.early_stopping_patience on both engines (the loop is one, hwft.loop). A threshold
    no loss can beat makes every evaluation after the first a non-improvement, whatever the
    CPU's rounding: evaluations at steps 1, 2, 3, patience 2, so the run stops at step 3 of 10,
    saves, and names the best step."""
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    recipe = write_recipe(
        tmp_path,
        tiny_llama,
        backend=backend,
        data={"train": [{"path": "train.jsonl"}], "val_size": 2},
        train={
            "lr": 1e-3,
            "max_steps": 10,
            "micro_batch_size": 2,
            "max_length": 64,
            "precision": "fp32",
            "seed": 7,
            "eval_every": 1,
            "early_stopping_patience": 2,
            "early_stopping_threshold": 100.0,
        },
    )
    code, out, err = cli("train", recipe)
    assert code == 0, err
    assert "early stopping at step 3: eval_loss has not improved on" in err and "(step 1) for 2 evaluations" in err
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "train, data, message",
    [
        (
            {"early_stopping_patience": 2, "eval_every": 1},
            {},
            "train.early_stopping_patience watches the held-out loss, "
            "and there is no held-out data: set data.eval (datasets) or data.val_size",
        ),
        (
            {"early_stopping_patience": 2},
            {"val_size": 2},
            "train.early_stopping_patience counts evaluations: set train.eval_every",
        ),
    ],
)
def test_early_stopping_needs_held_out_evaluations(train, data, message):
    from hwft.errors import RecipeError
    from hwft.recipe import recipe_from_dict

    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"data": {"train": [{"path": "x.jsonl"}], **data}, "train": train})
    assert message in str(err.value)


@pytest.mark.parametrize("backend", ["cpu", "mlx"])
def test_loraplus_steps_the_b_matrices_at_ratio_times_the_rate(tiny_llama, tmp_path, cli, backend):
    """One SGD step from a fresh adapter: B starts at 0, so only B has a gradient, and LoRA+ at
    ratio 16 moves it exactly 16 times as far as plain LoRA does; A does not move in either."""
    from safetensors.numpy import load_file

    saved = {}
    for ratio in (None, 16.0):
        folder = tmp_path / str(ratio)
        folder.mkdir()
        recipe = write_recipe(
            folder,
            tiny_llama,
            backend=backend,
            method={"lora": {"r": 8, "alpha": 16, "dropout": 0.0, "loraplus_lr_ratio": ratio}},
            train={"max_steps": 1, "optimizer": "sgd", "lr": 1e-2, "scheduler": "constant", "max_grad_norm": None},
        )
        code, _, err = cli("train", recipe)
        assert code == 0, err
        saved[ratio] = load_file(folder / "out" / "adapter" / "adapter_model.safetensors")
    plain, faster = saved[None], saved[16.0]
    b_keys = [k for k in plain if "lora_B" in k]
    assert b_keys and all(abs(plain[k]).max() > 0 for k in b_keys)
    for key in plain:
        if "lora_B" in key:
            np.testing.assert_allclose(faster[key], 16 * plain[key], rtol=1e-5, atol=1e-9, err_msg=key)
        else:
            np.testing.assert_array_equal(faster[key], plain[key], err_msg=key)


@pytest.mark.parametrize("backend", ["cpu", "mlx"])
def test_freeze_trains_the_last_layers_and_saves_the_whole_model(tiny_llama, tmp_path, cli, backend):
    """tuning: freeze with trainable_layers 1 on the 2-layer model: layer 1's weights move, layer
    0's, the embeddings' and the final norm's do not; model/ is the whole model, as full saves it."""
    from safetensors.numpy import load_file

    recipe = write_recipe(
        tmp_path,
        tiny_llama,
        backend=backend,
        method={"tuning": "freeze", "freeze": {"trainable_layers": 1}},
        train={"lr": 1e-2},
    )
    code, _, err = cli("train", recipe)
    assert code == 0, err
    before = load_file(tiny_llama / "model.safetensors")
    after = load_file(tmp_path / "out" / "model" / "model.safetensors")
    assert set(after) == set(before)
    moved = sorted(k for k in before if not np.array_equal(before[k], after[k].astype(before[k].dtype)))
    assert moved and all(k.startswith("model.layers.1.") for k in moved), moved
    assert len(moved) == len([k for k in before if k.startswith("model.layers.1.")])


@pytest.mark.parametrize(
    "freeze, message",
    [
        ({"trainable_layers": 1, "trainable_modules": ["mlp", "atention"]}, "method.freeze: atention names no module"),
        ({"trainable_layers": 0}, "0 layers would train nothing"),
    ],
)
def test_freeze_refusals(tiny_llama, tmp_path, cli, freeze, message):
    recipe = write_recipe(tmp_path, tiny_llama, method={"tuning": "freeze", "freeze": freeze})
    code, _, err = cli("train", recipe)
    assert code == 2 and message in err, err
