"""Images, videos and audio in conversational rows, as LLaMA-Factory and OpenAI write them.

Two ways a row carries them, both read as they are:
- **LLaMA-Factory's columns**: ``images``, ``videos`` and ``audios`` (lists of file paths,
  relative to the data file's folder, or ``dataset_dir`` for a registry), placed in the text by
  ``<image>``, ``<video>`` and ``<audio>``, one placeholder for each file, in order.
- **OpenAI-style content parts** in ``messages``: ``{"type": "image_url", "image_url": {"url":
  ...}}`` with a local path or a ``data:`` URL, and ``{"type": "input_audio", "input_audio":
  {"data": BASE64, "format": "wav"}}``. Each part becomes its placeholder where it stands.

hwft never fetches: an ``http(s)`` URL is refused in one line. A missing file, a placeholder
count that does not match the files, and a file that does not decode are refused naming the file
and row (the loader adds them to the messages raised here).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from pathlib import Path

#: A media kind -> its placeholder in a turn's text and the column LLaMA-Factory reads it from.
PLACEHOLDERS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}
COLUMNS = {"image": "images", "video": "videos", "audio": "audios"}
#: Content-part types, by the media kind they carry.
PART_TYPES = {
    "image_url": "image",
    "image": "image",
    "video_url": "video",
    "video": "video",
    "input_audio": "audio",
    "audio": "audio",
}
_DATA_URL = re.compile(r"data:(?P<mime>[\w/+.-]*)(;[\w=-]+)*;base64,(?P<data>.*)", re.S)


@dataclass
class Media:
    """One image, video or audio clip of an example, in the order its placeholders stand."""

    kind: str  #: image, video or audio
    given: str  #: as the row gave it: a path, or "data:<mime>;base64,..." (shortened where shown)
    path: Path | None = None  #: the file, once the loader resolved ``given`` (None for inline data)
    data: bytes | None = None  #: inline bytes (a data: URL, input_audio)

    def shown(self) -> str:
        """As given, shortened where long: a data: URL to its start, a path to its end (the name)."""
        if len(self.given) <= 60:
            return self.given
        return self.given[:40] + "..." if self.given.startswith("data:") else "..." + self.given[-57:]

    def open_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None, "located by the loader"
        return self.path.read_bytes()


def from_reference(kind: str, value: object, where: str) -> Media:
    """A path or URL as a column or an ``image_url`` part gives it."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} must be a file path or a data: URL, not {value!r}")
    if re.match(r"(?i)(https?|ftp)://", value):
        raise ValueError(
            f"{where} is a URL ({value[:80]}); hwft never fetches data: download the file and give its "
            "path (relative to the data file), or inline it as a data: URL"
        )
    if value.startswith("data:"):
        match = _DATA_URL.fullmatch(value.strip())
        if not match:
            raise ValueError(f"{where} is a data: URL that is not base64 ('data:<type>;base64,<data>')")
        return Media(kind, value, data=_decode(match["data"], where))
    return Media(kind, value)


def _decode(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: its base64 data does not decode") from None


def from_part(part: dict, where: str) -> Media:
    """The media of one OpenAI-style content part (``image_url``, ``input_audio``, ...)."""
    kind = PART_TYPES[part["type"]]
    body = part.get(part["type"])
    if part["type"] == "input_audio":
        if not isinstance(body, dict) or not isinstance(body.get("data"), str):
            raise ValueError(f"{where} is an input_audio part without its base64 'data'")
        return Media("audio", f"input_audio ({body.get('format', '?')})", data=_decode(body["data"], where))
    if isinstance(body, dict):
        body = body.get("url")
    if body is None:  # {"type": "image", "image": PATH} or {"type": "image", "path": ...}
        body = part.get("path") or part.get("url")
    return from_reference(kind, body, where)


def from_columns(row: dict, col) -> list[Media]:
    """The files of LLaMA-Factory's ``images``, ``videos`` and ``audios`` columns (``col``
    renames a column), kinds in that order and each in its own order."""
    found: list[Media] = []
    for kind, column in COLUMNS.items():
        name = col(column)
        value = row.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"field '{name}' must be a list of file paths")
        found += [from_reference(kind, v, f"{name}[{i}]") for i, v in enumerate(value)]
    return found


#: The message lists of the conversational kinds' examples (hwft.data.kinds), in turn order.
TURN_FIELDS = ("messages", "chosen", "rejected", "completion")


def attach_media(example, row: dict, mapping) -> None:
    """Gather an example's media: the content parts' (which the parser left on their turns as
    ``media``) in turn order, then LLaMA-Factory's columns; and check the placeholders."""
    found: list[Media] = []
    texts: list[str] = []
    for name in TURN_FIELDS:
        for turn in getattr(example, name, None) or []:
            found += turn.pop("media", [])
            texts.append(turn.get("content") or "")
    found += from_columns(row, mapping.col)
    check_placeholders(texts, found)
    example.media = found


def check_placeholders(texts: list[str], media: list[Media]) -> None:
    """Each kind's placeholders in the turns' text number its files."""
    for kind, mark in PLACEHOLDERS.items():
        marks = sum(t.count(mark) for t in texts)
        files = sum(1 for m in media if m.kind == kind)
        if marks != files:
            raise ValueError(
                f"{marks} {mark} placeholder{'s' * (marks != 1)} in the turns but {files} {kind} "
                f"file{'s' * (files != 1)} in the row; give one {mark} for each {COLUMNS[kind][:-1]}, "
                "where it belongs in the text"
            )


def locate(media: list[Media], folder: Path, where: str) -> None:
    """Resolve each file against ``folder`` (the data file's, or dataset_dir); a missing one
    is an error naming it."""
    from hwft.errors import DataError

    for m in media:
        if m.data is not None:
            continue
        path = Path(m.given).expanduser()
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise DataError(f"{where}: {m.kind} file not found: {m.given} (looked for {path})")
        m.path = path


def open_image(media: Media, where: str):
    """The image as an RGB PIL image; one that does not decode is an error naming it."""
    from PIL import Image, UnidentifiedImageError

    from hwft.errors import DataError

    try:
        with Image.open(io.BytesIO(media.open_bytes())) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{where}: image {media.shown()} does not decode ({exc})") from None


def thumbnail(media: Media, where: str, size: int) -> str:
    """A small picture of an image (or a video's first frame) as a data: URL (JPEG, its longer
    side at most ``size`` pixels): what hwft board shows beside a row."""
    if media.kind == "video":
        from hwft.data.video import VideoSampling, open_video

        picture = open_video(media, where, VideoSampling(maxlen=1)).frames[0]
    else:
        picture = open_image(media, where)
    picture = picture.copy()
    picture.thumbnail((size, size))
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def counts(media: list[Media]) -> dict[str, int]:
    """How many of each kind, for messages and `hwft data inspect`."""
    out: dict[str, int] = {}
    for m in media:
        out[m.kind] = out.get(m.kind, 0) + 1
    return out


def described(media: list[Media]) -> str:
    """'2 images and 1 video'."""
    parts = [f"{n} {kind}{'s' * (n != 1) if kind != 'audio' else ''}" for kind, n in counts(media).items()]
    return " and ".join(parts) if len(parts) <= 2 else ", ".join(parts[:-1]) + " and " + parts[-1]


def refuse_media(example) -> None:
    """A row with media where nothing feeds them to the model (a renderer without the model's
    vision record: hwft.vision) is refused in one line, rather than used as text with its
    placeholders in it."""
    if getattr(example, "media", None):
        from hwft.errors import DataError

        raise DataError(
            f"{example.source} has {described(example.media)}, but they are not fed to the model here: hwft "
            "trains on images with a vision-language model of hwft.vision's table on the torch engine; leave the "
            "row's media and its <image>/<video>/<audio> placeholders out to use its text"
        )
