"""QLoRA's quantisation and
saved adapter, the DPO reference modes, continued adapters, DoRA/rsLoRA, reward plugins, and
every refusal of the method spec with its message."""

from __future__ import annotations

import json

import pytest
import torch

from hwft.rewards import Sample, exact_match, final_answer, format_reward, length_penalty, normalise_answer
from hwft.testing.cells import PAIRS, PROMPTS, TEXTS, cell_recipe, metrics  # noqa: F401  (shared with other tests)
from tests.conftest import write_recipe
from tests.test_plugins import make_dist, site  # noqa: F401  (site is a fixture)

#: A reward plugin, installed as a real distribution (see tests/test_plugins.py): the share of
#: vowels among a completion's letters. Continuous, so random tiny models see spread in a group.
VOWELS_PLUGIN = """
    import pluggy
    from hwft.testing.rewards import testing_vowels as vowels
    HWFT_PLUGIN_API = "2.0"
    hookimpl = pluggy.HookimplMarker("hwft")
    @hookimpl
    def hwft_register_rewards(register):
        register("vowels", vowels, description="share of vowels")
"""


@pytest.fixture
def vowels(site):
    make_dist(site, "hwft-vowels", "fake_vowels", VOWELS_PLUGIN)
    return site


#: The cells themselves (every objective x tuning trains on the cpu and mlx backends) are the
#: conformance suite's (hwft.testing.conformance, run by tests/test_conformance.py).


def test_qlora_quantises_the_base_and_saves_a_plain_adapter(tiny_llama, tmp_path):
    """4-bit NF4 modules really are bitsandbytes ones; the adapter names the unquantised base,
    loads onto it in fp32 and merges into it."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hwft.recipe import load_recipe
    from hwft.train import plan_run, run

    recipe = cell_recipe(tmp_path, tiny_llama, "sft", "qlora", eval={"prompts": []})
    job = run(plan_run(load_recipe(recipe)), quiet=True)
    quantised = job.results.model.base_model.model
    linear = [m for name, m in quantised.named_modules() if name.endswith("q_proj.base_layer")]
    assert linear and all(isinstance(m, bnb.nn.Linear4bit) for m in linear)
    assert linear[0].weight.quant_type == "nf4" and linear[0].weight.quant_state.nested  # double quant

    adapter = tmp_path / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = torch.tensor([[1, 420, 3100, 57, 2]])
    with torch.no_grad():
        before = base(ids).logits
        peft = PeftModel.from_pretrained(base, adapter)
        unmerged = peft(ids).logits
        merged_model = peft.merge_and_unload()
        merged = merged_model(ids).logits
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged_model.modules())
    assert torch.allclose(merged, unmerged, atol=1e-4)
    assert (merged - before).abs().max() > 1e-3


def test_qlora_8bit(tiny_llama, tmp_path, cli):
    import bitsandbytes as bnb

    from hwft.recipe import load_recipe
    from hwft.train import plan_run, run

    recipe = cell_recipe(
        tmp_path,
        tiny_llama,
        "sft",
        "qlora",
        method={"qlora": {"bits": 8}},
        train={"max_steps": 2},
        eval={"prompts": []},
    )
    job = run(plan_run(load_recipe(recipe)), quiet=True)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in job.results.model.modules())
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_qlora_refused_where_bitsandbytes_cannot_run_unless_fallback(tiny_llama, tmp_path, cli, monkeypatch):
    """A device without bitsandbytes (here: the CPU record told so) refuses qlora before
    loading, naming what would work; allow_fallback trains LoRA instead and says so."""
    from hwft_torch import devices

    monkeypatch.setattr(
        devices, "bitsandbytes_missing", lambda: "bitsandbytes is not installed (pip install bitsandbytes)"
    )
    recipe = cell_recipe(tmp_path, tiny_llama, "sft", "qlora", train={"max_steps": 1})
    code, _, err = cli("train", recipe)
    assert code == 2
    assert (
        "method.tuning 'qlora' (bitsandbytes is not installed (pip install bitsandbytes)); use tuning: lora "
        "(with train.precision: bf16 where the device has it), or set method.qlora.allow_fallback: true"
    ) in err
    assert not (tmp_path / "out").exists()

    code, _, err = cli("train", recipe, "method.qlora.allow_fallback=true")
    assert code == 0, err
    assert (
        "qlora: bitsandbytes is not installed (pip install bitsandbytes); method.qlora.allow_fallback is set, "
        "so training plain LoRA" in err
    )
    assert "(lora)" in err and (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_dpo_precomputed_reference_equals_the_frozen_copy(tiny_llama, tmp_path, cli):
    """Full tuning: log-probabilities computed once before training give the same run as a
    frozen copy of the model beside it."""
    runs = {}
    for mode in ("auto", "precomputed"):
        folder = tmp_path / mode
        folder.mkdir()
        recipe = cell_recipe(folder, tiny_llama, "dpo", "full", train={"max_steps": 3, "micro_batch_size": 2})
        code, _, err = cli("train", recipe, f"method.dpo.reference={mode}")
        assert code == 0, err
        runs[mode] = metrics(folder / "out")
        assert ("dpo: reference log-probabilities of 4 pairs precomputed" in err) == (mode == "precomputed")
    for a, b in zip(runs["auto"], runs["precomputed"], strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


def test_continue_from_an_adapter_with_dora_and_rslora(tiny_llama, tmp_path, cli):
    first = tmp_path / "first"
    first.mkdir()
    recipe = cell_recipe(
        first, tiny_llama, "sft", "lora", method={"lora": {"r": 4, "alpha": 8, "dora": True, "rslora": True}}
    )
    code, _, err = cli("train", recipe)
    assert code == 0, err
    config = json.loads((first / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True and config["r"] == 4
    losses = [m["loss"] for m in metrics(first / "out")]
    assert losses[-1] < losses[0]

    second = tmp_path / "second"
    second.mkdir()
    recipe = cell_recipe(second, tiny_llama, "sft", "lora", train={"max_steps": 1})
    code, _, err = cli("train", recipe, f"model.adapter={first / 'out' / 'adapter'}")
    assert code == 0, err
    (resumed,) = metrics(second / "out")
    assert resumed["loss"] < losses[0] - 0.1  # it starts where the first run got to
    config = json.loads((second / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["use_dora"] is True


@pytest.mark.parametrize(
    "sections, message",
    [
        (
            {"overrides": ["model.adapter=a", "method.tuning=full"]},
            "model.adapter continues a LoRA adapter, but method.tuning is full; set method.tuning: lora",
        ),
        (
            {"overrides": ["model.adapter=no-such-folder"]},
            "model.adapter: {folder}/no-such-folder is not a PEFT adapter folder (no adapter_config.json)",
        ),
        (
            {"method": {"objective": "grpo", "grpo": {"rewards": ["exact_match"], "max_new_tokens": 64}}},
            "train.max_length (64) leaves no room for a prompt before method.grpo.max_new_tokens (64)",
        ),
        (
            {"method": {"objective": "dpo"}, "overrides": ["data.streaming=true", "train.max_steps=2"]},
            "data.streaming applies to sft and cpt, not to dpo",
        ),
        (
            {
                "method": {
                    "objective": "grpo",
                    "grpo": {
                        "rewards": [{"name": "length_penalty", "args": {"target": 4, "tagret": 2}}],
                        "max_new_tokens": 4,
                    },
                }
            },
            "method.grpo.rewards[0]: reward 'length_penalty' does not take args {'tagret': 2, 'target': 4}: "
            "got an unexpected keyword argument 'tagret' (it takes: target, limit)",
        ),
    ],
)
def test_method_refusals(tiny_llama, tmp_path, cli, sections, message):
    method = sections.pop("method", {})
    overrides = sections.pop("overrides", [])
    objective = method.get("objective", "sft")
    recipe = cell_recipe(
        tmp_path, tiny_llama, objective, "lora", method=method, train={"max_steps": 1, "max_length": 64}, **sections
    )
    code, _, err = cli("train", recipe, *overrides)
    assert code == 2, err
    assert message.replace("{folder}", str(tmp_path)) in err, err


def test_dpo_refuses_conversations_without_a_rejected_answer(tiny_llama, tmp_path, cli):
    recipe = cell_recipe(tmp_path, tiny_llama, "sft", "lora")  # sft rows (messages) ...
    code, _, err = cli("train", recipe, "method.objective=dpo")  # ... given to dpo
    assert code == 2 and "data.jsonl row 1" in err and "preference" in err, err


# ---------------------------------------------------------------------------------- rewards


def sample(completion: str, reference: str | None = None, tokens: int = 3, truncated: bool = False) -> Sample:
    return Sample("q", completion, reference, tokens, truncated)


def test_builtin_rewards():
    assert final_answer("so the answer is 42.") == "42."
    assert final_answer("<think>2+2</think><answer> 4 </answer>") == "4"
    assert final_answer("steps... #### 1,000") == "1,000"
    assert final_answer("\\boxed{7} done") == "7"
    assert final_answer("12 apples, then 15") == "15"
    assert normalise_answer("1,000.0") == normalise_answer("1000") == "1000"
    assert exact_match([sample("12"), sample("It is 12.")]) == [0.0, 0.0]  # no reference: no match
    assert exact_match([sample("It is 12.", "12"), sample("11", "12"), sample("The answer: 12", "#### 12")]) == [
        1.0,
        0.0,
        1.0,
    ]
    assert format_reward([sample("<think>a</think> <answer>b</answer>"), sample("b")]) == [1.0, 0.0]
    assert format_reward([sample(" 12 "), sample("12 apples")], pattern=r"-?\d+") == [1.0, 0.0]
    assert length_penalty(
        [sample("a", tokens=4), sample("b", tokens=10), sample("c", tokens=40), sample("d", tokens=8, truncated=True)],
        target=4,
        limit=16,
    ) == [0.0, -0.5, -1.0, -1.0]


def test_reward_plugin_registered_through_the_hook(vowels):
    from hwft.plugins import get_host
    from hwft.rewards import score

    rewards = get_host().rewards()
    assert {"exact_match", "format", "length_penalty", "vowels"} <= set(rewards)
    from hwft.methods.grpo import RewardSpec

    specs = [RewardSpec(name="vowels", weight=2.0, args={"scale": 0.5}), RewardSpec(name="exact_match")]
    total, per = score([sample("aaaa", "9"), sample("bbb 9", "9")], specs, rewards)
    assert per == {"vowels": [0.5, 0.0], "exact_match": [0.0, 1.0]}
    assert total == [1.0, 1.0]


@pytest.mark.parametrize(
    "name", ["quickstart", "cpt", "dpo", "orpo", "simpo", "kto", "rm", "grpo", "ppo", "qlora", "data-mix", "evaluate"]
)
def test_shipped_recipes_validate_and_say_how_to_run(name, cli):
    """One recipe per objective in configs/, each starting with the command that runs it."""
    from tests.conftest import REPO

    path = REPO / "configs" / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"hwft train configs/{name}.yaml" in first
    code, out, err = cli("train", path, "--dry-run")
    assert code == 0 and out.startswith("ok: backend cpu"), err


@pytest.mark.cuda
@pytest.mark.parametrize(
    "objective, tuning",
    [
        ("sft", "qlora"),
        ("dpo", "lora"),
        ("dpo", "full"),
        ("orpo", "lora"),
        ("simpo", "qlora"),
        ("kto", "lora"),
        ("rm", "qlora"),
        ("grpo", "lora"),
        ("grpo", "qlora"),
        ("ppo", "lora"),
    ],
)
def test_cells_on_cuda_in_bf16(tiny_llama, tmp_path, cli, objective, tuning):
    """The same cells on an NVIDIA GPU, bf16 autocast (qlora: 4-bit with bf16 matmuls)."""
    recipe = cell_recipe(tmp_path, tiny_llama, objective, tuning, backend="cuda", train={"precision": "bf16"})
    code, _, err = cli("train", recipe)
    assert code == 0, err
    run = metrics(tmp_path / "out")
    assert run[-1]["loss"] < run[0]["loss"], [m["loss"] for m in run]
    assert "compute bfloat16 on cuda" in err


def test_dpo_on_llamafactory_preference_data(tiny_llama, tmp_path, cli):
    """LLaMA-Factory's sharegpt preference shape, through its own dataset_info.json, trains."""
    from tests.conftest import PEER_DATA

    registry = PEER_DATA / "llamafactory" / "dataset_info.json"
    recipe = cell_recipe(
        tmp_path,
        tiny_llama,
        "dpo",
        "lora",
        train={"max_steps": 3, "max_length": 128},
        data={"registry": str(registry), "train": [{"name": "dpo_en_demo", "max_samples": 4}]},
    )
    code, _, err = cli("train", recipe)
    assert code == 0, err
    assert "4 truncated to max_length 128, 1 dropped (nothing left to learn within max_length); 3 pairs" in err, err
    run = metrics(tmp_path / "out")
    assert run[0]["loss"] == pytest.approx(0.693147, abs=1e-5) and run[-1]["loss"] < run[0]["loss"]


def test_kto_on_llamafactory_feedback_data_at_a_micro_batch_of_one(tiny_llama, tmp_path, cli):
    """LLaMA-Factory's kto_en_demo, through its kto_tag mapping, trains at its own recipe's micro-batch
    of 1 (the mismatched pairs are fixed when the data is prepared, not drawn from the micro-batch)."""
    from tests.conftest import PEER_DATA

    registry = PEER_DATA / "llamafactory" / "dataset_info.json"
    # its first 6 rows run to 4376 tokens (multi-turn) in the tiny models' 4096-token vocabulary
    recipe = cell_recipe(
        tmp_path,
        tiny_llama,
        "kto",
        "lora",
        train={"max_steps": 3, "max_length": 4608, "micro_batch_size": 1, "gradient_accumulation_steps": 2},
        data={"registry": str(registry), "train": [{"name": "kto_en_demo", "max_samples": 6}]},
    )
    code, _, err = cli("train", recipe)
    assert code == 0, err
    assert "6 answers" in err, err
    run = metrics(tmp_path / "out")
    assert run[0]["loss"] == pytest.approx(0.5, abs=1e-5) and "kl" in run[0]


@pytest.mark.parametrize("backend", ["cpu", "mlx"])
@pytest.mark.parametrize(
    "targets, message",
    [
        (
            ["q_proj", "v_prj"],
            "method.lora.target_modules: 'v_prj' names no module of this model; did you mean "
            "'v_proj'? Its linear modules are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, "
            "v_proj; or give all-linear",
        ),
        (
            "q_prj",
            "method.lora.target_modules 'q_prj' matches no module of this model (a string is a regular "
            "expression over whole paths such as model.layers.0.mlp.down_proj); did you mean 'q_proj'?",
        ),
        ("(", "method.lora.target_modules '(' is not a valid regular expression"),
    ],
)
def test_lora_targets_the_model_lacks_are_refused_naming_its_modules(
    tiny_llama, tmp_path, cli, backend, targets, message
):
    """PEFT raises NoMatchingPeftModuleError for a list that matches nothing (and skips a typo
    beside good names); the mlx engine once matched substrings. One reading, one message."""
    path = write_recipe(
        tmp_path,
        tiny_llama,
        backend=backend,
        method={"objective": "sft", "tuning": "lora", "lora": {"r": 4, "target_modules": targets}},
    )
    code, _, err = cli("train", path)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", ["cpu", "mlx"])
def test_lora_on_the_listed_modules_only(tiny_llama, tmp_path, cli, backend):
    path = write_recipe(
        tmp_path,
        tiny_llama,
        backend=backend,
        train={"max_steps": 1},
        method={
            "objective": "sft",
            "tuning": "lora",
            "lora": {"r": 4, "target_modules": ["self_attn.q_proj", "v_proj"]},
        },
    )
    code, _, err = cli("train", path)
    assert code == 0, err
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in tensors}
    assert adapted == {"q_proj", "v_proj"}, sorted(tensors)


# --- rm: reward models, and what uses them -----------------------------------------------------


@pytest.fixture(scope="module")
def reward_models(tiny_llama, tmp_path_factory):
    """rm trained on the cell pairs for 8 steps: LoRA on cpu, LoRA and full on mlx."""
    from hwft import cli as hwft_cli
    from hwft.plugins import reset_host

    out = {}
    for backend, tuning in (("cpu", "lora"), ("mlx", "lora"), ("mlx", "full")):
        folder = tmp_path_factory.mktemp(f"rm-{backend}-{tuning}")
        recipe = cell_recipe(folder, tiny_llama, "rm", tuning, backend=backend, train={"max_steps": 8})
        reset_host()
        assert hwft_cli.main(["train", str(recipe)]) == 0
        out[backend, tuning] = folder / "out"
    return out


@pytest.mark.parametrize("backend, tuning", [("cpu", "lora"), ("mlx", "lora"), ("mlx", "full")])
def test_a_reward_model_loads_in_transformers_and_hwft_eval_scores_its_pairs(
    reward_models, tmp_path, cli, backend, tuning
):
    """Either engine saves what transformers loads as AutoModelForSequenceClassification (the
    score head in the adapter, as PEFT's SEQ_CLS saves it, or in the whole model), and `hwft
    eval --data pairs` reports the pairwise accuracy training reached."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from hwft.testing.cells import write_jsonl

    run = reward_models[backend, tuning]
    last = metrics(run)[-1]
    if tuning == "lora":
        config = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
        base = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"], num_labels=1)
        model = PeftModel.from_pretrained(base, run / "adapter")
        assert model.base_model.model.score.modules_to_save["default"].weight.abs().sum() > 0
    else:
        model = AutoModelForSequenceClassification.from_pretrained(run / "model")
        assert model.config.num_labels == 1 and model.config.architectures == ["LlamaForSequenceClassification"]
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    code, out, err = cli("eval", run, "--data", data, "--json")
    assert code == 0, err
    result = json.loads(out)["results"]
    assert list(result) == ["fine-tuned"], "a reward model has no base to compare with"
    assert result["fine-tuned"]["pairs"] == len(PAIRS)
    assert result["fine-tuned"]["pairwise_accuracy"] >= 0.75 and last["rewards/accuracy"] >= 0.75, (result, last)
    assert result["fine-tuned"]["reward_margin"] > 0


def test_a_reward_model_rewards_grpo(reward_models, tiny_llama, tmp_path, cli):
    """rewards: [{name: reward_model, args: {path: ...}}] scores GRPO's rollouts with it."""
    recipe = cell_recipe(
        tmp_path,
        tiny_llama,
        "grpo",
        "lora",
        train={"max_steps": 2},
        method={
            "grpo": {
                "num_generations": 2,
                "max_new_tokens": 6,
                "rewards": [{"name": "reward_model", "args": {"path": str(reward_models["cpu", "lora"])}}],
            }
        },
    )
    code, _, err = cli("train", recipe)
    assert code == 0, err
    run = metrics(tmp_path / "out")
    assert all("rewards/reward_model/mean" in m for m in run) and any(m["rewards/reward_model/std"] > 0 for m in run)


def test_reward_model_refusals(reward_models, tiny_llama, tmp_path, cli):
    recipe = cell_recipe(tmp_path, tiny_llama, "rm", "lora", eval={"prompts": ["Hi"]})
    code, _, err = cli("train", recipe)
    assert code == 2 and "eval.prompts: a reward model (objective rm) scores answers" in err, err
    code, _, err = cli("chat", reward_models["cpu", "lora"], "--prompt", "Hi")
    assert code == 2 and "is a reward model: it scores answers and does not write them" in err, err
    code, _, err = cli("export", reward_models["cpu", "lora"], "--to", "gguf", "--out", tmp_path / "rm.gguf")
    assert code == 2 and "is a reward model; hwft export writes language models" in err, err
    recipe = cell_recipe(
        tmp_path,
        tiny_llama,
        "grpo",
        "lora",
        method={
            "grpo": {
                "num_generations": 2,
                "max_new_tokens": 6,
                "rewards": [{"name": "reward_model", "args": {"path": str(tiny_llama)}}],
            }
        },
    )
    code, _, err = cli("train", recipe)
    assert code == 2 and "is not a reward model (train one with objective rm)" in err, err


@pytest.mark.parametrize(
    "sections, message",
    [({"method": {"ppo": {"rewards": []}}}, "objective ppo needs at least one reward in method.ppo.rewards")],
)
def test_ppo_refusals(tiny_llama, tmp_path, cli, sections, message):
    recipe = cell_recipe(tmp_path, tiny_llama, "ppo", "lora", **sections)
    code, _, err = cli("train", recipe)
    assert code == 2 and message in err, err
