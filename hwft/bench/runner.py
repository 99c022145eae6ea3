"""``hwft bench RECIPE``: plan, run each arm in its own process, compare, write the results.

Everything that can be refused is refused before any arm starts (the recipe, the backends
asked for, the baseline's conditions), without importing an engine.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from hwft.bench.fingerprint import model_identity, workload_hash
from hwft.bench.schema import BenchResult, Comparison
from hwft.bench.summary import comparison_lines, paired_summary, summary_table
from hwft.errors import RecipeError, SelectionError
from hwft.methods.lookup import registry as method_registry
from hwft.plugins import get_host
from hwft.processes import run_child
from hwft.recipe import load_recipe
from hwft.records import PRIORITY_CPU_FALLBACK
from hwft.select import backend_problems, rank, select_backend
from hwft.train import plan_run

#: The baseline's fixed arguments that decide what model is trained (hwft_torch.bench.BASELINE_LORA).
BASELINE_MODEL = {"r": 16, "alpha": 32, "target_modules": "all-linear", "dropout": 0.0}
#: The baselines `--baseline` may name (hwft_torch.bench.BASELINES).
BASELINE_KINDS = ("hf", "hf-liger")


def language_modelling() -> list[str]:
    """The methods a Trainer baseline trains as hwft does: next-token loss on token rows (the
    methods whose rows pack)."""
    return [m.name for m in method_registry() if m.packs]


def baseline_differences(recipe) -> list[str]:
    """Recipe settings that make the hwft arm train something other than the baseline."""
    m, t = recipe.method, recipe.train
    out = []
    if m.objective not in language_modelling() or m.tuning != "lora":
        out.append(
            f"method {m.objective}/{m.tuning} (the baseline trains {' or '.join(language_modelling())} with lora)"
        )
    for key, want in BASELINE_MODEL.items():
        have = getattr(m.lora, key)
        if have != want:
            out.append(f"method.lora.{key} {have} (baseline {want})")
    if m.lora.dora or m.lora.rslora:
        out.append("method.lora dora/rslora (baseline plain LoRA)")
    if t.lr != 1e-4:
        out.append(f"train.lr {t.lr} (baseline 1e-4)")
    return out


def choose_backends(recipe, names: list[str] | None) -> list[str]:
    host = get_host()
    if names:
        for name in names:  # each refusal names why
            select_backend(recipe.model_copy(update={"backend": name}), host)
        return names
    able = [n for n in rank(host) if not backend_problems(recipe, host, n)[1]]
    # Another engine on the host CPU (MLX's CPU build) duplicates the cpu arm, far slower; it
    # runs when named.
    fallback = [n for n in able if (host.probe(n).priority or host.backend(n).priority) <= PRIORITY_CPU_FALLBACK]
    if fallback and len(fallback) < len(able):
        print(
            f"hwft bench: not running {', '.join(fallback)} (another engine on this CPU; name it with "
            "--backends to include it)",
            file=sys.stderr,
        )
        able = [n for n in able if n not in fallback]
    if not able:
        raise SelectionError("no available backend can run this recipe (see `hwft env`)")
    return able


def run_arm(spec: dict, folder: Path) -> BenchResult:
    spec_path = folder / f".{Path(spec['result']).stem}.spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    label = f"{spec['arm']}{' bf16' if spec.get('bf16') else ''} on {spec['backend']}"
    print(f"--- {label} ---", file=sys.stderr, flush=True)
    try:
        code = run_child([sys.executable, "-m", "hwft.bench.worker", str(spec_path)], f"hwft bench, the {label} arm")
    finally:
        spec_path.unlink(missing_ok=True)
    if code != 0:
        raise SystemExit(f"hwft bench: the {label} arm failed (exit {code}); see its output above")
    return BenchResult.model_validate_json(Path(spec["result"]).read_text(encoding="utf-8"))


def compare(hwft: BenchResult, base: BenchResult, base_file: str, differences: list[str]) -> Comparison:
    """hwft's arm against one baseline arm: the ratios, and whether they count."""
    trained = Counter(i for s in hwft.steps for i in s.examples)
    seen = Counter(i for s in base.steps for i in s.examples)
    same = trained == seen and hwft.metrics.tokens_total == base.metrics.tokens_total
    mem = None
    if hwft.metrics.peak_memory_bytes and base.metrics.peak_memory_bytes:
        mem = hwft.metrics.peak_memory_bytes / base.metrics.peak_memory_bytes
    e1, e0 = hwft.metrics.eval_loss, base.metrics.eval_loss
    return Comparison(
        baseline=base_file,
        baseline_dtype=base.arm.dtype,
        baseline_kind=base.arm.kind,
        same_tokens=same,
        differences=differences,
        counts=same and not differences,
        tokens_per_second_ratio=hwft.metrics.tokens_per_second / base.metrics.tokens_per_second,
        peak_memory_ratio=mem,
        eval_loss_hwft=e1,
        eval_loss_baseline=e0,
        eval_loss_relative_difference=(e1 - e0) / e0 if e1 is not None and e0 else None,
    )


def bench(
    recipe_path: str,
    overrides: list[str],
    backends: list[str] | None,
    steps: int | None,
    warmup: int,
    baseline: list[str] | str | None,
    baseline_bf16: bool,
    out: str,
    eval_examples: int,
    repeat: int = 1,
) -> int:
    recipe = load_recipe(recipe_path, overrides)
    kinds = [baseline] if isinstance(baseline, str) else list(baseline or [])
    for kind in kinds:
        if kind not in BASELINE_KINDS:
            raise RecipeError(f"--baseline {kind}: unknown baseline (known: {', '.join(BASELINE_KINDS)})")
    dtypes = list(dict.fromkeys([*recipe.bench.baseline.dtypes, *(["bf16"] if baseline_bf16 else [])]))
    if recipe.data.streaming:
        raise RecipeError("hwft bench reads the data into memory; remove data.streaming")
    if steps is not None and steps < 1:
        raise RecipeError("--steps must be at least 1")
    if repeat < 1:
        raise RecipeError("--repeat must be at least 1")
    plan = plan_run(recipe)  # cheap checks: data rows, model, backend
    names = choose_backends(recipe, backends)
    host = get_host()
    differences = []
    if kinds:
        if not any(host.backend(n).engine == "torch" for n in names):
            raise SelectionError(
                f"--baseline {','.join(kinds)} runs on a torch backend (cpu, cuda, rocm, npu); none "
                f"is among {', '.join(names)}"
            )
        if recipe.method.objective not in language_modelling():
            raise RecipeError(
                f"--baseline trains {' or '.join(language_modelling())}; this recipe's objective is "
                f"{recipe.method.objective}"
            )
        from hwft.bench.worker import bench_tools

        torch_names = [n for n in names if host.backend(n).engine == "torch"]
        tools = bench_tools(host.backend(torch_names[0]))
        if tools is None:
            raise SelectionError(
                f"--baseline needs the torch engine's bench tools (hwft_torch.bench); backend "
                f"{torch_names[0]} names none"
            )
        for kind in kinds:
            for n in torch_names:
                if problem := tools.baseline_problem(kind, n):
                    raise SelectionError(problem)
            print(
                f"baseline {kind} (fixed arguments): "
                + json.dumps(tools.baseline_arguments(recipe.bench.baseline, recipe.train.max_length, kind)),
                file=sys.stderr,
            )
        differences = baseline_differences(recipe)
        if differences:
            print(
                "baseline: the recipe differs from it in "
                + "; ".join(differences)
                + " -- ratios will be shown but do not count",
                file=sys.stderr,
            )
    model_id = model_identity(plan.model)
    bench_params = {"steps": steps, "warmup": warmup, "eval_examples": eval_examples}
    digest = workload_hash(recipe, model_id, bench_params)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    base_spec = {
        "recipe": str(Path(recipe_path).resolve()),
        "overrides": overrides,
        "steps": steps,
        "warmup": warmup,
        "eval_examples": eval_examples,
        "run_id": run_id,
        "workload_hash": digest,
        "model_id": model_id,
    }
    results: list[tuple[str, BenchResult]] = []
    # Rounds alternate the arms (hwft, baseline, hwft, baseline, ...): each hwft arm is compared
    # with the baseline run right after it (paired_summary).
    for name, round_ in ((n, k) for k in range(1, repeat + 1) for n in names):
        prefix = f"{run_id}-r{round_}" if repeat > 1 else run_id
        if repeat > 1:
            print(f"=== round {round_} of {repeat} ===", file=sys.stderr, flush=True)
        path = folder / f"{prefix}-hwft-{name}.json"
        hwft = run_arm({**base_spec, "arm": "hwft", "backend": name, "result": str(path)}, folder)
        results.append((path.name, hwft))
        if kinds and host.backend(name).engine == "torch":
            examples = [i for s in hwft.steps for i in s.examples]
            for kind, tag in ((k, d) for k in kinds for d in dtypes):
                bpath = folder / f"{prefix}-baseline-{kind}-{tag}-{name}.json"
                base = run_arm(
                    {
                        **base_spec,
                        "arm": f"baseline-{kind}",
                        "backend": name,
                        "result": str(bpath),
                        "bf16": tag == "bf16",
                        "examples": examples,
                    },
                    folder,
                )
                hwft.comparisons.append(compare(hwft, base, bpath.name, differences))
                results.append((bpath.name, base))
                path.write_text(hwft.dump(), encoding="utf-8")  # the comparisons so far
    print(f"\nworkload {digest} ({recipe_path}), run {run_id}")
    print(summary_table([r for _, r in results]))
    for _, r in results:
        for line in comparison_lines(r):
            print(line)
    for line in paired_summary([r for _, r in results]):
        print(line)
    print(f"results: {', '.join(str(folder / n) for n, _ in results)}")
    return 0
