"""Nothing from users is unpickled, executed or evaluated unless the recipe asks: each way in is
tried here and must be refused, with the payload never run (a marker file it would create)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

from tests.conftest import write_recipe

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_yaml_tag_in_a_recipe_is_refused(tmp_path, cli):
    marker = tmp_path / "ran"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data: x.jsonl\ntrain: !!python/object/apply:os.system ['touch {marker}']\n")
    code, _, err = cli("train", recipe, "--dry-run")
    assert code == 2 and "is not valid YAML" in err and "python/object/apply" in err, err
    assert not marker.exists()


def test_a_model_with_only_pickled_weights_is_refused(tmp_path, tiny_llama, cli):
    marker = tmp_path / "ran"
    model = tmp_path / "pickled-model"
    model.mkdir()
    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, model / f.name)
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    code, _, err = cli("train", write_recipe(tmp_path, model), "--dry-run")
    assert code == 2 and "holds its weights only as pickles (pytorch_model.bin)" in err, err
    assert "safe_serialization=True" in err and not marker.exists()


def test_a_pickled_adapter_is_refused(tmp_path, tiny_llama, cli):
    marker = tmp_path / "ran"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    code, _, err = cli("train", write_recipe(tmp_path, {"name": str(tiny_llama), "adapter": str(adapter)}), "--dry-run")
    assert code == 2 and "model.adapter" in err and "only as pickles (adapter_model.bin)" in err, err
    assert not marker.exists()


def remote_code_model(tmp_path: Path, tiny_llama: Path, marker: Path) -> Path:
    """A model folder whose config points at Python shipped beside it (auto_map), which would
    create ``marker`` on import."""
    model = tmp_path / "remote-model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config.update(
        model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    )
    (model / "config.json").write_text(json.dumps(config))
    (model / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    return model


def test_remote_code_is_not_run_unless_the_recipe_asks(tmp_path, tiny_llama, cli):
    marker = tmp_path / "ran"
    model = remote_code_model(tmp_path, tiny_llama, marker)
    code, _, err = cli("train", write_recipe(tmp_path, model))
    assert code == 2 and "ships its own Python code (evil.EvilConfig" in err, err
    assert "model.trust_remote_code: true" in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_trust_remote_code_warns_naming_the_model(tmp_path, tiny_llama, cli):
    recipe = write_recipe(tmp_path, {"name": str(tiny_llama), "trust_remote_code": True}, train={"max_steps": 1})
    code, _, err = cli("train", recipe)
    assert code == 0, err
    assert f"warning: model.trust_remote_code is on: Python code shipped with {tiny_llama} runs" in err


def shipped_python() -> list[Path]:
    return [
        p for top in ("hwft", "backends", "plugins") for p in (ROOT / top).rglob("*.py") if ".egg-info" not in str(p)
    ]


def test_shipped_code_never_unpickles_evaluates_or_uses_a_shell():
    """The rules, read off the source: torch.load only with weights_only=True, YAML only through
    safe_load, no shell=True, no eval/exec, no pickle module."""
    found = []
    for path in shipped_python():
        text = path.read_text(encoding="utf-8")
        for n, line in enumerate(text.splitlines(), 1):
            code = line.split("#")[0]
            checks = {
                "torch.load without weights_only=True": "torch.load(" in code and "weights_only=True" not in code,
                "yaml.load": re.search(r"yaml\.(load|unsafe_load|full_load)\(", code),
                "shell=True": "shell=True" in code,
                "eval/exec": re.search(r"(?<![\w.])(eval|exec)\(", code),
                "pickle": re.search(r"^\s*(import pickle|from pickle)|pickle\.loads?\(", code),
            }
            found += [f"{path.relative_to(ROOT)}:{n}: {what}" for what, hit in checks.items() if hit]
    assert not found, found
