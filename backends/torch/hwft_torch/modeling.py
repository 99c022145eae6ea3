"""Loading the model and tokenizer, applying the tuning, and saving the result."""

from __future__ import annotations

from pathlib import Path

import torch

from hwft.errors import ModelError
from hwft.recipe import Recipe

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def attention_implementation(recipe: Recipe) -> str:
    return "sdpa" if recipe.kernels.attention == "auto" else recipe.kernels.attention


def load_model(path: Path, recipe: Recipe, device: torch.device):
    """The base model in fp32 (mixed precision runs under autocast), with its tuning applied."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # hwft draws its own progress

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch.float32,
            attn_implementation=attention_implementation(recipe),
            trust_remote_code=recipe.model.trust_remote_code,
            local_files_only=True,
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a causal language model from {path}: {exc}") from None
    model.to(device)
    if recipe.parallel.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if recipe.method.tuning == "lora":
        model = add_lora(model, recipe)
    return model


def add_lora(model, recipe: Recipe):
    """Wrap in a peft LoRA adapter: W x + (alpha / r) * B A x, B initialised to zero."""
    from peft import LoraConfig, get_peft_model

    spec = recipe.method.lora
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
    )
    if recipe.parallel.activation_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, config)


def save_result(model, tokenizer, out_dir: Path, recipe: Recipe) -> None:
    """adapter/ in PEFT's own format, or model/ as HF safetensors; the tokenizer beside it."""
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
