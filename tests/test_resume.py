"""Checkpoints and resume (hwft.checkpoint): a run stopped at any point and resumed ends with
the same bytes as one never stopped, and its metrics continue without a gap or a duplicate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_recipe

# lora dropout on: the resumed run must also continue the RNG stream, not just the weights.
LORA = {"objective": "sft", "tuning": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1}}


def recipe_for(folder: Path, model, **train) -> Path:
    return write_recipe(
        folder,
        model,
        method=LORA,
        train={
            "max_steps": 6,
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "save_every": 2,
            "keep_checkpoints": 3,
            "lr": 2e-3,
            "log_every": 3,
            **train,
        },
        data={"train": [{"path": "train.jsonl"}], "packing": True},
    )


def adapter_bytes(run: Path) -> bytes:
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


def metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama):
    """The reference: 6 steps, never stopped, checkpoints at 2 and 4."""
    from hwft import cli as hwft_cli
    from hwft.plugins import reset_host

    folder = tmp_path_factory.mktemp("whole")
    recipe = recipe_for(folder, tiny_llama)
    reset_host()
    assert hwft_cli.main(["train", str(recipe), "--quiet"]) == 0
    return folder / "out"


def test_checkpoint_holds_everything_to_resume(uninterrupted):
    ckpt = uninterrupted / "checkpoints" / "step-4"
    names = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()}
    assert {
        "manifest.json",
        "trainer_state.json",
        "recipe.yaml",
        "optimizer.safetensors",
        "optimizer.json",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
    } <= names
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["schema"] == "hwft.checkpoint/1" and state["step"] == 4 and state["engine"] == "torch"
    assert state["data"]["micro_batches"] == 8  # 4 steps x 2 micro-batches
    assert len(state["log"]["losses"]) == 1  # step 4's loss, logged with 5 and 6 at step 6
    assert set(state["rng"][0]) == {"host", "engine"} and state["scheduler"]["last_epoch"] == 4
    assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir()) == ["step-2", "step-4"]


def test_resume_from_each_checkpoint_ends_bitwise_equal(tmp_path, uninterrupted, cli):
    """Resume from step 2 (mid log interval) and step 4: same adapter bytes, same metric lines."""
    for step in (2, 4):
        run = tmp_path / f"from-{step}"
        shutil.copytree(uninterrupted.parent, run)
        out = run / "out"
        for later in out.glob("checkpoints/step-*"):
            if int(later.name.split("-")[1]) > step:
                shutil.rmtree(later)
        (out / "adapter").rename(out / "adapter-before")
        # The copied recipe names the reference run's output folder: point it here.
        code, _, err = cli("train", run / "recipe.yaml", f"output.dir={out}", "--resume")
        assert code == 0, err
        assert f"resumed from {out / 'checkpoints' / f'step-{step}'}" in err
        assert adapter_bytes(out) == adapter_bytes(uninterrupted)
        assert metric_steps(out) == [3, 6]
        assert losses(out) == losses(uninterrupted)


# ---------------------------------------------------------------------------- killed for real

LONG = {"max_steps": 12, "save_every": 3, "log_every": 1, "keep_checkpoints": 2}


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory, tiny_llama):
    from hwft import cli as hwft_cli
    from hwft.plugins import reset_host

    folder = tmp_path_factory.mktemp("long")
    reset_host()
    assert hwft_cli.main(["train", str(recipe_for(folder, tiny_llama, **LONG)), "--quiet"]) == 0
    return folder / "out"


def start_run(recipe: Path) -> subprocess.Popen:
    env = dict(os.environ)  # the same threads as this process: the same reduction order
    return subprocess.Popen(
        [sys.executable, "-m", "hwft", "train", str(recipe)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be stopped: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run never reached the point to stop it")
        time.sleep(0.001)


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def resume_and_compare(cli, recipe: Path, out: Path, reference: Path) -> str:
    code, _, err = cli("train", recipe, "--resume")
    assert code == 0, err
    assert adapter_bytes(out) == adapter_bytes(reference)
    assert metric_steps(out) == list(range(1, 13))  # no gap, no duplicate
    assert losses(out) == losses(reference)
    assert not list((out / "checkpoints").glob(".step-*"))  # half-written folders cleared
    return err


def test_sigkill_between_checkpoints_then_resume(tmp_path, tiny_llama, long_reference, cli):
    import random

    at = random.Random().randint(4, 10)  # any step: the promise holds wherever the kill lands
    recipe = recipe_for(tmp_path, tiny_llama, **LONG)
    proc = start_run(recipe)
    wait_until(proc, lambda: logged_steps(tmp_path / "out") >= at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = logged_steps(tmp_path / "out")
    err = resume_and_compare(cli, recipe, tmp_path / "out", long_reference)
    # the newest complete checkpoint: the one at the last multiple of 3 logged, or the one before
    # it when the kill landed between a step's metrics line and the end of its checkpoint
    newest = killed_after // 3 * 3
    assert killed_after >= 12 or any(f"(step {s} of 12" in err for s in (newest, newest - 3)), (killed_after, err)


def test_sigkill_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, tiny_llama, long_reference, cli):
    recipe = recipe_for(tmp_path, tiny_llama, **LONG)
    out = tmp_path / "out"
    proc = start_run(recipe)
    # Step 3's checkpoint is done; kill while step 6's is being written (its temporary folder).
    wait_until(
        proc,
        lambda: (
            (out / "checkpoints" / "step-3" / "manifest.json").exists()
            and any((out / "checkpoints").glob(".step-6-tmp-*"))
        ),
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "step-6" / "manifest.json").exists() or pytest.skip(
        "the write finished before the kill landed"
    )
    err = resume_and_compare(cli, recipe, out, long_reference)
    assert "(step 3 of 12" in err


def test_sigterm_checkpoints_and_stops_then_resumes(tmp_path, tiny_llama, long_reference, cli):
    recipe = recipe_for(tmp_path, tiny_llama, **LONG)
    out = tmp_path / "out"
    proc = start_run(recipe)
    wait_until(proc, lambda: logged_steps(out) >= 4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = logged_steps(out)
    assert f"stopped by SIGTERM after step {stopped}; checkpoint {out / 'checkpoints' / f'step-{stopped}'}" in err
    assert "--resume" in err and "Traceback" not in err
    assert (out / "checkpoints" / f"step-{stopped}" / "manifest.json").exists()
    err = resume_and_compare(cli, recipe, out, long_reference)
    assert f"(step {stopped} of 12" in err


# ---------------------------------------------------------------------------- refusals


def copy_run(reference: Path, folder: Path) -> tuple[Path, Path]:
    shutil.copytree(reference.parent, folder)
    return folder / "recipe.yaml", folder / "out"


@pytest.mark.parametrize(
    "override,named",
    [
        ("train.lr=1e-3", "train.lr (0.002 -> 0.001)"),
        ("method.lora.r=4", "method.lora.r (8 -> 4)"),
        ("train.max_steps=8", "train.max_steps (6 -> 8)"),
    ],
)
def test_resume_refuses_a_recipe_that_changes_the_result(tmp_path, uninterrupted, cli, override, named):
    recipe, out = copy_run(uninterrupted, tmp_path / "run")
    before = adapter_bytes(out)
    code, _, err = cli("train", recipe, f"output.dir={out}", override, "--resume")
    assert code == 2 and named in err and "keys that change the result" in err, err
    assert adapter_bytes(out) == before and metric_steps(out) == [3, 6]  # nothing lost


def test_resume_accepts_settings_that_do_not_change_the_result(tmp_path, uninterrupted, cli):
    recipe, out = copy_run(uninterrupted, tmp_path / "run")
    code, stdout, err = cli(
        "train", recipe, f"output.dir={out}", "train.keep_checkpoints=1", "train.log_every=2", "--resume", "--dry-run"
    )
    assert code == 0 and "resumes" in stdout and "step-4 at step 4" in stdout, err


def test_resume_refuses_edited_data_and_another_global_batch(tmp_path, uninterrupted, cli):
    recipe, out = copy_run(uninterrupted, tmp_path / "run")
    code, _, err = cli("train", recipe, f"output.dir={out}", "train.gradient_accumulation_steps=1", "--resume")
    assert code == 2 and "1 processes x 2 accumulation" in err and "this run has 1 x 1" in err, err
    data = tmp_path / "run" / "train.jsonl"
    data.write_text(data.read_text() + data.read_text().splitlines(keepends=True)[0])
    code, _, err = cli("train", recipe, f"output.dir={out}", "--resume")
    assert code == 2 and "train.jsonl is not what step-4 was trained on" in err, err


def test_resume_without_a_checkpoint_says_how_to_get_one(tmp_path, tiny_llama, cli):
    recipe = recipe_for(tmp_path, tiny_llama)
    code, _, err = cli("train", recipe, "--resume")
    assert code == 2 and "has no complete checkpoint" in err and "train.save_every" in err, err
    code, _, err = cli("train", recipe, "--resume", tmp_path / "nowhere")
    assert code == 2 and "no such folder" in err, err


# ---------------------------------------------------------------------------- unsafe checkpoints


def test_a_checkpoint_hwft_did_not_write_is_never_loaded(tmp_path, uninterrupted, cli):
    """A pickle planted beside the weights, a file changed after saving (a pickled payload in
    DeepSpeed's place, say), a folder without a manifest: each is refused before loading."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    cases = {
        "planted": lambda c: (c / "adapter" / "extra.pt").write_bytes(pickle.dumps(Payload())),
        "changed": lambda c: (c / "optimizer.safetensors").write_bytes(pickle.dumps(Payload())),
        "unsigned": lambda c: (c / "manifest.json").unlink(),
    }
    for name, tamper in cases.items():
        recipe, out = copy_run(uninterrupted, tmp_path / name)
        checkpoint = out / "checkpoints" / "step-4"
        tamper(checkpoint)
        code, _, err = cli("train", recipe, f"output.dir={out}", "--resume", checkpoint)
        assert code == 2, err
        expected = {
            "planted": "adapter/extra.pt is not in the checkpoint's manifest",
            "changed": "optimizer.safetensors differs from what hwft wrote",
            "unsigned": "has no manifest.json",
        }[name]
        assert expected in err, err
    assert not (tmp_path / "pwned").exists()


def test_a_checkpoint_cut_short_names_the_one_before(tmp_path, uninterrupted, cli):
    """The newest checkpoint's optimizer state cut short (an interrupted copy of the run
    folder): --resume refuses it in one line and names the intact checkpoint before it."""
    recipe, out = copy_run(uninterrupted, tmp_path / "run")
    state = out / "checkpoints" / "step-4" / "optimizer.safetensors"
    size = state.stat().st_size
    state.write_bytes(state.read_bytes()[: size // 2])
    code, _, err = cli("train", recipe, f"output.dir={out}", "--resume")
    assert code == 2 and "Traceback" not in err, err
    assert f"optimizer.safetensors differs from what hwft wrote: {size // 2} of its {size} bytes (cut short" in err, err
    assert f"Resume from the one before: --resume {out / 'checkpoints' / 'step-2'}" in err, err


# ---------------------------------------------------------------------------- NaN and memory


def test_nonfinite_steps_are_skipped_then_the_run_stops_naming_the_step(tmp_path, tiny_llama, cli):
    """A learning rate of 1e30 makes the gradient NaN from step 2: one skipped step is allowed
    (nonfinite_limit 1), the second stops the run; the checkpoints written stay."""
    recipe = write_recipe(
        tmp_path,
        tiny_llama,
        method={"objective": "sft", "tuning": "full"},
        train={
            "max_steps": 6,
            "lr": 1e30,
            "optimizer": "sgd",
            "max_grad_norm": None,
            "save_every": 1,
            "nonfinite_limit": 1,
            "micro_batch_size": 2,
        },
    )
    code, _, err = cli("train", recipe)
    out = tmp_path / "out"
    assert code == 1, err
    assert "step 2: non-finite" in err and "update skipped (1 of at most 1)" in err
    assert "step 3: non-finite" in err and "more than train.nonfinite_limit=1" in err
    assert f"the last checkpoint, {out / 'checkpoints' / 'step-2'}, is kept" in err
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3] and lines[1]["grad_norm"] is None  # JSON null, not NaN
    assert (out / "checkpoints" / "step-2" / "manifest.json").exists() and not (out / "model").exists()


#: Run ``hwft`` under an address-space limit 4 GiB above what torch and transformers take once
#: imported: on CPU the kernel kills a process that exhausts memory, under RLIMIT_AS torch's
#: allocator raises instead, which hwft turns into its message.
UNDER_LIMIT = """
import resource, sys
import torch, transformers, peft
from hwft import cli
size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
limit = size + 4 * 2**30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_out_of_memory_names_the_step_and_what_would_use_less(tmp_path, tiny_llama):
    from tests.conftest import write_jsonl

    words = " ".join(["word"] * 2500)
    write_jsonl(
        tmp_path / "long.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": words}]}] * 16,
    )
    # Full-vocabulary fp32 logits of 16 x 2048 tokens: 6 GiB, and twice that for the softmax.
    recipe = write_recipe(
        tmp_path,
        tiny_llama,
        train={"max_steps": 2, "micro_batch_size": 16, "max_length": 2048},
        kernels={"fused_cross_entropy": False, "attention": "eager"},
        data={"train": [{"path": "long.jsonl"}], "packing": False},
    )
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-c", UNDER_LIMIT, "train", str(recipe)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "hwft: error: out of memory on cpu at step 1; to use less: train.micro_batch_size 16 -> 8" in done.stderr
    assert "train.max_length 2048 -> 1024" in done.stderr and "activation_checkpointing: true" in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------- every engine and objective

PROMPTS = [{"prompt": f"What is {i} + {i}?", "reference": str(2 * i)} for i in range(1, 5)]
PAIRS = [
    {"prompt": f"Say {w}.", "chosen": f"{w.title()}!", "rejected": f"No, I will not say {w}."}
    for w in ("hi", "yes", "ok", "thanks")
]


def method_recipe(folder: Path, model, case: str) -> Path:
    from tests.conftest import write_jsonl

    train = {
        "max_steps": 4,
        "save_every": 2,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "lr": 5e-3,
        "log_every": 1,
    }
    lora = {"r": 8, "alpha": 16, "dropout": 0.1}
    if case == "mlx-sft":
        return write_recipe(
            folder, model, backend="mlx", method={"objective": "sft", "tuning": "lora", "lora": lora}, train=train
        )
    if case == "dpo":
        write_jsonl(folder / "pairs.jsonl", PAIRS)
        return write_recipe(
            folder,
            model,
            data={"train": [{"path": "pairs.jsonl"}]},
            train=train,
            method={"objective": "dpo", "tuning": "lora", "lora": lora},
        )
    write_jsonl(folder / "prompts.jsonl", PROMPTS)  # grpo, ppo: each rollout batch serves 2 steps
    if case.endswith("ppo"):  # the value head, ppo's extra module, is in every checkpoint
        ppo = {
            "max_new_tokens": 6,
            "num_iterations": 2,
            "rewards": [{"name": "length_penalty", "args": {"target": 2, "limit": 6}}],
        }
        mlx = case.startswith("mlx")
        method = {"objective": "ppo", "tuning": "lora" if mlx else "full", "lora": lora, "ppo": ppo}
        return write_recipe(
            folder,
            model,
            backend="mlx" if mlx else "cpu",
            data={"train": [{"path": "prompts.jsonl"}]},
            train=train,
            method=method,
        )
    grpo = {
        "num_generations": 4,
        "max_new_tokens": 6,
        "beta": 0.04,
        "num_iterations": 2,
        "rewards": [{"name": "length_penalty", "args": {"target": 2, "limit": 6}}],
    }
    return write_recipe(
        folder,
        model,
        data={"train": [{"path": "prompts.jsonl"}]},
        train=train,
        method={"objective": "grpo", "tuning": "lora", "lora": lora, "grpo": grpo},
    )


@pytest.mark.parametrize("case", ["mlx-sft", "dpo", "grpo", "ppo", "mlx-ppo"])
def test_resume_is_exact_for_each_engine_and_objective(tmp_path, tiny_llama, cli, case):
    if case.startswith("mlx"):
        pytest.importorskip("mlx.core")
    whole = tmp_path / "whole"
    whole.mkdir()
    code, _, err = cli("train", method_recipe(whole, tiny_llama, case))
    assert code == 0, err
    recipe, out = copy_run(whole / "out", tmp_path / "again")
    shutil.rmtree(out / ("model" if case == "ppo" else "adapter"))
    code, _, err = cli("train", recipe, f"output.dir={out}", "--resume", out / "checkpoints" / "step-2")
    assert code == 0 and "(step 2 of 4" in err, err
    result = "model" if case == "ppo" else "adapter"
    for name in ("adapter_model.safetensors", "model.safetensors", "value_head.safetensors"):
        if (whole / "out" / result / name).exists():
            assert (out / result / name).read_bytes() == (whole / "out" / result / name).read_bytes(), name
    assert losses(out) == losses(whole / "out") and metric_steps(out) == [1, 2, 3, 4]
    if case == "grpo":  # rollouts of steps 1 and 3, each written once
        steps = [json.loads(x)["step"] for x in (out / "rollouts.jsonl").read_text().splitlines()]
        assert sorted(set(steps)) == [1, 3] and steps.count(3) == steps.count(1)


def test_a_run_of_a_model_folder_named_relatively_resumes_from_either_recipe(tiny_llama, tmp_path, cli):
    """model.name a folder relative to the recipe (``../tiny``): the checkpoint's copy of the
    recipe names the folder the resolver found, as the run folder's copy does, so both the run
    folder's recipe.yaml and the original recipe resume the run."""
    import yaml

    shutil.copytree(tiny_llama, tmp_path / "tiny")
    (tmp_path / "recipes").mkdir()
    path = write_recipe(tmp_path / "recipes", "../tiny", train={"max_steps": 4, "save_every": 2})
    assert cli("train", path, "--quiet")[0] == 0
    out = tmp_path / "recipes" / "out"
    for copy in (out / "recipe.yaml", out / "checkpoints" / "step-2" / "recipe.yaml"):
        assert yaml.safe_load(copy.read_text())["model"]["name"] == str((tmp_path / "tiny").resolve()), copy
    for recipe in (out / "recipe.yaml", path):
        shutil.rmtree(out / "checkpoints" / "step-4", ignore_errors=True)
        code, _, err = cli("train", recipe, "--resume")
        assert code == 0, err
        assert f"resumed from {out / 'checkpoints' / 'step-2'}" in err, err
