"""Choosing a backend for a recipe, and refusing clearly when none can run it.

The rule for ``backend: auto`` (documented in the README):
  1. only backends whose probe says *available* are candidates;
  2. the highest priority wins (bands in :mod:`hwft.records`: accelerators 300, MLX on Metal
     200, torch ``cpu`` 100, another engine on the CPU 50);
  3. among equal priorities, the alphabetically first name; registration order never counts;
  4. a candidate that cannot run the recipe is passed over for the next.
A recipe naming a backend gets that backend or a :class:`~hwft.errors.SelectionError` that says
why and what would work. All of this happens before any weight is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from hwft.errors import SelectionError
from hwft.kernels import Chosen, choose
from hwft.methods.lookup import registry as method_registry
from hwft.plugins import PluginHost
from hwft.recipe import Recipe
from hwft.records import Availability, Backend, Capability


@dataclass(frozen=True)
class Choice:
    backend: Backend
    availability: Availability
    capability: Capability
    kernels: Chosen = Chosen()  #: the kernels the recipe runs there (hwft.kernels.choose)


def core_problems(recipe: Recipe) -> list[str]:
    """Settings no backend could honour as written, whichever runs."""
    return parallel_problems(recipe)


def parallel_problems(recipe: Recipe) -> list[str]:
    """parallel settings that only one strategy honours, set for another (never ignored)."""
    p, out = recipe.parallel, []
    if p.offload_optimizer and p.strategy != "deepspeed":
        out.append(f"parallel.offload_optimizer needs strategy deepspeed (ZeRO-Offload), not {p.strategy}")
    if p.offload_params and p.strategy not in ("fsdp2", "deepspeed"):
        out.append(f"parallel.offload_params needs strategy fsdp2 or deepspeed with zero_stage 3, not {p.strategy}")
    if p.offload_params and p.strategy == "deepspeed" and p.zero_stage != 3:
        out.append(f"parallel.offload_params with deepspeed needs zero_stage 3, not {p.zero_stage}")
    if p.deepspeed_config and p.strategy != "deepspeed":
        out.append(f"parallel.deepspeed_config is set but parallel.strategy is {p.strategy}, not deepspeed")
    if p.sequence_parallel > 1:
        n = p.sequence_parallel
        registry = method_registry()
        if not registry.get(recipe.method.objective).sequence_parallel:
            able = ", ".join(m.name for m in registry if m.sequence_parallel)
            out.append(
                f"parallel.sequence_parallel {n} with objective {recipe.method.objective} (sequence "
                f"parallelism trains {able}); remove it"
            )
        elif recipe.data.packing is not False:
            out.append(
                f"parallel.sequence_parallel {n} with packed rows (not supported yet: each packed example "
                "would need its own mask after the all-to-all); set data.packing: false"
            )
        if p.strategy == "deepspeed":
            out.append(
                f"parallel.sequence_parallel {n} with parallel.strategy deepspeed (not wired up); use ddp or fsdp2"
            )
    if p.strategy in ("fsdp2", "deepspeed"):  # both shard parameters, gradients or optimizer state
        # FSDP2 shards bitsandbytes' packed 4-bit weights as any other tensor (each rank keeps
        # its layers' quantisation state whole); DeepSpeed's partitioning does not know them.
        if recipe.method.tuning == "qlora" and (p.strategy == "deepspeed" or recipe.method.qlora.bits == 8):
            why = (
                "DeepSpeed does not partition bitsandbytes' quantised weights"
                if p.strategy == "deepspeed"
                else "fsdp2 shards 4-bit weights, not LLM.int8's"
            )
            fix = (
                "use strategy fsdp2 or ddp, or tuning lora"
                if p.strategy == "deepspeed"
                else "use method.qlora.bits 4, or strategy ddp"
            )
            out.append(f"method.tuning qlora with parallel.strategy {p.strategy} ({why}); {fix}")
        if recipe.train.precision == "fp16":
            out.append(
                f"train.precision fp16 with parallel.strategy {p.strategy} (no loss scaling across "
                "shards in hwft); use bf16"
            )
    return out


def ranks_problem(recipe: Recipe, world_size: int) -> str | None:
    """Why ``world_size`` processes cannot run the recipe's sequence parallelism, or None."""
    n = recipe.parallel.sequence_parallel
    if n > 1 and world_size % n:
        return (
            f"parallel.sequence_parallel {n} needs a multiple of {n} processes, not {world_size} "
            f"(--nproc {n}, or {n} x the data-parallel replicas)"
        )
    return None


def capability_problems(recipe: Recipe, cap: Capability) -> list[str]:
    """What in the recipe this capability record cannot do, each naming what it can."""
    out = []
    m = recipe.method
    lora_instead = m.tuning == "qlora" and cap.runs(m.objective, "lora")
    if lora_instead and not cap.runs(m.objective, "qlora"):
        if not m.qlora.allow_fallback:
            why = cap.notes.get("qlora", "no 4-bit or 8-bit quantisation on this device")
            out.append(
                f"method.tuning 'qlora' ({why}); use tuning: lora (with train.precision: bf16 where the "
                "device has it), or set method.qlora.allow_fallback: true to do that automatically"
            )
    elif not cap.runs(m.objective, m.tuning):
        runs = cap.methods.get(m.objective)
        if runs:
            out.append(f"method.tuning '{m.tuning}' with objective '{m.objective}' (it runs: {', '.join(runs)})")
        else:
            out.append(f"method.objective '{m.objective}' (it runs: {', '.join(cap.methods) or 'none'})")
    p = recipe.train.precision
    if p != "auto" and p not in cap.dtypes:
        out.append(f"train.precision '{p}' (it has: {', '.join(cap.dtypes)})")
    k = recipe.kernels
    if k.attention != "auto" and k.attention not in cap.attention:
        out.append(f"kernels.attention '{k.attention}' (it has: auto, {', '.join(cap.attention)})")
    if recipe.train.optimizer not in cap.optimizers:
        out.append("train.optimizer 'fused_adamw' (no fused AdamW here; use adamw)")
    if k.compile and not cap.compile:
        out.append("kernels.compile (not supported)")
    if recipe.parallel.strategy not in cap.parallel:
        out.append(f"parallel.strategy '{recipe.parallel.strategy}' (it has: {', '.join(cap.parallel)})")
    if recipe.parallel.sequence_parallel > 1 and "deepspeed" not in cap.parallel:
        # DeepSpeed's Ulysses attention (hwft_torch.sequence_parallel): where a backend has DeepSpeed
        out.append(
            f"parallel.sequence_parallel {recipe.parallel.sequence_parallel} (no Ulysses sequence parallelism "
            "here: it is DeepSpeed's, on the torch backends with DeepSpeed installed)"
        )
    if recipe.data.packing and not cap.packing:
        out.append("data.packing (set data.packing: false)")
    return out


#: kernels.compile null (auto) compiles runs of at least this many optimizer steps on the CPU.
COMPILE_AUTO_MIN_STEPS = 100


def compile_decision(setting: bool | None, claimed: bool, accelerator: bool, steps: int) -> tuple[bool, str]:
    """(compile?, why) for kernels.compile ``setting`` on a backend that does or does not claim it.

    true and false are the user's; null compiles on the host CPU for runs of
    :data:`COMPILE_AUTO_MIN_STEPS` steps or more, where it was measured to repay its compile time
    (configs/bench.yaml; the figures: docs/benchmarks.md). On accelerators it stays opt-in until
    a bench there shows it pays.
    """
    if setting is not None:
        return setting, f"kernels.compile: {'true' if setting else 'false'}"
    if not claimed:
        return False, "the backend does not compile"
    if accelerator:
        return False, "auto: opt-in on accelerators (kernels.compile: true)"
    if steps < COMPILE_AUTO_MIN_STEPS:
        return False, f"auto: {steps} steps are too few to repay the compile time (from {COMPILE_AUTO_MIN_STEPS})"
    return True, f"auto: {steps} steps on the CPU"


def backend_problems(recipe: Recipe, host: PluginHost, name: str) -> tuple[Chosen, list[str]]:
    """(the kernels the recipe would run on backend ``name``, what the backend cannot do)."""
    cap = host.capability(name)
    chosen, problems = choose(recipe, name, host.backend(name).engine, host.kernels())
    return chosen, capability_problems(recipe, cap) + problems


def rank(host: PluginHost) -> list[str]:
    """Available backends, best first, by the documented rule."""
    scored = []
    for name, backend in host.backends.items():
        avail = host.probe(name)
        if avail.available:
            priority = avail.priority if avail.priority is not None else backend.priority
            scored.append((-priority, name))
    return [name for _, name in sorted(scored)]


def _who_can(recipe: Recipe, host: PluginHost, besides: str) -> str:
    able = []
    for name in host.backends:
        if name == besides or backend_problems(recipe, host, name)[1]:
            continue
        avail = host.probe(name)
        able.append(name if avail.available else f"{name} (not available here: {avail.reason})")
    return "; backends that could: " + ", ".join(able) if able else ""


def preflight(recipe: Recipe, host: PluginHost) -> None:
    """Refusals that need no probe: unimplemented settings, methods no backend runs."""
    problems = core_problems(recipe)
    if problems:
        raise SelectionError("cannot run this recipe: " + "; ".join(problems))
    if not host.backends:
        raise SelectionError(
            "no backend is installed; install one, e.g. pip install -e backends/torch "
            "(see `hwft plugins` for plugins that failed to load)"
        )
    m = recipe.method
    # qlora where only lora runs is refused per backend, naming the reason and the fallback.
    tunings = (m.tuning, "lora") if m.tuning == "qlora" else (m.tuning,)
    if not any(host.capability(n).runs(m.objective, t) for n in host.backends for t in tunings):
        implemented = sorted(
            {f"{o}/{t}" for n in host.backends for o, ts in host.capability(n).methods.items() for t in ts}
        )
        raise SelectionError(
            f"objective '{m.objective}' with tuning '{m.tuning}' is not implemented yet by any "
            f"installed backend (implemented: {', '.join(implemented)})"
        )


def select_backend(recipe: Recipe, host: PluginHost) -> Choice:
    """The backend that will run the recipe, or a SelectionError naming what would work."""
    preflight(recipe, host)
    if recipe.backend == "auto":
        ranked = rank(host)
        refusals = []
        for name in ranked:
            chosen, issues = backend_problems(recipe, host, name)
            if not issues:
                return Choice(host.backend(name), host.probe(name), host.capability(name), chosen)
            refusals.append(f"{name} cannot do " + "; ".join(issues))
        if not ranked:
            reasons = "; ".join(f"{n}: {host.probe(n).reason}" for n in host.backends)
            raise SelectionError(f"no backend is available on this machine ({reasons})")
        raise SelectionError("no available backend can run this recipe: " + " | ".join(refusals))

    backend = host.backend(recipe.backend)
    avail = host.probe(backend.name)
    if not avail.available:
        others = ", ".join(rank(host)) or "none"
        raise SelectionError(
            f"backend '{backend.name}' is not available here: {avail.reason} "
            f"(available: {others}; or set backend: auto)"
        )
    chosen, issues = backend_problems(recipe, host, backend.name)
    if issues:
        raise SelectionError(
            f"backend '{backend.name}' cannot run this recipe: it cannot do "
            + "; ".join(issues)
            + _who_can(recipe, host, backend.name)
        )
    return Choice(backend, avail, host.capability(backend.name), chosen)
