"""The torch training loop, top to bottom.

load tokenizer -> tokenise, mask and pack the data -> load the model and its tuning -> optimizer
and schedule -> answers before -> for each step: gather micro-batches, forward, loss, backward,
clip, step, log, maybe checkpoint -> save -> answers after -> loss.png.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from contextlib import nullcontext

import torch

from hwft.data.batching import Row, pad
from hwft.data.chat import ChatRenderer
from hwft.data.pipeline import training_batches
from hwft.job import Job
from hwft.models import load_tokenizer, materialise
from hwft.progress import Progress
from hwft.recipe import Recipe
from hwft_torch.losses import causal_lm_loss
from hwft_torch.modeling import DTYPES, attention_implementation, load_model, save_result
from hwft_torch.runtime import DeviceRuntime


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def compute_dtype(recipe: Recipe, runtime: DeviceRuntime) -> torch.dtype:
    """precision: auto is bf16 on accelerators that have it, fp32 on the CPU (exact, portable)."""
    precision = recipe.train.precision
    if precision == "auto":
        return torch.bfloat16 if runtime.type != "cpu" and runtime.bf16() else torch.float32
    return DTYPES[precision]


def make_optimizer(model, recipe: Recipe, runtime: DeviceRuntime) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    t = recipe.train
    if runtime.optimizer is not None:
        device_optimizer = runtime.optimizer(params, recipe)
        if device_optimizer is not None:
            return device_optimizer
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=runtime.type == "cuda")


def make_scheduler(optimizer, recipe: Recipe, steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(recipe.train.scheduler, recipe.train.scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=recipe.train.warmup_steps, num_training_steps=steps)


@torch.no_grad()
def answer(model, tokenizer, renderer: ChatRenderer, prompt: str, max_new_tokens: int, device) -> str:
    """Greedy answer to one user prompt."""
    was_training = model.training
    model.eval()
    if renderer.template is None:  # a base model without a chat template continues the text
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
    else:
        ids = torch.tensor([renderer.prompt_ids(prompt)], device=device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def show_answers(job: Job, when: str, model, tokenizer, renderer, device) -> list[dict]:
    answers = []
    for prompt in job.recipe.eval.prompts:
        text = answer(model, tokenizer, renderer, prompt, job.recipe.eval.max_new_tokens, device)
        job.say(f"[{when} training] Q: {prompt}\n[{when} training] A: {text}")
        answers.append({"when": when, "prompt": prompt, "answer": text})
    return answers


def save(job: Job, model, tokenizer, final, state: dict | None = None) -> None:
    """Weights, tokenizer and (for checkpoints) trainer state, renamed into place together."""
    with job.run_dir.atomic_dir(final) as tmp:
        save_result(model, tokenizer, tmp, job.recipe)
        if state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")


def block_causal_mask(rows: list[Row], width: int, dtype: torch.dtype | None) -> torch.Tensor:
    """(batch, 1, width, width) mask letting each token attend to earlier tokens of its own
    example only; right padding forms one more block, so no query row is fully masked.

    ``dtype`` None gives a boolean mask (True = attend, as sdpa reads it); a float dtype gives
    the additive form eager attention adds to its scores (0 or the dtype's minimum).
    """
    segments = torch.empty(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids = [k for k, n in enumerate(row.lengths) for _ in range(n)]
        segments[b] = torch.tensor(ids + [len(row.lengths)] * (width - len(ids)))
    same = segments[:, :, None] == segments[:, None, :]
    mask = (same & torch.ones(width, width, dtype=torch.bool).tril())[:, None]
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def to_tensors(rows: list[Row], pad_id: int, attention: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs for a micro-batch, keeping attention within each packed example.

    flash_attention_2 runs padding-free: all rows are concatenated into one sequence and the
    kernel finds the examples from where ``position_ids`` restart (varlen). Other kernels get
    right-padded rows and, when a row packs several examples, a block-diagonal causal mask
    (position ids alone do not isolate examples for sdpa or eager attention).
    """
    if attention == "flash_attention_2":
        flat = {
            "input_ids": [t for r in rows for t in r.input_ids],
            "labels": [t for r in rows for t in r.labels],
            "position_ids": [p for r in rows for p in r.position_ids],
        }
        return {k: torch.tensor([v], device=device) for k, v in flat.items()}
    batch = {k: torch.tensor(v) for k, v in pad(rows, pad_id).items()}
    if any(len(r.lengths) > 1 for r in rows):
        width = batch["input_ids"].shape[1]
        batch["attention_mask"] = block_causal_mask(rows, width, torch.float32 if attention == "eager" else None)
    return {k: v.to(device) for k, v in batch.items()}


def train(job: Job, runtime: DeviceRuntime) -> dict:
    recipe, t = job.recipe, job.recipe.train
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    device = runtime.device()
    seed_everything(t.seed)

    # 1. Tokenizer and data: render, mask all but what the model should say, pack into rows.
    model_path = materialise(job.model, log=job.log)
    tokenizer = load_tokenizer(model_path, recipe.model.trust_remote_code)
    renderer = ChatRenderer.for_recipe(recipe, tokenizer)
    batches = training_batches(job.data, renderer, recipe, job.choice.capability)
    if batches.rows is not None:
        job.log(f"data: {batches.stats.summary(t.max_length)}; {batches.describe()}")
    else:
        job.log(f"data: {batches.describe()}")
    attention = attention_implementation(recipe)

    # 2. Model with its tuning, optimizer, schedule.
    if runtime.before_load:
        runtime.before_load(recipe)
    model = load_model(model_path, recipe, device)
    if runtime.patch_model:
        applied = runtime.patch_model(model, recipe)
        if applied:
            job.log(f"kernels: {', '.join(applied)}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    dtype = compute_dtype(recipe, runtime)
    job.log(f"model: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trained ({recipe.method.tuning}), "
            f"compute {str(dtype).removeprefix('torch.')} on {device}")
    steps = batches.steps
    optimizer = make_optimizer(model, recipe, runtime)
    scheduler = make_scheduler(optimizer, recipe, steps)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    )
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = t.max_grad_norm or float("inf")

    job.results["answers"] = show_answers(job, "before", model, tokenizer, renderer, device)

    # 3. The loop.
    progress = Progress(steps, t.log_every, quiet=job.quiet)
    model.train()
    start = last_log = time.perf_counter()
    tokens_since_log = labels_since_log = rows_seen = 0
    losses_since_log: list[float] = []
    record: dict = {}
    epoch = 0
    for step in range(1, steps + 1):
        micro = [next(batches.iterator) for _ in range(t.gradient_accumulation_steps)]
        # Normalise by every label token of the step, so accumulation equals one big batch.
        num_items = sum(row.num_labels for _, batch in micro for row in batch)
        step_loss = 0.0
        for epoch, batch in micro:
            tensors = to_tensors(batch, tokenizer.pad_token_id, attention, device)
            labels = tensors.pop("labels")
            with autocast:
                logits = model(**tensors).logits
            loss = causal_lm_loss(logits, labels, num_items)
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.item()
            tokens_since_log += sum(len(row.input_ids) for row in batch)
            rows_seen += len(batch)
        labels_since_log += num_items
        losses_since_log.append(step_loss)
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        lr = scheduler.get_last_lr()[0]
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        if step % t.log_every == 0 or step == steps:
            now = time.perf_counter()
            interval = max(now - last_log, 1e-9)
            record = {
                "step": step,
                # in memory: passes over the rows; streaming: shuffle windows begun
                "epoch": round(rows_seen / len(batches.rows), 4) if batches.rows else epoch,
                "loss": sum(losses_since_log) / len(losses_since_log),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_second": tokens_since_log / interval,
                "trained_tokens_per_second": labels_since_log / interval,
                "elapsed": now - start,
            }
            job.run_dir.log_metrics(record)
            progress.update(record)
            last_log, tokens_since_log, labels_since_log, losses_since_log = now, 0, 0, []
        if t.save_every and step % t.save_every == 0 and step < steps:
            save(job, model, tokenizer, job.run_dir.checkpoint_dir(step), state={"step": step})
            job.run_dir.prune_checkpoints(t.keep_checkpoints)
    progress.close()

    # 4. Save the result, show what changed, plot.
    out = job.run_dir.adapter_dir if recipe.method.tuning == "lora" else job.run_dir.model_dir
    save(job, model, tokenizer, out)
    job.log(f"saved {out}")
    job.results["answers"] += show_answers(job, "after", model, tokenizer, renderer, device)
    job.results.update(final_loss=record.get("loss"), steps=steps, output=str(out), model=model)
    if recipe.output.plot and job.run_dir.plot_loss() is None:
        job.log("loss.png skipped: matplotlib is not installed")
    return job.results
