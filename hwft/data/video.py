"""A video row's frames, sampled as LLaMA-Factory samples them (PyAV decodes the file).

For one video of ``n`` frames lasting ``d`` seconds, at ``data.video_fps`` frames a second and
at most ``data.video_maxlen`` of them:

    sampled = min(n, video_maxlen, max(1, floor(d * video_fps)))
    indices = floor(linspace(0, n - 1, sampled))        (evenly spread, first and last frame kept)

an odd count gets its last frame once more (Qwen's vision towers take frames two at a time), and
each frame is scaled to at most ``data.video_max_pixels`` (and at least ``data.video_min_pixels``)
keeping its aspect ratio, as LLaMA-Factory's ``_regularize_videos`` does. The model's own
processing (hwft.vision) takes the frames from there.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from hwft.errors import DataError, UserError

#: What installs the decoder, for the message where it is missing.
INSTALL = "pip install av (or pip install 'hwft[video]')"


@dataclass(frozen=True)
class VideoSampling:
    """How frames are taken from a video (LLaMA-Factory's keys and defaults)."""

    max_pixels: int = 256 * 256  #: video_max_pixels: a larger frame is scaled down to about this
    min_pixels: int = 16 * 16  #: video_min_pixels: a smaller frame is scaled up to about this
    fps: float = 2.0  #: video_fps: frames sampled per second of video
    maxlen: int = 128  #: video_maxlen: at most this many frames of one video

    @classmethod
    def of(cls, data) -> VideoSampling:
        """The recipe's data section's settings, LLaMA-Factory's defaults where it leaves one out."""
        given = {
            "max_pixels": getattr(data, "video_max_pixels", None),
            "min_pixels": getattr(data, "video_min_pixels", None),
            "fps": getattr(data, "video_fps", None),
            "maxlen": getattr(data, "video_maxlen", None),
        }
        return cls(**{k: v for k, v in given.items() if v is not None})


@dataclass
class Clip:
    """The frames of one video as the model is given them."""

    frames: list  #: RGB PIL images, all one size, an even count
    indices: list[int]  #: which frame of the file each is (the last repeated where the count was odd)
    rate: float  #: the file's frames per second
    sampled_fps: float  #: frames taken per second of video (LLaMA-Factory's fps_per_video)


def sample_indices(total: int, seconds: float | None, sampling: VideoSampling) -> list[int]:
    """Which of ``total`` frames to take (see the module's docstring)."""
    import numpy as np

    if total <= 0:  # a stream that does not say its length: the first video_maxlen frames
        return list(range(sampling.maxlen))
    wanted = max(1, math.floor((seconds or total / 24.0) * sampling.fps))
    count = min(total, sampling.maxlen, wanted)
    return [int(i) for i in np.linspace(0, total - 1, count).astype(np.int32)]


def scaled(image, max_pixels: int, min_pixels: int):
    """``image`` scaled (aspect kept) to at most ``max_pixels`` and at least ``min_pixels``, as
    LLaMA-Factory's _preprocess_image does (PIL's default resampling), in RGB."""
    if image.width * image.height > max_pixels:
        factor = math.sqrt(max_pixels / (image.width * image.height))
        image = image.resize((int(image.width * factor), int(image.height * factor)))
    if image.width * image.height < min_pixels:
        factor = math.sqrt(min_pixels / (image.width * image.height))
        image = image.resize((int(image.width * factor), int(image.height * factor)))
    return image if image.mode == "RGB" else image.convert("RGB")


def open_video(media, where: str, sampling: VideoSampling) -> Clip:
    """The sampled frames of ``media`` (hwft.data.media.Media, a video); one that does not decode
    is an error naming it and the row."""
    try:
        import av
        from av.error import FFmpegError
    except ImportError:
        raise UserError(
            f"{where} has a video, and reading videos needs PyAV, which is not installed: {INSTALL}"
        ) from None

    try:
        with av.open(io.BytesIO(media.open_bytes()), "r") as container:
            stream = container.streams.video[0] if container.streams.video else None
            if stream is None:
                raise DataError(f"{where}: video {media.shown()} holds no video stream")
            seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
            if seconds is None and container.duration:  # Matroska: the container's length (microseconds)
                seconds = container.duration / 1e6
            rate = float(stream.average_rate) if stream.average_rate else None
            total = stream.frames or (round(seconds * rate) if seconds and rate else 0)
            indices = sample_indices(total, seconds, sampling)
            wanted, frames = set(indices), {}
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    frames[index] = frame.to_image()
                if index >= indices[-1]:
                    break
    except FFmpegError as exc:
        raise DataError(f"{where}: video {media.shown()} does not decode ({exc})") from None
    taken = [i for i in indices if i in frames]
    if not taken:
        raise DataError(f"{where}: video {media.shown()} gave no frames")
    if len(taken) % 2:
        taken.append(taken[-1])
    images = [scaled(frames[i], sampling.max_pixels, sampling.min_pixels) for i in taken]
    rate = rate or sampling.fps
    sampled_fps = len(indices) / seconds if seconds else sampling.fps
    return Clip(images, taken, rate, sampled_fps)
