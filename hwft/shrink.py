"""A small model of a family's config: the same architecture (its norms, activations, rotary
settings, layer kinds, expert routing), two layers of it, 64 wide.

Two users: the tiny test models of families without a record of their own (hwft.testing.tiny),
and the MLX engine's load-time proof that mlx-lm computes what transformers computes for a
family outside its table (hwft_mlx.agreement), which builds a small model of the checkpoint's own
config in both libraries rather than loading the checkpoint twice.
"""

from __future__ import annotations

from typing import Any

#: What every small model has: 2 layers, 64 wide, 4 query heads over 2 key/value heads, the
#: embedded SmolLM2's first 4096 tokens with its special ids. Tied embeddings or not, as the
#: config has them (a GLM-4 with tied ones once failed where an untied one passed).
COMMON = dict(
    vocab_size=4096,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)

#: Keys a family's config may have beyond :data:`COMMON`, and the small value each takes where
#: the config has it (and not None): expert counts and widths, multi-head latent attention's
#: ranks, state-space and linear-attention sizes, windows shorter than a test row's 64 tokens
#: would be too (64 keeps a window in force on longer rows).
SHRINK = {
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_k": 2,
    "moe_topk": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "num_dense_layers": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "head_dim": 16,
    "index_head_dim": 16,
    "index_n_heads": 2,
    "index_topk": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "mamba_d_state": 8,
    "mamba_n_heads": 4,
    "mamba_d_head": 16,
    "mamba_head_dim": 16,
    "mamba_n_groups": 1,
    "state_size": 8,
    "ssm_state_size": 8,
    "n_groups": 1,
    "time_step_rank": 8,
    "sliding_window": 64,
    "attention_chunk_size": 64,
    "original_max_position_embeddings": 256,
    "vocab_size_per_layer_input": 4096,
    "hidden_size_per_layer_input": 16,
    "global_head_dim": 16,
    "zero_expert_num": 2,
    "expert_ffn_hidden_size": 32,
    "intermediate_size_mlp": 128,
    "num_experts_per_token": 2,
    "linear_head_dim": 16,
    "rotary_dim": 8,
    "attn_layer_period": 2,
    "attn_layer_offset": 1,
    "expert_layer_period": 2,
    "expert_layer_offset": 1,
}


def layers_kept(config: dict, layers: int = 2) -> list[int]:
    """Which of the config's layers a small model keeps: the first of each kind ``layer_types``
    names (so a small Gemma keeps a sliding and a full layer, a hybrid a linear and an attention
    one), in their order, filled up to ``layers`` with the ones after."""
    count = int(config.get("num_hidden_layers") or layers)
    kinds = config.get("layer_types")
    if not (isinstance(kinds, list) and len(kinds) == count):
        return list(range(min(layers, count)))
    first = sorted({kinds.index(kind) for kind in kinds})
    rest = [i for i in range(count) if i not in first]
    return sorted(first + rest[: max(0, layers - len(first))])


def shrink(config: dict, layers: int = 2) -> dict:
    """The keys to put over ``config`` (a config.json's contents) for a small model of it:
    :data:`COMMON`, :data:`SHRINK` where the config has the key, and every per-layer list (a list
    as long as the config's layers: ``layer_types``, ``no_rope_layers``) cut to the kept layers
    (:func:`layers_kept`)."""
    keep = layers_kept(config, layers)
    count = config.get("num_hidden_layers")
    out: dict[str, Any] = dict(COMMON, num_hidden_layers=len(keep))
    out.update({k: v for k, v in SHRINK.items() if config.get(k) is not None})
    if config.get("kv_lora_rank") is not None:  # multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, ...)
        # the rotary part is the head size mlx-lm and transformers rotate; one key/value head per query head
        out["num_key_value_heads"] = out["num_attention_heads"]
        if config.get("head_dim") is not None:
            out["head_dim"] = out["qk_rope_head_dim"]
        if config.get("qk_head_dim") is not None:
            out["qk_head_dim"] = out["qk_nope_head_dim"] + out["qk_rope_head_dim"]
    experts = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    if any(k in out for k in experts) and "num_experts_per_tok" in config and "num_experts_per_tok" not in out:
        out["num_experts_per_tok"] = 2  # a default config that leaves its routing unset (DeepSeek-V2)
    for key, value in config.items():
        if isinstance(value, list) and count and len(value) == count and key not in out:
            out[key] = [value[i] for i in keep]
    for part in ("text_config", "vision_config", "audio_config"):  # a composite (vision-language) config
        if isinstance(config.get(part), dict):
            inner = config[part]
            out[part] = {**inner, **shrink(inner, 1 if part != "text_config" else layers)}
            if part != "text_config":
                out[part] = {k: v for k, v in out[part].items() if k in inner or k in ("num_hidden_layers",)}
    # state-space heads: their count times their width is the expanded width
    for expand, heads, width in (
        ("mamba_expand", "mamba_n_heads", "mamba_d_head"),
        ("expand", "num_heads", "head_dim"),
    ):
        if config.get(expand) and config.get(heads) and out.get(width, config.get(width)):
            out[heads] = int(config[expand]) * out["hidden_size"] // int(out.get(width) or config[width])
    if config.get("mamba_d_ssm") and "mamba_n_heads" in out:  # Falcon-H1 states the product too
        out["mamba_d_ssm"] = out["mamba_n_heads"] * int(out.get("mamba_d_head") or config["mamba_d_head"])
    kinds = out.get("layer_types")
    if config.get("full_attention_interval") and isinstance(kinds, list) and "full_attention" in kinds:
        out["full_attention_interval"] = kinds.index("full_attention") + 1  # where a config states it twice
    if isinstance(config.get("block_types"), list) and config["block_types"]:  # a cycle (RecurrentGemma): one of it
        out["num_hidden_layers"] = max(out["num_hidden_layers"], len(config["block_types"]))
    return out
