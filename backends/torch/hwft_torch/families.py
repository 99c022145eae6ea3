"""The torch engine's model-family table (hwft.families), registered through
``hwft_register_model_families`` as a plugin's would be.

Fast paths (``Family.paths``) the torch engine's kernels and loaders ask for:

- ``fused_projections``: the decoder layers name their sibling projections as Llama does
  (``self_attn.{q,k,v}_proj``, ``mlp.{gate,up}_proj``), so hwft_sibling_projections can run
  each group as one matmul (it still checks each module, and skips what does not match);
- ``packed_attention``: attention goes through transformers' AttentionInterface and takes
  ``position_ids``, so hwft_packed_sdpa can keep a packed row's examples apart;
- ``liger``: Liger has ``apply_liger_kernel_to_<options["liger"]>`` for the family;
- ``options["experts"]``: the experts implementation an MoE family loads with (transformers'
  ``experts_implementation``), where this torch has it;
- ``npu_ops``: the family's RMSNorm, rotary embedding and gated MLP are the Llama shapes that
  torch-npu's fused operators replace (hwft_ascend.kernels).

The generic record (``"*"``) is what a family without a row gets: the two paths that check the
model themselves, no Liger, no NPU operators, no GGUF.
"""

from __future__ import annotations

from hwft.families import GENERIC, Family, GgufLayout

ENGINE = "torch"
LLAMA_LIKE = frozenset({"fused_projections", "packed_attention", "liger", "npu_ops"})
#: What a family gets whose layers name their siblings as Llama does but whose norms, rotary
#: embedding or MLP are not the shapes torch-npu's fused operators replace.
TORCH_PATHS = LLAMA_LIKE - {"npu_ops"}

#: GGUF layouts as llama.cpp's convert_hf_to_gguf.py writes them; ``tests/test_families.py``
#: reads each back through transformers' own GGUF loader (its inverse transforms).
LLAMA_GGUF = GgufLayout("LLAMA", permute_qk=True, rope_dimension_count=True)  # Mistral too, as llama.cpp does
EXPERTS = (("expert_count", ("num_local_experts", "num_experts")), ("expert_used_count", ("num_experts_per_tok",)),
           ("expert_feed_forward_length", ("moe_intermediate_size",)))
SLIDING = (("attention.sliding_window", ("sliding_window",)),)
GRANITE_SCALES = (("attention.scale", ("attention_multiplier",)), ("embedding_scale", ("embedding_multiplier",)),
                  ("residual_scale", ("residual_multiplier",)), ("logit_scale", ("logits_scaling",)))
#: transformers 5's experts implementation for MoE families: every expert's tokens in one
#: grouped matmul (torch.nn.functional.grouped_mm), instead of its default loop over the experts.
GROUPED = "grouped_mm"
SOFTCAPS = (("attn_logit_softcapping", ("attn_logit_softcapping",)),
            ("final_logit_softcapping", ("final_logit_softcapping",)))

def smollm3_pattern(config: dict) -> str | None:
    """llama.cpp's smollm3 leaves out the rotary embedding on every 4th layer (and only there)."""
    layers = config.get("no_rope_layers")
    expected = [int((i + 1) % 4 != 0) for i in range(len(layers or []))]
    if layers and list(layers) != expected:
        return f"llama.cpp's smollm3 skips rotary embeddings on every 4th layer; this model's no_rope_layers are {layers}"
    return None


def gemma3_pattern(config: dict) -> str | None:
    """llama.cpp's gemma3 makes every 6th layer a full-attention one (the rest slide); a
    Gemma 3 whose layer_types differ would attend otherwise there."""
    kinds = config.get("layer_types")
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(len(kinds or []))]
    if kinds and kinds != expected:
        return ("llama.cpp's gemma3 makes every 6th layer full attention and the others sliding; this model's "
                f"layer_types are {kinds}")
    return None


FAMILIES = (
    Family("llama", ENGINE, "Llama 2/3, SmolLM2", LLAMA_LIKE, options={"liger": "llama"}, gguf=LLAMA_GGUF),
    Family("qwen2", ENGINE, "Qwen2, Qwen2.5", LLAMA_LIKE, options={"liger": "qwen2"}, gguf=GgufLayout("QWEN2")),
    Family("qwen3", ENGINE, "Qwen3", TORCH_PATHS, options={"liger": "qwen3"}, gguf=GgufLayout("QWEN3")),
    Family("qwen3_moe", ENGINE, "Qwen3-MoE", TORCH_PATHS,
           options={"liger": "qwen3_moe", "experts": GROUPED}, gguf=GgufLayout("QWEN3MOE", metadata=EXPERTS)),
    Family("mistral", ENGINE, "Mistral", LLAMA_LIKE, options={"liger": "mistral"}, gguf=LLAMA_GGUF),
    Family("phi3", ENGINE, "Phi-3, Phi-4-mini", frozenset({"packed_attention", "liger"}), options={"liger": "phi3"},
           gguf=GgufLayout("PHI3", rope_dimension_count=True)),
    Family("gemma2", ENGINE, "Gemma 2", TORCH_PATHS, attention="eager",
           options={"liger": "gemma2", "attention_why": "Gemma 2 soft-caps its attention scores, which sdpa cannot"},
           gguf=GgufLayout("GEMMA2", norm_offset=1.0, metadata=SLIDING + SOFTCAPS)),
    Family("gemma3_text", ENGINE, "Gemma 3 (text)", TORCH_PATHS,
           options={"liger": "gemma3_text"}, gguf=GgufLayout("GEMMA3", norm_offset=1.0, metadata=SLIDING, check=gemma3_pattern)),
    Family("mixtral", ENGINE, "Mixtral", TORCH_PATHS, options={"liger": "mixtral", "experts": GROUPED},
           gguf=GgufLayout("LLAMA", permute_qk=True, rope_dimension_count=True, metadata=EXPERTS, readback="hwft")),
    Family("olmo2", ENGINE, "OLMo 2", TORCH_PATHS, options={"liger": "olmo2"},
           gguf=GgufLayout("OLMO2", readback="hwft")),
    Family("granite", ENGINE, "Granite 3", TORCH_PATHS, options={"liger": "granite"},
           gguf=GgufLayout("GRANITE", permute_qk=True, rope_dimension_count=True, metadata=GRANITE_SCALES,
                           readback="hwft")),
    Family("glm4", ENGINE, "GLM-4 (q/k/v fuse; its gate/up is one Linear already)", TORCH_PATHS,
           options={"liger": "glm4"}, gguf=GgufLayout("GLM4", rope_dimension_count=True, readback="hwft")),
    Family("smollm3", ENGINE, "SmolLM3", TORCH_PATHS, options={"liger": "smollm3"},
           gguf=GgufLayout("SMOLLM3", permute_qk=True, rope_dimension_count=True, check=smollm3_pattern,
                           readback="hwft")),
    Family("deepseek_v3", ENGINE, "DeepSeek-V3 (MLA attention: no q/k/v siblings to fuse)",
           frozenset({"packed_attention"}), options={"experts": GROUPED}),
    Family(GENERIC, ENGINE, "any other family transformers loads", frozenset({"fused_projections", "packed_attention"})),
)
