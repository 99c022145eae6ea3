"""Video rows (hwft.data.video, hwft.vision_video) for the Qwen VL families on the torch engine:
LLaMA-Factory's video demo rows, with its image rows beside them, train a tiny Qwen2-VL,
Qwen2.5-VL and Qwen3-VL through the CLI; frames are sampled by LLaMA-Factory's rule; a clip's
patches are the image processor's where its two frames are one image, and a still clip trains
as its image does (transformers' own forward, each held to the other); Qwen3-VL's timestamps are
its processor's text; what cannot be fed is refused in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hwft.data.media import Media
from hwft.data.video import VideoSampling, open_video
from tests.conftest import PEER_DATA, write_jsonl, write_recipe

LF = PEER_DATA / "llamafactory"
DEMO = LF / "mllm_demo_data"


def media(path: Path) -> Media:
    return Media("video", path.name, path=path)


@pytest.mark.parametrize(
    ("name", "sampling", "frames"),
    [
        # 243 frames over 9.72 s at 2 a second: floor(19.44) = 19 frames, the last once more
        ("1.mp4", VideoSampling(), 20),
        # 270 frames over 9.03 s: 18
        ("2.avi", VideoSampling(), 18),
        ("3.mp4", VideoSampling(fps=1.0), 6),  # 146 frames over 6.09 s at 1 a second: 6
        ("4.mp4", VideoSampling(maxlen=5), 6),  # 150 frames over 5 s, at most 5 of them: 5, then 6
    ],
)
def test_frames_are_sampled_as_llamafactory_samples_them(name, sampling, frames):
    """min(frames, video_maxlen, floor(seconds x video_fps)) frames evenly spread from the first
    to the last, an odd count made even, each scaled to at most video_max_pixels."""
    import av

    clip = open_video(media(DEMO / name), name, sampling)
    with av.open(str(DEMO / name)) as container:
        stream = container.streams.video[0]
        total, seconds = stream.frames, float(stream.duration * stream.time_base)
        rate = float(stream.average_rate)
    count = min(total, sampling.maxlen, int(seconds * sampling.fps))
    expected = [int(i) for i in np.linspace(0, total - 1, count).astype(np.int32)]
    assert clip.indices[:count] == expected and len(clip.frames) == len(clip.indices) == frames
    assert clip.indices[0] == 0 and clip.indices[count - 1] == total - 1
    assert len({f.size for f in clip.frames}) == 1
    width, height = clip.frames[0].size
    assert width * height <= sampling.max_pixels
    assert clip.rate == pytest.approx(rate) and clip.sampled_fps == pytest.approx(count / seconds)


def still_clip(tmp_path: Path, size: int = 56, frames: int = 2) -> tuple[Path, Path]:
    """A lossless video (PNG frames in AVI, 2 a second) of one random picture, and the picture."""
    import av
    from PIL import Image

    picture = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    video = tmp_path / "still.avi"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("png", rate=2)
        stream.width, stream.height, stream.pix_fmt = size, size, "rgb24"
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    image = tmp_path / "still.png"
    Image.fromarray(picture).save(image)
    return video, image


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_a_clip_of_two_like_frames_is_the_image_processors_patches(family, tiny_vl, tmp_path):
    """pixel_values_videos of a clip whose two frames are one picture are exactly the image
    processor's pixel_values of that picture (it repeats the picture for its temporal patch):
    the same resize, normalisation and patch layout, two frames deep."""
    from PIL import Image

    from hwft.vision import VisionInputs
    from hwft.vision_video import read_videos

    video, image = still_clip(tmp_path, size=64)
    vision = VisionInputs.for_model(tiny_vl(family))
    assert vision is not None and vision.family.video is not None
    clip = open_video(media(video), "still.avi", VideoSampling())
    assert len(clip.frames) == 2
    side = 56 if family == "qwen2_vl" else 64  # Qwen2-VL's 28-pixel merged patch; Qwen3-VL's 32
    low = high = side * side * (1 if family == "qwen2_vl" else 2)  # Qwen3-VL bounds the clip's 2 frames
    outputs, counts, _ = read_videos(vision.family.video, vision.processor, (low, high), [clip])
    picture = Image.open(image).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    expected = vision.processor(images=[picture], return_tensors="np")
    np.testing.assert_array_equal(outputs["pixel_values_videos"], expected["pixel_values"])
    assert outputs["video_grid_thw"].tolist() == expected["image_grid_thw"].tolist()
    assert counts == [int(np.prod(expected["image_grid_thw"][0])) // 4]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_a_still_clip_trains_as_its_image(family, tiny_vl, tmp_path, cli):
    """The same question about a picture, once as an image row and once as a two-frame still
    video: transformers' forward gives both the same first loss and gradient norm (1e-6): the
    clip's tokens, grid, positions (Qwen2.5-VL's seconds per patch included) and features are
    the image's."""
    from tests.test_train import metrics

    video, image = still_clip(tmp_path)
    model = tiny_vl(family)
    turns = [{"role": "assistant", "content": "A square of coloured noise."}]
    runs = {}
    for kind, path in (("image", image), ("video", video)):
        folder = tmp_path / kind
        folder.mkdir()
        row = {"messages": [{"role": "user", "content": f"<{kind}>What is this?"}, *turns], f"{kind}s": [str(path)]}
        recipe = write_recipe(folder, model, train={"max_steps": 1, "micro_batch_size": 1, "max_length": 128})
        write_jsonl(folder / "train.jsonl", [row])
        code, _, err = cli("train", recipe)
        assert code == 0, err[-2000:]
        runs[kind] = metrics(folder / "out")[0]
    assert runs["video"]["loss"] == pytest.approx(runs["image"]["loss"], abs=1e-6)
    assert runs["video"]["grad_norm"] == pytest.approx(runs["image"]["grad_norm"], rel=1e-5)


def test_qwen3_vl_writes_each_temporal_patch_s_time_as_its_processor_does(tiny_vl):
    """Qwen3-VL's text for 1.mp4: each pair of frames' mean time, '<0.3 seconds>', then its
    tokens between <|vision_start|> and <|vision_end|>, as transformers' Qwen3VLProcessor
    writes it from the clip's frame indices and frame rate."""
    from types import SimpleNamespace

    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    from hwft.vision import VisionInputs

    vision = VisionInputs.for_model(tiny_vl("qwen3_vl"), video=VideoSampling())
    assert vision is not None
    clip = open_video(media(DEMO / "1.mp4"), "1.mp4", VideoSampling())
    inputs, expansions = vision.media([media(DEMO / "1.mp4")], "1.mp4")
    (ours,) = expansions[0].texts
    grid = inputs["video_grid_thw"]
    processor = object.__new__(Qwen3VLProcessor)
    processor.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    processor.vision_start_token, processor.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    processor.video_token = "<|video_pad|>"
    metadata = VideoMetadata(total_num_frames=243, fps=clip.rate, frames_indices=list(clip.indices))
    theirs = processor.replace_video_token({"video_grid_thw": grid, "video_metadata": [metadata]}, 0)
    assert ours == theirs and ours.startswith("<0.3 seconds><|vision_start|>") and ours.count("seconds>") == 10


@pytest.mark.parametrize(("family", "first"), [("qwen2_vl", 8.3374), ("qwen2_5_vl", 8.3327), ("qwen3_vl", 8.3130)])
def test_llamafactorys_video_rows_train_beside_its_image_rows(family, first, tiny_vl, tmp_path, cli):
    """mllm_video_demo (an mp4, an avi, an mp4) and mllm_demo's image rows through LLaMA-Factory's
    dataset_info.json, packed (tests/test_media_packing.py), two rows a micro-batch, LoRA sft:
    images and videos in one row, each video's tokens never trained on. The first loss is
    pinned (1e-3: PyAV's decode and PIL's resize are exact integer work, the tiny model's float
    sums differ by CPU in the 6th digit)."""
    model = tiny_vl(family)
    recipe = write_recipe(
        tmp_path,
        model,
        data={"registry": str(LF / "dataset_info.json"), "train": ["mllm_video_demo", "mllm_demo"]},
        train={"max_steps": 3, "micro_batch_size": 2, "max_length": 512, "lr": 5e-3, "log_every": 1},
    )
    code, _, err = cli("train", recipe)
    assert code == 0, err[-3000:]
    assert "packing on" in err and "packing: rows with images or videos pack" in err
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[0] == pytest.approx(first, abs=1e-3)
    code, out, err = cli("data", "inspect", recipe, "--rows", "1", "--json")
    assert code == 0, err
    (row,) = json.loads(out)["rows"]
    assert row["video_tokens"] == [20] and row["image_tokens"] == []  # 20 frames, 1 x 2 tokens each pair


def test_video_settings_are_recipe_keys_and_llamafactorys(tiny_vl, tmp_path, cli):
    """data.video_fps and data.video_maxlen sample fewer frames (hwft data inspect shows the
    tokens), and a LLaMA-Factory file's video_fps, video_maxlen, video_max_pixels and
    video_min_pixels become them."""
    from hwft.llamafactory import translate

    recipe = write_recipe(
        tmp_path,
        tiny_vl("qwen2_vl"),
        data={"registry": str(LF / "dataset_info.json"), "train": ["mllm_video_demo"]},
        train={"max_length": 512},
    )
    code, out, err = cli("data", "inspect", recipe, "data.video_fps=1", "data.video_maxlen=4", "--rows", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["rows"][0]["video_tokens"] == [4]  # 4 frames: 2 pairs of 1 x 2 tokens
    keys = {"video_fps": 1.5, "video_maxlen": 16, "video_max_pixels": 4096, "video_min_pixels": 1024}
    lf = {"model_name_or_path": "m", "stage": "sft", "dataset": "mllm_video_demo", "dataset_dir": str(LF), **keys}
    translated = translate(lf, tmp_path / "lf.yaml")
    data = translated.recipe["data"]
    assert {k: data[k] for k in keys} == keys


def test_what_is_not_fed_is_refused_in_one_line(tiny_vl, tmp_path, cli, monkeypatch, capsys):
    """A video for a family fed images only, audio beside a video, a video on MLX, a video that
    does not decode, and PyAV missing: one line each, exit 2, naming the file and row."""
    registry = {"registry": str(LF / "dataset_info.json")}
    tiny_vl("gemma3"), tiny_vl("qwen2_vl")
    capsys.readouterr()  # what building them printed is not the commands'

    def refused(model, train, *overrides):
        recipe = write_recipe(tmp_path, model, data={**registry, "train": train})
        code, _, err = cli("train", recipe, *overrides, "--dry-run")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        return err

    err = refused(tiny_vl("gemma3"), ["mllm_video_demo"])
    assert "mllm_video_demo.json row 1 has 1 video: hwft feeds Gemma 3 images only, not video" in err
    err = refused(tiny_vl("qwen2_vl"), ["mllm_video_audio_demo"])
    assert "row 1 has 1 video and 1 audio: hwft feeds Qwen2-VL images and videos only, not audio" in err
    assert "hwft feeds no model audio yet: Qwen2-Audio, Qwen2.5-Omni and Gemma 3n are not in its table" in err
    pytest.importorskip("mlx_vlm")
    err = refused(tiny_vl("qwen2_vl"), ["mllm_video_demo"], "backend=mlx")
    assert "backend mlx's engine does not feed videos to a model (mlx-vlm's Qwen forward takes a batch's images" in err

    broken = tmp_path / "broken.mp4"
    broken.write_bytes((DEMO / "1.mp4").read_bytes()[:3000])
    rows = write_jsonl(
        tmp_path / "rows.jsonl",
        [
            {
                "messages": [{"role": "user", "content": "<video>Hi"}, {"role": "assistant", "content": "Yo"}],
                "videos": [str(broken)],
            }
        ],
    )
    recipe = write_recipe(tmp_path, tiny_vl("qwen2_vl"), data={"train": [{"path": rows.name}]})
    code, _, err = cli("train", recipe)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert "rows.jsonl row 1: video" in last and "broken.mp4 does not decode" in last
    monkeypatch.setitem(sys.modules, "av", None)
    code, _, err = cli("train", recipe)
    assert code == 2 and "needs PyAV, which is not installed: pip install av" in err


def test_grpo_trains_on_video_prompts_beside_image_prompts(tiny_vl, tmp_path, cli):
    """method grpo on prompts with a video or an image: the rollouts generate from both kinds in
    one batch, the reference's forward sees them too (beta > 0), every completion is logged."""
    rows = [
        {"prompt": "<video>What happens?", "videos": [str(DEMO / "4.mp4")], "answer": "drawing"},
        {"prompt": "<image>Who are they?", "images": [str(DEMO / "1.jpg")], "answer": "players"},
    ]
    from tests.test_vision import grpo_two_steps

    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    rollouts = grpo_two_steps(cli, tmp_path, tiny_vl("qwen2_5_vl"), data, max_new_tokens=6)
    prompts = {r["prompt"] for r in rollouts}
    assert prompts == {"<video>What happens?", "<image>Who are they?"}


def test_dpo_trains_on_video_preference_pairs(tiny_vl, tmp_path, cli):
    """dpo on pairs whose prompt holds a video (Qwen3-VL, timestamps and all): each answer's
    sequence carries the clip to the policy's and the reference's forward, so the first loss is
    -log sigmoid(0) = log 2 (1e-5) and the second moves off it."""
    import math

    rows = [
        {
            "conversations": [{"from": "human", "value": f"<video>{question}"}],
            "chosen": {"from": "gpt", "value": chosen},
            "rejected": {"from": "gpt", "value": rejected},
            "videos": [str(DEMO / name)],
        }
        for name, question, chosen, rejected in (
            ("2.avi", "What is she doing?", "She is cooking.", "She is swimming."),
            ("1.mp4", "What happens?", "A baby reads.", "A dog runs."),
        )
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    recipe = write_recipe(
        tmp_path,
        tiny_vl("qwen3_vl"),
        data={"train": [{"path": data.name}]},
        method={"objective": "dpo", "tuning": "lora"},
        train={"max_steps": 2, "micro_batch_size": 2, "max_length": 512, "lr": 5e-3, "log_every": 1},
    )
    code, _, err = cli("train", recipe)
    assert code == 0, err[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5) and losses[1] != pytest.approx(math.log(2), abs=1e-4)


def test_chat_answers_about_a_video_as_transformers_generates(tiny_vl, cli, capsys):
    """`hwft chat MODEL --video 4.mp4 --prompt ...`: greedy tokens are transformers' own
    generate on the same ids, pixels and grid; a video for a family fed images only is refused
    in one line."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from hwft import vision
    from hwft.data.chat import ChatRenderer

    model_dir = tiny_vl("qwen2_5_vl")
    capsys.readouterr()
    video = DEMO / "4.mp4"
    code, out, err = cli(
        "chat", model_dir, "--video", video, "--prompt", "What happens?", "--max-new-tokens", "6", "--precision", "fp32"
    )
    assert code == 0, err
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = vision.VisionInputs.for_model(model_dir)
    assert inputs is not None
    ids, extras = vision.prompt(
        inputs,
        ChatRenderer(tokenizer, tokenizer.chat_template),
        [{"role": "user", "content": "<video>What happens?"}],
        [media(video)],
        "q",
    )
    assert "pixel_values_videos" in extras and "second_per_grid_ts" in extras
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    with torch.no_grad():
        made = model.generate(
            input_ids=torch.tensor([ids]), **{k: torch.as_tensor(v) for k, v in extras.items()}, max_new_tokens=6
        )
    assert out == tokenizer.decode(made[0, len(ids) :], skip_special_tokens=True) + "\n"
    code, _, err = cli("chat", tiny_vl("gemma3"), "--video", video, "--prompt", "What happens?")
    assert code == 2 and "Gemma 3 takes images only, not videos; leave those out" in err
