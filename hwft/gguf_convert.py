"""A GGUF model file as a Hugging Face folder, with gguf-py, numpy, safetensors and tokenizers
only: no torch, so an install with the MLX engine alone converts the embedded model too.

- ``config.json``: the GGUF's metadata under transformers' own names (its ``GGUF_CONFIG_MAPPING``
  table and defaults), built into the family's transformers config class;
- ``model.safetensors``: every tensor de-quantised by gguf-py (fp32), named as the family's
  Hugging Face model names it (its family record's ``GgufLayout.import_names``), with llama.cpp's
  rotary permutation of the query and key projections undone;
- the tokenizer: transformers' GGUF tokenizer builder (tokenizers) fed the file's metadata.

``tests/test_models.py`` holds the result to transformers' own conversion (its torch loader):
the same tensors bit for bit, the same config and the same token ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hwft.errors import ModelError

#: Tensors llama.cpp stores with the rotary halves interleaved, where the layout permutes q and k.
PERMUTED = ("attn_q", "attn_k")


def import_layout(architecture: str):
    """The GGUF layout hwft reads ``architecture`` with: a family record's (hwft.families,
    ``GgufLayout.import_names``) in any engine's table, so either engine alone converts."""
    from hwft.plugins import get_host

    return get_host().families().gguf_import(architecture)


def metadata(reader) -> dict:
    """Every metadata key of a gguf-py reader, as Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def hf_config(meta: dict, tensor_names: set[str]) -> dict:
    """The transformers config dict: the metadata renamed by transformers' own table, its GGUF
    defaults, the vocabulary's size, and tied embeddings where the file has no output matrix."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    architecture = meta["general.architecture"]
    config: dict = {"model_type": architecture, **GGUF_CONFIG_DEFAULTS_MAPPING.get(architecture, {})}
    for key, value in meta.items():
        prefix, _, rest = key.partition(".")
        renames = GGUF_CONFIG_MAPPING.get("general" if prefix == "general" else architecture, {})
        if prefix in ("general", architecture) and renames.get(rest) is not None:
            config[renames[rest]] = value
    config.setdefault("vocab_size", len(meta["tokenizer.ggml.tokens"]))
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    for key, name in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("padding_token_id", "pad_token_id"),
        ("unknown_token_id", "unk_token_id"),
    ):
        if f"tokenizer.ggml.{key}" in meta:
            config[name] = meta[f"tokenizer.ggml.{key}"]
    return config


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout (interleaved pairs) -> Hugging Face's (first half, second half)."""
    dim = weights.shape[0] // heads // 2
    return weights.reshape(heads, dim, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)


def tensors(reader, config: dict, layout) -> dict[str, np.ndarray]:
    """Every tensor de-quantised to fp32 under its Hugging Face name (``layout``: the family's
    hwft.families.GgufLayout)."""
    import gguf

    architecture = config["model_type"]
    names, permuted = layout.import_names, PERMUTED if layout.permute_qk else ()
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    out: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        stem, _, suffix = tensor.name.rpartition(".")
        parts = stem.split(".")
        if parts[0] == "blk":
            key, bid = ".".join(["blk", "{bid}", *parts[2:]]), parts[1]
        else:
            key, bid = stem, ""
        if key not in names:
            if "rope_freqs" in stem:
                continue  # computed from the config
            raise ModelError(f"{tensor.name}: no Hugging Face name for this {architecture} tensor")
        weights = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        leaf = parts[-1]
        if leaf in permuted and suffix == "weight":
            weights = _unpermute(weights, heads if leaf == "attn_q" else kv_heads)
        out[f"{names[key].format(bid=bid)}.{suffix}"] = np.ascontiguousarray(weights)
    if config.get("tie_word_embeddings"):
        out.pop("lm_head.weight", None)
    return out


def tokenizer(meta: dict):
    """The tokenizer as transformers builds it from a GGUF (its GGUF tokenizer tables and
    builders, tokenizers only), with the chat template and special tokens the file names."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    architecture = meta["general.architecture"]
    grouped = {
        group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    vocabulary, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if vocabulary.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)  # as transformers reads an older sentencepiece file
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = vocabulary["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(architecture, vocabulary)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def convert(gguf_file: Path, out_dir: Path, tokenizer_from: Path | None = None) -> None:
    """Write ``gguf_file`` as a Hugging Face folder in ``out_dir`` (the tokenizer copied from
    ``tokenizer_from`` where it was converted already)."""
    import gguf
    from safetensors.numpy import save_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    reader = gguf.GGUFReader(str(gguf_file))
    meta = metadata(reader)
    architecture = meta["general.architecture"]
    layout = import_layout(architecture)
    if layout is None:
        raise ModelError(
            f"{gguf_file.name}: GGUF architecture {architecture!r} is not one hwft converts (the "
            "families whose GgufLayout has import_names: hwft env --families)"
        )
    names = {t.name for t in reader.tensors}
    settings = hf_config(meta, names)
    config = AutoConfig.for_model(**settings)
    config.architectures = [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"]
    config.dtype = "float32"  # what the de-quantised tensors are
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    save_file(tensors(reader, settings, layout), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_from is not None and (tokenizer_from / "tokenizer_config.json").is_file():
        converted = AutoTokenizer.from_pretrained(tokenizer_from, local_files_only=True)
    else:
        converted = tokenizer(meta)
    converted.save_pretrained(out_dir)
