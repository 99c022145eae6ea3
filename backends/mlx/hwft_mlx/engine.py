"""The MLX training loop, top to bottom, for every objective.

join the ring (several ranks, :mod:`hwft_mlx.distributed`) -> load tokenizer -> the shared
data layer's micro-batches (the very rows torch gets for the same recipe and seed) -> load the
model into mlx-lm (config normalised) with its tuning (full, lora, qlora) -> the objective
(sft/cpt, dpo, grpo) -> optimizer and schedule -> the core loop (:mod:`hwft.loop`: answers
before (rank 0), each step, evaluation, checkpoints, save, answers after, loss.png), which calls
this engine's step: this rank's share of the objective's micro-batches, ``nn.value_and_grad``
of the loss, gradients summed over the micro-batches and the ranks, clip, update; the result
is a PEFT adapter or HF safetensors (rank 0).

The optimiser and schedule match the torch engine's: AdamW with torch's bias correction and
decoupled weight decay, and transformers' warmup + cosine / linear / constant schedules, built
from mlx.optimizers' schedules.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from hwft import kernels, loraplus
from hwft.data.chat import ChatRenderer
from hwft.distributed import ALONE, Collective
from hwft.errors import ModelError, UserError
from hwft.extras import write_extras
from hwft.job import Job, Result
from hwft.loop import EngineRun, run_steps
from hwft.methods.lookup import method
from hwft.models import stop_token_ids
from hwft.plugins import get_host
from hwft.recipe import Recipe
from hwft.steplog import StepLog
from hwft.vision import FAMILIES as VISION_FAMILIES
from hwft.vision import methods_fed
from hwft_mlx import vision
from hwft_mlx.adapters import add_lora, freeze_layers, load_peft_adapter, quantize_base, save_peft_adapter
from hwft_mlx.arrays import flat, number
from hwft_mlx.checkpoint import MlxState, step_seed
from hwft_mlx.distributed import join
from hwft_mlx.forward import architecture, family, packing_problem
from hwft_mlx.heads import add_score_head
from hwft_mlx.loading import DTYPES, ignored_window, load_model
from hwft_mlx.media import MEDIA_DATA_KINDS, is_vision
from hwft_mlx.methods import ENGINE, Setup
from hwft_mlx.objective import MlxObjective, held_out_loss
from hwft_mlx.saving import save_full_model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    mx.random.seed(seed)


def compute_dtype(recipe: Recipe) -> str:
    """precision auto: bf16 on Metal (Apple GPUs compute it natively), fp32 on MLX's CPU build."""
    if recipe.train.precision != "auto":
        return recipe.train.precision
    return "bf16" if mx.metal.is_available() else "fp32"


def make_schedule(recipe: Recipe, steps: int):
    """transformers' schedules (``get_scheduler``) as mlx.optimizers schedules: linear warmup
    from 0, then cosine to 0, linear to 0, or constant; step k (from 0) gets schedule(k)."""
    t = recipe.train
    warmup = t.warmup(steps)
    decay = max(steps - warmup, 1)
    main = {
        "cosine": optim.cosine_decay(t.lr, decay, 0.0),
        "linear": optim.linear_schedule(t.lr, 0.0, decay),
        "constant": lambda _: mx.array(t.lr),
    }[t.scheduler]
    if not warmup:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, t.lr, warmup), main], [warmup])


def make_optimizer(recipe: Recipe, steps: int) -> optim.Optimizer:
    """SGD or AdamW on the schedule; with LoRA+ (:mod:`hwft.loraplus`) one for the adapters' B
    matrices at ratio x the schedule and one for the rest (``MultiOptimizer``)."""
    t = recipe.train
    schedule = make_schedule(recipe, steps)
    ratio = recipe.method.lora.loraplus_lr_ratio if recipe.method.adapter else None

    def one(rate):
        if t.optimizer == "sgd":
            return optim.SGD(learning_rate=rate, weight_decay=t.weight_decay)
        return optim.AdamW(
            learning_rate=rate, betas=[0.9, 0.999], eps=1e-8, weight_decay=t.weight_decay, bias_correction=True
        )

    if not ratio:
        return one(schedule)
    return optim.MultiOptimizer(
        [one(lambda step: ratio * schedule(step)), one(schedule)], [lambda path, _: loraplus.is_b_matrix(path)]
    )


def answer(model, tokenizer, renderer: ChatRenderer, prompt: str, max_new_tokens: int, stop: list[int]) -> str:
    """Greedy answer to one user prompt."""
    from mlx_lm.generate import generate_step

    ids = tokenizer(prompt)["input_ids"] if renderer.template is None else renderer.prompt_ids(prompt)
    was_training = model.training
    model.eval()
    tokens = []
    generator = vision.TextModel(model) if is_vision(model) else model
    for token, _ in generate_step(mx.array(ids), generator, max_tokens=max_new_tokens):  # pyright: ignore[reportArgumentType]
        if int(token) in stop:
            break
        tokens.append(int(token))
    model.train(was_training)
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def refuse_early(job: Job) -> None:
    """What the MLX backend cannot do, refused before any weight loads or row is read."""
    m = job.recipe.method
    if m.adapter and m.lora.dora and not job.recipe.model.adapter:
        raise UserError("method.lora.dora: the MLX backend has no DoRA; set dora: false, or run on a torch backend")
    config = read_config(job.model.path) if job.model.ready else {}
    if vision.wanted(config):
        refuse_for_vision(job, config)
    elif config.get("model_type") in VISION_FAMILIES:  # mlx-lm reads text models; mlx-vlm's is not held here
        raise UserError(
            f"model: {job.model.path} is a vision-language {VISION_FAMILIES[config['model_type']].description} "
            f"checkpoint; the MLX engine trains those of {', '.join(vision.FAMILIES)} (through mlx-vlm), text rows "
            "or image rows. Train it with backend=cpu (or cuda, rocm: the torch engine)"
        )


def prepare_model(job: Job, model_path, dtype: str) -> tuple[nn.Module, str]:
    """The model with its tuning: frozen base + LoRA (a new adapter or model.adapter), the
    base quantised first for qlora, every weight trainable (full), or some layers' (freeze)."""
    recipe, m = job.recipe, job.recipe.method
    config = read_config(model_path)
    if vision.wanted(config):
        return prepare_vision_model(job, model_path, config, dtype)
    model, config = load_model(model_path, recipe.model.trust_remote_code)
    if not family(model).known:
        from hwft_mlx.agreement import disagreement

        refusal = disagreement(config, architecture(model))
        if refusal is not None:
            raise ModelError(f"{refusal}. Train it on a torch backend (cpu, cuda, rocm, npu)")
        job.log(
            f"model: {config.get('model_type')} is not in hwft's MLX family table; mlx-lm's {architecture(model)} "
            "gave transformers' logits on a small model of its config"
        )
    if dtype != "fp32":
        model.set_dtype(DTYPES[dtype])
    detail = ""
    if m.tuning == "qlora":
        count = quantize_base(model, m.qlora.bits)
        detail = f", {count} linear layers {m.qlora.bits}-bit (MLX affine, group 64)"
        if m.qlora.quant_type == "nf4" and m.qlora.bits == 4:
            job.log("qlora: MLX has no NF4; the base is quantised with MLX's affine 4-bit instead")
    if m.tuning in ("lora", "qlora"):
        if recipe.model.adapter:
            spec = load_peft_adapter(model, recipe.resolve_path(recipe.model.adapter))
            detail += f", continuing the adapter {recipe.model.adapter} (r={spec.r})"
        else:
            add_lora(model, m.lora, recipe.train.seed)
    elif m.tuning == "freeze":
        detail = f", {freeze_layers(model, m.freeze)} tensors of the chosen layers"
    else:
        model.unfreeze()
    if method(m.objective).head == "score":  # a reward model: a new scalar head, trained in full
        add_score_head(model, recipe.train.seed)
        detail += ", a new score head"
    return model, detail


def refuse_for_vision(job: Job, config: dict) -> None:
    """What the MLX engine does not do with a vision-language model yet, refused in one line: it
    trains LoRA on the language model (and the projector, where method.vision trains it) with
    the methods whose rows it feeds images (Capability.media_data_kinds)."""
    m = job.recipe.method
    kind = config.get("model_type")
    import importlib.util

    if importlib.util.find_spec("mlx_vlm") is None:
        raise UserError(
            f"model: {job.model.path} is a vision-language model ({kind}); the MLX engine trains it through "
            "mlx-vlm, which is not installed: pip install mlx-vlm (or -e 'backends/mlx[vision]')"
        )
    record = method(m.objective)
    if not (record.media and record.kind in MEDIA_DATA_KINDS):
        fed = ", ".join(methods_fed(MEDIA_DATA_KINDS))
        raise UserError(
            f"method.objective {m.objective}: the MLX engine trains a vision-language model ({kind}) with "
            f"{fed} only; train it with backend=cpu (or cuda, rocm: the torch engine)"
        )
    if m.tuning != "lora" or not m.vision.freeze_tower or m.vision.freeze_language_model:
        what = f"method.tuning {m.tuning}" if m.tuning != "lora" else "method.vision"
        raise UserError(
            f"{what}: the MLX engine trains a vision-language model ({kind}) with LoRA on its language model "
            "(and its projector, with method.vision.freeze_projector: false), the tower frozen; train it with "
            "backend=cpu (or cuda, rocm: the torch engine)"
        )


def prepare_vision_model(job: Job, model_path, config: dict, dtype: str) -> tuple[nn.Module, str]:
    """A vision-language model (mlx-vlm's: hwft_mlx.vision) with LoRA, new or model.adapter's, on
    the linear layers of the parts method.vision trains (the language model, and the projector
    where freeze_projector is false; :func:`refuse_for_vision` refused the rest)."""
    recipe = job.recipe
    model = vision.load_model(Path(model_path), config)
    if dtype != "fp32":
        model.set_dtype(DTYPES[dtype])
    trained = vision.train_parts(model, recipe.method.vision)
    frozen = "the vision tower" if "projector" in trained else "the vision tower and projector"
    if recipe.model.adapter:  # a PEFT adapter of the language model (a torch run's, or an MLX one's)
        spec = load_peft_adapter(model, recipe.resolve_path(recipe.model.adapter))
        return model, f", continuing the adapter {recipe.model.adapter} (r={spec.r}), {frozen} frozen (mlx-vlm)"
    add_lora(model, recipe.method.lora, recipe.train.seed)
    return model, f", {frozen} frozen (mlx-vlm)"


def read_config(model_path) -> dict:
    try:
        return json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a model.shape folder, or one load_model refuses in its own words


def check_architecture(job: Job, model: nn.Module, model_path, packing: bool) -> None:
    """What this family's mlx-lm forward can train, refused in one line where the recipe asks
    for more: packed rows (proven by the family table or at load, hwft_mlx.packing), and rows
    longer than a sliding window mlx-lm does not apply."""
    recipe = job.recipe
    if packing:
        problem = packing_problem(model)
        if problem is not None:
            library = "mlx-vlm" if is_vision(model) else "mlx-lm"
            raise UserError(
                f"data.packing: {library}'s {architecture(model)} cannot pack rows here: {problem}; "
                "set data.packing: false"
            )
        if not family(model).known:
            job.log(
                f"packing: mlx-lm's {architecture(model)} is not in hwft's family table; its packed forward "
                "matched its own on two examples, so rows pack"
            )
    config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    window = ignored_window(config)
    if window is not None and recipe.train.max_length > window:
        raise UserError(
            f"train.max_length: {recipe.train.max_length} is longer than {config.get('model_type')}'s sliding window "
            f"({window} tokens), which mlx-lm's {architecture(model)} does not apply: longer rows would attend "
            f"farther than the model does. Set train.max_length: {window} or less, or train on torch"
        )


def make_objective(setup: Setup) -> MlxObjective:
    """The recipe's method as this engine implements it (hwft_mlx.methods)."""
    implementation = get_host().methods().implementation(setup.job.recipe.method.objective, ENGINE)
    return implementation.make(setup)


def write_result(job: Job, model, tokenizer, model_path, folder, extras: tuple = ()) -> None:
    """An adapter (PEFT format) or the full model (HF safetensors) with the tokenizer, and the
    method's extras (hwft.objective.Extra) each in its own file."""
    if not job.recipe.method.adapter:
        save_full_model(model, model_path, folder, tokenizer.pad_token_id, apart=extras)
    else:
        save_peft_adapter(model, folder, job.recipe.method.lora, str(model_path))
    write_extras(
        folder, extras, lambda e: {e.prefix + k: np.array(v.astype(mx.float32)) for k, v in flat(e.module.parameters())}
    )
    tokenizer.save_pretrained(folder)


def save(job: Job, model, tokenizer, model_path, final, extras: tuple = ()) -> None:
    """The result, renamed into place by rank 0 (every rank holds the same weights)."""
    if not job.world.main:
        return
    with job.run_dir.atomic_dir(final) as tmp:
        write_result(job, model, tokenizer, model_path, tmp, extras)


def attach_extras(model: nn.Module, extras: tuple) -> None:
    """The method's extra modules (hwft.objective.Extra) as children of the model, so
    ``nn.value_and_grad``, the optimizer and the checkpoints take them with the rest."""
    for extra in extras:
        setattr(model, extra.name, extra.module)


def differentiable(objective: MlxObjective):
    """The objective's ``loss`` as ``nn.value_and_grad`` takes it: (the value to differentiate,
    the whole Loss, whose statistics and counts ride along)."""

    def value_and_loss(model, micro):
        loss = objective.loss(model, micro)
        return loss.value, loss

    return value_and_loss


def add_trees(a, b):
    return b if a is None else tree_map(lambda x, y: x + y, a, b)


def train_step(
    step, objective, model, optimizer, schedule, value_and_grad, collective, log: StepLog, max_norm
) -> float:
    """One optimizer step: this rank's share of the micro-batches, gradients summed over them
    and the ranks, clipped, applied -> the gradient norm. A NaN or Inf norm skips the update
    (the schedule, a function of the optimizer's step count, still advances)."""
    log.begin()
    grads = None
    for micro in objective.step(model, step):
        (value, loss), micro_grads = value_and_grad(model, micro)
        grads = add_trees(grads, micro_grads)
        mx.eval(value, grads, loss.stats)
        objective.record(loss.stats)
        log.add(value.item(), loss)
    if collective.world.size > 1:
        grads = collective.sum_gradients(grads)
    if max_norm:
        grads, grad_norm = optim.clip_grad_norm(grads, max_norm)
    else:
        grad_norm = mx.sqrt(sum(((g.astype(mx.float32) ** 2).sum() for _, g in flat(grads)), mx.array(0.0)))
    parts = getattr(optimizer, "optimizers", [optimizer])  # LoRA+: a MultiOptimizer of two
    lr = float(schedule(parts[-1].step))  # what this update uses (LoRA+: all but the B matrices)
    norm = number(grad_norm)
    if math.isfinite(norm):
        optimizer.update(model, grads)
    else:  # no update; the step still counts, so the schedule moves on
        for part in parts:
            part.state["step"] = part.step + 1
        if len(parts) == 1:
            optimizer.state["learning_rate"] = mx.array(lr)
    mx.eval(model.parameters(), optimizer.state)
    log.end(step, lr, norm)
    return norm


def train(job: Job) -> Result:
    recipe, t, world = job.recipe, job.recipe.train, job.world
    refuse_early(job)
    collective: Collective = ALONE
    if world.size > 1:
        collective = join(world)
        job.log(
            f"parallel: ddp over {world.size} processes (mx.distributed ring), "
            f"{t.micro_batch_size} x {t.gradient_accumulation_steps} micro-batches per rank and step"
        )
    seed_everything(t.seed)

    # 1. Tokenizer and data (hwft.job.Job.inputs): the very rows the torch engine gets.
    inputs = job.inputs()
    model_path, tokenizer, renderer = inputs.model_path, inputs.tokenizer, inputs.renderer
    batches, held_out = inputs.batches, inputs.held_out
    stop = stop_token_ids(tokenizer)

    # 2. Model with its tuning, the objective, optimizer, schedule.
    dtype = compute_dtype(recipe)
    model, detail = prepare_model(job, model_path, dtype)
    embedding = next(m for _, m in model.named_modules() if isinstance(m, nn.Embedding))
    batches.check_vocabulary(embedding.weight.shape[0], str(model_path))
    check_architecture(job, model, model_path, batches.packing)
    applied = kernels.apply(
        job,
        model,
        job.choice.kernels,
        kernels.prepare(job, job.choice.kernels),
        get_host().families().lookup(ENGINE, architecture(model)),
        recipe.method.tuning,
    )
    for line in applied.lines:
        job.log(f"kernels: {line}")
    trainable = sum(v.size for _, v in flat(model.trainable_parameters()))
    total = sum(v.size for _, v in flat(model.parameters()))
    device = "metal" if mx.metal.is_available() else "cpu"
    job.log(
        f"model: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trained ({recipe.method.tuning}"
        f"{detail}), compute {dtype} on mlx/{device}"
    )

    model.train()
    objective = make_objective(Setup(job, batches, model, tokenizer, stop, collective, applied))
    attach_extras(model, objective.extras)
    steps = batches.steps
    optimizer, schedule = make_optimizer(recipe, steps), make_schedule(recipe, steps)
    value_and_grad = nn.value_and_grad(model, differentiable(objective))
    max_norm = t.max_grad_norm

    def ask(prompt: str) -> str:
        return answer(model, tokenizer, renderer, prompt, job.recipe.eval.max_new_tokens, stop)

    def step(n: int, log) -> float:
        return train_step(n, objective, model, optimizer, schedule, value_and_grad, collective, log, max_norm)

    # 3. The loop (hwft.loop): answers (rank 0), steps from the checkpoint's on, evaluation,
    # checkpoints, save, plot. Dropout and sampling are seeded as a function of the step.
    return run_steps(
        job,
        EngineRun(
            objective=objective,
            steps=steps,
            train_step=step,
            state=MlxState(
                model,
                optimizer,
                lambda folder: write_result(job, model, tokenizer, model_path, folder, objective.extras),
            ),
            strategy="ddp" if world.size > 1 else "none",
            save=lambda out: save(job, model, tokenizer, model_path, out, objective.extras),
            tuning=recipe.method.tuning,
            dtype=dtype,
            model=model,
            device=f"mlx/{device}",
            ask=ask if world.main else None,
            held_out_loss=(lambda: held_out_loss(model, held_out, tokenizer.pad_token_id, t.micro_batch_size))
            if held_out
            else None,
            held_out_size=len(held_out or []),
            peak_memory=peak_memory,
            before_step=lambda n: mx.random.seed(step_seed(t.seed, n)),
            close=applied.undo,
        ),
    )


def peak_memory() -> int:
    """MLX's peak allocation (Metal or CPU), in bytes."""
    return int(mx.get_peak_memory())
