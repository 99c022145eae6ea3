"""Every recipe in configs/ under every parallel strategy, as written, and each strategy held to
one process: all in one launch of two processes on this CPU (gloo).

**The matrix.** Each recipe with the tiny model swapped in, two steps, with its own prompts
answered before and after, held-out evaluation where the method has it (sft, cpt), and (under
fsdp2, whose result is gathered from shards) the result exported and verified. A combination
that cannot run is refused in one line before anything loads: qlora under DeepSpeed (fsdp2
shards its 4-bit weights).

**Held to one process.** For each of ddp and ZeRO-2 (LoRA), fsdp2 (full tuning, and QLoRA) and
ZeRO-3 (full tuning, the sharded strategies gathering a whole model from shards), 2 processes x
accumulation 1 train the optimizer steps one process trains with accumulation 2: the same
examples in each step, the same losses (1e-4) and grad norms (0.1%), and the result saved from
shards gives the single run's logits in one process (1e-3). The sharded runs' step-2
checkpoints resume.

One torchrun launch runs it all (tests/recipe_worker.py): a rank's start is about 4 s of
imports here, the matrix's 45 runs and the strategies' 6 about 2 s each; the launcher
(``hwft train --nproc 2``) is held to one process in tests/test_parallel.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_parallel import LOGIT_TOLERANCE, LOSS_TOLERANCE, read_jsonl, recipe

#: Every training recipe in configs/ (bench.yaml is hwft bench's workload, run by tests/test_bench.py).
RECIPES = sorted(p.stem for p in (REPO / "configs").glob("*.yaml") if p.stem != "bench")
#: The strategies, each as its overrides. DeepSpeed at ZeRO-3, its sharded stage: stages 1 and 2
#: keep whole parameters as ddp does (ZeRO-2 is held to one process below).
STRATEGIES = {
    "ddp": ["parallel.strategy=ddp"],
    "fsdp2": ["parallel.strategy=fsdp2"],
    "zero3": ["parallel.strategy=deepspeed", "parallel.zero_stage=3"],
}
#: (recipe, strategy) -> the one line it is refused with; strategy None: under every strategy.
REFUSED = {("qlora", "zero3"): "method.tuning qlora with parallel.strategy deepspeed"}
#: Objectives with a held-out loss (data.val_size); the others' recipes run without one.
EVALUATED = ("sft", "cpt")
#: Each strategy's run held to one process: id -> (tuning, overrides). ddp and ZeRO-2 train
#: LoRA, fsdp2 and ZeRO-3 (the sharded ones) a full model, so that gathering a whole model from
#: shards is tested too; fsdp2 also QLoRA.
HELD = {
    "ddp": ("lora", ["parallel.strategy=ddp"]),
    "fsdp2": ("full", ["parallel.strategy=fsdp2"]),
    "fsdp2-qlora": ("qlora", ["parallel.strategy=fsdp2"]),
    "zero2": ("lora", ["parallel.strategy=deepspeed", "parallel.zero_stage=2"]),
    "zero3": ("full", ["parallel.strategy=deepspeed", "parallel.zero_stage=3"]),
}
#: ZeRO-3 answers a prompt with the model gathered and DeepSpeed's hooks off
#: (ZeroRedundancy.whole_model): before training, so the steps after it also show the hooks back.
ASKS = ['eval.prompts=["Question 3?"]', "eval.max_new_tokens=4"]


def refusal(name: str, strategy: str) -> str | None:
    return REFUSED.get((name, strategy)) or REFUSED.get((name, None))


def objective_of(name: str) -> str:
    import yaml

    recipe = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    return recipe.get("method", {}).get("objective", "sft")


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, tokenizer_dir) -> Path:
    from hwft.testing.tiny import build_tiny_model

    return build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("tiny-moe"), tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_vision(tmp_path_factory, tokenizer_dir) -> Path:
    """configs/vision.yaml's model, small: a tiny Qwen2-VL (hwft.vision)."""
    from hwft.testing.tiny import build_tiny_vision_model

    return build_tiny_vision_model("qwen2_vl", tmp_path_factory.mktemp("tiny-vision"), tokenizer_dir)


def column(strategy: str, folder: Path, models: dict[str, Path]) -> list[dict]:
    """Every recipe under ``strategy``: the plan's runs, each with its output in ``folder/NAME``."""
    plan = []
    for name in RECIPES:
        overrides = [
            f"model.name={models.get(name, models['dense'])}",
            "train.max_steps=2",
            "train.log_every=1",
            "backend=cpu",
            f"output.dir={folder / name}",
            "output.overwrite=true",
            "output.plot=false",
            "eval.max_new_tokens=4",
            "parallel.timeout=120",
            *STRATEGIES[strategy],
        ]
        if objective_of(name) in EVALUATED:
            overrides += ["data.val_size=4", "train.eval_every=1"]
        plan.append(
            {
                "recipe": str(REPO / "configs" / f"{name}.yaml"),
                "overrides": overrides,
                "log": str(folder / f"{name}.json"),
            }
        )
    return plan


def held(name: str, folder: Path, model: Path) -> list[dict]:
    """The run of HELD[name] in ``folder`` (recipe, rows, ``out``); ZeRO-3's also resumed from
    its step-2 checkpoint with the result deleted (DeepSpeed's checkpoint resumes under the same
    strategy and processes; ddp's and fsdp2's portable one resumes in one process, in the test).
    The first run's result is set aside in ``first/`` for the resumed run to write its own."""
    tuning, overrides = HELD[name]
    path = str(recipe(folder, model, tuning))
    asks = ASKS if name == "zero3" else []
    runs = [{"recipe": path, "overrides": [*overrides, "train.save_every=2", *asks], "log": str(folder / "run.json")}]
    if name == "zero3":
        runs.append(
            {
                "recipe": path,
                "overrides": [*overrides, "train.save_every=2", "--resume"],
                "log": str(folder / "resumed.json"),
                "move": {str(folder / "out" / "model"): str(folder / "first" / "model")},
            }
        )
    return runs


def launch(plan: list[dict], folder: Path) -> None:
    """The whole plan in one 2-process torchrun launch of tests/recipe_worker.py."""
    (folder / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--standalone",
            "-m",
            "tests.recipe_worker",
            str(folder / "plan.json"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def matrix(tiny_llama, tiny_moe, tiny_vision, tmp_path_factory) -> Path:
    """The one launch, made on first use: the columns (folder ``STRATEGY/``) and the held runs
    (``held-ID/``), strategy by strategy (ddp, fsdp2, then DeepSpeed), in one folder."""
    folder = tmp_path_factory.mktemp("matrix")
    plan: list[dict] = []
    for strategy in STRATEGIES:
        for name, (_, overrides) in HELD.items():
            if overrides[0] == STRATEGIES[strategy][0]:
                (folder / f"held-{name}").mkdir()
                plan += held(name, folder / f"held-{name}", tiny_llama)
        (folder / strategy).mkdir()
        plan += column(strategy, folder / strategy, {"dense": tiny_llama, "moe": tiny_moe, "vision": tiny_vision})
    launch(plan, folder)
    return folder


def result(log: Path) -> dict:
    """A run's exit code, rank 0's stdout and stderr, and rank 1's stdout."""
    rank1 = json.loads(Path(f"{log}.rank1").read_text())
    return {**json.loads(log.read_text()), "rank1_stdout": rank1["stdout"]}


@pytest.fixture(scope="module")
def single(tiny_llama, tmp_path_factory):
    """The reference runs, one per tuning, made on first use: one process with accumulation 2
    (the same global batch as 2 ranks x 1)."""
    from hwft import cli

    runs: dict[str, Path] = {}

    def run(tuning: str) -> Path:
        if tuning not in runs:
            folder = tmp_path_factory.mktemp(f"single-{tuning}")
            path = recipe(folder, tiny_llama, tuning, train={"gradient_accumulation_steps": 2})
            assert cli.main(["train", str(path), "--quiet"]) == 0
            runs[tuning] = folder / "out"
        return runs[tuning]

    return run


def logits_of(tiny_llama: Path, out: Path):
    """Logits of the saved result on a fixed batch, loaded as a user would in one process."""
    import torch
    from transformers import AutoModelForCausalLM

    if (out / "adapter").is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out / "adapter")
    else:
        model = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = torch.arange(10, 42).reshape(2, 16)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_recipe_runs_under_the_strategy_as_written(strategy, matrix, tmp_path, cli):
    for name in RECIPES:
        run = {**json.loads((matrix / strategy / f"{name}.json").read_text()), "out": matrix / strategy / name}
        said = run["stderr"] + run["stdout"]
        refused = refusal(name, strategy)
        if refused:
            # One line, before the model (or anything else) loads, and nothing written.
            assert run["code"] == 2, (name, said[-2000:])
            assert run["stderr"].strip().splitlines() == [run["stderr"].strip()] and refused in run["stderr"], (
                name,
                run["stderr"],
            )
            assert not (run["out"] / "metrics.jsonl").exists(), name
            continue
        assert run["code"] == 0, (name, said[-3000:])
        assert f"parallel: {STRATEGIES[strategy][0].split('=')[1]} over 2 processes" in run["stderr"], name
        steps = [json.loads(line) for line in (run["out"] / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in steps if "loss" in m] == [1, 2], (name, steps)
        recipe_text = (REPO / "configs" / f"{name}.yaml").read_text()
        if "prompts:" in recipe_text:
            assert "[before training] A:" in said and "[after training] A:" in said, (name, said[-2000:])
        if objective_of(name) in EVALUATED:
            assert said.count("eval_loss") >= 2, (name, said[-2000:])
        saved = [p.name for p in run["out"].iterdir() if p.name in ("adapter", "model")]
        assert len(saved) == 1, (name, sorted(p.name for p in run["out"].iterdir()))
        if objective_of(name) == "rm" or strategy != "fsdp2":
            continue  # a reward model scores answers (test_methods); export reads what fsdp2 gathered from shards
        code, out, err = cli("export", run["out"], "--to", "hf", "--verify", "--out", tmp_path / "export" / name)
        assert code == 0 and '"ok": true' in out, (name, err[-2000:])


@pytest.mark.parametrize("name", list(HELD))
def test_strategy_matches_one_process(name, matrix, single, tiny_llama, cli):
    tuning, overrides = HELD[name]
    reference, folder = single(tuning), matrix / f"held-{name}"
    strategy = overrides[0].split("=")[1]
    done = result(folder / "run.json")
    assert done["code"] == 0, done["stderr"][-3000:]
    assert "done: results in" in done["stdout"] and "done: results in" not in done["rank1_stdout"]  # rank 0 alone
    assert f"parallel: {strategy} over 2 processes (gloo)" in done["stderr"]

    ours, theirs = read_jsonl(folder / "out" / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    print(f"{name} losses:", [round(m["loss"], 6) for m in ours])
    print("one process:  ", [round(m["loss"], 6) for m in theirs])
    assert [m["step"] for m in ours] == [1, 2, 3, 4]
    for a, b in zip(ours, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=LOSS_TOLERANCE)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    assert ours[-1]["loss"] < ours[0]["loss"]

    # The examples of each step, all ranks together, are exactly the single-process step's.
    for a, b in zip(
        read_jsonl(folder / "out" / "examples.jsonl"), read_jsonl(reference / "examples.jsonl"), strict=True
    ):
        assert Counter(a["examples"]) == Counter(b["examples"]) and len(a["examples"]) == 4, (a, b)

    # Saved from shards (or a replica), reloaded in one process: the single run's logits.
    import torch

    saved = folder / ("first" if name == "zero3" else "out")
    whole = logits_of(tiny_llama, saved)
    torch.testing.assert_close(whole, logits_of(tiny_llama, reference), atol=LOGIT_TOLERANCE, rtol=0)
    if name == "zero3":  # the gathered model's greedy answer is the saved result's, in one process
        said = done["stdout"].split("[after training] A: ")[1].splitlines()[0]
        code, out, err = cli(
            "chat",
            saved / "model",
            "--prompt",
            "Question 3?",
            "--max-new-tokens",
            "4",
            "--precision",
            "fp32",
            "--backend",
            "cpu",
        )
        assert code == 0, err
        assert said.strip() and said.strip() in out, (said, out)
        # DeepSpeed's step-2 checkpoint resumed under the same strategy and processes.
        resumed = result(folder / "resumed.json")
        assert resumed["code"] == 0, resumed["stderr"][-3000:]
        assert "(step 2 of 4" in resumed["stderr"]
        after = read_jsonl(folder / "out" / "metrics.jsonl")
        assert [m["step"] for m in after] == [1, 2, 3, 4]
        for a, b in zip(after, ours, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=LOSS_TOLERANCE)
        torch.testing.assert_close(logits_of(tiny_llama, folder / "out"), whole, atol=LOGIT_TOLERANCE, rtol=0)

    # The portable checkpoint of ddp and fsdp2 (LoRA and full) at step 2 resumes in one process
    # with the same global batch. (ZeRO-2 is the same DeepSpeed checkpoint path as ZeRO-3.)
    if name not in ("ddp", "fsdp2"):
        return
    shutil.rmtree(folder / "out" / ("adapter" if tuning == "lora" else "model"))
    from hwft.plugins import reset_host

    reset_host()
    code, out, err = cli(
        "train",
        folder / "recipe.yaml",
        "parallel.strategy=none",
        "train.gradient_accumulation_steps=2",
        "train.save_every=2",
        "--resume",
    )
    assert code == 0, err[-3000:]
    assert "(step 2 of 4" in err
    after = read_jsonl(folder / "out" / "metrics.jsonl")
    assert [m["step"] for m in after] == [1, 2, 3, 4]
    for a, b in zip(after, ours, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=LOSS_TOLERANCE)
    torch.testing.assert_close(logits_of(tiny_llama, folder / "out"), whole, atol=LOGIT_TOLERANCE, rtol=0)
