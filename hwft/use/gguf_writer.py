"""Writing a merged model as GGUF, for llama.cpp and Ollama, in the layout its family's
record gives (:class:`hwft.families.GgufLayout`, in the torch engine's table hwft_torch.families;
`hwft env --families` lists them).

Written with the ``gguf`` package's ``GGUFWriter`` (llama.cpp's own Python writer), laid out as
llama.cpp's converter lays these families out:

- hyperparameters under the architecture's keys (``llama.*`` / ``qwen2.*``);
- the byte-level BPE tokenizer (``tokenizer.ggml.model = gpt2``) with its merges, special-token
  ids and chat template; the pre-tokenizer name (``tokenizer.ggml.pre``) read off
  ``tokenizer.json``'s split rule, refused when it is not one llama.cpp knows;
- tensors renamed by ``gguf.get_tensor_name_map``. Where the layout says ``permute_qk`` (llama), the q and k projections
are
  permuted from Hugging Face's half-split rotary layout to GGML's interleaved one:
  ``W.reshape(heads, 2, d/2, dim).swapaxes(1, 2)`` (readers undo it);
- ``f16``: every matrix in float16, norms, biases and MoE routers in float32 (llama.cpp's
  converter keeps routers at full precision: rounding them flips which experts a token takes);
  ``q8_0``: every matrix whose rows split into 32-value blocks as 8-bit integers with one
  float16 scale per block (``gguf.quants.quantize``), the rest as for f16.
- per family (its :class:`hwft.families.GgufLayout`): Gemma's norm weights plus one (llama.cpp
  scales by w where Gemma scales by 1 + w); each MoE layer's experts stacked into one
  (experts, out, in) tensor per projection; the family's own keys (soft-capping, sliding
  window, expert counts; the head size where it is not hidden / heads).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from hwft.errors import UserError
from hwft.families import GgufLayout

#: GGUF types hwft writes, and the llama.cpp file type each declares.
GGUF_TYPES = ("f16", "q8_0")

#: tokenizer.json pre-tokenizer -> llama.cpp's name for it (tokenizer.ggml.pre).
_QWEN2_REGEX_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
_LLAMA3_REGEX_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the way this tokenizer splits text before BPE."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds and kinds[0] == "Split":
        regex = (parts[0].get("pattern") or {}).get("Regex", "")
        if regex.startswith(_QWEN2_REGEX_START):
            return "qwen2"
        if regex.startswith(_LLAMA3_REGEX_START):
            return "llama-bpe"
    raise UserError(
        f"export gguf: the tokenizer splits text with {kinds or 'nothing'}, which hwft cannot name for "
        "llama.cpp (it knows GPT-2, SmolLM, Qwen2 and Llama-3 byte-level BPE); export --to hf and convert "
        "with llama.cpp's convert_hf_to_gguf.py"
    )


def _vocabulary(folder: Path, vocab_size: int) -> tuple[list[str], list[int], list[str], dict]:
    """(tokens by id, GGUF token types, merges as 'a b', tokenizer.json) of a byte-level BPE."""
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not model.get("vocab"):
        raise UserError(
            f"export gguf: {folder / 'tokenizer.json'} is not a byte-level BPE tokenizer "
            f"({model.get('type')}); hwft writes GGUF for BPE vocabularies (Llama-3, Qwen2, SmolLM)"
        )
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding may be larger than the vocabulary: padding rows
        if i in by_id:
            tokens.append(by_id[i])
            types.append(3 if added.get(i, {}).get("special") else 4 if i in added else 1)  # control/user/normal
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges, tok


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotary layout (first half, second half) -> GGML's (interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_value(writer, key: str, value) -> None:
    """One metadata value under its full key, typed as llama.cpp reads it."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        raise UserError(f"export gguf: cannot write {key} = {value!r}")


#: A per-expert tensor name: ``...experts.<e>.<projection>.weight``.
_EXPERT = re.compile(r"^(?P<head>.*\.experts)\.(?P<index>\d+)\.(?P<tail>.+)$")


def merged_tensors(merged: Path, tied: bool):
    """(name, fp32 array) of every tensor in the merged folder, with each MoE layer's experts
    stacked into one (experts, out, in) tensor per projection, named ``...experts.<projection>``
    as llama.cpp's converter stacks them. The output layer is left out where it is the
    embedding again (llama.cpp reuses token_embd when output is absent)."""
    from safetensors import safe_open

    experts: dict[str, dict[int, np.ndarray]] = {}
    for file in sorted(merged.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:  # the merged folder is fp32
            for key in f.keys():
                if tied and key == "lm_head.weight":
                    continue
                array = f.get_tensor(key).astype(np.float32)
                match = _EXPERT.match(key)
                if match:
                    experts.setdefault(f"{match['head']}.{match['tail']}", {})[int(match["index"])] = array
                else:
                    yield key, array
    for key, by_index in experts.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise UserError(f"export gguf: the experts of {key} are not numbered 0..{len(by_index) - 1}")
        yield key, np.stack([by_index[i] for i in range(len(by_index))])


def layout_for(config: dict, layouts: dict[str, GgufLayout]) -> GgufLayout:
    """The GGUF layout of the model whose config.json is ``config``, or a UserError naming the
    families that have one (``layouts``: model_type -> layout, from the family table)."""
    family = config.get("model_type")
    if family not in layouts:
        raise UserError(
            f"export gguf: model_type {family!r} is not one hwft writes as GGUF "
            f"({', '.join(sorted(layouts))}); export --to hf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    return layouts[family]


def write_gguf(merged: Path, out_file: Path, gguf_type: str, name: str, layout: GgufLayout) -> Path:
    """Write the merged HF folder ``merged`` (safetensors, config, tokenizer) as one GGUF file,
    laid out as ``layout`` says."""
    import gguf

    config = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    # transformers 5 writes rope settings as rope_parameters; older folders as rope_theta/rope_scaling.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if isinstance(rope.get("full_attention"), dict):  # one rotary base per layer type (Gemma 3): the full layers'
        rope = rope["full_attention"]
    if layout.check is not None and (problem := layout.check(config)):
        raise UserError(f"export gguf: {problem}")
    rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(
            "export gguf: the model scales its rotary embedding (rope_scaling), which hwft does not "
            "write; export --to hf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    arch = getattr(gguf.MODEL_ARCH, layout.arch)
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    vocab_size = config["vocab_size"]

    prefix = gguf.MODEL_ARCH_NAMES[arch]
    derived = layout.derived(config) if layout.derived else {}

    def own(key: str) -> bool:  # a key the family derives itself, written below instead
        return key in derived

    writer = gguf.GGUFWriter(str(out_file), prefix)
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    if not own("attention.head_count_kv"):
        writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(rope_theta)
    if layout.norm == "layer":
        eps = next((config[k] for k in ("norm_epsilon", "layer_norm_eps", "layer_norm_epsilon") if k in config), 1e-5)
        writer.add_layer_norm_eps(float(eps))
    else:
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", config.get("norm_eps", 1e-6))))
    if layout.rope_dimension_count and not own("rope.dimension_count"):
        writer.add_rope_dimension_count(
            int(head_dim * float(config.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0))
        )
    if config.get("head_dim") and not own("attention.key_length"):  # a head size other than hidden / heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    for key, sources in layout.metadata:
        value = next((config[k] for k in sources if config.get(k) is not None), None)
        if value is not None and not own(key):
            add_value(writer, f"{prefix}.{key}", value)
    for key, value in derived.items():
        add_value(writer, f"{prefix}.{key}", value)
    writer.add_vocab_size(vocab_size)
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])

    tokens, types, merges, tok = _vocabulary(merged, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = config.get(key)
        if isinstance(value, list):
            value = value[0]
        if value is not None:
            add(int(value))
    tok_config_file = merged / "tokenizer_config.json"
    tok_config = json.loads(tok_config_file.read_text(encoding="utf-8")) if tok_config_file.is_file() else {}
    writer.add_add_bos_token(bool(tok_config.get("add_bos_token", False)))
    template_file = merged / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else tok_config.get("chat_template")
    if isinstance(template, str):
        writer.add_chat_template(template)

    names = gguf.get_tensor_name_map(arch, layers)
    tied = config.get("tie_word_embeddings", False)

    def stored(pairs):
        for key, array in pairs:
            parts = layout.split(key, array, config) if layout.split else None
            yield from parts if parts is not None else [(key, array)]

    for key, array in stored(merged_tensors(merged, tied)):
        stem, _, suffix = key.rpartition(".")
        mapped = names.get_name(stem)
        if mapped is None:
            if "rotary_emb" in key:
                continue
            raise UserError(f"export gguf: no GGUF name for the tensor {key}")
        if layout.permute_qk and stem.endswith("q_proj") and suffix == "weight":
            array = _permute(array, heads)
        elif layout.permute_qk and stem.endswith("k_proj") and suffix == "weight":
            array = _permute(array, kv_heads)
        if layout.norm_offset and key.endswith("norm.weight"):
            array = array + np.float32(layout.norm_offset)
        tensor_name = f"{mapped}.{suffix}"
        if array.ndim == 1 or mapped.endswith("ffn_gate_inp"):  # norms, biases and MoE routers stay fp32
            writer.add_tensor(tensor_name, array.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32 == 0:
            writer.add_tensor(tensor_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor_name, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file
