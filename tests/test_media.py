"""Images, video and audio in rows (hwft.data.media): LLaMA-Factory's columns and OpenAI's content
parts read as they are, from the real demo files in ../shared/peer-data; each bad input refused
in one line naming the file and row. Where nothing feeds them to the model, a row with media is
refused in one line rather than used as text with its placeholders in it (tests/test_vision.py:
the models that are fed images)."""

from __future__ import annotations

import base64
import io

import pytest

from hwft.data.chat import ChatRenderer
from hwft.data.formats import BUILTIN_FORMATS, Mapping, parse_turns
from hwft.data.kinds.preference import tokenize_pair
from hwft.data.loading import load_examples
from hwft.data.media import Media, open_image
from hwft.errors import DataError
from tests.conftest import PEER_DATA, write_jsonl

LF = PEER_DATA / "llamafactory"
FORMATS = {f.name: f for f in BUILTIN_FORMATS}


def png_bytes() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    "name, kinds",
    [
        ("mllm_demo", {"image"}),
        ("mllm_video_demo", {"video"}),
        ("mllm_audio_demo", {"audio"}),
        ("mllm_video_audio_demo", {"video", "audio"}),
    ],
)
def test_llamafactory_demo_rows_read_with_their_files(name, kinds):
    """Every demo row: its placeholders count its files, each file found next to the data file."""
    examples = list(load_examples(LF / f"{name}.json", "messages", FORMATS))
    assert examples and all(e.media for e in examples)
    for example in examples:
        assert {m.kind for m in example.media} <= kinds
        assert all(
            m.path is not None and m.path.is_file() and m.path.parent.name == "mllm_demo_data" for m in example.media
        )
        marks = sum(t["content"].count(f"<{k}>") for t in example.messages for k in ("image", "video", "audio"))
        assert marks == len(example.media)
    if name == "mllm_demo":
        first = examples[0]
        assert [m.given for m in first.media] == ["mllm_demo_data/1.jpg", "mllm_demo_data/1.jpg"]
        assert first.messages[0]["content"] == "<image>Who are they?"
        image = open_image(first.media[0], "row 1")
        assert image.mode == "RGB" and min(image.size) > 100


def test_openai_content_parts_become_placeholders_and_media():
    data = base64.b64encode(png_bytes()).decode()
    turns = parse_turns(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is "},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                    {"type": "text", "text": " and "},
                    {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                    {"type": "image_url", "image_url": {"url": "pictures/cat.jpg"}},
                ],
            },
            {"role": "assistant", "content": "A red square."},
        ],
        Mapping(),
        "messages",
    )
    assert turns[0]["content"] == "What is <image> and <audio><image>"
    media = turns[0]["media"]
    assert [m.kind for m in media] == ["image", "audio", "image"]
    assert media[0].data == png_bytes() and media[2].given == "pictures/cat.jpg" and media[2].data is None
    assert open_image(media[0], "row 1").size == (8, 6)


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Hello."}]},
            "1 <image> placeholder in the turns but 0 image files in the row",
        ),
        (
            {
                "messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Hello."}],
                "images": ["a.png", "a.png"],
            },
            "1 <image> placeholder in the turns but 2 image files in the row",
        ),
        (
            {
                "messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Hello."}],
                "images": ["https://example.com/a.png"],
            },
            "images[0] is a URL (https://example.com/a.png); hwft never fetches data",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
                    {"role": "assistant", "content": "Hello."},
                ]
            },
            "messages[0].content[0] is a URL (http://x/y.png); hwft never fetches data",
        ),
        (
            {
                "messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Hello."}],
                "images": ["missing.png"],
            },
            "image file not found: missing.png",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}],
                    },
                    {"role": "assistant", "content": "Hello."},
                ]
            },
            "messages[0].content[0]: its base64 data does not decode",
        ),
    ],
    ids=["no-file", "too-many-files", "url-column", "url-part", "missing", "bad-base64"],
)
def test_bad_media_is_refused_naming_the_file_and_row(tmp_path, row, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    with pytest.raises(DataError) as caught:
        list(load_examples(path, "messages", FORMATS))
    said = str(caught.value)
    assert message in said and f"{path} row 1" in said, said
    assert "\n" not in said


def test_an_image_that_does_not_decode_is_named(tmp_path):
    whole = png_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])  # an interrupted copy
    media = Media("image", "cut.png", path=tmp_path / "cut.png")
    with pytest.raises(DataError, match=r"rows.jsonl row 3: image cut.png does not decode \("):
        open_image(media, "rows.jsonl row 3")


def test_preference_rows_keep_their_images(tokenizer, tmp_path):
    """A dpo row with an image prompt is refused like an sft row, not trained on its text with
    the placeholder in it."""
    (tmp_path / "a.png").write_bytes(png_bytes())
    rows = [{"prompt": "<image>What colour?", "chosen": "Red.", "rejected": "Blue.", "images": ["a.png"]}]
    (example,) = load_examples(write_jsonl(tmp_path / "p.jsonl", rows), "auto", FORMATS, objective="dpo")
    assert [m.path for m in example.media] == [tmp_path / "a.png"]
    example.source = "p.jsonl row 1"
    with pytest.raises(DataError, match="p.jsonl row 1 has 1 image, but they are not fed to the model here"):
        tokenize_pair(ChatRenderer(tokenizer, tokenizer.chat_template), example)
