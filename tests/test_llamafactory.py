"""LLaMA-Factory's own training recipes (../shared/peer-data/llamafactory/examples), read as they
are: `hwft import` prints the recipe each becomes and `hwft train` trains it (ppo against the rm
recipe's reward model), with the tiny local
model swapped in for the hub model and the sizes scaled down (max_samples, cutoff_len,
gradient_accumulation_steps, max_steps are LLaMA-Factory keys too). Refusals name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hwft.errors import RecipeError
from hwft.llamafactory import translate
from tests.conftest import PEER_DATA

LF = PEER_DATA / "llamafactory"
EXAMPLES = LF / "examples"


def lf_recipe(tmp_path: Path, name: str, model: Path, **changes) -> Path:
    """The example ``name``, its model swapped for ``model`` and its run scaled down."""
    raw = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text(encoding="utf-8"))
    raw.update(
        {
            "model_name_or_path": str(model),
            "dataset_dir": str(LF),
            "output_dir": str(tmp_path / "out"),
            "max_samples": 16,
            "cutoff_len": 1024,
            "gradient_accumulation_steps": 1,
            "max_steps": 2,
            **changes,
        }
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "name, objective",
    [
        ("qwen3_lora_pretrain", "cpt"),
        ("qwen3_lora_sft", "sft"),
        ("qwen3_lora_sft_ds3", "sft"),
        ("qwen3_lora_dpo", "dpo"),
        ("qwen3_lora_kto", "kto"),
        ("qwen3_lora_reward", "rm"),
    ],
)
def test_llamafactory_examples_import_and_train(tiny_llama, tmp_path, cli, name, objective):
    path = lf_recipe(tmp_path, name, tiny_llama)
    code, out, err = cli("import", path)
    assert code == 0, err
    assert out.startswith("# Translated by `hwft import`") and "# Keys that change nothing in hwft: " in out
    translated = yaml.safe_load(out)
    assert translated["method"]["objective"] == objective and translated["method"]["lora"]["alpha"] == 16.0
    assert translated["train"]["precision"] == "bf16" and translated["train"]["warmup_ratio"] == 0.1
    code, _, err = cli("train", path)
    assert code == 0, err
    assert f"read LLaMA-Factory recipe {path} (objective {objective}, tuning lora); changes nothing in hwft: " in err
    run = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert run[-1]["step"] == 2
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    if name.endswith("ds3"):  # LLaMA-Factory's examples/deepspeed/ds_z3_config.json, read from its name
        assert translated["parallel"] == {
            "strategy": "deepspeed",
            "zero_stage": 3,
            "offload_optimizer": False,
            "offload_params": False,
        }
        assert "read from its name as ZeRO stage 3" in out


def test_llamafactory_reward_model_then_ppo(tiny_llama, tmp_path, cli):
    """LLaMA-Factory's classic pipeline: its rm recipe trains a reward model, its ppo recipe
    (reward_model: that folder) trains against it, with hwft's PPO and value head."""
    (tmp_path / "rm").mkdir()
    code, _, err = cli("train", lf_recipe(tmp_path / "rm", "qwen3_lora_reward", tiny_llama))
    assert code == 0, err
    (tmp_path / "ppo").mkdir()
    path = lf_recipe(
        tmp_path / "ppo",
        "llama3_lora_ppo",
        tiny_llama,
        reward_model=str(tmp_path / "rm" / "out"),
        max_new_tokens=6,
        per_device_train_batch_size=2,
        ppo_epochs=2,
    )
    code, out, err = cli("import", path)
    assert code == 0, err
    ppo = yaml.safe_load(out)["method"]["ppo"]
    assert (
        ppo["top_p"] == 0.9
        and ppo["num_iterations"] == 2
        and ppo["rewards"] == [{"name": "reward_model", "args": {"path": str(tmp_path / "rm" / "out")}}]
    )
    assert yaml.safe_load(out)["train"]["max_length"] == 1024 + 6
    code, _, err = cli("train", path)
    assert code == 0, err
    run = [json.loads(line) for line in (tmp_path / "ppo" / "out" / "metrics.jsonl").read_text().splitlines()]
    assert run[-1]["step"] == 2 and (tmp_path / "ppo" / "out" / "adapter" / "value_head.safetensors").is_file()


def base(**keys) -> dict:
    return {"model_name_or_path": "m", "stage": "sft", "dataset": "identity", "dataset_dir": str(LF), **keys}


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"lora_rnak": 8}, "key 'lora_rnak' is not one hwft can honour; did you mean 'lora_rank'?"),
        ({"stage": "dpo", "pref_loss": "kto_pair"}, "pref_loss: 'kto_pair' has no hwft counterpart"),
        ({"template": "alpaca"}, "template: 'alpaca' is LLaMA-Factory's own prompt format"),
        ({"pref_loss": "orpo"}, "pref_loss: 'orpo' applies to stage dpo, not sft"),
        ({"quantization_bit": 3}, "hwft quantises the base to 4 or 8 bits under LoRA"),
        ({"report_to": "swanlab"}, "report_to: 'swanlab' - hwft reports to mlflow, tensorboard, wandb"),
        ({"resume_from_checkpoint": "saves/x/checkpoint-500"}, "run `hwft train lf.yaml --resume`"),
        ({"dataset_dir": "nowhere"}, "dataset_dir 'nowhere' has no dataset_info.json"),
        ({"deepspeed": "my_ds.json"}, "deepspeed: my_ds.json is neither a file here nor one of"),
    ],
)
def test_llamafactory_refusals_name_the_key(tmp_path, keys, message):
    with pytest.raises(RecipeError) as caught:
        translate(base(**keys), tmp_path / "lf.yaml")
    assert message in str(caught.value), str(caught.value)


def test_llamafactory_translations(tmp_path):
    """Defaults are LLaMA-Factory's and transformers'; QLoRA, freeze, the preference losses."""
    plain = translate(base(), tmp_path / "lf.yaml").recipe
    assert plain["train"]["precision"] == "fp32"  # transformers' default without bf16 or fp16
    assert (plain["train"]["scheduler"], plain["train"]["micro_batch_size"], plain["train"]["epochs"]) == (
        "linear",
        8,
        3.0,
    )
    assert plain["method"]["lora"] == {
        "r": 8,
        "alpha": 16.0,
        "dropout": 0.0,
        "target_modules": "all-linear",
        "dora": False,
        "rslora": False,
    }
    q = translate(
        base(quantization_bit=4, lora_target="q_proj,v_proj", lora_alpha=32, loraplus_lr_ratio=16), tmp_path / "lf.yaml"
    ).recipe["method"]
    assert q["tuning"] == "qlora" and q["qlora"]["bits"] == 4 and q["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert q["lora"]["alpha"] == 32 and q["lora"]["loraplus_lr_ratio"] == 16
    f = translate(
        base(
            finetuning_type="freeze",
            freeze_trainable_layers=-1,
            freeze_trainable_modules="mlp,self_attn",
            freeze_extra_modules="embed_tokens",
        ),
        tmp_path / "lf.yaml",
    ).recipe["method"]
    assert f["freeze"] == {
        "trainable_layers": -1,
        "trainable_modules": ["mlp", "self_attn"],
        "extra_modules": ["embed_tokens"],
    }
    s = translate(base(stage="dpo", pref_loss="simpo", pref_beta=2.0, simpo_gamma=0.7), tmp_path / "lf.yaml").recipe
    assert s["method"]["objective"] == "simpo" and s["method"]["simpo"] == {"beta": 2.0, "gamma": 0.7}
    k = translate(base(stage="kto", kto_chosen_weight=1.2), tmp_path / "lf.yaml").recipe["method"]["kto"]
    assert k == {"beta": 0.1, "desirable_weight": 1.2, "undesirable_weight": 1.0}
