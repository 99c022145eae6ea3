"""FSDP2's sharded loading (hwft_torch.sharded_loading): what each rank holds while the model
loads, measured in fresh processes, and which runs load the whole model instead. The losses of
sharded runs are held to one process in tests/test_parallel.py (fsdp2, fsdp2-qlora)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_parallel import recipe

#: Loading measured in a fresh process per rank (torchrun): the process's peak RSS while the
#: model loads and is sharded (VmHWM, reset just before) over its RSS then; its anonymous memory
#: (resident or swapped) once loaded over before; and this rank's shards.
MEASURE_LOADING = """
import json, os, sys
from hwft import train
from hwft.recipe import load_recipe
job = train.run(train.plan_run(load_recipe(sys.argv[1], sys.argv[2:])), quiet=True)
extra = job.results.extra
with open(f"loading-{os.environ['RANK']}.json", "w") as out:
    json.dump({"grew": extra["memory_load_peak_bytes"] - extra["memory_before_load_bytes"],
               "held": extra["memory_loaded_anonymous_bytes"] - extra["memory_before_load_anonymous_bytes"],
               "shard": extra.get("memory_shard_bytes")}, out)
"""
#: 12 decoder layers of 7 MiB in fp32 (hidden and MLP width 512): 84 of the model's 92 MiB.
WIDE = {
    "hidden_size": 512,
    "intermediate_size": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
#: The same 12 layers with next to no weights: what loading costs besides them (the modules'
#: Python objects, FSDP's records, code paged in), about 20 MiB.
NARROW = {**WIDE, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4}


def measure_loading(model: Path, folder: Path, tuning: str, strategy: str) -> list[dict]:
    """Each rank's loading figures for a 1-step run of ``model`` under ``strategy`` on 2 ranks."""
    folder.mkdir()
    (folder / "measure.py").write_text(MEASURE_LOADING)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--standalone",
            str(folder / "measure.py"),
            str(recipe(folder, model, tuning)),
            f"parallel.strategy={strategy}",
            "train.max_steps=1",
            "eval.prompts=[]",
            "backend=cpu",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=folder,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((folder / f"loading-{rank}.json").read_text()) for rank in range(2)]


#: bitsandbytes' CPU ``quantize_4bit`` peaks at this many times the fp32 bytes of the weight it
#: quantises, beyond the weight itself (measured on this CPU: 2.48 MiB for a 512x512 weight,
#: 9.95 for 1024x1024, 40.2 for 2048x2048).
QUANTIZE_WORKING = 2.5


def checkpoint_bytes(model: Path, tuning: str) -> tuple[int, int, int]:
    """(the model's bytes as the run holds it: fp32, or for qlora its decoder layers' linear
    weights in 4 bits; its first decoder layer's bytes in fp32; its largest quantised weight's
    fp32 bytes, 0 unless qlora)."""
    import math

    from safetensors import safe_open

    whole = layer = biggest = 0
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            fp32 = 4 * math.prod(shape)
            quantised = tuning == "qlora" and ".layers." in name and len(shape) == 2
            whole += fp32 // 8 if quantised else fp32
            layer += fp32 if ".layers.0." in name else 0
            biggest = max(biggest, fp32 if quantised else 0)
    return whole, layer, biggest


@pytest.mark.parametrize("tuning", ["lora", "qlora"])
def test_fsdp2_loads_each_rank_only_its_shards(tokenizer_dir, tmp_path, tuning):
    """fsdp2 reads each rank's shards straight from the checkpoint (hwft_torch.sharded_loading):
    while loading, no rank's memory grows by more than its shards plus one decoder layer. The
    growth of the same 12 layers with next to no weights is what loading costs besides them; a
    qlora rank also quantises one weight whole at a time, and bitsandbytes' CPU quantize_4bit
    holds 2.5 times that weight's fp32 bytes while it works (QUANTIZE_WORKING). Measured on a
    2-core EPYC: lora grew 2.8 to 2.9 MiB beyond its 47.1 MiB of shards (either rank),
    against a 7 MiB layer; qlora 4.8 to 7.1 MiB beyond its 10.7, against the layer and 2.5 MiB
    of quantising (ddp, which loads the whole model on each rank, grew about 255 MiB for the
    92 MiB model).

    The two bounds read two measures. The upper reads the peak resident size: the kernel
    reclaiming pages under another process's memory pressure can only lower it. The lower reads
    the anonymous memory held once loaded (resident or swapped, so reclaim cannot lower it): the
    shards are allocations of the process, which the peak resident size over the size before
    did not always count, when the kernel dropped file-backed pages counted before (code, the
    mapped checkpoint) while the model loaded. Once it measured 40.9 MiB for 47.1 MiB of shards
    that way."""
    from hwft.testing.tiny import build_tiny_model

    wide = build_tiny_model("llama", tmp_path / "wide", tokenizer_dir, **WIDE)
    narrow = build_tiny_model("llama", tmp_path / "narrow", tokenizer_dir, **NARROW)
    whole, layer, biggest = checkpoint_bytes(wide, tuning)
    loaded = measure_loading(wide, tmp_path / "run-wide", tuning, "fsdp2")
    bare = measure_loading(narrow, tmp_path / "run-narrow", tuning, "fsdp2")
    MiB = 2**20
    for rank, (ours, base) in enumerate(zip(loaded, bare, strict=True)):
        weights_grew, shards = ours["grew"] - base["grew"], ours["shard"] - base["shard"]
        held = ours["held"] - base["held"]
        print(
            f"{tuning} rank {rank}: grew {weights_grew / MiB:.1f} MiB at the peak and holds {held / MiB:.1f} MiB "
            f"for {shards / MiB:.1f} MiB of shards (model {whole / MiB:.1f} MiB, layer {layer / MiB:.1f} MiB)"
        )
        assert shards < 0.6 * whole  # its part of every weight, not the whole model (adapters add a few %)
        assert shards <= held  # the shards are the process's own memory
        assert weights_grew <= shards + layer + QUANTIZE_WORKING * biggest


@pytest.mark.parametrize(
    ("config", "overrides", "why"),
    [
        ("quickstart.yaml", [], None),
        ("quickstart.yaml", ["method.tuning=qlora"], None),
        ("quickstart.yaml", ["method.tuning=full"], None),  # sft keeps no reference
        (
            "quickstart.yaml",
            ["method.lora.dora=true"],
            "method.lora.dora starts each magnitude from its loaded weight's norm",
        ),
        ("dpo.yaml", [], None),  # lora: the reference is the base with its adapters off
        (
            "dpo.yaml",
            ["method.tuning=full"],
            "method.tuning full with dpo copies the loaded model as its frozen reference",
        ),
        (
            "kto.yaml",
            ["method.tuning=freeze"],
            "method.tuning freeze with kto copies the loaded model as its frozen reference",
        ),
    ],
)
def test_fsdp2_names_why_a_run_loads_the_whole_model(config, overrides, why):
    """What needs the loaded weights before they are sharded loads the whole model on each rank,
    and the log line names it (hwft_torch.sharded_loading.why_not); the rest loads shards."""
    from hwft.recipe import load_recipe
    from hwft_torch.sharded_loading import why_not

    recipe = load_recipe(REPO / "configs" / config, overrides)
    assert why_not(recipe, recipe.method.tuning) == why
