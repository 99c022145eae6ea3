"""The MLX engine's model-family table (hwft.families), registered through
``hwft_register_model_families`` as a plugin's would be.

The key is the mlx-lm architecture a checkpoint loads as (the module under ``mlx_lm.models``
that mlx-lm picks for its ``model_type``: mistral loads as llama). What a record holds:

- ``paths``: ``mlx_packing``, proven to pack: the tests hold its packed forward to its rows'
  own forwards (tests/test_families.py). Every other architecture packs only after the same
  check passes when the model loads (:func:`hwft_mlx.packing.prove`), and is refused in one line
  where it fails.
- ``options["config"]``: the family's config.json keys put where mlx-lm's ``ModelArgs`` reads
  them (:func:`hwft_mlx.loading.config_overrides` applies them after the keys every family
  shares). transformers 5 writes, and mlx-lm 0.32 reads:

  ============  ====================================  =====================================
  family        transformers 5 writes                 mlx-lm reads
  ============  ====================================  =====================================
  every family  ``rope_parameters.rope_theta``        ``rope_theta``, ``rope_scaling``
  every family  ``rope_parameters.partial_rotary_..`` ``partial_rotary_factor``
  qwen3_moe     ``num_local_experts``                 ``num_experts``
  gemma3_text   ``rope_parameters.{full,sliding}_..`` ``rope_theta``, ``rope_local_base_freq``
  gemma3_text   ``layer_types``                       ``sliding_window_pattern``
  ============  ====================================  =====================================

- ``options["logits"]``: what the family's own call does to the output layer's logits (Gemma
  2's soft-capping, Granite's scaling), for hwft's forward that runs the output layer itself.
- ``options["router"]``: the path ending of an MoE family's routers: LoRA adapts them as PEFT
  does (``target_parameters: gate.weight``; :mod:`hwft_mlx.moe_lora`), and where the config has
  a router_aux_loss_coef their logits give the load-balancing loss (:mod:`hwft_mlx.router`,
  :mod:`hwft.router_balance`).
- ``options["mask_dims"]``: 5 where the family's attention scores are (batch, kv_heads,
  repeats, L, L) rather than (batch, heads, L, L) (mlx-lm's gemma2), so a packed mask gets one
  more axis.
- ``options["window"]``: whether mlx-lm's forward applies the config's sliding window
  (a function of the config). Most of mlx-lm's models have no sliding window: where a config
  sets one (Gemma 2, Mistral v0.1, Qwen with ``use_sliding_window``), rows longer than it are
  refused (:func:`hwft_mlx.loading.ignored_window`), since they would attend farther than the
  model does on torch. Gemma 3 applies its window, and mlx-lm's llama applies one where the
  config lists ``layer_types`` (Ministral).

The generic record (``"*"``) is any other architecture mlx-lm loads: keys shared by every
family translated, packing after the load-time proof.
"""

from __future__ import annotations

from hwft.errors import ModelError
from hwft.families import GENERIC, LLAMA_GGUF, Family

ENGINE = "mlx"
PACKS = frozenset({"mlx_packing"})


def qwen3_moe_config(config: dict) -> dict:
    """transformers 5 names the expert count ``num_local_experts`` (as Mixtral's); mlx-lm's
    qwen3_moe reads ``num_experts``."""
    if config.get("num_experts") is None and config.get("num_local_experts") is not None:
        return {"num_experts": config["num_local_experts"]}
    return {}


def gemma3_text_config(config: dict) -> dict:
    """Gemma 3 keeps one rotary base per layer type (``rope_parameters: {full_attention: ...,
    sliding_attention: ...}``) and lists each layer's type; mlx-lm reads the full layers' base
    as ``rope_theta``, the sliding layers' as ``rope_local_base_freq``, and a full layer every
    ``sliding_window_pattern`` layers."""
    out: dict = {}
    rope = config.get("rope_parameters") or {}
    full, local = rope.get("full_attention"), rope.get("sliding_attention")
    if isinstance(full, dict) and "rope_theta" in full:
        out["rope_theta"] = full["rope_theta"]
        if full.get("rope_type", "default") != "default":
            out["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
    if isinstance(local, dict) and "rope_theta" in local:
        out["rope_local_base_freq"] = local["rope_theta"]
    kinds = config.get("layer_types")
    if kinds:
        if "full_attention" not in kinds:
            raise ModelError(
                "mlx-lm's gemma3_text needs a full-attention layer in every sliding_window_pattern "
                f"layers; this config's layer_types has none ({len(kinds)} sliding layers)"
            )
        pattern = kinds.index("full_attention") + 1
        expected = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(len(kinds))]
        if kinds != expected:
            raise ModelError(f"mlx-lm's gemma3_text repeats one sliding/full pattern; layer_types {kinds} does not")
        out["sliding_window_pattern"] = pattern
    return out


def applies_window(config: dict) -> bool:
    return True


def windows_by_layer_type(config: dict) -> bool:
    """mlx-lm's llama: a sliding window only on the layers ``layer_types`` calls sliding."""
    return "sliding_attention" in (config.get("layer_types") or ())


def softcapped(model, logits):
    """Gemma 2's final soft-capping: c * tanh(logits / c)."""
    import mlx.core as mx  # here, not at the top: registering the table imports no engine

    cap = model.final_logit_softcapping
    return mx.tanh(logits / cap) * cap


def granite_scaled(model, logits):
    """Granite divides its logits by ``logits_scaling``."""
    return logits / model.logits_scaling


FAMILIES = (
    Family(
        "llama",
        ENGINE,
        "Llama 2/3, SmolLM2, Mistral (and what mlx-lm loads as llama)",
        PACKS,
        options={"window": windows_by_layer_type},
        serves=("mistral",),
        gguf=LLAMA_GGUF,
    ),  # the embedded model's GGUF reads without torch (hwft.gguf_convert)
    Family("qwen2", ENGINE, "Qwen2, Qwen2.5", PACKS),
    Family("qwen3", ENGINE, "Qwen3", PACKS),
    Family(
        "qwen3_moe", ENGINE, "Qwen3-MoE", PACKS, options={"config": qwen3_moe_config, "router": "mlp.gate"}, moe=True
    ),
    Family("mixtral", ENGINE, "Mixtral", PACKS, options={"router": "block_sparse_moe.gate"}, moe=True),
    Family(
        "gemma2",
        ENGINE,
        "Gemma 2 (mlx-lm's has no sliding window)",
        PACKS,
        options={"logits": softcapped, "mask_dims": 5},
    ),
    Family(
        "gemma3_text", ENGINE, "Gemma 3 (text)", PACKS, options={"config": gemma3_text_config, "window": applies_window}
    ),
    Family("phi3", ENGINE, "Phi-3", PACKS),
    Family("olmo2", ENGINE, "OLMo 2", PACKS),
    Family("granite", ENGINE, "Granite 3", PACKS, options={"logits": granite_scaled}),
    Family("glm4", ENGINE, "GLM-4", PACKS),
    Family("smollm3", ENGINE, "SmolLM3", PACKS),
    Family("deepseek_v3", ENGINE, "DeepSeek-V3 (MLA attention, MoE)", PACKS, options={"router": "mlp.gate"}, moe=True),
    Family(GENERIC, ENGINE, "any other family mlx-lm loads (packs after a check at load time)"),
)
