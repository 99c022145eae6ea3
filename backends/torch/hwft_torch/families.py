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

from hwft.families import GENERIC, LLAMA_GGUF, Family, GgufLayout

ENGINE = "torch"
LLAMA_LIKE = frozenset({"fused_projections", "packed_attention", "liger", "npu_ops"})
#: The paths that check the model themselves: what the generic record gives, and the families
#: with a row only for their GGUF layout.
GENERIC_PATHS = frozenset({"fused_projections", "packed_attention"})
#: What a family gets whose layers name their siblings as Llama does but whose norms, rotary
#: embedding or MLP are not the shapes torch-npu's fused operators replace.
TORCH_PATHS = LLAMA_LIKE - {"npu_ops"}

#: GGUF layouts as llama.cpp's convert_hf_to_gguf.py writes them; ``tests/test_families.py``
#: reads each back through transformers' own GGUF loader (its inverse transforms).
EXPERTS = (
    ("expert_count", ("num_local_experts", "num_experts")),
    ("expert_used_count", ("num_experts_per_tok",)),
    ("expert_feed_forward_length", ("moe_intermediate_size",)),
)
SLIDING = (("attention.sliding_window", ("sliding_window",)),)
GRANITE_SCALES = (
    ("attention.scale", ("attention_multiplier",)),
    ("embedding_scale", ("embedding_multiplier",)),
    ("residual_scale", ("residual_multiplier",)),
    ("logit_scale", ("logits_scaling",)),
)
#: transformers 5's experts implementation for MoE families: every expert's tokens in one
#: grouped matmul (torch.nn.functional.grouped_mm), instead of its default loop over the experts.
GROUPED = "grouped_mm"
SOFTCAPS = (
    ("attn_logit_softcapping", ("attn_logit_softcapping",)),
    ("final_logit_softcapping", ("final_logit_softcapping",)),
)


def smollm3_pattern(config: dict) -> str | None:
    """llama.cpp's smollm3 leaves out the rotary embedding on every 4th layer (and only there)."""
    layers = config.get("no_rope_layers")
    expected = [int((i + 1) % 4 != 0) for i in range(len(layers or []))]
    if layers and list(layers) != expected:
        return (
            f"llama.cpp's smollm3 skips rotary embeddings on every 4th layer; this model's no_rope_layers are {layers}"
        )
    return None


def deepseek2_metadata(config: dict) -> dict:
    """DeepSeek-V3's GGUF keys as llama.cpp's deepseek2 reads them: MLA written as MQA with one
    key/value head of the latent's width (kv_lora_rank + the rotary part), decompressed to the
    heads' own sizes (the ``_mla`` lengths); the routed and shared experts, sigmoid gating."""
    rope, latent = config["qk_rope_head_dim"], config["kv_lora_rank"]
    out = {
        "attention.head_count_kv": 1,
        "attention.kv_lora_rank": latent,
        "attention.key_length": latent + rope,
        "attention.value_length": latent,
        "attention.key_length_mla": config["qk_nope_head_dim"] + rope,
        "attention.value_length_mla": config["v_head_dim"],
        "rope.dimension_count": rope,
        "leading_dense_block_count": int(config.get("first_k_dense_replace") or 0),
        "expert_feed_forward_length": config["moe_intermediate_size"],
        "expert_count": config["n_routed_experts"],
        "expert_shared_count": int(config.get("n_shared_experts") or 0),
        "expert_used_count": config["num_experts_per_tok"],
        "expert_gating_func": 2,  # gguf.ExpertGatingFuncType.SIGMOID
        "expert_weights_scale": float(config.get("routed_scaling_factor", 1.0)),
        "expert_group_count": int(config.get("n_group") or 1),
        "expert_group_used_count": int(config.get("topk_group") or 1),
    }
    if config.get("q_lora_rank"):
        out["attention.q_lora_rank"] = config["q_lora_rank"]
    if config.get("norm_topk_prob"):
        out["expert_weights_norm"] = True
    return out


def deepseek2_split(key: str, array, config: dict):
    """llama.cpp's MLA split: kv_b_proj (heads * (nope + v), latent) becomes k_b (heads, latent,
    nope) and v_b (heads, v, latent); the router's correction bias is ``exp_probs_b.bias``."""
    if key.endswith("self_attn.kv_b_proj.weight"):
        heads, nope, v = config["num_key_value_heads"], config["qk_nope_head_dim"], config["v_head_dim"]
        kv_b = array.reshape(heads, nope + v, array.shape[-1])
        return [
            (key.replace("kv_b_proj", "k_b_proj"), kv_b[:, :nope].transpose(0, 2, 1).copy()),
            (key.replace("kv_b_proj", "v_b_proj"), kv_b[:, nope:].copy()),
        ]
    if key.endswith("mlp.gate.e_score_correction_bias"):
        return [(key.replace("e_score_correction_bias", "e_score_correction.bias"), array)]
    return None


def deepseek2_config_back(meta: dict) -> dict:
    """:func:`deepseek2_metadata` read back as DeepseekV3Config keys."""
    rope = int(meta["rope.dimension_count"])
    return {
        "num_key_value_heads": None,  # MQA in the file: the model's own heads (set from the head count)
        "kv_lora_rank": meta["attention.kv_lora_rank"],
        "q_lora_rank": meta.get("attention.q_lora_rank"),
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": int(meta["attention.key_length_mla"]) - rope,
        "v_head_dim": meta["attention.value_length_mla"],
        "head_dim": rope,
        "first_k_dense_replace": meta["leading_dense_block_count"],
        "moe_intermediate_size": meta["expert_feed_forward_length"],
        "n_routed_experts": meta["expert_count"],
        "n_shared_experts": meta["expert_shared_count"],
        "num_experts_per_tok": meta["expert_used_count"],
        "routed_scaling_factor": meta["expert_weights_scale"],
        "norm_topk_prob": bool(meta.get("expert_weights_norm", False)),
        "n_group": meta["expert_group_count"],
        "topk_group": meta["expert_group_used_count"],
    }


def deepseek2_tensor_back(key: str, read, config):
    """:func:`deepseek2_split` undone for one parameter, or None."""
    import numpy as np

    if key.endswith("self_attn.kv_b_proj.weight"):
        k_b = read(key.replace("kv_b_proj", "k_b_proj")).transpose(0, 2, 1)
        v_b = read(key.replace("kv_b_proj", "v_b_proj"))
        joined = np.concatenate([k_b, v_b], axis=1)
        return joined.reshape(-1, joined.shape[-1])
    if key.endswith("mlp.gate.e_score_correction_bias"):
        return read(key.replace("e_score_correction_bias", "e_score_correction.bias"))
    return None


def gemma3_pattern(config: dict) -> str | None:
    """llama.cpp's gemma3 makes every 6th layer a full-attention one (the rest slide); a
    Gemma 3 whose layer_types differ would attend otherwise there."""
    kinds = config.get("layer_types")
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(len(kinds or []))]
    if kinds and kinds != expected:
        return (
            "llama.cpp's gemma3 makes every 6th layer full attention and the others sliding; this model's "
            f"layer_types are {kinds}"
        )
    return None


#: Each family's tiny test config (``Family.tiny``, over hwft.testing.tiny.COMMON's 2 layers, 64
#: wide, 4 query heads over 2 key/value heads): the smallest shapes that still exercise what sets
#: the family apart. Gemma 3's sliding window is 8 tokens, shorter than the test rows, so the
#: window is really in force (Gemma 2's is as long as the model, since mlx-lm's gemma2 has none;
#: Mistral's is off, as in Mistral v0.2 on); MoE families route 2 of 4 experts; Gemma 2/3
#: alternate a sliding and a full layer. mlx-lm ties no output layer for GLM-4 or DeepSeek-V3
#: (their real checkpoints do not either); DeepSeek's MLA has as many key/value heads as query heads.
FAMILIES = (
    Family("llama", ENGINE, "Llama 2/3, SmolLM2", LLAMA_LIKE, options={"liger": "llama"}, gguf=LLAMA_GGUF, tiny={}),
    Family(
        "qwen2", ENGINE, "Qwen2, Qwen2.5", LLAMA_LIKE, options={"liger": "qwen2"}, gguf=GgufLayout("QWEN2"), tiny={}
    ),
    Family(
        "qwen3",
        ENGINE,
        "Qwen3",
        TORCH_PATHS,
        options={"liger": "qwen3"},
        gguf=GgufLayout("QWEN3"),
        tiny={"head_dim": 16},
    ),
    Family(
        "qwen3_moe",
        ENGINE,
        "Qwen3-MoE",
        TORCH_PATHS,
        options={"liger": "qwen3_moe", "experts": GROUPED},
        gguf=GgufLayout("QWEN3MOE", metadata=EXPERTS),
        moe=True,
        tiny={
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
            "router_aux_loss_coef": 0.01,
        },
    ),
    Family(
        "mistral",
        ENGINE,
        "Mistral",
        LLAMA_LIKE,
        options={"liger": "mistral"},
        gguf=LLAMA_GGUF,
        tiny={"sliding_window": None},
    ),
    Family(
        "mixtral",
        ENGINE,
        "Mixtral",
        TORCH_PATHS,
        options={"liger": "mixtral", "experts": GROUPED},
        moe=True,
        gguf=GgufLayout("LLAMA", permute_qk=True, rope_dimension_count=True, metadata=EXPERTS, readback="hwft"),
        tiny={"num_local_experts": 4, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02, "sliding_window": None},
    ),
    Family(
        "gemma2",
        ENGINE,
        "Gemma 2",
        TORCH_PATHS,
        attention="eager",
        options={"liger": "gemma2", "attention_why": "Gemma 2 soft-caps its attention scores, which sdpa cannot"},
        gguf=GgufLayout("GEMMA2", norm_offset=1.0, metadata=SLIDING + SOFTCAPS),
        tiny={
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 512,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    Family(
        "gemma3_text",
        ENGINE,
        "Gemma 3 (text)",
        TORCH_PATHS,
        options={"liger": "gemma3_text"},
        gguf=GgufLayout("GEMMA3", norm_offset=1.0, metadata=SLIDING, check=gemma3_pattern),
        tiny={
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    Family(
        "phi3",
        ENGINE,
        "Phi-3, Phi-4-mini",
        frozenset({"packed_attention", "liger"}),
        options={"liger": "phi3"},
        gguf=GgufLayout("PHI3", rope_dimension_count=True),
        tiny={},
    ),
    Family(
        "olmo2",
        ENGINE,
        "OLMo 2",
        TORCH_PATHS,
        options={"liger": "olmo2"},
        gguf=GgufLayout("OLMO2", readback="hwft"),
        tiny={},
    ),
    Family(
        "granite",
        ENGINE,
        "Granite 3",
        TORCH_PATHS,
        options={"liger": "granite"},
        gguf=GgufLayout(
            "GRANITE", permute_qk=True, rope_dimension_count=True, metadata=GRANITE_SCALES, readback="hwft"
        ),
        tiny={
            "embedding_multiplier": 2.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.25,
            "logits_scaling": 4.0,
        },
    ),
    Family(
        "glm4",
        ENGINE,
        "GLM-4 (q/k/v fuse; its gate/up is one Linear already)",
        TORCH_PATHS,
        options={"liger": "glm4"},
        gguf=GgufLayout("GLM4", rope_dimension_count=True, readback="hwft"),
        tiny={"head_dim": 16, "partial_rotary_factor": 0.5, "tie_word_embeddings": False},
    ),
    Family(
        "smollm3",
        ENGINE,
        "SmolLM3",
        TORCH_PATHS,
        options={"liger": "smollm3"},
        gguf=GgufLayout("SMOLLM3", permute_qk=True, rope_dimension_count=True, check=smollm3_pattern, readback="hwft"),
        tiny={"no_rope_layers": [1, 0]},
    ),
    Family(
        "deepseek_v3",
        ENGINE,
        "DeepSeek-V3 (MLA attention: no q/k/v siblings to fuse)",
        frozenset({"packed_attention"}),
        options={"experts": GROUPED},
        moe=True,
        gguf=GgufLayout(
            "DEEPSEEK2",
            rope_dimension_count=True,
            derived=deepseek2_metadata,
            split=deepseek2_split,
            config_back=deepseek2_config_back,
            tensor_back=deepseek2_tensor_back,
            readback="hwft",
        ),
        tiny={
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "head_dim": 8,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "tie_word_embeddings": False,
            "num_key_value_heads": 4,
        },
    ),
    Family(
        "starcoder2",
        ENGINE,
        "StarCoder2 (LayerNorm, GELU MLP)",
        GENERIC_PATHS,
        gguf=GgufLayout("STARCODER2", norm="layer"),
    ),
    Family(
        "stablelm",
        ENGINE,
        "StableLM 2 (LayerNorm, partial rotary embedding)",
        GENERIC_PATHS,
        gguf=GgufLayout("STABLELM", norm="layer", rope_dimension_count=True),
    ),
    Family(
        "nemotron",
        ENGINE,
        "Nemotron (LayerNorm1P: llama.cpp stores its norms' weights plus one; partial rotary embedding)",
        GENERIC_PATHS,
        gguf=GgufLayout("NEMOTRON", norm_offset=1.0, rope_dimension_count=True),
    ),
    Family(GENERIC, ENGINE, "any other family transformers loads", GENERIC_PATHS),
)
