"""Scale-out launched as a user launches it: the real ``hwft train --nproc 2`` (torchrun's
machinery, gloo on this CPU), two "machines", srun's tasks, sequence parallelism, GRPO's and
PPO's statistics over every rank, a rank dying, SIGTERM to the launcher, and MLX's ddp held to
one process.

The promise: 2 processes x ``gradient_accumulation_steps: 1`` train exactly the optimizer steps
one process trains with accumulation 2 — the same examples in each step and the same loss
curve (tolerance 1e-4 on losses near 10: only the order of floating-point sums differs) — and
the result saved from shards reloads in one process with the same logits (1e-3). Each torch
strategy (ddp, fsdp2, DeepSpeed ZeRO 2/3) is held to it in tests/test_recipe_matrix.py, inside
the matrix's one launch; the helpers here (ROWS, recipe) make its runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import foreign_lines, write_jsonl, write_recipe

#: 16 chat examples of different lengths: 4 optimizer steps of 2 micro-batches of 2 rows (one
#: micro-batch on each rank, or two accumulated in one process).
ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": f"Answer number {i} is {'x' * (i % 5)}."},
        ]
    }
    for i in range(16)
]
LR = {"lora": 1e-2, "qlora": 1e-2, "full": 3e-3}
LOSS_TOLERANCE = 1e-4
LOGIT_TOLERANCE = 1e-3


def recipe(folder: Path, model: Path, tuning: str, **sections) -> Path:
    write_jsonl(folder / "rows.jsonl", ROWS)
    train = {
        "lr": LR[tuning],
        "max_steps": 4,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_length": 64,
        "precision": "fp32",
        "seed": 3,
        "scheduler": "constant",
        "log_every": 1,
    }
    train.update(sections.pop("train", {}))
    return write_recipe(
        folder,
        model,
        data={"train": [{"path": "rows.jsonl"}]},
        method={"objective": "sft", "tuning": tuning, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        train=train,
        output={"dir": str(folder / "out"), "log_examples": True, "plot": False},
        **sections,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def launch(recipe_path: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``hwft train RECIPE --nproc 2 ARGS`` in a subprocess, as a user types it. Its log holds
    hwft's lines only: not torchrun's banner, not the deprecation warnings torch gives DeepSpeed,
    not DeepSpeed's start-up line (which transformers' save_pretrained of a full model, or
    DeepSpeed's own import, prints)."""
    done = subprocess.run(
        [sys.executable, "-m", "hwft", "train", str(recipe_path), "--nproc", "2", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=recipe_path.parent,
    )
    assert foreign_lines(done.stdout, done.stderr) == [], done.stdout + done.stderr[-3000:]
    return done


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(recipe_path: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """The multi-node path: ``hwft train RECIPE --nproc 1 --nnodes 2 --node-rank R`` for R = 0
    and 1, as two machines would run it (torchrun's static rendezvous at --master-addr and
    --master-port), both on this host. Node 0's output; node 1 reports nothing."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "hwft",
        "train",
        str(recipe_path),
        "--nproc",
        "1",
        "--nnodes",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        *args,
    ]
    nodes = [
        subprocess.Popen(
            [*command, "--node-rank", str(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=recipe_path.parent,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=timeout) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert "done: results in" not in outputs[1][0]
    return subprocess.CompletedProcess(command, 0, *outputs[0])


def launch_as_srun(recipe_path: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Two tasks as ``srun --ntasks 2 hwft train RECIPE`` starts them: plain ``hwft train`` in
    each, its rank in SLURM_PROCID, the job's size in SLURM_STEP_NUM_TASKS, rank 0's host in
    SLURM_LAUNCH_NODE_IPADDR (configs/slurm.sbatch sets MASTER_PORT). Rank 0's output."""
    port = str(free_port())
    command = [sys.executable, "-m", "hwft", "train", str(recipe_path), *args]
    tasks = [
        subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=recipe_path.parent,
            env={
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "SLURM_PROCID": str(rank),
                "SLURM_STEP_NUM_TASKS": "2",
                "SLURM_LOCALID": str(rank),
                "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for rank in (0, 1)
    ]
    outputs = [task.communicate(timeout=timeout) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], [err[-2000:] for _, err in outputs]
    return subprocess.CompletedProcess(command, 0, *outputs[0])


@pytest.fixture(scope="module")
def one_node(tiny_llama, tmp_path_factory):
    """The reference of the several-machine runs, made on first use: ``--nproc 2`` on one node."""
    made: list[Path] = []

    def run() -> Path:
        if not made:
            folder = tmp_path_factory.mktemp("one-node")
            done = launch(recipe(folder, tiny_llama, "lora"), "parallel.strategy=ddp")
            assert done.returncode == 0, done.stderr[-3000:]
            made.append(folder)
        return made[0]

    return run


@pytest.mark.parametrize("start", [launch_two_nodes, launch_as_srun], ids=["two-nodes", "srun"])
def test_several_machines_train_as_one_machine_of_two_processes(tiny_llama, tmp_path, start, one_node):
    """Two nodes of one process each (two launchers on this host, torchrun's static rendezvous at
    --master-addr:--master-port), or two tasks as srun starts them, train the very steps one node
    of two processes trains: the same reductions in the same order, so the same losses."""
    one, two = one_node(), tmp_path / "two"
    two.mkdir()
    done = start(recipe(two, tiny_llama, "lora"), "parallel.strategy=ddp")
    assert done.stdout.count("done: results in") == 1
    assert "parallel: ddp over 2 processes (gloo)" in done.stderr
    ours, theirs = read_jsonl(two / "out" / "metrics.jsonl"), read_jsonl(one / "out" / "metrics.jsonl")
    print(f"{start.__name__}:", [m["loss"] for m in ours])
    assert [m["step"] for m in ours] == [1, 2, 3, 4]
    for a, b in zip(ours, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(
            b["grad_norm"], rel=1e-6
        )


@pytest.fixture(scope="module")
def long_rows(tokenizer_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama that reaches 4096 positions (4 heads, 2 key/value heads: both split over 2
    ranks), and 4 texts of about 2,400 tokens, cut at max_length 2048 into 8 rows."""
    import random

    from hwft.testing.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("long")
    model = build_tiny_model("llama", folder / "model", tokenizer_dir, max_position_embeddings=4096)
    random.seed(0)
    words = "the model reads long rows of text and learns what comes next in them".split()
    write_jsonl(
        folder / "long.jsonl", [{"text": " ".join(random.choice(words) for _ in range(1900))} for _ in range(4)]
    )
    return model, folder / "long.jsonl"


def test_sequence_parallelism_gives_the_unsplit_loss(long_rows, tmp_path):
    """parallel.sequence_parallel 2: each 2048-token row split over 2 ranks (DeepSpeed's Ulysses
    attention), the labels shifted before the split, global position ids, each rank's token-loss
    sum over the step's label count: the losses and gradient norms of one process training the
    whole rows (1e-5 relative; they agreed to 1e-7 here)."""
    import yaml

    model, data = long_rows
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": str(model),
                "data": {"train": [{"path": str(data), "format": "text"}], "packing": False},
                "method": {"objective": "cpt", "tuning": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
                "train": {
                    "lr": 1e-2,
                    "max_steps": 3,
                    "micro_batch_size": 1,
                    "max_length": 2048,
                    "precision": "fp32",
                    "seed": 3,
                    "log_every": 1,
                    "scheduler": "constant",
                },
                "backend": "cpu",
                "output": {"dir": str(tmp_path / "one"), "plot": False},
            }
        )
    )
    from hwft import cli

    assert cli.main(["train", str(path), "--quiet"]) == 0
    done = launch(path, "parallel.sequence_parallel=2", f"output.dir={tmp_path / 'two'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sequence parallel: each row's tokens split over 2 ranks" in done.stderr
    ours, theirs = read_jsonl(tmp_path / "two" / "metrics.jsonl"), read_jsonl(tmp_path / "one" / "metrics.jsonl")
    print("sequence parallel:", [m["loss"] for m in ours], "\none process:      ", [m["loss"] for m in theirs])
    assert [m["step"] for m in ours] == [1, 2, 3]
    for a, b in zip(ours, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_sequence_parallelism_splits_the_heads_or_says_why():
    from transformers import LlamaConfig

    from hwft.errors import RecipeError
    from hwft_torch.sequence_parallel import check_model

    check_model(LlamaConfig(num_attention_heads=4, num_key_value_heads=2), 2)
    check_model(LlamaConfig(num_attention_heads=8, num_key_value_heads=2), 4)  # kv heads replicate onto 4 ranks
    with pytest.raises(RecipeError, match="the model has 4 attention heads, which do not split over 3 ranks"):
        check_model(LlamaConfig(num_attention_heads=4, num_key_value_heads=2), 3)
    with pytest.raises(RecipeError, match="key/value heads neither split"):
        check_model(LlamaConfig(hidden_size=768, num_attention_heads=12, num_key_value_heads=4), 6)


def test_the_slurm_example_starts_hwft_train_with_srun():
    """configs/slurm.sbatch is valid bash, names rank 0's host and port, and starts plain
    ``hwft train`` with srun (the tasks launch_as_srun starts above)."""
    from tests.conftest import REPO

    script = REPO / "configs" / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "#SBATCH --nodes=" in text and "export MASTER_ADDR" in text and "export MASTER_PORT" in text
    assert 'srun --kill-on-bad-exit=1 .venv/bin/hwft train "$recipe" "$@"' in text


def test_grpo_scores_all_ranks_rollouts_together(tiny_llama, tmp_path):
    """GRPO under ddp: each rank samples its share of the prompts; rewards and advantages are
    computed over every rank's completions, and rank 0 writes them all once."""
    prompts = [{"prompt": f"What is {i} + {i}?", "reference": str(2 * i)} for i in range(1, 5)]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    path = write_recipe(
        tmp_path,
        tiny_llama,
        data={"train": [{"path": "prompts.jsonl"}]},
        method={
            "objective": "grpo",
            "tuning": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "grpo": {
                "num_generations": 4,
                "max_new_tokens": 6,
                "beta": 0.04,
                "num_iterations": 2,
                "rewards": [{"name": "length_penalty", "args": {"target": 3}}],
            },
        },
        train={
            "lr": 1e-2,
            "max_steps": 2,
            "micro_batch_size": 1,
            "max_length": 64,
            "precision": "fp32",
            "seed": 3,
            "log_every": 1,
        },
        output={"dir": str(tmp_path / "out"), "plot": False},
    )
    done = launch(path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parallel: ddp over 2 processes" in done.stderr  # strategy none with 2 processes: ddp
    rollouts = read_jsonl(tmp_path / "out" / "rollouts.jsonl")
    # 2 ranks x 1 prompt x 4 completions, one rollout batch for the 2 steps (num_iterations 2)
    assert len(rollouts) == 8 and {r["step"] for r in rollouts} == {1}
    assert len({r["prompt"] for r in rollouts}) == 2
    run = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert len(run) == 2 and "reward" in run[0] and run[1]["clip_ratio"] >= 0


def test_ppo_whitens_and_normalises_over_every_rank(tiny_llama, tmp_path):
    """PPO under ddp: each rank samples its share of the prompts; the completions are scored
    together, the advantages whitened over every rank's tokens and each loss divided by the
    step's completion tokens, so the value head and policy train as in one process; rank 0
    writes every rank's rollouts once."""
    prompts = [{"prompt": f"What is {i} + {i}?", "reference": str(2 * i)} for i in range(1, 5)]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    path = write_recipe(
        tmp_path,
        tiny_llama,
        data={"train": [{"path": "prompts.jsonl"}]},
        method={
            "objective": "ppo",
            "tuning": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "ppo": {"max_new_tokens": 6, "num_iterations": 3, "rewards": ["testing_vowels"]},
        },
        train={
            "lr": 1e-2,
            "max_steps": 3,
            "micro_batch_size": 2,
            "max_length": 64,
            "precision": "fp32",
            "seed": 3,
            "log_every": 1,
        },
        output={"dir": str(tmp_path / "out"), "plot": False},
    )
    done = launch(path)
    assert done.returncode == 0, done.stderr[-3000:]
    rollouts = read_jsonl(tmp_path / "out" / "rollouts.jsonl")
    assert len(rollouts) == 4 and {r["step"] for r in rollouts} == {1}  # 2 ranks x 2 prompts, once
    assert len({r["prompt"] for r in rollouts}) == 4
    run = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert run[0]["clip_ratio"] == 0 and run[-1]["value_loss"] < run[0]["value_loss"], run
    assert (tmp_path / "out" / "adapter" / "value_head.safetensors").is_file()


def test_whitening_over_ranks_is_whitening_over_the_whole_batch():
    """hwft.methods.ppo.whiten on two ranks' halves, their sums exchanged as the collective does,
    gives the one-process whitening."""
    import threading

    import numpy as np

    from hwft.distributed import Collective, World
    from hwft.methods.ppo import whiten

    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(3, 5)) for _ in range(4)]
    masks = [(rng.random((3, 5)) > 0.3).astype(float) for _ in range(4)]
    barrier, sums = threading.Barrier(2), {}

    class Pair(Collective):  # the sums two ranks' all_reduce gives, between two threads
        def sum(self, values):
            sums[self.world.rank] = values
            barrier.wait()
            total = [a + b for a, b in zip(sums[0], sums[1], strict=True)]
            barrier.wait()
            return total

    got = {}
    threads = [
        threading.Thread(
            target=lambda r: got.__setitem__(
                r, whiten(xs[2 * r : 2 * r + 2], masks[2 * r : 2 * r + 2], Pair(World(r, 2)))
            ),
            args=(r,),
        )
        for r in (0, 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(got[0] + got[1], whiten(xs, masks), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-12)


def _rank_pid(tag: str, rank: int, variable: str) -> int | None:
    """The pid of the training process whose ``variable`` (RANK, MLX_RANK) is ``rank``, started
    by the test tagged ``tag``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"HWFT_TEST_TAG={tag}".encode() in env and f"{variable}={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process in /proc")
def test_a_rank_dying_stops_the_run_with_a_message(tiny_llama, tmp_path):
    path = recipe(tmp_path, tiny_llama, "lora", train={"max_steps": 100000}, kernels={"compile": False})
    code, err, pid = _kill_rank_mid_run(
        [sys.executable, "-m", "hwft", "train", str(path), "--nproc", "2"], tmp_path, "RANK"
    )
    assert code == 1
    assert f"rank 1 (pid {pid}) killed by SIGKILL" in err
    # rank 0 is either stopped by torchrun or fails first in the broken collective: a race, and
    # both are named (a clean clone run met the second)
    assert "torchrun stopped the other 1" in err or "rank 0 (pid" in err


def _kill_rank_mid_run(cmd: list[str], tmp_path: Path, rank_variable: str) -> tuple[int, str, int]:
    """Start ``cmd``, SIGKILL rank 1 once step 2 is logged; (exit code, stderr, killed pid)."""
    tag = f"dying-{os.getpid()}-{rank_variable}"
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HWFT_TEST_TAG": tag},
        cwd=tmp_path,
    )
    metrics_file = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    pid = _rank_pid(tag, 1, rank_variable)
    assert pid is not None and proc.poll() is None, "the run did not reach step 2"
    os.kill(pid, signal.SIGKILL)  # what the kernel's OOM killer or a crashed node does
    killed = time.monotonic()
    _, err = proc.communicate(timeout=60)  # a hang would fail here
    assert time.monotonic() - killed < 30, "the surviving rank was not stopped promptly"
    assert _rank_pid(tag, 0, rank_variable) is None  # no orphan left behind
    return proc.returncode, err, pid


def launch_mlx_hostfile(recipe_path: Path) -> subprocess.CompletedProcess:
    """``mlx.launch --hostfile hosts.json --backend ring -- python -m hwft train RECIPE``, as a
    user starts MLX on several Macs, with two hosts that are both 127.0.0.1: mlx.launch runs
    them here, without ssh."""
    hosts = recipe_path.parent / "hosts.json"
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from mlx._distributed_utils.launch import main; main()",
            "--hostfile",
            str(hosts),
            "--backend",
            "ring",
            "--python",
            sys.executable,
            "--",
            "-m",
            "hwft",
            "train",
            str(recipe_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=recipe_path.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def mlx_single(tiny_llama, tmp_path_factory) -> Path:
    """The MLX reference run, made once for both launchers: one process, accumulation 2."""
    from hwft import cli

    one = tmp_path_factory.mktemp("mlx-one")
    path = recipe(one, tiny_llama, "lora", backend="mlx", train={"gradient_accumulation_steps": 2})
    assert cli.main(["train", str(path), "--quiet"]) == 0
    return one


@pytest.mark.parametrize("start", ["nproc", "hostfile"])
def test_mlx_ddp_matches_one_process(tiny_llama, tmp_path, start, mlx_single):
    """MLX data parallelism over mx.distributed's ring, started by mlx.launch (through
    ``hwft train --nproc 2``, or by the user with a hostfile): the same steps, examples and
    losses as one MLX process with twice the accumulation."""
    one = mlx_single
    two = tmp_path / "two"
    two.mkdir()
    path = recipe(two, tiny_llama, "lora", backend="mlx")
    done = launch(path) if start == "nproc" else launch_mlx_hostfile(path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parallel: ddp over 2 processes (mx.distributed ring)" in done.stderr
    ours, theirs = read_jsonl(two / "out" / "metrics.jsonl"), read_jsonl(one / "out" / "metrics.jsonl")
    print("mlx, 2 processes:", [round(m["loss"], 6) for m in ours])
    print("mlx, 1 process:  ", [round(m["loss"], 6) for m in theirs])
    for a, b in zip(ours, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=LOSS_TOLERANCE)
    for a, b in zip(
        read_jsonl(two / "out" / "examples.jsonl"), read_jsonl(one / "out" / "examples.jsonl"), strict=True
    ):
        assert Counter(a["examples"]) == Counter(b["examples"])
    from safetensors.numpy import load_file

    mine, single = (load_file(d / "out" / "adapter" / "adapter_model.safetensors") for d in (two, one))
    assert mine.keys() == single.keys()
    assert max(float(abs(mine[k] - single[k]).max()) for k in mine) < 1e-4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process in /proc")
def test_an_mlx_rank_dying_stops_the_run_with_a_message(tiny_llama, tmp_path):
    path = recipe(tmp_path, tiny_llama, "lora", backend="mlx", train={"max_steps": 100000})
    code, err, _ = _kill_rank_mid_run(
        [sys.executable, "-m", "hwft", "train", str(path), "--nproc", "2"], tmp_path, "MLX_RANK"
    )
    assert code == 1
    assert "training process failed: rank 1 was killed by SIGKILL; mlx.launch stopped the others" in err


# ---------------------------------------------------------------- in-process: no launch needed


def test_world_from_each_launchers_environment(tmp_path):
    from hwft.distributed import SINGLE, World, torch_rendezvous_env, world_from_env

    assert world_from_env({}) == SINGLE
    assert world_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == World(3, 8, 1, "torchrun")
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7",
    }
    assert world_from_env(slurm) == World(5, 8, 1, "slurm")
    assert torch_rendezvous_env(World(5, 8, 1, "slurm"), slurm) == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "29500",
    }
    # an salloc shell (one task) is not a multi-process run
    assert world_from_env({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_LOCALID": "0"}) == SINGLE
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text('[["127.0.0.1:5000"], ["127.0.0.1:5001"], ["127.0.0.1:5002"]]')
    assert world_from_env({"MLX_RANK": "2", "MLX_HOSTFILE": str(hostfile)}) == World(2, 3, 2, "mlx")
    assert World(1, 2).share(list(range(6))) == [1, 3, 5]


def test_torchrun_command_lines():
    from hwft.distributed import Launch
    from hwft_torch.launch import threads_per_rank, torchrun_args

    local = torchrun_args(Launch(nproc=4), ["train", "r.yaml"])
    assert "--standalone" in local and local[-4:] == ["-m", "hwft", "train", "r.yaml"]
    nodes = torchrun_args(Launch(8, 2, 1, "10.0.0.1", 29400), ["train", "r.yaml"])
    assert nodes[:12] == [
        "--nproc-per-node",
        "8",
        "--nnodes",
        "2",
        "--max-restarts",
        "0",
        "--monitor-interval",
        "0.5",
        "--rdzv-backend",
        "static",
        "--node-rank",
        "1",
    ]
    assert nodes[nodes.index("--master-addr") + 1] == "10.0.0.1" and "--standalone" not in nodes
    # each rank's CPU threads: the cores shared out (torchrun's default, announced, is 1)
    assert [threads_per_rank(n, cores=64) for n in (1, 2, 8, 128)] == [64, 32, 8, 1]


def test_dry_run_plans_ddp_for_several_processes(tiny_llama, tmp_path, cli):
    path = recipe(tmp_path, tiny_llama, "lora")
    code, out, err = cli("train", path, "--nproc", "2", "--dry-run")
    assert code == 0, err
    assert "2 processes (2 per node), parallel.strategy ddp" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["parallel.offload_optimizer=true"],
            "parallel.offload_optimizer needs strategy deepspeed (ZeRO-Offload), not ddp",
        ),
        (
            ["parallel.strategy=fsdp2", "parallel.offload_params=true", "method.tuning=qlora", "method.qlora.bits=8"],
            "method.tuning qlora with parallel.strategy fsdp2 (fsdp2 shards 4-bit weights, not LLM.int8's)",
        ),
        (
            ["parallel.strategy=deepspeed", "method.tuning=qlora"],
            "method.tuning qlora with parallel.strategy deepspeed (DeepSpeed does not partition",
        ),
        (["parallel.deepspeed_config=ds.json"], "parallel.deepspeed_config is set but parallel.strategy is ddp"),
        (["backend=mlx", "parallel.strategy=fsdp2"], "parallel.strategy 'fsdp2' (it has: none, ddp)"),
        (["--nnodes", "2"], "--nnodes > 1 needs --master-addr"),
        (["backend=mlx", "--nnodes", "2", "--master-addr", "10.0.0.1"], "mlx.launch --hostfile hosts.json"),
        (["parallel.sequence_parallel=2"], "parallel.sequence_parallel 2 with packed rows (not supported yet"),
        (["parallel.sequence_parallel=3", "data.packing=false"], "needs a multiple of 3 processes, not 2"),
        (
            ["parallel.sequence_parallel=2", "data.packing=false", "parallel.strategy=deepspeed"],
            "parallel.sequence_parallel 2 with parallel.strategy deepspeed",
        ),
        (["backend=mlx", "parallel.sequence_parallel=2", "data.packing=false"], "no Ulysses sequence parallelism here"),
    ],
)
def test_parallel_refusals(tiny_llama, tmp_path, cli, args, message):
    """Each refused with exit code 2 before any process starts or any weight loads."""
    path = recipe(tmp_path, tiny_llama, "lora")
    code, _, err = cli("train", path, "--nproc", "2", *args)
    assert code == 2, err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_deepspeed_config_pass_through(tmp_path):
    """An expert's DeepSpeed JSON is the base; hwft fills what it owns and refuses a contradiction."""
    from hwft.errors import RecipeError
    from hwft.recipe import load_recipe
    from hwft_torch.parallel import deepspeed_config

    (tmp_path / "ds.json").write_text(
        json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}, "train_micro_batch_size_per_gpu": "auto"})
    )
    path = recipe(tmp_path, tmp_path, "lora", parallel={"strategy": "deepspeed", "deepspeed_config": "ds.json"})
    config = deepspeed_config(load_recipe(path), 1.0)
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": True}  # the file's stage wins
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 1
    assert config["gradient_clipping"] == 1.0
    (tmp_path / "ds.json").write_text(json.dumps({"gradient_accumulation_steps": 8}))
    with pytest.raises(RecipeError, match="sets gradient_accumulation_steps=8 but the recipe means 1"):
        deepspeed_config(load_recipe(path), 1.0)


ACCELERATE_YAML = """\
compute_environment: LOCAL_MACHINE
debug: false
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  offload_optimizer_device: cpu
  offload_param_device: none
downcast_bf16: 'no'
machine_rank: 0
main_training_function: main
mixed_precision: bf16
num_machines: 1
num_processes: 4
rdzv_backend: static
same_network: true
use_cpu: false
"""


def test_an_accelerate_config_becomes_the_parallel_settings(tiny_llama, tmp_path, cli):
    """The YAML `accelerate config` writes: translated into parallel.*, train.precision and the
    process count `accelerate launch` would start; a contradiction with the recipe is refused."""
    from hwft import accelerate_config
    from hwft.recipe import load_recipe

    (tmp_path / "accelerate.yaml").write_text(ACCELERATE_YAML)
    path = recipe(
        tmp_path, tiny_llama, "lora", parallel={"accelerate_config": "accelerate.yaml"}, train={"precision": "auto"}
    )
    translated, launch = accelerate_config.apply(load_recipe(path))
    p = translated.parallel
    assert (p.strategy, p.zero_stage, p.offload_optimizer, p.offload_params) == ("deepspeed", 3, True, False)
    assert translated.train.precision == "bf16" and launch.nproc == 4 and launch.nnodes == 1
    code, out, err = cli("train", path, "--dry-run")
    assert code == 0, err
    assert "4 processes (4 per node), parallel.strategy deepspeed" in out
    code, out, _ = cli("train", path, "--dry-run", "--nproc", "2")  # the command line wins
    assert "2 processes (2 per node)" in out

    code, _, err = cli("train", path, "parallel.strategy=fsdp2")
    assert code == 2
    assert (
        "says distributed_type DEEPSPEED (parallel.strategy: 'deepspeed') but the recipe says "
        "parallel.strategy: 'fsdp2'" in err
    )
    (tmp_path / "accelerate.yaml").write_text(ACCELERATE_YAML + "dynamo_config:\n  dynamo_backend: INDUCTOR\n")
    code, _, err = cli("train", path)
    assert code == 2 and "sets dynamo_config, which hwft does not translate" in err


def test_sigterm_to_the_launcher_checkpoints_every_rank_then_stops(tiny_llama, tmp_path):
    """Preemption of a launched run: torchrun passes SIGTERM on, the ranks agree on the step,
    write one checkpoint together and stop; the launcher exits 143 without a traceback."""
    path = recipe(
        tmp_path, tiny_llama, "lora", train={"max_steps": 200, "micro_batch_size": 1}, kernels={"compile": False}
    )  # a long run would compile (auto); this test is about signals
    proc = subprocess.Popen(
        [sys.executable, "-m", "hwft", "train", str(path), "--nproc", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM after step" in err and "the ranks were asked to write a checkpoint" in err
    assert "Traceback" not in err
    (checkpoint,) = (tmp_path / "out" / "checkpoints").glob("step-*")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and (checkpoint / "manifest.json").exists()


def test_two_deepspeed_runs_in_one_process(tiny_llama, tmp_path, cli):
    """A second ZeRO-3 run in the same Python process starts afresh: DeepSpeed forgets the groups
    it cached from the first run's process group, which that run tore down (else: 'Group ... is not
    registered'); and the run leaves the rendezvous variables as it found them (else a process
    started later, an mlx.launch rank say, reads RANK=0 WORLD_SIZE=1 as its own world)."""
    from hwft_torch.parallel import RENDEZVOUS

    before = {key: os.environ.get(key) for key in RENDEZVOUS}
    for n in (1, 2):
        (tmp_path / f"run{n}").mkdir()
        path = recipe(tmp_path / f"run{n}", tiny_llama, "full", train={"max_steps": 1})
        code, _, err = cli("train", path, "parallel.strategy=deepspeed", "parallel.zero_stage=3")
        assert code == 0, err[-2000:]
        assert {key: os.environ.get(key) for key in RENDEZVOUS} == before
