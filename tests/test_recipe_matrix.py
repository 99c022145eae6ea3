"""Every recipe in configs/ under every parallel strategy, as written: the tiny model swapped
in, two steps, two processes on this CPU (gloo), with the recipe's own prompts answered before
and after, held-out evaluation where the method has it (sft, cpt), and (under fsdp2, whose result is
gathered from shards) the result exported and verified.

A combination that cannot run is refused in one line before anything loads: qlora under
DeepSpeed (fsdp2 shards its 4-bit weights).

One torchrun launch per strategy runs the whole column (tests/recipe_worker.py), about 20-45 s
each here; tests/test_parallel.py holds each strategy's numbers to one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

#: Every training recipe in configs/ (bench.yaml is hwft bench's workload, run by tests/test_bench.py).
RECIPES = sorted(p.stem for p in (REPO / "configs").glob("*.yaml") if p.stem != "bench")
#: The strategies, each as its overrides. DeepSpeed at ZeRO-3, its sharded stage: stages 1 and 2
#: keep whole parameters as ddp does (test_parallel runs ZeRO-2).
STRATEGIES = {
    "ddp": ["parallel.strategy=ddp"],
    "fsdp2": ["parallel.strategy=fsdp2"],
    "zero3": ["parallel.strategy=deepspeed", "parallel.zero_stage=3"],
}
#: (recipe, strategy) -> the one line it is refused with; strategy None: under every strategy.
REFUSED = {("qlora", "zero3"): "method.tuning qlora with parallel.strategy deepspeed"}
#: Objectives with a held-out loss (data.val_size); the others' recipes run without one.
EVALUATED = ("sft", "cpt")


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


def column(strategy: str, folder: Path, models: dict[str, Path]) -> dict[str, dict]:
    """Every recipe under ``strategy`` in one 2-process torchrun launch -> recipe -> its run's
    exit code, stdout, stderr (rank 0's) and output folder."""
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
        timeout=600,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: {**json.loads((folder / f"{name}.json").read_text()), "out": folder / name} for name in RECIPES}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_recipe_runs_under_the_strategy_as_written(strategy, tiny_llama, tiny_moe, tmp_path, cli):
    runs = column(strategy, tmp_path, {"dense": tiny_llama, "moe": tiny_moe})
    for name, run in runs.items():
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
