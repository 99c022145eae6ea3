"""Vision-language families: what a row's images become for the model, one record each.

A :class:`VisionFamily` says, for one ``model_type``, which image processor of transformers
reads its images (the PIL one: it needs no torchvision), the text one image stands as in the
chat template's output before it is expanded (Qwen's ``<|vision_start|><|image_pad|>
<|vision_end|>``), the token the expansion repeats, how many tokens an image becomes, which of
the processor's outputs the model's forward takes, and where its vision tower is (LoRA's
``all-linear`` leaves it out, as LLaMA-Factory's ``freeze_vision_tower`` does by default).

How a row with images renders (:func:`tokenize`), for the chat kind and the kinds built on it:
each ``<image>`` of the turns becomes the family's placeholder, the chat template renders the
turns as text (the label spans found as for any row: hwft.data.chat), each image's placeholder
token is repeated as many times as the image has tokens, and the text is tokenised. The image
tokens never count as labels. The pixels travel with the sequence (``Tokenized.inputs``) to the
engine, which hands them to the model's forward beside the token ids.

The engine that feeds images says so in its capability (``Capability.media``); a row with
media for a model or an engine that is not fed them is refused in one line at the dry run
(:func:`check_media`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwft.data.video import VideoSampling
from hwft.errors import DataError
from hwft.vision_video import QWEN2_5_VIDEO, QWEN2_VIDEO, QWEN3_VIDEO, VideoFamily, read_videos, video_bounds


def qwen_tokens(outputs: dict, index: int, merge: int) -> int:
    """Qwen2-VL's count: the image's patch grid (t, h, w) merged ``merge x merge`` at a time."""
    t, h, w = (int(x) for x in outputs["image_grid_thw"][index])
    return t * h * w // (merge * merge)


@dataclass(frozen=True)
class VisionFamily:
    """One vision-language family: how its images become tokens and model inputs."""

    model_type: str
    description: str
    #: transformers' image processor class (its PIL backend: no torchvision), "module:Class"
    image_processor: str
    placeholder: str  #: the text one ``<image>`` becomes before the chat template renders the turns
    expands: str  #: the token of the rendered text that stands for one image until it is expanded
    image_token: str  #: the token an image's features fill, ``tokens`` of them per image
    #: (processor outputs, image index, processor, model config) -> how many tokens that image becomes
    tokens: Callable[[dict, int, Any, dict], int]
    inputs: tuple[str, ...]  #: processor outputs the model's forward takes, concatenated over a batch
    vision_modules: tuple[str, ...]  #: module-path parts of the vision tower and its projector
    projector_modules: tuple[str, ...]  #: module-path parts, among those, of the projector
    #: how it takes videos (hwft.vision_video); None: it is fed images only
    video: VideoFamily | None = None
    #: a per-token input marking the image tokens (1), video tokens (2) and text (0), by the name
    #: the forward takes it; None: none
    token_types: str | None = None
    #: what ``expands`` becomes for an image of n tokens, from (n, processor outputs, image index,
    #: processor, model config) (default: ``image_token`` n times)
    expansion: Callable[[int, dict, int, Any, dict], str] | None = None
    #: its forward works out the positions itself from the ids, the image grid and the mask
    #: (Qwen's 3-D mRoPE): a caller passes none, where for other families it counts real tokens
    own_positions: bool = False
    #: the keyword arguments the family's processor call takes from the model config (Pixtral's
    #: images are cut to the merged patch, patch_size x spatial_merge_size)
    call: Callable[[dict], dict] | None = None
    #: its rows with images and videos pack: the engine gives each packed example its own
    #: positions from the model's own rule (Qwen's get_rope_index) and proves the packed forward
    #: at load time (hwft_torch.media_packing)
    packs: bool = False

    def expanded(self, n: int, outputs: dict, index: int, processor, config: dict) -> str:
        return self.expansion(n, outputs, index, processor, config) if self.expansion else self.image_token * n

    @property
    def kinds(self) -> tuple[str, ...]:
        """The media kinds hwft feeds it."""
        return ("image", "video") if self.video else ("image",)


QWEN_VL = dict(
    image_processor="transformers.models.qwen2_vl:Qwen2VLImageProcessorPil",
    placeholder="<|vision_start|><|image_pad|><|vision_end|>",
    expands="<|image_pad|>",
    image_token="<|image_pad|>",
    tokens=lambda outputs, index, processor, config: qwen_tokens(outputs, index, processor.merge_size),
    inputs=("pixel_values", "image_grid_thw"),
    token_types="mm_token_type_ids",
    vision_modules=("visual",),
    projector_modules=("merger", "deepstack_merger_list"),
    own_positions=True,
    packs=True,
)
#: GLM-4V (GLM-4.1V, GLM-4.5V): Qwen2-VL's processing under its own tokens, as Glm4vProcessor
#: writes it: each image grid_t x grid_h x grid_w / 4 <|image|> tokens between
#: <|begin_of_image|> and <|end_of_image|>, 3-D positions from the grid (its rows pack as
#: Qwen's do). Its videos (timestamped frames of its own) are not fed yet.
GLM4V = {
    **QWEN_VL,
    "image_processor": "transformers.models.glm4v:Glm4vImageProcessorPil",
    "placeholder": "<|begin_of_image|><|image|><|end_of_image|>",
    "expands": "<|image|>",
    "image_token": "<|image|>",
}
#: Qwen3.5's Gated DeltaNet layers carry state along a row across its examples in transformers'
#: torch path (its text rows' packing proof fails too), so its rows do not pack.
QWEN3_5 = {**QWEN_VL, "packs": False}
#: Gemma 3 (4B and up): each image a fixed number of soft tokens (mm_tokens_per_image, 256 in
#: the released checkpoints) between its begin and end tokens, as Gemma3Processor writes it; the
#: image tokens attend to each other both ways in training (token_type_ids).
GEMMA3 = dict(
    image_processor="transformers.models.gemma3:Gemma3ImageProcessorPil",
    placeholder="<start_of_image>",
    expands="<start_of_image>",
    image_token="<image_soft_token>",
    tokens=lambda outputs, index, processor, config: int(config.get("mm_tokens_per_image", 256)),
    inputs=("pixel_values",),
    token_types="token_type_ids",
    vision_modules=("vision_tower", "multi_modal_projector"),
    projector_modules=("multi_modal_projector",),
    expansion=lambda n, *_: f"\n\n<start_of_image>{'<image_soft_token>' * n}<end_of_image>\n\n",
)

#: Gemma 4: each image as many soft tokens as its aspect-preserving resize gives (up to the
#: processor's max_soft_tokens, 280 in the released checkpoints) between <|image> and <image|>,
#: as Gemma4Processor writes it; patch positions travel beside the pixels, and the image tokens
#: are marked (mm_token_type_ids) for the layers that let an image's tokens see each other. The
#: audio tower of the small checkpoints is left out of LoRA as the vision tower is.
GEMMA4 = dict(
    image_processor="transformers.models.gemma4:Gemma4ImageProcessorPil",
    placeholder="<|image|>",
    expands="<|image|>",
    image_token="<|image|>",
    tokens=lambda outputs, index, processor, config: int(outputs["num_soft_tokens_per_image"][index]),
    inputs=("pixel_values", "image_position_ids"),
    token_types="mm_token_type_ids",
    vision_modules=("vision_tower", "embed_vision", "audio_tower", "embed_audio"),
    projector_modules=("embed_vision", "embed_audio"),
    expansion=lambda n, *_: f"<|image>{'<|image|>' * n}<image|>",
)


def pixtral_patch(config: dict) -> int:
    """Pixtral's merged patch: the tower's patch times Mistral 3's spatial merge (28 pixels)."""
    return int(config["vision_config"].get("patch_size", 14)) * int(config.get("spatial_merge_size", 2))


def pixtral_call(config: dict) -> dict:
    """The processor call's patch: the merged one."""
    return {"patch_size": pixtral_patch(config)}


def pixtral_grid(outputs: dict, index: int, config: dict) -> tuple[int, int]:
    """(rows, columns) of merged patches of image ``index`` as the processor resized it."""
    height, width = (int(x) for x in outputs["image_sizes"][index])
    return height // pixtral_patch(config), width // pixtral_patch(config)


def pixtral_text(n: int, outputs: dict, index: int, processor, config: dict) -> str:
    """A Pixtral image as PixtralProcessor writes it: each row of [IMG] tokens ends with
    [IMG_BREAK], the last one with [IMG_END]."""
    rows, columns = pixtral_grid(outputs, index, config)
    return ("[IMG]" * columns + "[IMG_BREAK]") * (rows - 1) + "[IMG]" * columns + "[IMG_END]"


#: Mistral 3 (Mistral Small 3.1 and up, Ministral 3, Magistral): Pixtral's tower reads each image
#: at its own size (its longest edge up to the processor's), padded to the batch's largest with
#: the sizes beside it; its merged patches become [IMG] tokens row by row.
MISTRAL3 = dict(
    image_processor="transformers.models.pixtral:PixtralImageProcessorPil",
    placeholder="[IMG]",
    expands="[IMG]",
    image_token="[IMG]",
    tokens=lambda outputs, index, processor, config: math.prod(pixtral_grid(outputs, index, config)),
    inputs=("pixel_values", "image_sizes"),
    vision_modules=("vision_tower", "multi_modal_projector"),
    projector_modules=("multi_modal_projector",),
    expansion=pixtral_text,
    call=pixtral_call,
)


def smolvlm_seq(config: dict) -> int:
    """SmolVLM's tokens per tile: the tower's patches, pixel-shuffled scale_factor^2 into one."""
    tower = config["vision_config"]
    return (int(tower.get("image_size", 512)) // int(tower.get("patch_size", 16))) ** 2 // int(
        config.get("scale_factor", 2)
    ) ** 2


def smolvlm_grid(outputs: dict, index: int) -> tuple[int, int]:
    """(rows, columns) of the tiles image ``index`` was split into (0, 0: not split)."""
    return int(outputs["rows"][0][index]), int(outputs["cols"][0][index])


def smolvlm_tokens(outputs: dict, index: int, processor, config: dict) -> int:
    rows, columns = smolvlm_grid(outputs, index)
    return (rows * columns + 1) * smolvlm_seq(config)  # the tiles, and the whole image shrunk


def smolvlm_text(n: int, outputs: dict, index: int, processor, config: dict) -> str:
    """A SmolVLM image as SmolVLMProcessor writes it (transformers' own function): each tile's
    tokens after its <row_r_col_c>, then the whole image's after <global-img>."""
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    rows, columns = smolvlm_grid(outputs, index)
    return get_image_prompt_string(
        rows, columns, smolvlm_seq(config), "<fake_token_around_image>", "<image>", "<global-img>"
    )


#: SmolVLM (SmolVLM2 too): each image split into tiles of the tower's size plus the whole image
#: shrunk to one, each read as image_seq_len tokens; a row's tiles travel as one stack with a
#: mask of their pixels, and a batch's stacks are zero-padded to the most tiles, as the
#: processor pads a batch (the model drops all-zero tiles).
SMOLVLM = dict(
    image_processor="transformers.models.smolvlm:SmolVLMImageProcessorPil",
    placeholder="<image>",
    expands="<image>",
    image_token="<image>",
    tokens=smolvlm_tokens,
    inputs=("pixel_values", "pixel_attention_mask"),
    vision_modules=("vision_model", "connector"),
    projector_modules=("connector",),
    expansion=smolvlm_text,
    call=lambda config: {"return_row_col_info": True},
)


def llava_tokens(outputs: dict, index: int, processor, config: dict) -> int:
    """LLaVA's count: the tower's patches of the cropped image, and its class token too where
    the model keeps every feature (vision_feature_select_strategy full; default drops it)."""
    height, width = (int(x) for x in outputs["pixel_values"][index].shape[-2:])
    patch = int(config["vision_config"].get("patch_size", 14))
    cls = config.get("vision_feature_select_strategy", "default") == "full"
    return (height // patch) * (width // patch) + int(cls)


#: LLaVA-1.5: each image cropped to the tower's size, one <image> token per patch, as
#: LlavaProcessor writes it.
LLAVA = dict(
    image_processor="transformers.models.llava:LlavaImageProcessorPil",
    placeholder="<image>",
    expands="<image>",
    image_token="<image>",
    tokens=llava_tokens,
    inputs=("pixel_values",),
    vision_modules=("vision_tower", "multi_modal_projector"),
    projector_modules=("multi_modal_projector",),
)


def llava_next_tokens(outputs: dict, index: int, processor, config: dict) -> int:
    """LLaVA-NeXT's count (LlavaNextProcessor's): the base crop's patches, then the patches of
    the tiles of the best grid resolution for the image, with the rows and columns its padding
    added taken back off (``unpad``), and one newline per remaining row; the class token too
    where the model keeps every feature."""
    from transformers.image_processing_utils import select_best_resolution

    original = tuple(int(x) for x in outputs["image_sizes"][index])
    height, width = (int(x) for x in outputs["pixel_values"][index].shape[-2:])
    best_height, best_width = select_best_resolution(original, processor.image_grid_pinpoints)
    patch = int(config["vision_config"].get("patch_size", 14))
    rows, columns = height // patch * (best_height // height), width // patch * (best_width // width)
    if original[1] / original[0] > columns / rows:  # wider than the grid: rows of padding above and below
        rows -= (rows - int(round(original[0] * (columns / original[1]), 7))) // 2 * 2
    else:
        columns -= (columns - int(round(original[1] * (rows / original[0]), 7))) // 2 * 2
    cls = config.get("vision_feature_select_strategy", "default") == "full"
    return rows * columns + rows + (height // patch) * (width // patch) + int(cls)


#: LLaVA-NeXT (LLaVA-1.6): each image as its base crop plus the tiles of the grid resolution
#: that fits it best (its ``image_grid_pinpoints``), a row's tiles stacked and a batch's stacks
#: zero-padded to the most tiles as the processor pads them, ``image_sizes`` beside them; the
#: learned newline vector goes with the projector.
LLAVA_NEXT = {
    **LLAVA,
    "image_processor": "transformers.models.llava_next:LlavaNextImageProcessorPil",
    "tokens": llava_next_tokens,
    "inputs": ("pixel_values", "image_sizes"),
    "vision_modules": ("vision_tower", "multi_modal_projector", "image_newline"),
    "projector_modules": ("multi_modal_projector", "image_newline"),
}

FAMILIES: dict[str, VisionFamily] = {
    f.model_type: f
    for f in (
        VisionFamily("qwen2_vl", "Qwen2-VL", **QWEN_VL, video=QWEN2_VIDEO),  # pyright: ignore[reportArgumentType]
        VisionFamily("qwen2_5_vl", "Qwen2.5-VL", **QWEN_VL, video=QWEN2_5_VIDEO),  # pyright: ignore[reportArgumentType]
        VisionFamily("qwen3_vl", "Qwen3-VL", **QWEN_VL, video=QWEN3_VIDEO),  # pyright: ignore[reportArgumentType]
        VisionFamily("qwen3_vl_moe", "Qwen3-VL MoE", **QWEN_VL, video=QWEN3_VIDEO),  # pyright: ignore[reportArgumentType]
        VisionFamily("qwen3_5", "Qwen3.5", **QWEN3_5, video=QWEN3_VIDEO),  # pyright: ignore[reportArgumentType]
        VisionFamily("qwen3_5_moe", "Qwen3.5 MoE", **QWEN3_5, video=QWEN3_VIDEO),  # pyright: ignore[reportArgumentType]
        VisionFamily("glm4v", "GLM-4V", **GLM4V),  # pyright: ignore[reportArgumentType]
        VisionFamily("glm4v_moe", "GLM-4.5V", **GLM4V),  # pyright: ignore[reportArgumentType]
        VisionFamily("gemma3", "Gemma 3", **GEMMA3),  # pyright: ignore[reportArgumentType]
        VisionFamily("gemma4", "Gemma 4", **GEMMA4),  # pyright: ignore[reportArgumentType]
        VisionFamily("mistral3", "Mistral 3", **MISTRAL3),  # pyright: ignore[reportArgumentType]
        VisionFamily("smolvlm", "SmolVLM", **SMOLVLM),  # pyright: ignore[reportArgumentType]
        VisionFamily(
            "idefics3",
            "Idefics3",
            **{**SMOLVLM, "image_processor": "transformers.models.idefics3:Idefics3ImageProcessorPil"},  # pyright: ignore[reportArgumentType]
        ),
        VisionFamily("llava", "LLaVA-1.5", **LLAVA),  # pyright: ignore[reportArgumentType]
        VisionFamily("llava_next", "LLaVA-NeXT", **LLAVA_NEXT),  # pyright: ignore[reportArgumentType]
    )
}


def model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def family_of(folder: Path) -> VisionFamily | None:
    return FAMILIES.get(model_type(folder) or "")


def packing_families() -> list[str]:
    """The families whose rows with images and videos pack (VisionFamily.packs)."""
    return [f.description for f in FAMILIES.values() if f.packs]


def methods_fed(data_kinds: tuple[str, ...] | None = None) -> list[str]:
    """The methods whose rows carry images to the model (Method.media), of ``data_kinds`` only
    where given (an engine's Capability.media_data_kinds)."""
    from hwft.methods.lookup import registry

    return [name for name, m in registry().methods.items() if m.media and (data_kinds is None or m.kind in data_kinds)]


def check_media(examples, model, capability, backend: str, objective: str) -> None:
    """Refuse, in one line naming the first row, media that this model on this backend is not
    fed: a method that does not feed them, a family not in the table, a kind the family is not
    fed, an engine that feeds none."""
    from hwft.data.media import described
    from hwft.methods.lookup import method

    first = next((e for e in examples if getattr(e, "media", None)), None)
    if first is None:
        return

    if not method(objective).media:
        fed = ", ".join(methods_fed())
        raise DataError(
            f"{first.source} has {described(first.media)}, but method.objective {objective} does not feed "
            f"images to the model yet ({fed} do); leave the rows' media and their placeholders out to train "
            "on the text"
        )
    family = family_of(model.path) if model.ready else None
    kinds = {m.kind for e in examples for m in getattr(e, "media", None) or []}
    if family is None:
        kind = model_type(model.path) if model.ready else None
        raise DataError(
            f"{first.source} has {described(first.media)}, but the model ({kind or model.path}) is not a "
            f"vision-language family hwft feeds images ({', '.join(FAMILIES)}); give such a checkpoint, "
            "or leave the rows' media and their <image>/<video>/<audio> placeholders out to train on the text"
        )
    unfed = sorted(kinds - set(family.kinds))
    if unfed:
        row = next(e for e in examples if any(m.kind in unfed for m in getattr(e, "media", None) or []))
        why = (
            " (hwft feeds no model audio yet: Qwen2-Audio, Qwen2.5-Omni and Gemma 3n are not in its table, and "
            "Gemma 4's audio tower is left out)"
            if "audio" in unfed
            else ""
        )
        raise DataError(
            f"{row.source} has {described(row.media)}: hwft feeds {family.description} "
            f"{' and '.join(k + 's' for k in family.kinds)} only, not {' or '.join(unfed)}{why}; leave those out"
        )
    missing = sorted(kinds - set(getattr(capability, "media", ())))
    if missing:
        notes = getattr(capability, "notes", {})
        why = "".join(f" ({notes[k]})" for k in missing if k in notes)
        raise DataError(
            f"{first.source} has {described(first.media)}, but backend {backend}'s engine does not feed "
            f"{' or '.join(k + 's' for k in missing)} to a model{why or ' yet'}; train these rows with "
            "backend=cpu (or cuda, rocm: the torch engine)"
        )
    families, data_kinds = getattr(capability, "media_families", None), getattr(capability, "media_data_kinds", None)
    if families is not None and family.model_type not in families:
        raise DataError(
            f"{first.source} has {described(first.media)}, but backend {backend}'s engine feeds images to "
            f"{', '.join(families)} only, not {family.model_type}; train these rows with backend=cpu (or cuda, "
            "rocm: the torch engine)"
        )
    if data_kinds is not None and method(objective).kind not in data_kinds:
        fed = ", ".join(methods_fed(data_kinds))
        raise DataError(
            f"{first.source} has {described(first.media)}, but backend {backend}'s engine feeds images with "
            f"method.objective {fed} only, not {objective}; train these rows with backend=cpu "
            "(or cuda, rocm: the torch engine)"
        )


class VisionInputs:
    """A model's image processor and family record, and how its videos are sampled: what
    :func:`tokenize` needs."""

    def __init__(
        self,
        family: VisionFamily,
        folder: Path,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        video: VideoSampling | None = None,
    ):
        import importlib

        module, name = family.image_processor.split(":")
        cls = getattr(importlib.import_module(module), name)
        overrides = {k: v for k, v in (("max_pixels", max_pixels), ("min_pixels", min_pixels)) if v is not None}
        try:
            self.processor = cls.from_pretrained(folder, local_files_only=True, **overrides)
        except OSError:  # no preprocessor_config.json: the family's defaults
            self.processor = cls(**overrides)
        self.family = family
        self.config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        self.sampling = video or VideoSampling()
        self.video_bounds = video_bounds(family.video, folder) if family.video else None

    @classmethod
    def for_model(
        cls,
        folder: Path,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        video: VideoSampling | None = None,
    ) -> VisionInputs | None:
        """The model's, where it is a vision-language family of the table; else None."""
        family = family_of(folder)
        return None if family is None else cls(family, folder, max_pixels, min_pixels, video)

    @classmethod
    def for_data(cls, folder: Path, data) -> VisionInputs | None:
        """The model's, with the recipe's data section's image and video settings."""
        return cls.for_model(folder, data.image_max_pixels, data.image_min_pixels, VideoSampling.of(data))

    def tokenize(self, renderer, example, first: int):
        return tokenize(renderer, example, first)

    def read(self, images: list) -> tuple[dict, list[int], list[str]]:
        """The processor's outputs for ``images``, how many image tokens each becomes, and the
        text each stands as in the sequence."""
        family, processor, config = self.family, self.processor, self.config
        outputs = processor(images=images, return_tensors="np", **(family.call(config) if family.call else {}))
        counts = [family.tokens(outputs, i, processor, config) for i in range(len(images))]
        texts = [family.expanded(n, outputs, i, processor, config) for i, n in enumerate(counts)]
        return outputs, counts, texts

    def media(self, media: list, where: str) -> tuple[dict, list[Expansion]]:
        """What the forward takes for a row's images and videos (hwft.data.media.Media), and how
        each kind's marks in the rendered text expand."""
        from hwft.data.media import open_image
        from hwft.data.video import open_video

        family, inputs, expansions = self.family, {}, []
        images = [open_image(m, where) for m in media if m.kind == "image"]
        if images:
            outputs, counts, texts = self.read(images)
            inputs.update({key: outputs[key] for key in family.inputs})
            expansions.append(Expansion("image", family.placeholder, family.expands, family.image_token, counts, texts))
        clips = [open_video(m, where, self.sampling) for m in media if m.kind == "video"]
        if clips:
            video = family.video
            assert video is not None and self.video_bounds is not None, "check_media refuses videos it is not fed"
            outputs, counts, texts = read_videos(video, self.processor, self.video_bounds, clips)
            inputs.update(outputs)
            expansions.append(Expansion("video", video.placeholder, video.expands, video.token, counts, texts))
        return inputs, expansions


@dataclass(frozen=True)
class Expansion:
    """One media kind of a row: its placeholder before rendering, its mark in the rendered text,
    the token its features fill, and each file's token count and text."""

    kind: str
    placeholder: str
    mark: str
    token: str
    counts: list[int]
    texts: list[str]


#: mm_token_type_ids' value of each media kind's tokens (text: 0), as transformers' Qwen models read it
TOKEN_TYPES = {"image": 1, "video": 2}


def rendered(turns: list[dict], expansions: list[Expansion]) -> list[dict]:
    """The turns with each ``<image>``/``<video>`` written as the family's placeholder."""
    from hwft.data.media import PLACEHOLDERS

    out = []
    for m in turns:
        content = m.get("content")
        if isinstance(content, str):
            for e in expansions:
                content = content.replace(PLACEHOLDERS[e.kind], e.placeholder)
            m = {**m, "content": content}
        out.append(m)
    return out


def token_types(renderer, ids: list[int], expansions: list[Expansion]) -> list[int]:
    kinds = {renderer.tokenizer.convert_tokens_to_ids(e.token): TOKEN_TYPES[e.kind] for e in expansions}
    return [kinds.get(t, 0) for t in ids]


def tokenize(renderer, example, first: int):
    """A conversation with images and videos: the token sequence (each one's tokens in place,
    none of them a label), labels on the assistant turns, and the pixels in ``inputs``."""
    from hwft.data.chat import IGNORE_INDEX
    from hwft.data.media import described

    vision: VisionInputs = renderer.vision
    inputs, expansions = vision.media(example.media, example.source)
    text, spans = renderer.label_spans(rendered(example.messages, expansions), example.tools, example.source, first)
    for e in expansions:
        text, spans = expand(text, spans, e.mark, e.texts, example.source, e.kind)
    tok = renderer.encode_text(text, spans)
    media_ids = set()
    for e in expansions:
        token_id = renderer.tokenizer.convert_tokens_to_ids(e.token)
        media_ids.add(token_id)
        found = sum(1 for t in tok.input_ids if t == token_id)
        if found != sum(e.counts):
            raise DataError(
                f"{example.source}: its {described([m for m in example.media if m.kind == e.kind])} should be "
                f"{sum(e.counts)} {e.token} tokens, but the chat template and tokenizer give {found}; the model's "
                f"tokenizer must hold {e.token} as one token"
            )
    tok.labels = [IGNORE_INDEX if t in media_ids else label for t, label in zip(tok.input_ids, tok.labels, strict=True)]
    tok.inputs = inputs
    tok.media_tokens = {e.kind: e.counts for e in expansions}
    if vision.family.token_types:
        tok.token_inputs = {vision.family.token_types: token_types(renderer, tok.input_ids, expansions)}
    return tok


def prompt(vision: VisionInputs, renderer, messages: list[dict], media: list, where: str) -> tuple[list[int], dict]:
    """A conversation with images, rendered up to where the assistant speaks: its token ids and
    what the model's forward takes beside them (pixels, grid, token types as one row)."""
    ids, inputs, token_inputs = prompt_inputs(vision, renderer, messages, media, where)
    return ids, {**inputs, **{key: [values] for key, values in token_inputs.items()}}


def prompt_inputs(
    vision: VisionInputs, renderer, messages: list[dict], media: list, where: str
) -> tuple[list[int], dict, dict[str, list[int]]]:
    """(token ids up to where the assistant speaks, the processor outputs the forward takes,
    the per-token inputs over those ids) of a conversation with images or videos: a prompt to
    generate from."""
    from hwft.data.media import check_placeholders

    check_placeholders([m.get("content") or "" for m in messages], media)
    inputs, expansions = vision.media(media, where)
    turns = [{**m, "content": m.get("content") or ""} for m in messages]
    text = renderer.render(rendered(turns, expansions), add_generation_prompt=True)
    for e in expansions:
        text, _ = expand(text, [], e.mark, e.texts, where, e.kind)
    ids = list(renderer.tokenizer(text, add_special_tokens=False)["input_ids"])
    token_inputs = {}
    if vision.family.token_types:
        token_inputs[vision.family.token_types] = token_types(renderer, ids, expansions)
    return ids, inputs, token_inputs


def expand(
    text: str, spans: list[tuple[int, int]], mark: str, images: list[str], where: str, kind: str = "image"
) -> tuple[str, list[tuple[int, int]]]:
    """``text`` with the i-th ``mark`` made ``images[i]`` (the image's or video's own text), and
    the label spans moved past what was inserted before them."""
    pieces = text.split(mark)
    if len(pieces) - 1 != len(images):
        raise DataError(
            f"{where}: the chat template's text holds {len(pieces) - 1} {mark} for {len(images)} {kind}s "
            f"(a template that drops or repeats a turn's text cannot carry its {kind}s)"
        )
    out, shifts, position = [pieces[0]], [], len(pieces[0])
    for image, piece in zip(images, pieces[1:], strict=True):
        shifts.append((position, len(image) - len(mark)))
        out.append(image + piece)
        position += len(mark) + len(piece)

    def moved(at: int) -> int:
        return at + sum(extra for where_, extra in shifts if where_ < at)

    return "".join(out), [(moved(s), moved(e)) for s, e in spans]


def part_of(family: VisionFamily, path: str) -> str:
    """Which part of the model a parameter or module path is in: tower, projector or language
    (the language model, its embeddings and output layer)."""
    parts = path.split(".")
    if not any(p in parts for p in family.vision_modules):
        return "language"
    return "projector" if any(p in parts for p in family.projector_modules) else "tower"


def frozen_parts(spec) -> set[str]:
    """The parts method.vision keeps frozen."""
    return {
        part
        for part, frozen in (
            ("tower", spec.freeze_tower),
            ("projector", spec.freeze_projector),
            ("language", spec.freeze_language_model),
        )
        if frozen
    }
