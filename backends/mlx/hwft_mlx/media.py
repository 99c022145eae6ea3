"""What the MLX engine feeds images to and with (hwft_mlx.vision), in a module of its own that
imports nothing: the capability record (hwft_mlx.device) claims it without importing mlx, and
the forward (hwft_mlx.forward) tells a vision-language model by its mark."""

#: The vision-language families whose images the MLX engine feeds (mlx-vlm's forward held to
#: transformers' logits: tests/test_mlx_vision.py).
MEDIA_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
#: The data kinds whose rows it feeds them with: conversations (sft) and preference pairs (dpo,
#: orpo, simpo).
MEDIA_DATA_KINDS = ("chat", "preference")

#: The attribute a model loaded by hwft_mlx.vision.load_model carries (its forward is mlx-vlm's).
VISION_MARK = "_hwft_vision"


def is_vision(model) -> bool:
    """Whether ``model`` is a vision-language model loaded by hwft_mlx.vision.load_model."""
    return bool(getattr(model, VISION_MARK, False))
