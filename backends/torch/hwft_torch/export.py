"""The torch backend's exporters (registered through ``hwft_register_exporters``):

- ``hf``: the merged full model (LoRA folded into the base weights, ``W + (alpha/r) B A``) as
  Hugging Face safetensors with its tokenizer and chat template: transformers, vLLM and TGI load
  the folder as it is;
- ``peft``: the adapter alone, PEFT's own layout (``PeftModel.from_pretrained``);
- ``gguf``: one file for llama.cpp and Ollama, f16 or q8_0, from the merged fp32 model
  (:mod:`hwft.use.gguf_writer`, which needs gguf and numpy only).

Each reloads for ``--verify`` with the library its users use: transformers, peft on the base,
transformers' GGUF reader.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field

from hwft import vision
from hwft.section import Section
from hwft.use.exporters import Exporter, ExportOptions

ENGINE = "torch"


def model_class(weights: Path):
    """transformers' class of the base model: a vision-language family's image-text-to-text
    model (hwft.vision: its vision tower travels with it), else the causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if vision.family_of(weights) is not None else AutoModelForCausalLM


#: What a vision-language model's folder holds for its processor besides the tokenizer.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def merge_to_hf(trained, out: Path, dtype: str = "auto") -> Path:
    """The merged model as an HF safetensors folder with tokenizer (torch and peft), and a
    vision-language model's image processor settings."""
    import torch
    from transformers.utils import logging as hf_logging

    from hwft.models import load_tokenizer

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    model = model_class(trained.weights).from_pretrained(
        trained.weights,
        dtype=torch.float32,
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=trained.trust_remote_code,
    )
    if trained.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, trained.adapter).merge_and_unload()
    saved = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if saved is not None:
        model = model.to(saved)
    model.config._name_or_path = out.name
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(trained.tokenizer_dir, trained.trust_remote_code).save_pretrained(out)
    for name in PROCESSOR_FILES:
        if (Path(trained.weights) / name).is_file():
            shutil.copy(Path(trained.weights) / name, out / name)
    return out


def write_hf(trained, staged: Path, options: ExportOptions) -> Path:
    return merge_to_hf(trained, staged, options.dtype)


def write_peft(trained, staged: Path, options: ExportOptions) -> Path:
    shutil.copytree(trained.adapter, staged)
    return staged


class GgufOptions(Section):
    """``hwft export --to gguf``'s own settings (``--gguf-type``)."""

    type: Literal["f16", "q8_0"] = Field(default="q8_0", description="GGUF weights: f16, or q8_0 (8-bit, llama.cpp's)")


def write_gguf(trained, staged: Path, options: ExportOptions) -> Path:
    """The merged weights as GGUF, in the layout the model's family has in this engine's table
    (hwft_torch.families), refused before merging where it has none."""
    import json

    from hwft.plugins import get_host
    from hwft.use.gguf_writer import layout_for
    from hwft.use.gguf_writer import write_gguf as write

    layouts = {f.model_type: f.gguf for f in get_host().families().of("torch") if f.gguf is not None}
    layout = layout_for(json.loads((trained.weights / "config.json").read_text(encoding="utf-8")), layouts)
    merged = merge_to_hf(trained, staged.parent / "merged", "fp32")
    return write(merged, staged, options.settings.type, staged.stem, layout)


def _logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def reload_hf(path: Path, ids: list[int], trained):
    import torch

    return _logits(model_class(path).from_pretrained(path, dtype=torch.float32, local_files_only=True), ids)


def reload_peft(path: Path, ids: list[int], trained):
    import torch
    from peft import PeftModel

    base = model_class(trained.weights).from_pretrained(trained.weights, dtype=torch.float32, local_files_only=True)
    return _logits(PeftModel.from_pretrained(base, path), ids)


def reload_gguf(path: Path, ids: list[int], trained):
    """The GGUF's logits, read back through transformers' own GGUF loader where it reads the
    architecture, else through hwft's inverse of its writer (hwft.use.gguf_readback), saying so."""
    import json
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    from hwft.plugins import get_host

    config = json.loads((trained.weights / "config.json").read_text(encoding="utf-8"))
    layout = get_host().families().lookup("torch", config.get("model_type")).gguf
    if layout is not None and layout.readback == "hwft":
        from hwft_torch.gguf_readback import load

        print(
            f"hwft export: --verify reads {config['model_type']} GGUF back with hwft's inverse of its writer "
            "(gguf.GGUFReader); transformers' GGUF loader does not read it",
            file=sys.stderr,
        )
        return _logits(load(path, config["model_type"], layout), ids)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF reader draws a progress bar
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except RuntimeError as exc:
        if layout is None or "mismatched" not in str(exc):
            raise
        # transformers' GGUF loader takes some config keys from its defaults (a Qwen3 head size
        # other than 128): read the file with hwft's inverse instead, saying so
        from hwft_torch.gguf_readback import load

        print(
            f"hwft export: --verify reads this {config['model_type']} GGUF back with hwft's inverse of its writer: "
            "transformers' GGUF loader does not read every key of it (its shapes came out otherwise)",
            file=sys.stderr,
        )
        return _logits(load(path, config["model_type"], layout), ids)
    return _logits(model, ids)


#: How far an export's logits may be from the trained model's (max |difference| relative to the
#: largest |logit|): fp32 round-trips exactly up to summation order; f16 and q8_0 round.
GGUF_TOLERANCE = {"f16": 1e-2, "q8_0": 5e-2}

EXPORTERS = (
    Exporter(
        "hf", ENGINE, "the merged model as Hugging Face safetensors (transformers, vLLM, TGI)", write_hf, reload_hf
    ),
    Exporter("peft", ENGINE, "the LoRA adapter alone, PEFT's layout", write_peft, reload_peft, needs_adapter=True),
    Exporter(
        "gguf",
        ENGINE,
        "one GGUF file, f16 or q8_0 (llama.cpp, Ollama)",
        write_gguf,
        reload_gguf,
        tolerance=lambda options: GGUF_TOLERANCE[options.settings.type],
        name=lambda options: f"model-{options.settings.type}.gguf",
        single_file=True,
        options=GgufOptions,
    ),
)
