"""One arm of ``hwft bench`` in its own process: ``python -m hwft.bench.worker SPEC.json``.

The spec (written by :mod:`hwft.bench.runner`) names the arm, backend, recipe, steps, warmup,
held-out size and, for the baseline, the sequences the hwft arm trained on. The worker writes
one :class:`~hwft.bench.schema.BenchResult` to ``spec["result"]``.
"""

from __future__ import annotations

import importlib
import json
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from hwft.bench.fingerprint import fingerprint
from hwft.bench.flops import step_flops
from hwft.bench.schema import Arm, BenchResult, Metrics, Step, Workload
from hwft.data.batching import make_rows
from hwft.data.chat import ChatRenderer
from hwft.data.kinds.sequences import tokenize_examples
from hwft.data.pipeline import training_batches
from hwft.errors import RunFailed
from hwft.models import load_tokenizer, materialise
from hwft.plugins import get_host
from hwft.recipe import load_recipe
from hwft.select import compile_decision
from hwft.train import Plan, plan_run, run


def bench_recipe(spec: dict, out_dir: str):
    """The recipe as the arm runs it: on the named backend, for warmup + steps steps, writing
    into a throwaway folder, showing no answers."""
    overrides = [
        *spec["overrides"],
        f"backend={spec['backend']}",
        f"output.dir={out_dir}",
        "output.overwrite=true",
        "output.plot=false",
        "eval.prompts=[]",
    ]
    if spec["steps"]:
        overrides.append(f"train.max_steps={spec['warmup'] + spec['steps']}")
    return load_recipe(spec["recipe"], overrides)


def split(plan: Plan, eval_examples: int) -> tuple[list, list]:
    """(training examples, held-out examples): data.eval when the recipe has it, else the last
    ``eval_examples`` examples of the training data, kept out of training."""
    if plan.data.eval_examples:
        return plan.data.examples, plan.data.eval_examples
    if eval_examples == 0:
        return plan.data.examples, []
    if len(plan.data.examples) <= eval_examples:
        raise SystemExit(
            f"hwft bench: {len(plan.data.examples)} examples leave none to train on after "
            f"holding out {eval_examples}; lower --eval-examples"
        )
    return plan.data.examples[:-eval_examples], plan.data.examples[-eval_examples:]


def decide_compile(plan: Plan, spec: dict, out_dir: str) -> Plan:
    """kernels.compile null, decided for the recipe's whole run rather than the bench's few steps:
    the bench measures the steady state of the run `hwft train` would do (which compiles when
    the run is long enough, hwft.select.compile_decision)."""
    model_path = materialise(plan.model, log=lambda m: None)
    tokenizer = load_tokenizer(model_path, plan.recipe.model.trust_remote_code)
    whole = plan.recipe.model_copy(update={"train": plan.recipe.train.model_copy(update={"max_steps": None})})
    steps = training_batches(
        plan.data, ChatRenderer.for_recipe(whole, tokenizer), whole, plan.choice.capability, 1
    ).steps
    on, why = compile_decision(None, plan.choice.capability.compile, plan.choice.backend.accelerator, steps)
    print(
        f"hwft bench: kernels.compile null: {'on' if on else 'off'} as in the whole run ({why})",
        file=sys.stderr,
        flush=True,
    )
    if not on:
        return plan
    examples = plan.data.examples
    plan = plan_run(bench_recipe({**spec, "overrides": [*spec["overrides"], "kernels.compile=true"]}, out_dir))
    plan.data.examples, plan.data.eval_examples = examples, []
    return plan


def bench_tools(backend):
    """The module of the backend's bench tools (``Backend.bench``): model_dims, peak_flops,
    held_out_loss, memory_kind (and the torch engine's Trainer baseline); for a backend that
    names none (a 1.0 plugin), another backend's on the same engine; None if there is none."""
    path = backend.bench or next(
        (b.bench for b in get_host().backends.values() if b.engine == backend.engine and b.bench), None
    )
    return importlib.import_module(path) if path else None


def metrics(
    steps: list[dict],
    warmup: int,
    peak_memory: int | None,
    memory_kind: Literal["device", "process-rss"],
    eval_loss,
    dims: dict | None,
    tuning: str,
    reference_forward: bool,
    peak: tuple | None,
    measured: float | None = None,
) -> Metrics:
    timed = steps[warmup:]
    if not timed:
        raise SystemExit(
            f"hwft bench: {len(steps)} steps ran, none after {warmup} warmup steps; lower --warmup or raise --steps"
        )
    seconds = sum(s["seconds"] for s in timed)
    times = sorted(s["seconds"] for s in timed)
    computed = [c for s in steps if (c := s.get("computed")) is not None]
    padding = None
    if len(computed) == len(steps):
        padding = 1 - sum(s["tokens"] for s in steps) / sum(computed)
    flops_per_second = None
    if dims:
        flops_per_second = sum(step_flops(s, dims, tuning, reference_forward) for s in timed) / seconds
    peak_value, peak_source = peak if peak else (None, None)
    return Metrics(
        tokens_per_second=sum(s["tokens"] for s in timed) / seconds,
        label_tokens_per_second=sum(s["trained"] for s in timed) / seconds,
        step_time_median_s=statistics.median(times),
        step_time_p90_s=times[min(len(times) - 1, round(0.9 * (len(times) - 1)))],
        peak_memory_bytes=peak_memory,
        memory_kind=memory_kind,
        loss_last_step=steps[-1].get("loss"),
        eval_loss=eval_loss,
        tokens_total=sum(s["tokens"] for s in steps),
        label_tokens_total=sum(s["trained"] for s in steps),
        padding_fraction=padding,
        model_flops_per_second=flops_per_second,
        peak_flops=peak_value,
        peak_source=peak_source,
        mfu=flops_per_second / peak_value if flops_per_second and peak_value else None,
        measured_peak_flops=measured,
        mfu_of_measured=flops_per_second / measured if flops_per_second and measured else None,
    )


def rows_of(examples: list, recipe, model_path: Path):
    tokenizer = load_tokenizer(model_path, recipe.model.trust_remote_code)
    renderer = ChatRenderer.for_recipe(recipe, tokenizer)
    tokenized, _ = tokenize_examples(examples, renderer, recipe.train.max_length)
    return tokenizer, make_rows(tokenized, recipe.train.max_length, packing=False)


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    host = get_host()
    backend = host.backend(spec["backend"])
    tools = bench_tools(backend)
    with tempfile.TemporaryDirectory(prefix="hwft-bench-") as tmp:
        recipe = bench_recipe(spec, tmp)
        plan = plan_run(recipe)
        train_examples, eval_examples = split(plan, spec["eval_examples"])
        m = recipe.method
        reference_forward = host.methods().get(m.objective).runs_reference(recipe)
        if spec["arm"] == "hwft":
            plan.data.examples, plan.data.eval_examples = train_examples, []
            if recipe.kernels.compile is None and spec["steps"]:
                plan = decide_compile(plan, spec, tmp)
            try:
                job = run(plan)
            except RunFailed as exc:
                if exc.exit_code <= 128:
                    raise
                # stopped by a signal: the checkpoint it wrote lived in this arm's throwaway folder
                raise RunFailed(f"the arm stopped ({str(exc).split(' after step')[0]})", exc.exit_code) from None
            steps, model = job.steps, job.results.model
            dtype, tuning = job.results.dtype or recipe.train.precision, job.results.tuning or m.tuning
            peak_memory = job.results.peak_memory_bytes
            settings = {
                "kernels": recipe.kernels.model_dump(),
                "packing": recipe.data.packing,
                "micro_batch_size": recipe.train.micro_batch_size,
                "gradient_accumulation_steps": recipe.train.gradient_accumulation_steps,
                "lora": recipe.method.lora.model_dump(),
                "lr": recipe.train.lr,
            }
        else:
            if tools is None:  # runner.check_baseline refused this before any arm started
                raise SystemExit(f"hwft bench: backend {spec['backend']} has no bench tools for a baseline arm")
            model_path = materialise(plan.model)
            tokenizer, rows = rows_of(train_examples, recipe, model_path)
            trained = [rows[i] for i in spec["examples"]]
            _, eval_rows = rows_of(eval_examples, recipe, model_path) if eval_examples else (None, [])
            kind = spec["arm"].removeprefix("baseline-")
            arguments = tools.baseline_arguments(recipe.bench.baseline, recipe.train.max_length, kind)
            out = tools.baseline_run(
                model_path, tokenizer, trained, eval_rows, spec["backend"], spec["bf16"], recipe.train.seed, arguments
            )
            steps, model, dtype, tuning = out["steps"], out["model"], out["dtype"], "lora"
            peak_memory, settings = out["peak_memory"], out["settings"]
        eval_loss = None
        if tools is not None and eval_examples:
            if spec["arm"] == "hwft":
                tokenizer, eval_rows = rows_of(eval_examples, recipe, materialise(plan.model))
                eval_loss = tools.held_out_loss(
                    model, eval_rows, tokenizer.pad_token_id, "sdpa", tools.device_of(model)
                )
            else:
                eval_loss = out["eval_loss"]
        dims = tools.model_dims(model) if tools else None
        peak = (
            tools.peak_flops(tools.device_of(model), tools.dtype_named(dtype), device_label(spec["backend"]))
            if tools
            else None
        )
        measured = None  # the matmul probe, where the peak above is a spec sheet's
        if tools and peak and not peak[1].startswith("measured"):
            measured = tools.peak_flops(tools.device_of(model), tools.dtype_named(dtype), "")[0]
        elif peak:
            measured = peak[0]
    memory_kind = tools.memory_kind(spec["backend"]) if tools else "device"
    result = BenchResult(
        run_id=spec["run_id"],
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        arm=Arm(
            kind=spec["arm"],
            backend=spec["backend"],
            engine=backend.engine,
            objective=m.objective,
            tuning=tuning,
            dtype=dtype,
            settings=settings,
        ),
        workload=Workload(
            hash=spec["workload_hash"],
            recipe=spec["recipe"],
            model=spec["model_id"],
            steps=max(0, len(steps) - spec["warmup"]),
            warmup=spec["warmup"],
            eval_examples=len(eval_examples),
            train_sequences=sum(len(s.get("examples", [])) for s in steps),
        ),
        fingerprint=fingerprint(spec["backend"], host.probe(spec["backend"])),
        metrics=metrics(
            steps, spec["warmup"], peak_memory, memory_kind, eval_loss, dims, tuning, reference_forward, peak, measured
        ),
        steps=[Step(**{k: v for k, v in s.items() if k in Step.model_fields}) for s in steps],
    )
    Path(spec["result"]).write_text(result.dump(), encoding="utf-8")
    return 0


def device_label(backend: str) -> str:
    devices = get_host().probe(backend).devices
    return str(devices[0].get("name", "")) if devices else ""


if __name__ == "__main__":
    from hwft.entry import guarded, start_process

    start_process()
    sys.exit(guarded(lambda: main(sys.argv[1])))
