"""Reading a GGUF file hwft wrote (hwft.use.gguf_writer) back into a transformers model, for
``hwft export --to gguf --verify``, where
transformers' own GGUF loader does not read the architecture (Mixtral as llama with experts,
Granite, SmolLM3, OLMo 2, GLM-4).

It inverts what :mod:`hwft.use.gguf_writer` did, from the family's layout (its
:class:`hwft.families.GgufLayout`), with ``gguf.GGUFReader`` and gguf's own tensor-name map:

- the config: the family's transformers config class, from the GGUF's hyperparameters (the
  keys every architecture has, and the layout's own ``metadata`` keys read back);
- the tensors: each parameter of that config's model named as gguf's map names it, read
  de-quantised, with the layout's transforms undone: the rotary permutation of q and k,
  the norm offset, and the experts, whose stacked gate and up halves go back into
  transformers 5's fused ``experts.gate_up_proj``.

The model is built on the meta device and takes the file's tensors as its own (no random
initialisation, no copy of the weights on disk). This is hwft's inverse of hwft's writer: it
catches a tensor lost, misnamed, mis-shaped or mis-transformed, and a hyperparameter not
written, but not a convention hwft and llama.cpp might both get wrong; ``--verify`` says which
reader it used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hwft.errors import UserError
from hwft.families import GgufLayout

#: GGUF keys under ``<arch>.`` that every architecture has -> the transformers config key.
COMMON_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "vocab_size": "vocab_size",
}


def _value(field):
    value = field.contents()
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def read_config(reader, model_type: str, layout: GgufLayout) -> dict:
    """The transformers config dict of a GGUF written in ``layout``."""
    import gguf

    prefix = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, layout.arch)]
    meta: dict[str, Any] = {name: _value(field) for name, field in reader.fields.items()}
    config: dict = {"model_type": model_type}
    for key, target in COMMON_KEYS.items():
        if f"{prefix}.{key}" in meta:
            config[target] = meta[f"{prefix}.{key}"]
    for key, sources in layout.metadata:
        if f"{prefix}.{key}" in meta:
            config[sources[0]] = meta[f"{prefix}.{key}"]
    rope = {"rope_type": "default", "rope_theta": float(meta.get(f"{prefix}.rope.freq_base", 10000.0))}
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rotary = meta.get(f"{prefix}.rope.dimension_count")
    if rotary and rotary != head_dim:
        rope["partial_rotary_factor"] = rotary / head_dim
    config["rope_parameters"] = rope
    if layout.config_back is not None:
        config.update(
            layout.config_back({k.removeprefix(prefix + "."): v for k, v in meta.items() if k.startswith(prefix + ".")})
        )
    names = {t.name for t in reader.tensors}
    config["tie_word_embeddings"] = "output.weight" not in names
    config["attention_bias"] = "blk.0.attn_q.bias" in names  # llama.cpp reads it off the tensors too
    for key, name in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("padding_token_id", "pad_token_id"),
    ):
        if f"tokenizer.ggml.{key}" in meta:
            config[name] = int(meta[f"tokenizer.ggml.{key}"])
    return config


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """GGML's interleaved rotary pairs -> Hugging Face's halves (hwft.use.gguf_writer._permute undone)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load(path: Path, model_type: str, layout: GgufLayout, extra_config: dict | None = None):
    """The transformers causal LM a GGUF file written in ``layout`` holds, in eval mode."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    reader = gguf.GGUFReader(str(path))
    settings = {**read_config(reader, model_type, layout), **(extra_config or {})}
    config = AutoConfig.for_model(**settings)
    tensors = {t.name: t for t in reader.tensors}

    def read(name: str) -> np.ndarray:
        if name not in tensors:
            raise UserError(f"--verify: {path.name} has no tensor {name}")
        t = tensors[name]
        return np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, layout.arch), config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)

    def read_hf(name: str) -> np.ndarray:
        """The GGUF tensor a Hugging Face-style name maps to (``...k_b_proj.weight``)."""
        stem, _, suffix = name.rpartition(".")
        mapped = names.get_name(stem)
        if mapped is None:
            raise UserError(f"--verify: no GGUF name for {name}")
        return read(f"{mapped}.{suffix}")

    state = {}
    for key, parameter in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        stem, _, suffix = key.rpartition(".")
        special = layout.tensor_back(key, read_hf, config) if layout.tensor_back is not None else None
        if special is not None:
            array = special
        elif stem.endswith(".experts") and suffix in ("gate_up_proj", "down_proj"):  # transformers 5's fused experts
            block = names.get_name(f"{stem}.{'gate_proj' if suffix == 'gate_up_proj' else 'down_proj'}")
            if block is None:
                raise UserError(f"--verify: no GGUF name for the experts of {stem}")
            if suffix == "gate_up_proj":
                array = np.concatenate([read(f"{block}.weight"), read(f"{block.replace('gate', 'up')}.weight")], axis=1)
            else:
                array = read(f"{block}.weight")
        else:
            mapped = names.get_name(stem)
            if mapped is None:
                raise UserError(f"--verify: no GGUF name for {key}")
            array = read(f"{mapped}.{suffix}")
            if layout.permute_qk and suffix == "weight" and stem.endswith(("q_proj", "k_proj")):
                array = _unpermute(array, heads if stem.endswith("q_proj") else kv_heads)
            if layout.norm_offset and key.endswith("norm.weight"):
                array = array - np.float32(layout.norm_offset)
        if tuple(array.shape) != tuple(parameter.shape):
            raise UserError(
                f"--verify: {key} reads back as {tuple(array.shape)}, the model needs {tuple(parameter.shape)}"
            )
        state[key] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"--verify: {path.name} reads back without {missing[:3]} / with {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    for name, module in list(model.named_modules()):  # rotary tables are computed, not stored: build them
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, type(module)(config=module.config))
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            raise UserError(f"--verify: {name} was not rebuilt")
    return model.eval()
