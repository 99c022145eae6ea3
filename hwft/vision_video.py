"""What a row's videos become for a vision-language family that takes them (Qwen's), one record each.

A video's frames (hwft.data.video: sampled and scaled as LLaMA-Factory does) are sized once for
the whole clip by the family's video rule, normalised by the model's own image processor, and
cut into patches two frames deep: ``temporal_patch_size`` consecutive frames make one patch, so
a clip of ``t`` frames at ``h x w`` pixels is a grid of ``(t / 2, h / p, w / p)`` patches, of
which each ``merge x merge`` square becomes one token:

    tokens = (t / temporal_patch_size) * (h / p) * (w / p) / merge**2

in the layout transformers' Qwen2-VL video processor writes (``pixel_values_videos``, one row
per patch: channel, then the patch's frames, then its pixels). A clip of two identical frames
gives exactly the image processor's patches of that frame, which repeats the frame to make its
one temporal patch (tests/test_video.py).

The sizing rules are the video processors' (transformers' ``Qwen2VLVideoProcessor`` bounds
each frame's pixels, ``Qwen3VLVideoProcessor`` the clip's ``t * h * w``) with their bounds from
the checkpoint's ``video_preprocessor_config.json``, else the processor's defaults. The frames
are resized with PIL's bicubic filter, as the image processor does; transformers' video
processors (torchvision's bicubic) can differ from it by a grey level here and there.

Qwen2.5-VL is given each clip's seconds per temporal patch (``second_per_grid_ts``, for its
time-aligned positions); Qwen3-VL and Qwen3.5 write each temporal patch's time in the text,
``<1.2 seconds><|vision_start|>...<|vision_end|>``, as their processors do.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VideoFamily:
    """How one family takes videos."""

    placeholder: str  #: the text one ``<video>`` becomes before the chat template renders the turns
    expands: str  #: what of the rendered text stands for one video until it is expanded
    token: str  #: the token a video's features fill
    inputs: tuple[str, ...]  #: what the forward takes, concatenated over a batch
    #: (frames, height, width, patch factor, min pixels, max pixels) -> the clip's (height, width)
    size: Callable[[int, int, int, int, int, int], tuple[int, int]]
    bounds: tuple[int, int]  #: the video processor's default (min, max) pixels
    timestamps: bool = False  #: each temporal patch's time written before it (Qwen3-VL)


def per_frame_size(frames: int, height: int, width: int, factor: int, low: int, high: int) -> tuple[int, int]:
    """Qwen2-VL's rule: each frame as an image, its pixels between the bounds, sides multiples of
    the patch factor (transformers' smart_resize)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=factor, min_pixels=low, max_pixels=high)


def whole_clip_size(frames: int, height: int, width: int, factor: int, low: int, high: int) -> tuple[int, int]:
    """Qwen3-VL's rule: the clip's frames x height x width between the bounds (its video
    processor's smart_resize, with frames counted in pairs)."""
    temporal = 2
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(frames / temporal) * temporal
    if t_bar * h_bar * w_bar > high:
        beta = math.sqrt(frames * height * width / high)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < low:
        beta = math.sqrt(low / (frames * height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


QWEN2_VIDEO = VideoFamily(
    placeholder="<|vision_start|><|video_pad|><|vision_end|>",
    expands="<|video_pad|>",
    token="<|video_pad|>",
    inputs=("pixel_values_videos", "video_grid_thw"),
    size=per_frame_size,
    bounds=(128 * 28 * 28, 768 * 28 * 28),
)
QWEN2_5_VIDEO = VideoFamily(**{**QWEN2_VIDEO.__dict__, "inputs": (*QWEN2_VIDEO.inputs, "second_per_grid_ts")})
QWEN3_VIDEO = VideoFamily(
    placeholder="<|vision_start|><|video_pad|><|vision_end|>",
    expands="<|vision_start|><|video_pad|><|vision_end|>",
    token="<|video_pad|>",
    inputs=("pixel_values_videos", "video_grid_thw"),
    size=whole_clip_size,
    bounds=(128 * 32 * 32, 768 * 32 * 32),
    timestamps=True,
)


def video_bounds(video: VideoFamily, folder: Path) -> tuple[int, int]:
    """(min, max) pixels of the checkpoint's video processor config, else the family's defaults."""
    low, high = video.bounds
    try:
        saved = json.loads((folder / "video_preprocessor_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return low, high
    size = saved.get("size") or {}
    low = saved.get("min_pixels") or size.get("shortest_edge") or low
    high = saved.get("max_pixels") or size.get("longest_edge") or high
    return int(low), int(high)


def read_videos(
    video: VideoFamily, processor, bounds: tuple[int, int], clips: list
) -> tuple[dict, list[int], list[str]]:
    """The forward's inputs for ``clips`` (hwft.data.video.Clip), how many video tokens each
    becomes, and the text each stands as in the sequence."""
    import numpy as np
    from PIL import Image

    patch, temporal, merge = processor.patch_size, processor.temporal_patch_size, processor.merge_size
    pixels, grids, seconds, counts, texts = [], [], [], [], []
    for clip in clips:
        frames = list(clip.frames)
        while len(frames) % temporal:
            frames.append(frames[-1])
        width, height = frames[0].size
        h, w = video.size(len(frames), height, width, patch * merge, *bounds)
        resized = [f if f.size == (w, h) else f.resize((w, h), Image.Resampling.BICUBIC) for f in frames]
        # the image processor normalises and patches each frame (repeating it to fill a temporal
        # patch); its first copy of each frame, taken ``temporal`` frames at a time, is the clip's
        flat = processor(images=resized, do_resize=False, return_tensors="np")["pixel_values"]
        t, cells = len(frames), (h // patch) * (w // patch)
        flat = np.asarray(flat, dtype=np.float32).reshape(t, cells, 3, temporal, patch * patch)[:, :, :, 0]
        flat = flat.reshape(t // temporal, temporal, cells, 3, patch * patch).transpose(0, 2, 3, 1, 4)
        pixels.append(flat.reshape((t // temporal) * cells, 3 * temporal * patch * patch))
        grid = (t // temporal, h // patch, w // patch)
        grids.append(grid)
        seconds.append(temporal / clip.sampled_fps)
        per_patch = grid[1] * grid[2] // (merge * merge)
        counts.append(grid[0] * per_patch)
        if video.timestamps:
            texts.append(timestamped(clip, temporal, grid[0], per_patch, video.token))
        else:
            texts.append(video.token * counts[-1])
    outputs = {
        "pixel_values_videos": np.concatenate(pixels),
        "video_grid_thw": np.array(grids, dtype=np.int64),
        "second_per_grid_ts": np.array(seconds, dtype=np.float32),
    }
    return {k: outputs[k] for k in video.inputs}, counts, texts


def timestamped(clip, temporal: int, groups: int, per_patch: int, token: str) -> str:
    """Qwen3-VL's text for a clip: each temporal patch's mean time, then its tokens."""
    indices = list(clip.indices)
    while len(indices) % temporal:
        indices.append(indices[-1])
    times = [i / clip.rate for i in indices]
    means = [(times[i] + times[i + temporal - 1]) / 2 for i in range(0, len(times), temporal)]
    return "".join(f"<{t:.1f} seconds><|vision_start|>{token * per_patch}<|vision_end|>" for t in means[:groups])
