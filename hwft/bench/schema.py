"""The result of one benchmark arm: one JSON file, schema ``hwft.bench/1``.

Versioned: a new field may be added within ``/1``; renaming or changing one makes ``/2``.
``hwft bench schema`` prints the JSON Schema generated from these models (field descriptions
included); the README lists the fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA = "hwft.bench/1"


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Step(Record):
    step: int = Field(description="Optimizer step, from 1.")
    seconds: float = Field(description="Wall time of the step (forward, backward, optimizer), synchronised.")
    tokens: int = Field(description="Non-padding tokens the step computed.")
    trained: int = Field(description="Tokens a loss was taken on.")
    attended: int = Field(default=0, description="Causal attention pairs, sum of L(L+1)/2 over sequences.")
    computed: int | None = Field(default=None, description="Tokens computed including padding (baseline arm).")
    loss: float | None = Field(default=None, description="The step's training loss.")
    examples: list[int] = Field(default_factory=list, description="Indices of the sequences trained on.")


class Arm(Record):
    kind: Literal["hwft", "baseline-hf", "baseline-hf-liger"] = Field(
        description="hwft's engine, or the transformers Trainer baseline (hf-liger: with Liger's kernels)."
    )
    backend: str = Field(description="Backend the arm ran on (cpu, cuda, npu, mlx, ...).")
    engine: str = Field(description="Engine of that backend (torch, mlx).")
    objective: str
    tuning: str
    dtype: str = Field(description="Compute dtype (fp32, bf16, fp16).")
    settings: dict = Field(
        default_factory=dict, description="The baseline's fixed arguments; hwft's kernels and batching."
    )


class Workload(Record):
    hash: str = Field(description="Hash of the workload (see hwft.bench.fingerprint); results compare only when equal.")
    recipe: str = Field(description="The recipe file as given.")
    model: str = Field(description="Model alias or config digest.")
    steps: int = Field(
        description="Timed steps (after warmup); for the baseline, the steps its pass took beyond warmup."
    )
    warmup: int = Field(description="Steps run before timing starts.")
    eval_examples: int = Field(description="Held-out examples the eval loss is measured on.")
    train_sequences: int = Field(description="Sequences trained on over all steps (with repeats).")


class Metrics(Record):
    tokens_per_second: float = Field(description="Non-padding tokens per second over the timed steps.")
    label_tokens_per_second: float = Field(description="Tokens a loss was taken on, per second, over the timed steps.")
    step_time_median_s: float
    step_time_p90_s: float
    peak_memory_bytes: int | None = Field(description="Device memory high-water mark, or process peak RSS on the CPU.")
    memory_kind: Literal["device", "process-rss"]
    loss_last_step: float | None
    eval_loss: float | None = Field(
        description="Mean loss per label token on the held-out examples, fp32, after training."
    )
    tokens_total: int = Field(description="Non-padding tokens over all steps, warmup included.")
    label_tokens_total: int
    padding_fraction: float | None = Field(description="Share of computed tokens that were padding (when known).")
    model_flops_per_second: float | None = Field(
        description="Counted FLOPs (hwft.bench.flops) per second, timed steps."
    )
    peak_flops: float | None = Field(description="The device's peak FLOP/s in the compute dtype.")
    peak_source: str | None = Field(description="Spec sheet, or the measured matmul probe.")
    mfu: float | None = Field(description="model_flops_per_second / peak_flops.")
    measured_peak_flops: float | None = Field(
        default=None,
        description="The device's matmul FLOP/s in the compute dtype as measured on it (a square matmul, "
        "best of 4), beside a spec sheet's peak_flops.",
    )
    mfu_of_measured: float | None = Field(default=None, description="model_flops_per_second / measured_peak_flops.")


class Comparison(Record):
    baseline: str = Field(description="File name of the baseline result.")
    baseline_dtype: str
    baseline_kind: str = Field(
        default="baseline-hf", description="The baseline arm's kind (baseline-hf, baseline-hf-liger)."
    )
    same_tokens: bool = Field(description="Both arms trained on exactly the same sequences (as multisets).")
    differences: list[str] = Field(description="Recipe settings that differ from the baseline's fixed arguments.")
    counts: bool = Field(description="same_tokens and no differences: the ratios count.")
    tokens_per_second_ratio: float = Field(description="hwft / baseline.")
    peak_memory_ratio: float | None = Field(description="hwft / baseline.")
    eval_loss_hwft: float | None
    eval_loss_baseline: float | None
    eval_loss_relative_difference: float | None = Field(description="(hwft - baseline) / baseline.")


class BenchResult(Record):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["hwft.bench/1"] = Field(default=SCHEMA, alias="schema")
    run_id: str = Field(description="One `hwft bench` invocation; its arms share it.")
    created: str = Field(description="UTC time, ISO 8601.")
    arm: Arm
    workload: Workload
    fingerprint: dict = Field(
        description="hwft, backend, device, device_count, devices, runtime, cpu, "
        "cpu_cores, memory_gb, os, python, packages (versions)."
    )
    metrics: Metrics
    comparisons: list[Comparison] = Field(default_factory=list, description="hwft arm against each baseline.")
    steps: list[Step]

    def dump(self) -> str:
        return self.model_dump_json(by_alias=True, indent=1)
