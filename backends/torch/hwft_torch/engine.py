"""The torch engine's set-up and step, for every method and parallel strategy.

The set-up runs in named phases (:class:`TorchRun`): start (the device, the process group, the
seed, the tokenizer and the method's micro-batches) -> load (the model with its tuning: full,
freeze, lora, qlora; an fsdp2 skeleton whose shards each rank reads) -> fuse (the recipe's
kernels, torch.compile) -> tune (the method's objective and the modules it trains beside the
model) -> distribute (the strategy: none, ddp, fsdp2, deepspeed, with optimizer and schedule).
Then the core loop (:mod:`hwft.loop`: answers before, each step, evaluation, checkpoints and
stop signals, save, answers after, loss.png) calls this engine's step: this rank's share of the
objective's micro-batches (a method that generates samples rollouts here), forward and loss,
backward, then clip and update, logged summed over ranks. The losses live in
:mod:`hwft_torch.losses` and the methods' own modules, each with its maths; the strategies in
:mod:`hwft_torch.parallel`.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from hwft import kernels, loraplus
from hwft.contract import EngineObjective
from hwft.data.chat import ChatRenderer
from hwft.distributed import ALONE, Collective
from hwft.errors import RecipeError
from hwft.job import Inputs, Job, Result
from hwft.loop import EngineRun, run_steps
from hwft.plugins import get_host
from hwft.recipe import Recipe
from hwft.select import compile_decision, ranks_problem
from hwft.steplog import StepLog
from hwft_torch import compiling, frozen_weights, sequence_parallel
from hwft_torch.checkpoint import TorchState
from hwft_torch.host_memory import (
    cpu_anonymous_bytes,
    cpu_current_rss,
    cpu_peak_rss_since_reset,
    keep_freed_host_memory,
    map_passing_blocks,
    reset_peak_rss,
)
from hwft_torch.methods import ENGINE, Setup
from hwft_torch.modeling import (
    DTYPES,
    attention_implementation,
    experts_implementation,
    family_attention,
    import_model_code,
    load_model,
    model_type_of,
    quantised_linear_count,
    save_result,
)
from hwft_torch.objective import held_out_loss
from hwft_torch.parallel import Single, TorchCollective, init_process_group, make_strategy, sharded
from hwft_torch.runtime import DeviceRuntime
from hwft_torch.sharded_loading import load_skeleton
from hwft_torch.unwrap import base_model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def compute_dtype(recipe: Recipe, runtime: DeviceRuntime) -> torch.dtype:
    """precision: auto is bf16 autocast where the device computes bf16 natively (accelerators
    that have it; CPUs with AVX512-BF16 or AMX), fp32 elsewhere: a CPU without bf16 units
    emulates it, several times slower than fp32."""
    precision = recipe.train.precision
    if precision == "auto":
        return torch.bfloat16 if runtime.bf16() else torch.float32
    return DTYPES[precision]


def trainable_groups(model, recipe: Recipe) -> list:
    """The trainable parameters; with LoRA+ (:mod:`hwft.loraplus`) two parameter groups, the
    others at train.lr first (the rate the log shows) and the B matrices at ratio x train.lr."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ratio = recipe.method.lora.loraplus_lr_ratio if recipe.method.adapter else None
    if not ratio:
        return [p for _, p in named]
    rest, faster = loraplus.split(named)
    return [{"params": rest, "lr": recipe.train.lr}, {"params": faster, "lr": recipe.train.lr * ratio}]


def make_optimizer(model, recipe: Recipe, runtime: DeviceRuntime) -> torch.optim.Optimizer:
    params = trainable_groups(model, recipe)
    t = recipe.train
    if runtime.optimizer is not None:
        device_optimizer = runtime.optimizer(params, recipe)
        if device_optimizer is not None:
            return device_optimizer
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
    # torch's fused AdamW kernel (CPU, CUDA, ROCm) for adamw too where torch has one: the same
    # update in one pass over all tensors, several times faster (docs/benchmarks.md). fused_adamw
    # on a device with its own (Ascend's NpuFusedAdamW) was returned above through runtime.optimizer.
    fused = t.optimizer == "fused_adamw" or runtime.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused)


def make_scheduler(optimizer, recipe: Recipe, steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(recipe.train.scheduler, recipe.train.scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=recipe.train.warmup(steps), num_training_steps=steps)


@torch.no_grad()
def answer(
    model, tokenizer, renderer: ChatRenderer, prompt: str, max_new_tokens: int, device, synced: bool = False
) -> str:
    """Greedy answer to one user prompt (``synced``: every rank generates in lockstep, as
    sharded parameters need)."""
    was_training = model.training
    model.eval()
    if renderer.template is None:  # a base model without a chat template continues the text
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
    else:
        ids = torch.tensor([renderer.prompt_ids(prompt)], device=device)
    with frozen_weights.autocast_for(model, ids.device):  # frozen linears stored in bf16 read bf16 inputs
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=synced,
            use_cache=True,  # the training model's config has it off (hwft_torch.modeling.load_model)
        )
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def save(job: Job, strategy, tokenizer, final, extras: tuple = ()) -> None:
    """The result (adapter/ or model/ with the tokenizer, and the method's extras beside it),
    renamed into place by rank 0; sharded weights are gathered first (every rank takes part),
    so a sharded run writes the same adapter/ or model/ a single process does."""
    full = strategy.full_state_dict()
    if not job.world.main:
        return
    with job.run_dir.atomic_dir(final) as tmp:
        save_result(strategy.model, tokenizer, tmp, job.recipe, full, extras)


def attach_extras(model, extras: tuple, device) -> None:
    """The method's extra modules (hwft.objective.Extra) as children of the model, on its
    device, so the optimizer, the strategy and the checkpoints take them with the rest."""
    for extra in extras:
        model.add_module(extra.name, extra.module.to(device))


def effective_tuning(job: Job) -> str:
    """The recipe's tuning, or lora where qlora cannot run and the recipe allows the fallback
    (selection has refused qlora otherwise)."""
    m = job.recipe.method
    if m.tuning == "qlora" and not job.choice.capability.runs(m.objective, "qlora"):
        why = job.choice.capability.notes.get("qlora", "no quantisation on this device")
        job.log(
            f"qlora: {why}; method.qlora.allow_fallback is set, so training plain LoRA on the unquantised base instead"
        )
        return "lora"
    return m.tuning


def apply_kernels(job: Job, model, made: dict, tuning: str):
    """The recipe's kernels (hwft.kernels: chosen at selection, made before the weights
    loaded), applied to the loaded model of its family (hwft_torch.families)."""
    base = base_model(model)
    family = get_host().families().lookup(ENGINE, getattr(base.config, "model_type", None))
    applied = kernels.apply(job, model, job.choice.kernels, made, family, tuning)
    for line in applied.lines:
        job.log(f"kernels: {line}")
    return applied


def compile_layers_if_wanted(job: Job, model, device, steps: int) -> None:
    """kernels.compile (hwft_torch.compiling): each decoder layer's training forward through
    torch.compile, when asked for or when auto finds that the run repays it."""
    on, why = compile_decision(
        job.recipe.kernels.compile,
        job.choice.capability.compile,
        job.choice.backend.accelerator or device.type != "cpu",
        steps,
    )
    if not on:
        if job.recipe.kernels.compile is None and job.choice.capability.compile:
            job.log(f"kernels: torch.compile off ({why})")
        return
    count, layers = compiling.compile_layers(model)
    if count:
        which = (
            f"{count} decoder layers"
            if count == layers
            else f"{count} of {layers} decoder layers (the first one's input needs no gradient: it runs eagerly)"
        )
        job.log(f"kernels: torch.compile on the training forward of {which} ({why}); the first steps include compiling")
    else:
        job.log("kernels: torch.compile skipped: the model has no decoder.layers to compile")


def make_objective(setup: Setup) -> EngineObjective:
    """The recipe's method as this engine implements it (hwft_torch.methods)."""
    implementation = get_host().methods().implementation(setup.job.recipe.method.objective, ENGINE)
    return implementation.make(setup)


def train_step(
    step: int, objective: EngineObjective, model, strategy: Single, log: StepLog, autocast, device
) -> tuple[float, float]:
    """One optimizer step: this rank's share of the step's micro-batches, forward and loss,
    backward, then clip and update -> (lr, gradient norm); logged (summed over ranks)."""
    log.begin()
    micro_batches = objective.step(model, step)  # this rank's share of the step
    for i, micro in enumerate(micro_batches):
        with autocast():
            loss = strategy.forward(objective.loss, micro, last=i == len(micro_batches) - 1)
        strategy.backward(loss.value)
        objective.record(loss.stats)
        log.add(loss.value.item(), loss)
    lr, grad_norm = strategy.step()
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()
    log.end(step, lr, grad_norm)
    return lr, grad_norm


@dataclass
class TorchRun:
    """What the torch engine's set-up builds, phase by phase: :func:`start` (the device, the
    process group, the data), :func:`load` (the weights with their tuning), :func:`fuse` (the
    recipe's kernels), :func:`tune` (what trains: the method's objective and its extras) and
    :func:`distribute` (the parallel strategy with optimizer and schedule)."""

    job: Job
    runtime: DeviceRuntime
    device: torch.device
    collective: Collective
    owns_group: bool  #: this run started the process group, so the strategy ends it
    tuning: str  #: the tuning that runs (lora where qlora fell back)
    dtype: torch.dtype  #: the compute dtype
    inputs: Inputs
    model: Any = None
    weights: Any = None  #: a skeleton's shards, read once fsdp2 has sharded it (hwft_torch.sharded_loading)
    made: dict = field(default_factory=dict)  #: the chosen kernels' objects (hwft.kernels.prepare)
    applied: kernels.Applied = field(default_factory=kernels.Applied)
    undo: list[Callable[[], None]] = field(default_factory=list)  #: what the run puts back when it ends

    def autocast(self):
        """The run's compute dtype as a context (none for fp32)."""
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()


def start(job: Job, runtime: DeviceRuntime) -> TorchRun:
    """The device, the process group (several ranks, or a strategy that needs one), the seed,
    and the tokenizer with the method's micro-batches (hwft.job.Job.inputs, alike on every engine)."""
    recipe, t, world = job.recipe, job.recipe.train, job.world
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    device = runtime.device(world.local_rank)
    if device.type == "cpu":
        map_passing_blocks()  # while loading (hwft_torch.host_memory)
    collective: Collective = ALONE
    owns_group = False
    if world.size > 1 or recipe.parallel.strategy != "none":
        owns_group = init_process_group(
            world, job.choice.capability.collective or "gloo", recipe.parallel.timeout, device
        )
        collective = TorchCollective(world)
        job.log(
            f"parallel: {recipe.parallel.strategy} over {world.size} processes "
            f"({job.choice.capability.collective}), {t.micro_batch_size} x {t.gradient_accumulation_steps} "
            f"micro-batches per rank and step"
        )
    if problem := ranks_problem(recipe, world.size):  # ranks started by torchrun or srun themselves
        raise RecipeError(problem)
    seed_everything(t.seed)
    return TorchRun(
        job,
        runtime,
        device,
        collective,
        owns_group,
        effective_tuning(job),
        compute_dtype(recipe, runtime),
        job.inputs(),
    )


def load(run: TorchRun) -> None:
    """The weights with their tuning (full, freeze, lora, qlora): under fsdp2 over several
    ranks a skeleton whose shards each rank reads once sharded, else the whole model; the
    kernels' ``before_load`` first, and on the CPU the memory loading takes (hwft plan's figures)."""
    job, recipe, device, path = run.job, run.job.recipe, run.device, run.inputs.model_path
    run.made = kernels.prepare(job, job.choice.kernels)
    if run.runtime.before_load:
        run.runtime.before_load(recipe)
    if device.type == "cpu":  # what the model and its training add to the process
        import_model_code(path, recipe, run.tuning)
        job.results.extra["memory_before_load_bytes"] = cpu_current_rss()
        job.results.extra["memory_before_load_anonymous_bytes"] = cpu_anonymous_bytes()
        reset_peak_rss()
    if recipe.parallel.sequence_parallel > 1:
        from transformers import AutoConfig

        sequence_parallel.check_model(
            AutoConfig.from_pretrained(path, local_files_only=True), recipe.parallel.sequence_parallel
        )
    if recipe.parallel.strategy == "fsdp2" and job.world.size > 1:
        run.model, run.weights = load_skeleton(path, recipe, device, run.tuning, run.dtype, job.world)
    skeleton = run.model is not None
    if skeleton:
        job.log("fsdp2: each rank reads only its own shards of the weights (no rank loads the whole model)")
    else:
        if run.weights:
            job.log(f"fsdp2: each rank loads the whole model, then keeps its shards ({run.weights})")
        frozen = frozen_weights.wanted(recipe, run.tuning, run.dtype, device.type)
        run.model, run.weights = load_model(path, recipe, device, run.tuning, run.dtype, frozen), None
        if frozen:
            job.log(
                f"frozen weights: {frozen_weights.count(run.model, frozen)} linear layers stored in "
                f"{str(frozen).removeprefix('torch.')}, as autocast would cast them in every forward "
                "(train.frozen_weights)"
            )
    needed = family_attention(model_type_of(path)) if recipe.kernels.attention == "auto" else None
    if needed is not None:
        job.log(f"attention: {needed[0]}, not sdpa ({needed[1]})")
    prove_packing(run, whole=not skeleton)
    prove_media_packing(run, whole=not skeleton)
    if experts_implementation(model_type_of(path)):
        job.log("moe: every expert's tokens in one grouped matmul (transformers' grouped_mm experts)")
    run.inputs.batches.check_vocabulary(run.model.get_input_embeddings().num_embeddings, str(path))


def prove_packing(run: TorchRun, whole: bool = True) -> None:
    """A family outside the torch table packs rows only after the load-time proof
    (:mod:`hwft_torch.packing_proof`); refused in one line where it fails. flash-attention's
    varlen path keeps examples apart by itself, and no rows pack where the method or the recipe
    packs none. Where each fsdp2 rank loaded only its shards (``whole`` False) there is no whole
    model to run the proof on: packing is refused for such a family, with the way on."""
    from hwft.methods.lookup import method

    job, recipe = run.job, run.job.recipe
    model_type = model_type_of(run.inputs.model_path)
    if get_host().families().lookup("torch", model_type).known or recipe.kernels.attention == "flash_attention_2":
        return
    vision = getattr(run.inputs.renderer, "vision", None)
    if vision is not None and vision.family.packs:
        return  # its record says its rows pack (tests/test_media_packing.py); prove_media_packing checks them
    if not method(recipe.method.objective).packs or recipe.data.packing is False or not run.inputs.batches.packing:
        return  # nothing packs: the method's rows, the recipe, or the data (image rows: hwft.vision)
    from hwft_torch.packing_proof import packing_problem

    if not whole:
        raise RecipeError(
            f"data.packing: {model_type} is not in hwft's family table, and its packing is proven on the whole "
            "model, which no fsdp2 rank holds here; set data.packing: false, or parallel.strategy: ddp (each rank "
            "holds the whole model and proves it)"
        )
    problem = packing_problem(run.model, run.model.get_input_embeddings().num_embeddings)
    if problem is not None:
        raise RecipeError(
            f"data.packing: transformers' {model_type} cannot keep packed examples apart here: {problem}; "
            "set data.packing: false"
        )
    job.log(
        f"packing: {model_type} is not in hwft's family table; its packed forward matched each example's own, "
        "so rows pack"
    )


def prove_media_packing(run: TorchRun, whole: bool = True) -> None:
    """Where rows with images or videos pack (hwft.vision: the family's record says so), two of
    the run's own examples, packed, must give each the logits it has alone
    (hwft_torch.packing_proof); refused in one line where they do not. Where each fsdp2 rank
    loaded only its shards (``whole`` False) the record stands alone, as the tests hold it."""
    from hwft.data.chat import TokenizeStats
    from hwft.data.kinds.sequences import encode

    renderer, batches = run.inputs.renderer, run.inputs.batches
    if getattr(renderer, "vision", None) is None or not batches.packing or not whole:
        return
    examples = run.job.data.examples[:64]
    with_media = [e for e in examples if getattr(e, "media", None)][:4]
    if not with_media:
        return
    length = run.job.recipe.train.max_length
    shortest = sorted(
        (t for e in with_media for t in encode(e, renderer, length, TokenizeStats())), key=lambda t: len(t.input_ids)
    )[:2]
    if len(shortest) < 2:  # one example with media: packed beside a text one
        text = [
            t for e in examples if not getattr(e, "media", None) for t in encode(e, renderer, length, TokenizeStats())
        ]
        shortest += sorted(text, key=lambda t: len(t.input_ids))[:1]
    if len(shortest) < 2:
        return
    from hwft_torch.packing_proof import media_packing_problem

    model_type = model_type_of(run.inputs.model_path)
    with run.autocast():
        problem = media_packing_problem(
            run.model,
            shortest,
            run.inputs.tokenizer.pad_token_id,
            attention_implementation(run.job.recipe),
            run.device,
            run.dtype,
        )
    if problem is not None:
        raise RecipeError(
            f"data.packing: transformers' {model_type} cannot keep packed examples with images or videos apart "
            f"here: {problem}; set data.packing: false"
        )
    run.job.log(
        f"packing: rows with images or videos pack ({renderer.vision.family.description}: each example's own "
        "3-D positions; a packed pair of this run's examples gave each its own logits)"
    )


def fuse(run: TorchRun) -> None:
    """The recipe's kernels applied to the loaded model of its family, then torch.compile where
    it pays (kernels.compile)."""
    run.applied = apply_kernels(run.job, run.model, run.made, run.tuning)
    compile_layers_if_wanted(run.job, run.model, run.device, run.inputs.batches.steps)


def tune(run: TorchRun) -> EngineObjective:
    """What trains: the model's size in the log, Ulysses attention where rows are split over
    ranks, and the method's objective (this engine's implementation) with its extra modules
    attached to the model."""
    job, recipe, model = run.job, run.job.recipe, run.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    quantised = (
        f", {quantised_linear_count(model)} linear layers {recipe.method.qlora.bits}-bit"
        if run.tuning == "qlora"
        else ""
    )
    job.log(
        f"model: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trained ({run.tuning}{quantised}), "
        f"compute {str(run.dtype).removeprefix('torch.')} on {run.device}"
    )
    spread = recipe.parallel.sequence_parallel
    if spread > 1:
        run.undo.append(sequence_parallel.register(model, spread, recipe.train.micro_batch_size))
        groups = job.world.size // spread
        job.log(
            f"sequence parallel: each row's tokens split over {spread} ranks (DeepSpeed's Ulysses attention "
            f"over sdpa), {groups} data-parallel {'group' if groups == 1 else 'groups'}"
        )
    objective = make_objective(
        Setup(
            job,
            run.inputs.batches,
            model,
            run.inputs.tokenizer,
            run.device,
            run.autocast,
            run.collective,
            run.runtime,
            run.applied,
        )
    )
    attach_extras(model, objective.extras, run.device)
    return objective


def distribute(run: TorchRun, objective: EngineObjective) -> Single:
    """The parallel strategy around the model (none, ddp, fsdp2, deepspeed) with optimizer and
    schedule; the objective of a method that generates samples in the strategy's whole model."""
    job, recipe = run.job, run.job.recipe
    steps = run.inputs.batches.steps
    scaler = torch.amp.GradScaler(run.device.type) if run.dtype == torch.float16 else None
    strategy = make_strategy(
        recipe,
        run.model,
        lambda m: make_optimizer(m, recipe, run.runtime),
        lambda o: make_scheduler(o, recipe, steps),
        job.world,
        recipe.train.max_grad_norm or float("inf"),
        scaler,
        run.weights,
        objective.extras,
    )
    if run.device.type == "cpu":
        job.results.extra["memory_load_peak_bytes"] = cpu_peak_rss_since_reset()
        job.results.extra["memory_loaded_anonymous_bytes"] = cpu_anonymous_bytes()
        if run.weights is not None:
            job.results.extra["memory_shard_bytes"] = run.weights.held_bytes
        if kept := keep_freed_host_memory():  # for the steps, now that loading's passing blocks are gone
            job.log(kept)
    strategy.owns_group = run.owns_group
    run.model = strategy.model  # sharded in place by fsdp2; the same module otherwise
    if get_host().methods().get(recipe.method.objective).generates:  # it samples as answers do
        objective.whole_model = strategy.whole_model
    return strategy


def train(job: Job, runtime: DeviceRuntime) -> Result:
    """The set-up's phases, then the loop written once in the core (hwft.loop)."""
    run = start(job, runtime)
    load(run)
    fuse(run)
    objective = tune(run)
    strategy = distribute(run, objective)
    return run_steps(job, engine_run(run, objective, strategy))


def engine_run(run: TorchRun, objective: EngineObjective, strategy: Single) -> EngineRun:
    """What the core loop needs of this run: its step, answers (rank 0 alone, unless sharded
    parameters need every rank in each forward), held-out loss, checkpoint state and save."""
    job, recipe = run.job, run.job.recipe
    model, device, inputs = run.model, run.device, run.inputs
    synced = sharded(recipe) and job.world.size > 1

    def ask(prompt: str) -> str:
        with strategy.whole_model():
            return answer(model, inputs.tokenizer, inputs.renderer, prompt, recipe.eval.max_new_tokens, device, synced)

    def evaluate() -> float:
        return held_out_loss(
            model,
            inputs.held_out,
            inputs.tokenizer.pad_token_id,
            attention_implementation(recipe),
            device,
            recipe.train.micro_batch_size,
            run.autocast,
            fused=not sharded(recipe),
        )

    def step(n: int, log: StepLog) -> float:
        _, grad_norm = train_step(n, objective, model, strategy, log, run.autocast, device)
        return grad_norm if strategy.scaler is None else 0.0  # fp16: the scaler skips a non-finite step

    def close() -> None:
        strategy.close()
        run.applied.undo()
        for undo in run.undo:
            undo()

    model.train()
    return EngineRun(
        objective=objective,
        steps=inputs.batches.steps,
        train_step=step,
        state=TorchState(strategy, inputs.tokenizer, recipe, device, save_result, objective.extras),
        strategy=strategy.name,
        save=lambda out: save(job, strategy, inputs.tokenizer, out, objective.extras),
        tuning=run.tuning,
        dtype={v: k for k, v in DTYPES.items()}[run.dtype],
        model=model,
        device=str(device),
        ask=ask if job.world.main or synced else None,
        held_out_loss=evaluate if inputs.held_out else None,
        held_out_size=len(inputs.held_out or []),
        peak_memory=run.runtime.peak_memory,
        skips_nonfinite=strategy.skips_nonfinite,
        close=close,
    )
