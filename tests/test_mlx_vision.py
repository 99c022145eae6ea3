"""Vision-language models on the MLX engine (hwft_mlx.vision, through mlx-vlm's model code):
mlx-vlm's forward of a Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 with an image row gives
transformers' logits; LLaMA-Factory's image rows train with LoRA from the CLI on MLX from the same first loss
as on the torch engine, into an adapter PEFT loads onto transformers' model; what MLX does not
do with images yet is refused in one line. The same tests run on Apple silicon (Metal).

Tolerances (fp32): logits 1e-5 absolute (measured 5e-7 on logits of about 1.4); the first loss
1e-5 (measured equal to the printed digits).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import PEER_DATA, REPO, write_recipe
from tests.test_vision import first_demo_row

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_vlm")

LF = PEER_DATA / "llamafactory"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_mlx_vlm_gives_transformers_logits_on_an_image_row(family, tiny_vl):
    """mllm_demo's first row (two images) as hwft renders it: mlx-vlm's model of the
    transformers-5 folder (its config put where mlx-vlm reads it: the text settings at the top,
    Qwen's mRoPE sections as rope_scaling) gives transformers' logits at every position."""
    import torch
    from transformers import AutoModelForImageTextToText

    from hwft.data.batching import Row
    from hwft_mlx.vision import load_model, logits

    folder = tiny_vl(family)
    _, tok = first_demo_row(folder)
    model = load_model(folder, json.loads((folder / "config.json").read_text()))
    ids = mx.array([tok.input_ids])
    row = Row(tok.input_ids, tok.labels, [len(tok.input_ids)], inputs=tok.inputs, token_inputs=tok.token_inputs)
    ours = np.array(logits(model, ids, mx.ones_like(ids), [row]).astype(mx.float32))
    reference = AutoModelForImageTextToText.from_pretrained(folder).eval()
    given = {k: torch.as_tensor(v) for k, v in tok.inputs.items()}
    given |= {k: torch.tensor([v]) for k, v in (tok.token_inputs or {}).items()}
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor([tok.input_ids]), **given).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-5


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5"])
def test_image_rows_train_on_mlx_from_torchs_first_loss_into_an_adapter_peft_loads(family, tiny_vl, tmp_path, cli):
    """`hwft train` backend=mlx, LoRA sft on mllm_demo (every micro-batch has images): the first
    loss is the torch engine's on the same rows (LoRA's B starts at zero: the base model's loss);
    the adapter names transformers' modules, holds none of the vision tower's, and PEFT loads
    every tensor of it onto transformers' model (Qwen3.5's Gated DeltaNet projections too)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    model = tiny_vl(family)
    firsts = {}
    for backend in ("mlx", "cpu"):
        (tmp_path / backend).mkdir()
        recipe = write_recipe(
            tmp_path / backend,
            model,
            # MLX packs no row of a vision-language model; the torch engine's reference unpacked too
            data={
                "registry": str(LF / "dataset_info.json"),
                "train": ["mllm_demo"],
                "packing": None if backend == "mlx" else False,
            },
            train={"max_steps": 2, "micro_batch_size": 2, "max_length": 512, "lr": 5e-3, "precision": "fp32"},
            backend=backend,
        )
        code, _, err = cli("train", recipe)
        assert code == 0, err[-3000:]
        assert "packing off" in err
        rows = (tmp_path / backend / "out" / "metrics.jsonl").read_text().splitlines()
        firsts[backend] = json.loads(rows[0])["loss"]
    assert firsts["mlx"] == pytest.approx(firsts["cpu"], abs=1e-5)

    adapter = tmp_path / "mlx" / "out" / "adapter"
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved and all(".language_model." in k for k in saved)
    peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model), adapter)
    loaded = {k.replace(".default", ""): v for k, v in peft.state_dict().items() if "lora_" in k}
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert any(float(saved[k].abs().max()) > 0 for k in saved if "lora_B" in k)  # it trained


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["method.objective=grpo"], "feeds images with method.objective sft, dpo, orpo, simpo only, not grpo"),
        (["method.tuning=full"], "method.tuning full: the MLX engine trains a vision-language model (qwen2_vl)"),
        (["method.vision.freeze_tower=false"], "method.vision: the MLX engine trains a vision-language model"),
    ],
)
def test_what_mlx_does_not_do_with_images_is_refused_in_one_line(overrides, says, tiny_vl, tmp_path, cli):
    """Image rows with a method MLX does not feed them with (at the dry run), and tunings other
    than LoRA on the language model (before any row is read), each in one line."""
    rows = {"registry": str(LF / "dataset_info.json"), "train": ["mllm_demo"]}
    if "method.objective=grpo" in overrides:  # an image prompt
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text(json.dumps({"prompt": "<image>Who?", "answer": "Footballers.", "images": ["1.jpg"]}) + "\n")
        (tmp_path / "1.jpg").write_bytes((LF / "mllm_demo_data" / "1.jpg").read_bytes())
        rows = {"train": [{"path": str(prompts), "format": "prompt"}]}
        overrides = [*overrides, "method.grpo.rewards=[exact_match]"]
    recipe = write_recipe(tmp_path, tiny_vl("qwen2_vl"), data=rows, backend="mlx", train={"max_length": 512})
    code, _, err = cli("train", recipe, *overrides)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and last.startswith("hwft: error:") and says in last, err


def test_a_torch_runs_adapter_continues_on_mlx_as_on_torch(tiny_vl, tmp_path, cli):
    """PEFT to MLX: a torch run's adapter of Qwen3.5 (model.adapter) continues on MLX from the
    loss it continues from on the torch engine (the same adapter on the same image rows, 1e-5)."""
    model = tiny_vl("qwen3_5")
    data = {"registry": str(LF / "dataset_info.json"), "train": ["mllm_demo"]}
    train = {"micro_batch_size": 2, "max_length": 512, "lr": 5e-3, "precision": "fp32"}
    (tmp_path / "first").mkdir()
    first = write_recipe(tmp_path / "first", model, data=data, train={**train, "max_steps": 2}, backend="cpu")
    code, _, err = cli("train", first)
    assert code == 0, err[-3000:]
    adapter = tmp_path / "first" / "out" / "adapter"
    losses = {}
    for backend in ("mlx", "cpu"):
        (tmp_path / backend).mkdir()
        recipe = write_recipe(
            tmp_path / backend,
            {"name": str(model), "adapter": str(adapter)},
            data=data,
            train={**train, "max_steps": 1},
            backend=backend,
        )
        code, _, err = cli("train", recipe)
        assert code == 0, err[-3000:]
        assert backend != "mlx" or f"continuing the adapter {adapter}" in err
        losses[backend] = json.loads((tmp_path / backend / "out" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert losses["mlx"] == pytest.approx(losses["cpu"], abs=1e-5)


def test_text_rows_for_a_vision_language_family_mlx_does_not_feed_are_refused_in_one_line(tiny_vl, tmp_path, cli):
    """A Gemma 3 checkpoint on MLX, even with text rows only: one line that names the families
    MLX trains and where this one trains (mlx-lm alone read its weights wrong)."""
    recipe = write_recipe(tmp_path, tiny_vl("gemma3"), backend="mlx")
    code, _, err = cli("train", recipe)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert "is a vision-language Gemma 3 checkpoint; the MLX engine trains those of qwen2_vl" in last
    assert "backend=cpu" in last


def image_pairs(folder) -> dict:
    """Preference rows over the demo images (LLaMA-Factory's rlhf_v shape is on the hub)."""
    rows = [
        {"prompt": f"<image>{question}", "chosen": good, "rejected": bad, "images": [f"{n}.jpg"]}
        for n, question, good, bad in [
            (1, "Who are they?", "Two footballers celebrating.", "A cat."),
            (2, "What is he doing?", "Sliding on his knees.", "Sleeping."),
            (3, "Who is speaking?", "An astronaut.", "Nobody."),
            (1, "Where are they?", "On a football pitch.", "In a kitchen."),
        ]
    ]
    for n in (1, 2, 3):
        (folder / f"{n}.jpg").write_bytes((LF / "mllm_demo_data" / f"{n}.jpg").read_bytes())
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"train": [{"path": str(folder / "pairs.jsonl"), "format": "preference"}]}


@pytest.mark.parametrize("objective", ["orpo", "dpo"])
def test_image_preference_pairs_train_on_mlx_as_on_torch(objective, tiny_vl, tmp_path, cli):
    """orpo and dpo on MLX with image prompts: each pair's two sequences carry the prompt's
    image. orpo's first loss (no reference: the base model's log-odds of the two answers, with
    the image in view) is the torch engine's (1e-5); dpo's is -log sigmoid(0) = log 2, the
    reference's log-probabilities precomputed with the images too."""
    import math

    data = image_pairs(tmp_path)
    firsts = {}
    for backend in ("mlx", "cpu") if objective == "orpo" else ("mlx",):
        (tmp_path / backend).mkdir()
        recipe = write_recipe(
            tmp_path / backend,
            tiny_vl("qwen2_vl"),
            data=data,
            method={"objective": objective, "tuning": "lora"},
            train={"max_steps": 2, "micro_batch_size": 2, "max_length": 512, "precision": "fp32"},
            backend=backend,
        )
        code, _, err = cli("train", recipe)
        assert code == 0, err[-3000:]
        firsts[backend] = json.loads((tmp_path / backend / "out" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    if objective == "orpo":
        assert firsts["mlx"] == pytest.approx(firsts["cpu"], abs=1e-5)
    else:
        assert firsts["mlx"] == pytest.approx(math.log(2), abs=1e-5)


def test_the_vision_demo_recipe_runs_on_mlx_as_written(tiny_vl, tmp_path, cli):
    """configs/vision.yaml (LoRA on the language model and on the projector: freeze_projector
    false) with a tiny Qwen2-VL: on MLX from the torch engine's first loss, into an adapter with
    the very names the torch engine's has (the projector's merger among them), which PEFT loads
    whole."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    model = tiny_vl("qwen2_vl")
    recipe = REPO / "configs" / "vision.yaml"
    firsts, adapters = {}, {}
    for backend in ("mlx", "cpu"):
        out = tmp_path / backend
        args = [f"model.name={model}", f"backend={backend}", "train.max_steps=2", "train.precision=fp32"]
        args += ["data.packing=false"] if backend == "cpu" else []  # MLX packs none of its rows: the reference neither
        code, _, err = cli("train", recipe, *args, f"output.dir={out}", "eval.prompts=[]")
        assert code == 0, err[-3000:]
        firsts[backend] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
        adapters[backend] = load_file(out / "adapter" / "adapter_model.safetensors")
    assert firsts["mlx"] == pytest.approx(firsts["cpu"], abs=1e-5)
    assert set(adapters["mlx"]) == set(adapters["cpu"]) and any(".visual.merger." in k for k in adapters["mlx"])
    peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model), tmp_path / "mlx" / "adapter")
    loaded = {k.replace(".default", ""): v for k, v in peft.state_dict().items() if "lora_" in k}
    assert set(loaded) == set(adapters["mlx"]) and all(torch.equal(loaded[k], adapters["mlx"][k]) for k in loaded)


def test_text_rows_train_a_qwen3_5_checkpoint_on_mlx_unpacked_as_on_torch(tiny_vl, tmp_path, cli):
    """The issue's first row: text-only LoRA on a Qwen3.5 checkpoint (image-text-to-text, as
    released) on MLX. With data.packing unset the rows run unpacked (mlx-vlm's forward takes no
    packed mask: Capability.media_packing), from the torch engine's first loss with packing off."""
    model = tiny_vl("qwen3_5")
    firsts = {}
    for backend, packing in (("mlx", None), ("cpu", False)):
        (tmp_path / backend).mkdir()
        data = {"train": [{"path": "train.jsonl"}], **({} if packing is None else {"packing": packing})}
        recipe = write_recipe(tmp_path / backend, model, data=data, backend=backend, train={"max_steps": 1})
        code, _, err = cli("train", recipe)
        assert code == 0, err[-3000:]
        assert "packing off" in err
        firsts[backend] = json.loads((tmp_path / backend / "out" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert firsts["mlx"] == pytest.approx(firsts["cpu"], abs=1e-5)


def test_without_mlx_vlm_a_vision_language_model_is_refused_with_the_install_line(tiny_vl, tmp_path, cli, monkeypatch):
    """Where mlx-vlm is not installed (this project installs it: the import system is told it
    is not there), a Qwen2-VL run on MLX stops before reading a row, with the install line."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlx_vlm" else real(name, *a))
    recipe = write_recipe(tmp_path, tiny_vl("qwen2_vl"), backend="mlx")
    code, _, err = cli("train", recipe)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and "pip install mlx-vlm" in last, err


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_a_vision_language_run_exports_to_mlx_vlm(family, tiny_vl, tmp_path, cli, capsys):
    """`hwft export RUN --to mlx --verify` of a LoRA run on image rows: an mlx-vlm folder that
    mlx-vlm's own `load` reads (model and processor), whose logits on mllm_demo's first row with
    its two images are the trained model's in transformers (base + adapter merged; 1e-5); the
    families mlx-vlm does not run here, and --mlx-bits, are refused in one line."""
    import torch
    from mlx_vlm import load
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from hwft.data.batching import Row
    from hwft_mlx.vision import logits

    model = tiny_vl(family)
    recipe = write_recipe(
        tmp_path,
        model,
        data={"registry": str(LF / "dataset_info.json"), "train": ["mllm_demo"]},
        train={"max_steps": 2, "micro_batch_size": 2, "max_length": 512, "lr": 5e-2, "precision": "fp32"},
    )
    code, _, err = cli("train", recipe)
    assert code == 0, err[-3000:]
    run = tmp_path / "out"
    code, out, err = cli("export", run, "--to", "mlx", "--out", tmp_path / "mlx", "--verify")
    assert code == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["ok"] is True
    exported, processor = load(str(tmp_path / "mlx"))
    assert type(processor).__name__.endswith("Processor")
    _, tok = first_demo_row(model)
    ids = mx.array([tok.input_ids])
    row = Row(tok.input_ids, tok.labels, [len(tok.input_ids)], inputs=tok.inputs, token_inputs=tok.token_inputs)
    ours = np.array(logits(exported, ids, mx.ones_like(ids), [row]).astype(mx.float32))
    trained = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model), run / "adapter")
    given = {k: torch.as_tensor(v) for k, v in tok.inputs.items()}
    given |= {k: torch.tensor([v]) for k, v in (tok.token_inputs or {}).items()}
    with torch.no_grad():
        theirs = trained.merge_and_unload().eval()(input_ids=torch.tensor([tok.input_ids]), **given).logits.numpy()
        base = AutoModelForImageTextToText.from_pretrained(model).eval()(
            input_ids=torch.tensor([tok.input_ids]), **given
        )
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.abs(ours - base.logits.numpy()).max() > 1e-3  # the adapter is in it
    code, _, err = cli("export", run, "--to", "mlx", "--out", tmp_path / "q", "--mlx-bits", "4")
    assert code == 2 and "--mlx-bits with a vision-language model" in err
    if family == "qwen2_vl":  # a family mlx-vlm does not run here
        (tmp_path / "gemma").mkdir()
        gemma = write_recipe(tmp_path / "gemma", tiny_vl("gemma3"))
        code, _, err = cli("train", gemma, "train.max_steps=1")
        assert code == 0, err[-2000:]
        code, _, err = cli("export", tmp_path / "gemma" / "out", "--to", "mlx", "--out", tmp_path / "g")
        assert code == 2 and "export mlx: Gemma 3 is a vision-language model hwft does not run on mlx-vlm" in err
