"""Vision-language models on the torch engine (hwft.vision): LLaMA-Factory's image rows train a
tiny model of every family of hwft.vision through the CLI (Qwen3-VL through LLaMA-Factory's own
recipes), each first loss transformers' own; the image tokens are counted as transformers' processor counts them and
never trained on; the vision tower stays frozen under LoRA; a row with images for a text-only
model, or on MLX, is refused in one line at the dry run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hwft.data.chat import IGNORE_INDEX, ChatRenderer
from hwft.data.formats import BUILTIN_FORMATS
from hwft.data.loading import load_examples
from tests.conftest import PEER_DATA, REPO, write_recipe
from tests.test_llamafactory import lf_recipe

LF = PEER_DATA / "llamafactory"
SHAPES = REPO / "configs" / "data" / "shapes"  #: the vision demo's pictures
FORMATS = {f.name: f for f in BUILTIN_FORMATS}


def first_demo_row(model: Path):
    """The model's tokenizer, and mllm_demo's first row (two images) rendered as training renders it."""
    from transformers import AutoTokenizer

    from hwft.vision import VisionInputs

    tokenizer = AutoTokenizer.from_pretrained(model)
    renderer = ChatRenderer(tokenizer, tokenizer.chat_template)
    renderer.vision = VisionInputs.for_model(model)
    example = next(iter(load_examples(LF / "mllm_demo.json", "messages", FORMATS)))
    example.source = "mllm_demo.json row 1"
    return tokenizer, renderer.tokenize(example)


def test_an_image_row_renders_with_the_processors_token_count(tiny_vl):
    """mllm_demo's first row (two images): each image becomes grid_t*grid_h*grid_w/merge^2
    <|image_pad|> tokens, the count Qwen2-VL's own processor expands to; none is a label; the
    assistant answers are the labels, as for a text row."""
    tokenizer, tok = first_demo_row(tiny_vl("qwen2_vl"))
    grid = tok.inputs["image_grid_thw"]
    assert grid.shape == (2, 3)
    per_image = [int(t * h * w) // 4 for t, h, w in grid]
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert tok.input_ids.count(pad) == sum(per_image) and all(n > 0 for n in per_image)
    assert all(label == IGNORE_INDEX for t, label in zip(tok.input_ids, tok.labels, strict=True) if t == pad)
    trained = tokenizer.decode([t for t, label in zip(tok.input_ids, tok.labels, strict=True) if label != IGNORE_INDEX])
    assert "Kane and Gretzka" in trained and "celebrating" in trained and "Who are they" not in trained
    # Qwen2-VL's pixel rows: one per patch, 3 channels x temporal 2 x 14 x 14 values each.
    assert tok.inputs["pixel_values"].shape == (int(sum(t * h * w for t, h, w in grid)), 3 * 2 * 14 * 14)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_5", "gemma3", "gemma4", "mistral3", "smolvlm"])
def test_image_rows_train_a_vision_language_model_from_the_cli(family, tiny_vl, tmp_path, cli):
    """LLaMA-Factory's mllm_demo with identity's text rows, through its dataset_info.json, LoRA
    sft for 3 steps: the rows pack where the family's do (Qwen's), and the adapter holds
    the language model's layers only (the vision tower frozen)."""
    model = tiny_vl(family)
    recipe = write_recipe(
        tmp_path,
        model,
        data={"registry": str(LF / "dataset_info.json"), "train": ["mllm_demo", "identity"]},
        train={"max_steps": 3, "micro_batch_size": 2, "max_length": 512, "lr": 5e-3, "log_every": 1},
    )
    code, out, err = cli("train", recipe)
    assert code == 0, err[-3000:]
    from hwft.vision import FAMILIES

    assert ("packing on" if FAMILIES[family].packs else "packing off") in err  # Qwen's pack: test_media_packing.py
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)

    vision_side = FAMILIES[family].vision_modules
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["exclude_modules"] and all(any(v in m for v in vision_side) for m in config["exclude_modules"])
    from safetensors.torch import load_file

    names = list(load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert names and not any(v in n for n in names for v in vision_side)


@pytest.mark.parametrize("family", ["mistral3", "smolvlm"])
def test_rows_of_images_of_other_sizes_batch_as_the_processor_batches_them(family, tiny_vl):
    """Mistral 3 reads each image at its own size, SmolVLM splits each into as many tiles as it
    takes: two rows' pixels (two images, one), each row processed alone and joined by the engine
    (zero-padded to the larger), are the processor's own for the two rows as one batch."""
    import numpy as np
    from PIL import Image

    from hwft.data.batching import Row
    from hwft.vision import VisionInputs
    from hwft_torch.objective import media_tensors

    vision = VisionInputs.for_model(tiny_vl(family))
    assert vision is not None
    photo = Image.open(LF / "mllm_demo_data" / "1.jpg").convert("RGB")
    square = Image.open(SHAPES / "blue_square.png").convert("RGB")
    rows = [[photo, square], [photo]]
    keys = vision.family.inputs
    alone = [vision.read(images)[0] for images in rows]
    assert alone[0]["pixel_values"].shape[1:] != alone[1]["pixel_values"].shape[1:]
    joined = media_tensors([Row([1, 2], [1, 2], [2], inputs={k: a[k] for k in keys}) for a in alone], 2)
    call = vision.family.call(vision.config) if vision.family.call else {}
    together = vision.processor(images=rows, return_tensors="np", **call)
    for key in keys:
        assert np.array_equal(joined[key].numpy(), together[key]), key


def test_a_text_only_model_refuses_image_rows_in_one_line(tiny_llama, tmp_path, cli):
    recipe = write_recipe(
        tmp_path, tiny_llama, data={"registry": str(LF / "dataset_info.json"), "train": ["mllm_demo"]}
    )
    code, out, err = cli("train", recipe, "--dry-run")
    assert code == 2 and err.strip().splitlines() == [err.strip()]
    assert "mllm_demo.json row 1 has 2 images, but the model (llama) is not a vision-language family" in err
    assert "qwen2_vl" in err


def test_a_family_mlx_does_not_feed_is_refused_in_one_line(tiny_vl, tmp_path, cli):
    """(Video rows' refusals: tests/test_video.py.)"""
    images = write_recipe(
        tmp_path, tiny_vl("gemma3"), data={"registry": str(LF / "dataset_info.json"), "train": ["mllm_demo"]}
    )
    code, _, err = cli("train", images, "backend=mlx", "--dry-run")
    assert code == 2 and "engine feeds images to qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_5 only, not gemma3" in err


#: Every family of hwft.vision but Qwen3-VL (LLaMA-Factory's own recipes train it, below) and
#: Qwen2.5-VL (Qwen2-VL's processing; it trains in the CLI test above).
FIRST_LOSS_FAMILIES = [
    *("qwen2_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "gemma3", "gemma4"),
    *("mistral3", "smolvlm", "idefics3", "llava", "llava_next", "glm4v", "glm4v_moe"),
]


@pytest.mark.parametrize("size", [(300, 168), (50, 100), (64, 64), (200, 33)])
def test_llava_next_counts_an_image_s_tokens_as_its_processor_does(size, tiny_vl):
    """LLaVA-NeXT's tokens for an image (base crop, the best grid's tiles unpadded, a newline per
    row): the count transformers' LlavaNextProcessor expands <image> to, wide, tall and square."""
    from PIL import Image
    from transformers import AutoTokenizer, LlavaNextProcessor

    from hwft.vision import VisionInputs

    model = tiny_vl("llava_next")
    vision = VisionInputs.for_model(model)
    assert vision is not None
    image = Image.open(LF / "mllm_demo_data" / "1.jpg").convert("RGB").resize(size)
    _, (ours,), _ = vision.read([image])
    tokenizer = AutoTokenizer.from_pretrained(model)
    processor = LlavaNextProcessor(
        image_processor=vision.processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    ids = processor(text=["<image>"], images=[image], return_tensors="np")["input_ids"][0].tolist()
    assert ours == ids.count(tokenizer.convert_tokens_to_ids("<image>")) > 16


def test_every_family_of_the_table_is_held_to_transformers():
    from hwft.vision import FAMILIES

    assert {*FIRST_LOSS_FAMILIES, "qwen3_vl", "qwen2_5_vl"} == set(FAMILIES)


@pytest.mark.parametrize("family", FIRST_LOSS_FAMILIES)
def test_the_first_loss_is_transformers_own_on_the_row_and_its_image(family, tiny_vl, tmp_path, cli):
    """One image row, one step (fp32; LoRA's B starts at zero): hwft's loss is the one
    transformers' model computes from the same ids, pixels, token types and labels (1e-5, the
    order of the sums), and the pixels matter: blank ones give another loss."""
    import torch
    from transformers import AutoModelForImageTextToText

    model_dir = tiny_vl(family)
    recipe = write_recipe(
        tmp_path,
        model_dir,
        data={"train": [{"path": str(LF / "mllm_demo.json"), "format": "messages", "max_samples": 1}]},
        train={"max_steps": 1, "micro_batch_size": 1, "max_length": 512, "log_every": 1},
    )
    code, _, err = cli("train", recipe)
    assert code == 0, err[-3000:]
    (ours,) = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]

    _, tok = first_demo_row(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    inputs = {
        "input_ids": torch.tensor([tok.input_ids]),
        "labels": torch.tensor([tok.labels]),
        **{k: torch.as_tensor(v) for k, v in tok.inputs.items() if k != "pixel_values"},
        **{k: torch.tensor([v]) for k, v in (tok.token_inputs or {}).items()},
    }
    pixels = torch.as_tensor(tok.inputs["pixel_values"])
    with torch.no_grad():
        theirs = float(model(**inputs, pixel_values=pixels).loss)
        blank = float(model(**inputs, pixel_values=torch.full_like(pixels, 0.5)).loss)  # SmolVLM drops all-zero tiles
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-5)
    # The pixels matter: ten times the order of fp32's rounding of a loss near 8 (1e-6) at least
    # (a tiny random Qwen3-VL MoE's images move its loss by 3e-5).
    assert abs(blank - theirs) > 1e-5


@pytest.mark.parametrize("name", ["qwen3vl_lora_sft", "qwen3vl_full_sft"])
def test_llamafactorys_qwen3vl_recipes_train_as_they_are(name, tiny_vl, tmp_path, cli, capsys):
    """LLaMA-Factory's own Qwen3-VL recipes (mllm_demo with identity and alpaca_en_demo), a tiny
    Qwen3-VL swapped in and the run scaled down: they import and train. The full recipe's
    freeze_vision_tower and freeze_multi_modal_projector leave the vision side as it was; its
    ZeRO-3 config runs in one process."""
    import yaml
    from safetensors.torch import load_file

    model = tiny_vl("qwen3_vl")
    capsys.readouterr()  # what building it printed (DeepSpeed's start-up line) is not the command's
    path = lf_recipe(tmp_path, name, model)
    code, out, err = cli("import", path)
    assert code == 0, err
    translated = yaml.safe_load(out)
    assert translated["data"]["image_max_pixels"] == 262144
    if name == "qwen3vl_full_sft":
        assert translated["method"]["vision"] == {
            "freeze_tower": True,
            "freeze_projector": True,
            "freeze_language_model": False,
        }
    code, _, err = cli("train", path)
    assert code == 0, err[-3000:]
    steps = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["step"] == 2
    if name == "qwen3vl_full_sft":
        before, after = (
            load_file(model / "model.safetensors"),
            load_file(tmp_path / "out" / "model" / "model.safetensors"),
        )
        moved = {n for n in before if not (before[n].float() == after[n].float()).all()}
        assert moved and all("visual" not in n for n in moved), sorted(moved)[:5]
        assert any("language_model" in n for n in moved)


def test_data_inspect_shows_what_each_image_became(tiny_vl, tmp_path, cli):
    model = tiny_vl("qwen2_vl")
    recipe = write_recipe(
        tmp_path,
        model,
        data={"registry": str(LF / "dataset_info.json"), "train": ["mllm_demo"]},
        train={"max_length": 512},
    )
    code, out, err = cli("data", "inspect", recipe, "--rows", "1")
    assert code == 0, err
    head = next(line for line in out.splitlines() if line.startswith("--- ") and "mllm_demo.json row 1" in line)
    counts = head.split("; 2 images of ")[1].removesuffix(" tokens").split(", ")
    assert len(counts) == 2 and all(int(n) > 0 for n in counts)
    assert f"<|vision_start|><|image_pad|>x{counts[0]}<|vision_end|>Who are they?" in out


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5", "gemma3", "gemma4", "mistral3", "smolvlm"])
def test_chat_answers_about_an_image_as_transformers_generates(family, tiny_vl, cli, capsys):
    """`hwft chat MODEL --image F --prompt Q`: the greedy reply is the one transformers' generate
    gives from the same prompt ids and pixels (its own KV cache and positions)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from hwft import vision
    from hwft.data.media import Media

    model_dir = tiny_vl(family)
    capsys.readouterr()
    image = LF / "mllm_demo_data" / "1.jpg"
    code, out, err = cli(
        "chat", model_dir, "--image", image, "--prompt", "Who are they?", "--max-new-tokens", "6", "--precision", "fp32"
    )
    assert code == 0, err
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = vision.VisionInputs.for_model(model_dir)
    renderer = ChatRenderer(tokenizer, tokenizer.chat_template)
    ids, extras = vision.prompt(
        inputs,
        renderer,
        [{"role": "user", "content": "<image>Who are they?"}],
        [Media("image", "1.jpg", path=image)],
        "q",
    )
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    with torch.no_grad():
        made = model.generate(
            input_ids=torch.tensor([ids]),
            **{k: torch.as_tensor(v) for k, v in extras.items()},
            max_new_tokens=6,
            do_sample=False,
        )
    theirs = tokenizer.decode(made[0, len(ids) :], skip_special_tokens=True)
    assert out == theirs + "\n" and len(theirs) >= 6, (out, theirs)  # the tiny Qwen2-VL says 6 newlines


def test_chat_refuses_an_image_for_a_text_only_model(tiny_llama, cli):
    code, _, err = cli("chat", tiny_llama, "--image", LF / "mllm_demo_data" / "1.jpg", "--prompt", "Who?")
    assert code == 2 and "is not a vision-language model of hwft's table" in err and "leave the images out" in err


def test_llamafactorys_qwen3vl_dpo_recipe_trains_on_image_preference_rows(tiny_vl, tmp_path, cli, capsys):
    """qwen3vl_lora_dpo.yaml as it is, its rlhf_v (on the hub) replaced by preference rows over
    the demo images in LLaMA-Factory's ranking shape: the first step's loss is -log sigmoid(0)
    (the policy is the reference while LoRA's B is zero: 1e-5), and the pairs' images reach both
    forwards (a pair's two sequences each carry them)."""
    import math

    model = tiny_vl("qwen3_vl")
    capsys.readouterr()
    rows = [
        {
            "conversations": [{"from": "human", "value": f"<image>{question}"}],
            "chosen": {"from": "gpt", "value": good},
            "rejected": {"from": "gpt", "value": bad},
            "images": [str(LF / "mllm_demo_data" / f"{n}.jpg")],
        }
        for n, question, good, bad in [
            (1, "Who are they?", "Two footballers celebrating.", "A cat."),
            (2, "What is he doing?", "Sliding on his knees.", "Sleeping."),
            (3, "Who is speaking?", "An astronaut.", "Nobody."),
            (1, "Where are they?", "On a football pitch.", "In a kitchen."),
        ]
    ]
    (tmp_path / "rlhf_v.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(
        json.dumps(
            {
                "rlhf_v": {
                    "file_name": "rlhf_v.json",
                    "formatting": "sharegpt",
                    "ranking": True,
                    "columns": {
                        "messages": "conversations",
                        "chosen": "chosen",
                        "rejected": "rejected",
                        "images": "images",
                    },
                }
            }
        ),
        encoding="utf-8",
    )
    path = lf_recipe(
        tmp_path,
        "qwen3vl_lora_dpo",
        model,
        dataset_dir=str(tmp_path),
        per_device_train_batch_size=2,
        bf16=False,
        logging_steps=1,
    )
    code, _, err = cli("train", path)
    assert code == 0, err[-3000:]
    steps = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_methods_that_do_not_feed_images_refuse_them_in_one_line(tiny_vl, tmp_path, cli, capsys):
    """kto (which unpairs preference rows, images kept) refuses image rows at the dry run."""
    model = tiny_vl("qwen2_vl")
    capsys.readouterr()
    row = {
        "prompt": "<image>Who?",
        "chosen": "Kane.",
        "rejected": "A cat.",
        "images": [str(LF / "mllm_demo_data" / "1.jpg")],
    }
    (tmp_path / "pairs.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    recipe = write_recipe(tmp_path, model, data={"train": [{"path": "pairs.jsonl"}]}, method={"objective": "kto"})
    code, _, err = cli("train", recipe, "--dry-run")
    assert code == 2 and err.strip().splitlines() == [err.strip()]
    assert "pairs.jsonl row 1 has 1 image, but method.objective kto does not feed images to the model yet" in err


def test_a_vision_language_run_exports_and_the_export_answers_about_images(tiny_vl, tmp_path, cli, capsys):
    """--to hf merges the adapter into the whole vision-language model (its image processor's
    settings beside it) and verifies; the export answers about an image as the run does;
    --to peft verifies."""
    model = tiny_vl("qwen2_vl")
    capsys.readouterr()
    recipe = write_recipe(
        tmp_path,
        model,
        data={"train": [{"path": str(LF / "mllm_demo.json"), "format": "messages"}]},
        train={"max_steps": 2, "micro_batch_size": 2, "max_length": 512, "lr": 1e-2},
    )
    code, _, err = cli("train", recipe)
    assert code == 0, err[-3000:]
    run = tmp_path / "out"
    for to in ("hf", "peft"):
        code, out, err = cli("export", run, "--to", to, "--verify", "--out", tmp_path / to)
        assert code == 0 and '"ok": true' in out, err[-2000:]
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()
    question = ["--image", LF / "mllm_demo_data" / "2.jpg", "--prompt", "Who is he?", "--max-new-tokens", "5"]
    answers = []
    for target in (run, tmp_path / "hf"):
        code, out, err = cli("chat", target, *question, "--precision", "fp32")
        assert code == 0, err
        answers.append(out)
    assert answers[0] == answers[1]  # --to mlx (mlx-vlm's folder): tests/test_mlx_vision.py


def test_the_demo_model_is_smollm2_on_text(tmp_path, capsys):
    """hwft_torch.vision_demo's assembled model (configs/vision.yaml's): on text it computes what the
    embedded SmolLM2-135M-Instruct computes (logits within 1e-4 of values up to ~30: fp32 sums in
    another order), its zero q/k/v biases and Qwen2-VL's 3-D rotary embedding notwithstanding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from hwft.models import materialise, resolve_model
    from hwft_torch.vision_demo import assemble

    smol = materialise(resolve_model("smollm2-135m"))
    folder = assemble(tmp_path / "demo")
    tokenizer = AutoTokenizer.from_pretrained(smol)
    ids = torch.tensor([tokenizer("The capital of France is Paris, and the capital of Italy is")["input_ids"]])
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(smol).eval()(input_ids=ids).logits
        ours = AutoModelForImageTextToText.from_pretrained(folder).eval()(input_ids=ids).logits
    assert ours.shape[-1] == theirs.shape[-1] + 4  # Qwen's four vision tokens
    torch.testing.assert_close(ours[..., : theirs.shape[-1]], theirs, atol=1e-4, rtol=0)
    assert (folder / "preprocessor_config.json").is_file()


def test_plan_counts_the_vision_tower(tiny_vl, tmp_path, cli, capsys):
    """hwft plan of a vision-language recipe: every parameter, the vision tower's too (the
    activations are measured on the decoder layers, as for a text model)."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = tiny_vl("qwen2_vl")
    capsys.readouterr()
    recipe = write_recipe(tmp_path, model, data={"train": [{"path": str(LF / "mllm_demo.json"), "format": "messages"}]})
    code, out, err = cli("plan", recipe, "--devices", "1x16GB", "--json")
    assert code == 0, err
    plan = json.loads(out)
    whole = sum(p.numel() for p in AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32).parameters())
    assert plan["shape"]["parameters"] == whole, (plan["shape"], whole)


def test_eval_scores_image_rows_with_their_images(tiny_vl, tmp_path, cli, capsys):
    """hwft eval on image rows: the base model's held-out loss with the images in is the loss
    the first training step reports on the same rows (before its update: 1e-5), and answers are
    generated from the images; MLX refuses in one line."""
    model = tiny_vl("qwen2_vl")
    capsys.readouterr()
    rows = json.loads((LF / "mllm_demo.json").read_text(encoding="utf-8"))[:2]
    for row in rows:
        row["images"] = [str(LF / image) for image in row["images"]]
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = write_recipe(
        tmp_path,
        model,
        data={"train": [{"path": str(data), "format": "messages"}]},
        train={"max_steps": 1, "micro_batch_size": 2, "max_length": 512},
    )
    code, _, err = cli("train", recipe)
    assert code == 0, err[-2000:]
    (first,) = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    code, out, err = cli("eval", tmp_path / "out", "--data", data, "--max-new-tokens", "4", "--json")
    assert code == 0, err[-2000:]
    results = json.loads(out)["results"]
    assert results["base"]["loss"] == pytest.approx(first, rel=1e-5)
    assert all(r["generated"] == 2 for r in results.values())
    code, _, err = cli("eval", tmp_path / "out", "--data", data, "--backend", "mlx")
    assert code == 2 and "the mlx backend does not feed images to a model yet" in err


def test_serve_answers_image_url_parts(tiny_vl, capsys):
    """hwft serve: an image_url part as a data: URL is answered as chat answers the same image;
    a local path only under --images-from (and not outside it); an http URL is refused with 400;
    a text-only model refuses images with 400."""
    import base64
    import threading
    import urllib.error
    import urllib.request

    from hwft.data.media import Media
    from hwft.inference import Sampling, open_session, open_trained
    from hwft.use.serve import make_server

    model = tiny_vl("gemma3")  # its tiny replies are words (the tiny Qwen2-VL's are newlines)
    capsys.readouterr()
    session = open_session(open_trained(str(model)), "cpu", "fp32")
    image = LF / "mllm_demo_data" / "1.jpg"
    want = session.reply(
        [{"role": "user", "content": "<image>Who are they?"}],
        Sampling(max_new_tokens=6),
        [Media("image", "1.jpg", path=image)],
    )
    httpd = make_server(session, "127.0.0.1", 0, "tiny", images_from=image.parent)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/chat/completions"

    def ask(ref: str) -> tuple[int, dict]:
        parts = [{"type": "image_url", "image_url": {"url": ref}}, {"type": "text", "text": "Who are they?"}]
        body = {"messages": [{"role": "user", "content": parts}], "temperature": 0, "max_tokens": 6}
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    try:
        inline = "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()
        for ref in (inline, "1.jpg"):
            status, body = ask(ref)
            assert status == 200, body
            assert body["choices"][0]["message"]["content"].strip() == want and want
        for ref, said in (
            ("../identity.json", "no image ../identity.json under"),
            ("https://example.com/a.jpg", "hwft never fetches data"),
        ):
            status, body = ask(ref)
            assert status == 400 and said in body["error"]["message"], body
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_grpo_rollouts_of_image_prompts_are_scored_as_transformers_scores_them(family, tiny_vl):
    """GRPO's rollouts from two image prompts of different lengths (left-padded together, each
    sampled twice with its picture in view): the log-probabilities its loss takes of each
    completion are the ones transformers' model gives that prompt and completion alone, with
    the prompt's own image (fp32, 1e-5): the pixels, the token types and the positions (Qwen's
    3-D ones over the image grid, worked out by the model from the mask) line up under padding."""
    import contextlib

    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from hwft import vision
    from hwft.data.kinds.prompt import Prompt
    from hwft.data.media import Media
    from hwft.methods.grpo import GrpoSpec
    from hwft_torch.grpo import GroupRelative, completion_logps, own_positions
    from hwft_torch.losses import target_logps

    model_dir = tiny_vl(family)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    renderer = ChatRenderer(tokenizer, tokenizer.chat_template)
    inputs = vision.VisionInputs.for_model(model_dir)
    prompts = []
    asked = (("<image>Colour?", "blue_square"), ("<image>Name the colour of this shape in one word.", "red_circle"))
    for text, name in asked:
        media = [Media("image", f"{name}.png", path=SHAPES / f"{name}.png")]
        turns = [{"role": "user", "content": text}]
        ids, extras, per_token = vision.prompt_inputs(inputs, renderer, turns, media, name)
        prompts.append(Prompt(ids, text, None, extras, per_token))
    assert len(prompts[0].input_ids) != len(prompts[1].input_ids)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    spec = GrpoSpec(num_generations=2, max_new_tokens=6, temperature=1.0)
    objective = GroupRelative(
        None,
        spec,
        1,
        tokenizer,
        {},
        torch.device("cpu"),
        None,
        None,
        contextlib.nullcontext,  # type: ignore[arg-type]
        own_positions=own_positions(model),
    )
    r = objective.generate(model, prompts)
    with torch.no_grad():
        ours = completion_logps(model, r, spec.temperature)
    for i, prompt in enumerate(p for p in prompts for _ in range(spec.num_generations)):
        n = int(r.completion_mask[i].sum())
        completion = r.completion_ids[i, :n].tolist()
        ids = torch.tensor([prompt.input_ids + completion])
        given = {k: torch.as_tensor(v) for k, v in (prompt.inputs or {}).items()}
        given |= {k: torch.tensor([v + [0] * n]) for k, v in (prompt.token_inputs or {}).items()}
        with torch.no_grad():
            logits = model(input_ids=ids, **given).logits
        theirs = target_logps(logits[:, -n - 1 : -1, :], torch.tensor([completion]), spec.temperature)[0]
        assert torch.allclose(ours[i, :n], theirs, atol=1e-5), (i, ours[i, :n], theirs)


def test_grpo_trains_on_image_prompts_from_the_cli(tiny_vl, tmp_path, cli):
    """`hwft train` with method grpo on rows of a prompt, its picture and the colour to name:
    two steps with a reference (beta > 0: its forward sees the pictures too); every completion
    is in rollouts.jsonl with its prompt."""
    rows = [
        {"prompt": "<image>What colour is the shape?", "images": [f"{name}.png"], "answer": name.split("_")[0]}
        for name in ("blue_square", "green_triangle", "red_circle", "yellow_circle")
    ]
    data = tmp_path / "shapes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("blue_square", "green_triangle", "red_circle", "yellow_circle"):
        (tmp_path / f"{name}.png").write_bytes((SHAPES / f"{name}.png").read_bytes())
    rollouts = grpo_two_steps(cli, tmp_path, tiny_vl("qwen2_vl"), data, max_new_tokens=8)
    assert len(rollouts) == 2 * 2 * 2 and all(r["prompt"] == "<image>What colour is the shape?" for r in rollouts)


def grpo_two_steps(cli, folder: Path, model: Path, prompts: Path, max_new_tokens: int) -> list[dict]:
    """`hwft train`, method grpo (2 completions a prompt, a reference: beta > 0) on a prompt file,
    two steps of two prompts: each step logs its reward and KL; the rollouts it logged."""
    recipe = write_recipe(
        folder,
        model,
        data={"train": [{"path": str(prompts), "format": "prompt"}]},
        method={
            "objective": "grpo",
            "tuning": "lora",
            "grpo": {
                "rewards": ["testing_vowels"],
                "num_generations": 2,
                "max_new_tokens": max_new_tokens,
                "beta": 0.04,
            },
        },
        train={"max_steps": 2, "micro_batch_size": 2, "max_length": 512, "log_every": 1},
    )
    code, _, err = cli("train", recipe)
    assert code == 0, err[-3000:]
    metrics = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all("reward" in m and "kl" in m for m in metrics), metrics
    return [json.loads(line) for line in (folder / "out" / "rollouts.jsonl").read_text().splitlines()]
