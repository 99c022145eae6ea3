"""The torch training loop, top to bottom.

load tokenizer -> tokenise and mask the data -> load the model and its tuning -> optimizer and
schedule -> answers before -> for each step: gather micro-batches, forward, loss, backward,
clip, step, log, maybe checkpoint -> save -> answers after -> loss.png.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from contextlib import nullcontext

import torch

from hwft.data.batching import micro_batches, pad, total_steps
from hwft.data.chat import ChatRenderer, resolve_template, tokenize_examples
from hwft.job import Job
from hwft.models import materialise
from hwft.progress import Progress
from hwft.recipe import Recipe
from hwft_torch.devices import torch_device
from hwft_torch.losses import causal_lm_loss
from hwft_torch.modeling import DTYPES, load_model, load_tokenizer, save_result


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def compute_dtype(recipe: Recipe, backend_name: str) -> torch.dtype:
    """precision: auto is bf16 on GPUs that have it, fp32 on the CPU (exact, and portable)."""
    precision = recipe.train.precision
    if precision == "auto":
        if backend_name != "cpu" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[precision]


def make_optimizer(model, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    t = recipe.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=device.type == "cuda")


def make_scheduler(optimizer, recipe: Recipe, steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(recipe.train.scheduler, recipe.train.scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=recipe.train.warmup_steps, num_training_steps=steps)


@torch.no_grad()
def answer(model, tokenizer, renderer: ChatRenderer, prompt: str, max_new_tokens: int, device) -> str:
    """Greedy answer to one user prompt."""
    was_training = model.training
    model.eval()
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


def train(job: Job) -> dict:
    recipe, t = job.recipe, job.recipe.train
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    device = torch_device(job.choice.backend.name)
    seed_everything(t.seed)

    # 1. Tokenizer and data: render with the chat template, mask all but assistant tokens.
    model_path = materialise(job.model, log=job.log)
    tokenizer = load_tokenizer(model_path, recipe)
    renderer = ChatRenderer(tokenizer, resolve_template(recipe.template, recipe.resolve_path("."), tokenizer))
    data, stats = tokenize_examples(job.train_examples, renderer, t.max_length)
    job.log(f"data: {stats.summary(t.max_length)}")

    # 2. Model with its tuning, optimizer, schedule.
    model = load_model(model_path, recipe, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    dtype = compute_dtype(recipe, job.choice.backend.name)
    job.log(f"model: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trained ({recipe.method.tuning}), "
            f"compute {str(dtype).removeprefix('torch.')} on {device}")
    steps = total_steps(len(data), t.micro_batch_size, t.gradient_accumulation_steps, t.epochs, t.max_steps)
    optimizer = make_optimizer(model, recipe, device)
    scheduler = make_scheduler(optimizer, recipe, steps)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    )
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = t.max_grad_norm or float("inf")

    job.results["answers"] = show_answers(job, "before", model, tokenizer, renderer, device)

    # 3. The loop.
    batches = micro_batches(len(data), t.micro_batch_size, t.seed)
    progress = Progress(steps, t.log_every)
    model.train()
    start = last_log = time.perf_counter()
    tokens_since_log = labels_since_log = examples_seen = 0
    losses_since_log: list[float] = []
    record: dict = {}
    for step in range(1, steps + 1):
        micro = [next(batches) for _ in range(t.gradient_accumulation_steps)]
        rows = [[data[i] for i in idx] for _, idx in micro]
        # Normalise by every label token of the step, so accumulation equals one big batch.
        num_items = sum(e.num_labels for batch in rows for e in batch)
        step_loss = 0.0
        for batch in rows:
            tensors = {k: torch.tensor(v, device=device) for k, v in pad(batch, tokenizer.pad_token_id).items()}
            with autocast:
                logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
            loss = causal_lm_loss(logits, tensors["labels"], num_items)
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.item()
            tokens_since_log += int(tensors["attention_mask"].sum())
        labels_since_log += num_items
        losses_since_log.append(step_loss)
        examples_seen += sum(len(batch) for batch in rows)
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
                "epoch": round(examples_seen / len(data), 4),
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
