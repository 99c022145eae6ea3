"""``hwft bench``: the real CLI on a tiny model, both arms in their own processes, the results'
schema, the report, the FLOP model and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO

#: The baseline's model-defining settings, so the ratios count.
MATCHING = {"objective": "sft", "tuning": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}}


def bench_recipe(folder: Path, model: Path, **extra) -> Path:
    import yaml

    recipe = {
        "model": str(model),
        "data": {"train": [{"path": str(REPO / "configs" / "data" / "identity.jsonl")}]},
        "method": MATCHING,
        "train": {"lr": 1e-4, "max_length": 512, "micro_batch_size": 2, "precision": "fp32"},
        **extra,
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bench_run(tiny_llama, tmp_path_factory):
    """One `hwft bench --backends cpu,mlx --baseline hf` on the tiny Llama: (results folder, stdout)."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("bench")
    recipe = bench_recipe(folder, tiny_llama)
    out = folder / "results"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hwft.cli",
            "bench",
            str(recipe),
            "--steps",
            "3",
            "--warmup",
            "1",
            "--baseline",
            "hf",
            "--eval-examples",
            "8",
            "--backends",
            "cpu,mlx",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_bench_writes_one_result_per_arm_and_compares_them(bench_run):
    from hwft.bench.schema import BenchResult

    out, stdout = bench_run
    files = sorted(out.glob("*.json"))
    assert [f.name.split("-", 1)[1] for f in files] == ["baseline-hf-fp32-cpu.json", "hwft-cpu.json", "hwft-mlx.json"]
    base, hwft, mlx = (BenchResult.model_validate_json(f.read_text()) for f in files)
    assert json.loads(files[1].read_text())["schema"] == "hwft.bench/1"
    assert hwft.workload.hash == base.workload.hash and hwft.run_id == base.run_id
    assert (hwft.arm.kind, hwft.arm.dtype, base.arm.kind, base.arm.dtype) == ("hwft", "fp32", "baseline-hf", "fp32")
    # hwft ran warmup + steps; the baseline one pass over the very same sequences
    assert len(hwft.steps) == 4 and hwft.workload.steps == 3
    assert sorted(i for s in hwft.steps for i in s.examples) == sorted(i for s in base.steps for i in s.examples)
    assert hwft.metrics.tokens_total == base.metrics.tokens_total
    assert hwft.metrics.label_tokens_total == base.metrics.label_tokens_total
    (c,) = hwft.comparisons
    assert c.same_tokens and c.counts and not c.differences
    assert c.tokens_per_second_ratio == pytest.approx(hwft.metrics.tokens_per_second / base.metrics.tokens_per_second)
    for r in (hwft, base):
        m = r.metrics
        assert m.memory_kind == "process-rss" and m.peak_memory_bytes > 100e6
        assert 0 < m.mfu < 1 and m.peak_source.startswith("measured")
        assert m.measured_peak_flops == m.peak_flops and m.mfu_of_measured == m.mfu  # no spec sheet for a CPU
        assert m.step_time_median_s <= m.step_time_p90_s
        assert 0 < m.eval_loss < 15 and r.workload.eval_examples == 8
        assert r.fingerprint["backend"] == "cpu" and r.fingerprint["packages"]["torch"]
    assert base.metrics.padding_fraction > 0 and hwft.metrics.padding_fraction is None
    # the tiny model barely moves in 4 steps at lr 1e-4: both arms measure nearly the same eval loss
    assert abs(c.eval_loss_relative_difference) < 0.01
    assert "ratio counts" in stdout and "| hwft | cpu | fp32 |" in stdout


def test_the_mlx_arm_is_comparable_with_the_cpu_arm(bench_run):
    """The same workload on the MLX engine (its CPU build here): the same hash, the same
    sequences in the same steps, an MFU from its own matmul probe, and the same held-out loss
    as the torch arm to 5e-3. For the same weights the engines' losses agree to 1e-4
    (tests/test_mlx.py); but Adam's first steps move every weight by about lr whatever its
    gradient's size, so where a gradient is near zero the engines' rounding picks the sign, and
    4 steps at lr 1e-4 leave the two held-out losses about 1e-3 apart (1.5e-3 measured)."""
    from hwft.bench.schema import BenchResult

    out, stdout = bench_run
    (cpu_file,) = out.glob("*-hwft-cpu.json")
    (mlx_file,) = out.glob("*-hwft-mlx.json")
    cpu, mlx = (BenchResult.model_validate_json(f.read_text()) for f in (cpu_file, mlx_file))
    assert mlx.workload.hash == cpu.workload.hash and (mlx.arm.engine, mlx.arm.backend) == ("mlx", "mlx")
    assert [s.examples for s in mlx.steps] == [s.examples for s in cpu.steps]
    assert mlx.metrics.tokens_total == cpu.metrics.tokens_total and not mlx.comparisons
    assert 0 < mlx.metrics.mfu < 1 and "MLX" in mlx.metrics.peak_source
    assert mlx.metrics.eval_loss == pytest.approx(cpu.metrics.eval_loss, abs=5e-3)
    assert mlx.metrics.peak_memory_bytes > 0 and mlx.fingerprint["backend"] == "mlx"
    assert "| hwft | mlx | fp32 |" in stdout


def test_report_merges_results_and_refuses_different_workloads(bench_run, tmp_path, cli):
    out, _ = bench_run
    files = sorted(str(f) for f in out.glob("*.json"))
    code, stdout, err = cli("bench", "report", *files, "--out", tmp_path / "report")
    assert code == 0, err
    text = (tmp_path / "report" / "report.md").read_text()
    assert "/ cpu / hwft fp32 |" in text and "/ cpu / baseline fp32 |" in text
    assert (tmp_path / "report" / "tokens_per_second.png").stat().st_size > 1000
    assert (tmp_path / "report" / "peak_memory.png").is_file()

    other = json.loads(Path(files[0]).read_text())
    other["workload"]["hash"] = "0123456789abcdef"
    moved = tmp_path / "other.json"
    moved.write_text(json.dumps(other))
    code, _, err = cli("bench", "report", files[1], moved, "--out", tmp_path / "r2")
    assert code == 2
    assert "measure 2 different workloads" in err and "--force" in err
    code, stdout, _ = cli("bench", "report", files[1], moved, "--out", tmp_path / "r2", "--force")
    assert code == 0 and "0123456789abcdef" in stdout

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "hwft.bench/9"}))
    code, _, err = cli("bench", "report", bad)
    assert code == 2 and "not a hwft.bench/1 result" in err


def test_repeated_rounds_report_the_median_paired_ratio(bench_run, tmp_path, cli):
    """`--repeat N` pairs each hwft arm with the baseline run right after it; the report gives
    the median of the pairs' ratios and their range (three rounds stand in for a real run)."""
    out, _ = bench_run
    (hwft_file,) = out.glob("*-hwft-cpu.json")
    result = json.loads(hwft_file.read_text())
    files = []
    for k, (speed, memory) in enumerate([(1.8, 0.6), (2.4, 0.5), (2.1, 0.7)], start=1):
        result["comparisons"][0].update(tokens_per_second_ratio=speed, peak_memory_ratio=memory)
        files.append(tmp_path / f"r{k}-hwft-cpu.json")
        files[-1].write_text(json.dumps(result))
    code, stdout, err = cli("bench", "report", *files, "--out", tmp_path / "report")
    assert code == 0, err
    assert (
        f"hwft/cpu vs baseline-hf fp32, workload {result['workload']['hash']}, median of 3 paired runs: "
        "tokens/s x2.10 (range x1.80 to x2.40), peak memory x0.60 (at most x0.70)"
    ) in stdout
    assert "Over the paired runs" in (tmp_path / "report" / "report.md").read_text()


def test_model_identity_is_by_content(tmp_path):
    """Same config, other weights: another identity (so a random stand-in never shares the
    real model's workload hash); an embedded model is named by its GGUF file's digest."""
    from types import SimpleNamespace

    from hwft.bench.fingerprint import model_identity

    ids = []
    for name, weights in (("a", b"real"), ("b", b"random"), ("c", b"real")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(weights)
        ids.append(model_identity(SimpleNamespace(kind="local", name=str(folder), path=folder, source=None)))
    assert ids[0] != ids[1] and ids[0] == ids[2]
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    embedded = model_identity(SimpleNamespace(kind="embedded", name="smollm2-135m", path=tmp_path / "x", source=gguf))
    assert embedded.startswith("smollm2-135m:") and len(embedded) == len("smollm2-135m:") + 16


def test_schema_is_printed(cli):
    code, out, _ = cli("bench", "schema")
    schema = json.loads(out)
    assert code == 0 and "tokens_per_second" in json.dumps(schema) and schema["title"] == "BenchResult"


def test_flop_model_counts_no_frozen_weight_gradients():
    from hwft.bench.flops import step_flops

    dims = {"linear": 100, "adapter": 10, "head": 50, "attention": 8}
    step = {"tokens": 4, "trained": 2, "attended": 10}
    body, attention, head, adapter = 2 * 100 * 4, 4 * 8 * 10, 2 * 50 * 2, 2 * 10 * 4
    assert step_flops(step, dims, "full") == 3 * (body + attention + head)
    assert step_flops(step, dims, "lora") == 2 * (body + head) + 3 * (attention + adapter)
    assert (
        step_flops(step, dims, "lora", reference_forward=True)
        == 2 * (body + head) + 3 * (attention + adapter) + body + attention + head
    )


def test_model_dims_of_a_lora_model(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hwft_torch.bench import model_dims

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    plain = model_dims(model)
    # 2 layers of q, o (64x64), k, v (64x32), gate, up, down (64x128): the head is not the body
    assert plain["linear"] == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    assert plain["head"] == 64 * 4096 and plain["attention"] == 2 * 64 and plain["adapter"] == 0
    lora = model_dims(get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")))
    assert lora["linear"] == plain["linear"] and lora["adapter"] == lora["trainable"] > 0


@pytest.mark.parametrize(
    ("extra", "args", "message"),
    [
        (
            {"method": {**MATCHING, "objective": "dpo"}, "data": {"train": ["pairs.jsonl"]}},
            ["--baseline", "hf"],
            "--baseline trains sft or cpt; this recipe's objective is dpo",
        ),
        ({}, ["--baseline", "hf,hf-liger"], "--baseline hf-liger runs Liger's Triton kernels, on CUDA and ROCm only"),
        ({}, ["--baseline", "trl"], "--baseline trl: unknown baseline (known: hf, hf-liger)"),
        ({}, ["--backends", "cuda"], "backend 'cuda' is not available here"),
        (
            {"data": {"train": ["x.jsonl"], "streaming": True}, "train": {"max_steps": 2}},
            [],
            "hwft bench reads the data into memory; remove data.streaming",
        ),
        ({}, ["--steps", "0"], "--steps must be at least 1"),
        ({}, ["--repeat", "0"], "--repeat must be at least 1"),
    ],
)
def test_bench_refuses_before_any_arm_runs(tiny_llama, tmp_path, cli, extra, args, message):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) + "\n")
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    recipe = bench_recipe(tmp_path, tiny_llama, **extra)
    code, _, err = cli("bench", recipe, *args, "--out", tmp_path / "res")
    assert code == 2, err
    assert message in err
    assert not list((tmp_path).glob("res/*.json"))


def test_mfu_is_shown_against_the_measured_matmul_rate_too_where_the_peak_is_a_spec_sheet_s():
    from hwft.bench.schema import Metrics
    from hwft.bench.summary import mfu_text

    common = dict(
        tokens_per_second=1.0,
        label_tokens_per_second=1.0,
        step_time_median_s=1.0,
        step_time_p90_s=1.0,
        peak_memory_bytes=None,
        memory_kind="device",
        loss_last_step=None,
        eval_loss=None,
        tokens_total=1,
        label_tokens_total=1,
        padding_fraction=None,
        model_flops_per_second=4.5e14,
    )
    h200 = Metrics(
        **common,
        peak_flops=989e12,
        peak_source="spec sheet (H200, bf16, dense)",
        mfu=4.5e14 / 989e12,
        measured_peak_flops=7.9e14,
        mfu_of_measured=4.5e14 / 7.9e14,
    )
    assert mfu_text(h200) == "45.5% (57.0% of measured)"
    cpu = Metrics(
        **common, peak_flops=1e15, peak_source="measured", mfu=0.45, measured_peak_flops=1e15, mfu_of_measured=0.45
    )
    assert mfu_text(cpu) == "45.0%"


def test_baseline_differences_name_each_setting():
    from hwft.bench.runner import baseline_differences
    from hwft.recipe import Recipe

    recipe = Recipe.model_validate(
        {"data": "x.jsonl", "method": {"lora": {"r": 8, "alpha": 32}}, "train": {"lr": 2e-4, "max_length": 512}}
    )
    assert baseline_differences(recipe) == ["method.lora.r 8 (baseline 16)", "train.lr 0.0002 (baseline 1e-4)"]


def test_the_board_compares_results_of_several_machines(bench_run, tmp_path):
    """hwft board's Compare page: every result file in the workspace, whichever machine wrote it
    (here the same results, and a copy as another machine's), in one table and one chart."""
    import shutil

    from starlette.testclient import TestClient

    from hwft.board.app import make_app
    from hwft.board.workspace import Workspace

    out, _ = bench_run
    shutil.copytree(out, tmp_path / "bench-results")
    mine = json.loads((tmp_path / "bench-results" / sorted(p.name for p in out.glob("*-hwft-cpu.json"))[0]).read_text())
    mine["fingerprint"]["device"] = "Other Machine CPU"
    (tmp_path / "from-elsewhere").mkdir()
    (tmp_path / "from-elsewhere" / "hwft-cpu.json").write_text(json.dumps(mine))
    client = TestClient(make_app(Workspace(tmp_path)), base_url="http://127.0.0.1:7860")
    rows = client.get("/api/bench").json()["results"]
    labels = [r["label"] for r in rows]
    assert len(rows) == 4 and "Other Machine CPU / cpu / hwft fp32" in labels
    assert sum("/ cpu / baseline fp32" in label for label in labels) == 1
    assert all(r["tokens_per_second"] > 0 and r["hash"] == rows[0]["hash"] for r in rows)
    chart = client.get("/api/bench/chart.svg")
    assert chart.headers["content-type"].startswith("image/svg+xml") and "Other Machine CPU" in chart.text
