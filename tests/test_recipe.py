"""The recipe schema, overrides, and the user errors it raises (exit code 2, one message)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from hwft.errors import RecipeError
from hwft.recipe import Recipe, load_recipe, recipe_from_dict
from tests.conftest import REPO, write_recipe


def _write(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_and_shorthands(tmp_path):
    recipe = load_recipe(_write(tmp_path, "model: smollm2-135m\ndata: d.jsonl\noutput: runs/x\n"))
    assert recipe.model.name == "smollm2-135m"
    assert recipe.data.train[0].path == "d.jsonl" and recipe.data.train[0].format == "auto"
    assert recipe.output.dir == "runs/x"
    assert (recipe.method.objective, recipe.method.tuning, recipe.backend) == ("sft", "lora", "auto")
    assert recipe.resolve_path("d.jsonl") == tmp_path / "d.jsonl"
    # The resolved recipe round-trips through YAML, its file paths made absolute.
    again = Recipe.model_validate(yaml.safe_load(recipe.to_yaml()))
    assert again.data.train[0].path == str(tmp_path / "d.jsonl")
    again.data.train[0].path = "d.jsonl"
    assert again.model_dump() == recipe.model_dump()


def test_every_section_is_defined_now():
    assert set(Recipe.model_fields) >= {
        "model",
        "template",
        "data",
        "method",
        "train",
        "kernels",
        "backend",
        "parallel",
        "output",
    }
    for name, field in Recipe.model_fields.items():
        assert field.description, f"{name} has no help text"


@pytest.mark.parametrize(
    "text, message",
    [
        ("data: d.jsonl\ntrain: {lrr: 0.1}\n", "unknown key 'train.lrr'; did you mean 'train.lr'?"),
        ("data: d.jsonl\nmethod: {tunning: lora}\n", "did you mean 'method.tuning'?"),
        ("data: d.jsonl\ntrian: {}\n", "unknown key 'trian'; did you mean 'train'?"),
        ("data: d.jsonl\ntrain: {lr: fast}\n", "train.lr: expected a number, got 'fast'"),
        ("data: d.jsonl\ntrain: {micro_batch_size: 2.5}\n", "train.micro_batch_size: expected an integer"),
        (
            "data: d.jsonl\nmethod: {tuning: lorra}\n",
            "method.tuning: 'lorra' is not allowed; expected one of 'full', 'freeze', 'lora' or 'qlora'",
        ),
        ("model: x\n", "missing required key 'data'"),
        ("data: {train: [{path: a.json, formatt: alpaca}]}\n", "did you mean 'data.train[0].format'?"),
        ("data: d.jsonl\ntrain: {lr: [1\n", "is not valid YAML at line"),
        ("- a\n- b\n", "must hold a mapping of sections"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path, cli, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    code, out, stderr = cli("train", path)
    assert code == 2
    assert message in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_a_recipe_saved_with_a_byte_order_mark_reads_as_utf8(tmp_path, encoding):
    text = "# café\ndata: d.jsonl\ntrain: {lr: 0.001}\n"
    (tmp_path / "r.yaml").write_bytes(text.encode(encoding))
    assert load_recipe(tmp_path / "r.yaml").train.lr == 0.001


def test_a_recipe_that_is_no_unicode_text_names_the_byte(tmp_path, cli):
    path = tmp_path / "r.yaml"
    path.write_bytes("# café\ndata: d.jsonl\n".encode("cp1252"))
    with pytest.raises(RecipeError, match=r"r.yaml: not valid text at byte 5 \(0xe9\): tried UTF-8"):
        load_recipe(path)
    code, _, stderr = cli("train", path)
    assert code == 2 and "not valid text at byte 5" in stderr and "Traceback" not in stderr


def test_overrides(tmp_path):
    path = _write(tmp_path, "model: smollm2-135m\ndata: d.jsonl\n")
    recipe = load_recipe(
        path, ["train.lr=5e-5", "method.tuning=full", "model.trust_remote_code=true", "eval.prompts=[hi, there]"]
    )
    assert recipe.train.lr == 5e-5
    assert recipe.method.tuning == "full"
    assert recipe.model.trust_remote_code is True and recipe.model.name == "smollm2-135m"
    assert recipe.eval.prompts == ["hi", "there"]
    with pytest.raises(RecipeError, match="did you mean 'train.lr'"):
        load_recipe(path, ["train.lrr=1"])
    # a key below a shorthand applies to what the shorthand means: data: FILE is data.train: FILE
    recipe = load_recipe(path, ["data.packing=false", "output.overwrite=true"])
    assert recipe.data.packing is False and recipe.data.train[0].path == "d.jsonl"
    listed = _write(tmp_path, "model: smollm2-135m\ndata: [a.jsonl, b.jsonl]\noutput: runs/x\n")
    recipe = load_recipe(listed, ["data.val_size=2", "output.overwrite=true"])
    assert [d.path for d in recipe.data.train] == ["a.jsonl", "b.jsonl"] and recipe.data.val_size == 2
    assert recipe.output.dir == "runs/x" and recipe.output.overwrite
    with pytest.raises(RecipeError, match="not of the form key.path=value"):
        load_recipe(path, ["train.lr"])


def test_missing_recipe_file(cli, tmp_path):
    code, _, err = cli("train", tmp_path / "nope.yaml")
    assert code == 2 and "recipe file not found" in err


def test_debug_shows_the_traceback(tmp_path):
    from hwft import cli

    path = _write(tmp_path, "data: d.jsonl\ntrain: {lrr: 1}\n")
    with pytest.raises(RecipeError):
        cli.main(["--debug", "train", str(path)])


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"method": {"objective": "grpo"}}, "objective grpo needs at least one reward in method.grpo.rewards"),
        (
            {"method": {"objective": "grpo", "grpo": {"rewards": ["exact_mach"]}}},
            "method.grpo.rewards[0]: unknown reward 'exact_mach'; did you mean 'exact_match'?",
        ),
        (
            {
                "data": {"train": [{"path": "train.jsonl"}], "eval": [{"path": "train.jsonl"}]},
                "method": {"objective": "dpo"},
            },
            "data.eval measures the loss of sft and cpt runs; objective dpo has no held-out loss yet",
        ),
        ({"train": {"eval_every": 2}}, "train.eval_every needs data.eval"),
        (
            {"parallel": {"offload_optimizer": True}},
            "parallel.offload_optimizer needs strategy deepspeed (ZeRO-Offload), not none",
        ),
        ({"parallel": {"accelerate_config": "train.jsonl"}}, "parallel.accelerate_config: "),
        (
            {"kernels": {"fused_rms_norm": True}},
            "backend 'cpu' cannot run this recipe: it cannot do kernels.fused_rms_norm",
        ),
        (
            {"train": {"precision": "fp16"}},
            "train.precision 'fp16' (it has: fp32, bf16); backends that could: cuda (not available here",
        ),
        (
            {"parallel": {"strategy": "deepspeed"}, "backend": "mlx"},
            "parallel.strategy 'deepspeed' (it has: none, ddp)",
        ),
        ({"backend": "cuda"}, "backend 'cuda' is not available here: torch 2.13.0+cpu is a CPU-only build"),
        ({"backend": "cdua"}, "no backend named 'cdua'; did you mean 'cuda'?"),
    ],
)
def test_refused_before_weights_load(tmp_path, cli, sections, message):
    path = write_recipe(tmp_path, "smollm2-135m", **sections)  # resolved, never loaded
    code, _, err = cli("train", path)
    assert code == 2, err
    assert message in err, err
    assert not (tmp_path / "out").exists(), "a refused run must not create its output folder"


def test_a_fixed_backend_whose_plugin_is_absent_names_its_distribution(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HWFT_DISABLE_PLUGINS", "mlx")
    code, _, err = cli("train", write_recipe(tmp_path, "smollm2-135m", backend="mlx"))
    assert code == 2 and "backend 'mlx' is not installed: it comes with hwft-mlx" in err, err
    assert not (tmp_path / "out").exists()


def test_validation_imports_no_engine():
    """Recipe validation, plugin loading and error messages never import torch or mlx."""
    code = (
        "import sys\n"
        "from hwft.plugins import get_host\n"
        "from hwft.recipe import recipe_from_dict\n"
        "from hwft.select import capability_problems\n"
        "host = get_host(); r = recipe_from_dict({'data': 'x.jsonl'})\n"
        "assert host.backends and host.probe('cpu').available\n"
        "capability_problems(r, host.capability('cpu'))\n"
        "bad = [m for m in ('torch', 'transformers', 'mlx') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_installed_command_exits_2_without_a_traceback(tmp_path):
    """The console script itself (one subprocess): exit code 2 and one line on stderr."""
    from pathlib import Path

    path = _write(tmp_path, "data: d.jsonl\ntrain: {lrr: 1}\n")
    script = Path(sys.executable).parent / "hwft"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "hwft.cli"]
    done = subprocess.run([*command, "train", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"hwft: error: invalid recipe {path}: unknown key 'train.lrr'; did you mean 'train.lr'?"
    ]


def test_the_recipe_reference_in_docs_is_generated_from_the_schema():
    """docs/recipe.md is `python -m hwft.reference`'s output: every key, type, default and help
    text of the schema and of the built-in methods' sections, so the two cannot drift apart."""
    from hwft.reference import markdown

    written = (REPO / "docs" / "recipe.md").read_text(encoding="utf-8")
    assert written == markdown(), "docs/recipe.md is stale: run `python -m hwft.reference > docs/recipe.md`"
    for key in ("`train.lr`", "`method.dpo.beta`", "`method.grpo.rewards[].weight`", "`kernels.compile`"):
        assert key in written


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
def test_warmup_ratio_warms_up_the_same_steps_on_both_engines(scheduler):
    """train.warmup_ratio: ceil(ratio x steps) warmup steps, as transformers counts them; the
    torch engine's schedule (transformers' get_scheduler) and the MLX engine's (mlx.optimizers)
    give every step the same learning rate as warmup_steps would."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("mlx.core")
    from hwft_mlx.engine import make_schedule
    from hwft_torch.engine import make_scheduler

    steps = 10
    ratio = recipe_from_dict({"data": "x.jsonl", "train": {"lr": 1e-3, "warmup_ratio": 0.25, "scheduler": scheduler}})
    fixed = recipe_from_dict({"data": "x.jsonl", "train": {"lr": 1e-3, "warmup_steps": 3, "scheduler": scheduler}})
    assert ratio.train.warmup(steps) == 3 == fixed.train.warmup(steps)  # ceil(2.5)

    def torch_lrs(recipe):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.train.lr)
        schedule = make_scheduler(optimizer, recipe, steps)
        out = []
        for _ in range(steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return out

    mlx_schedule = make_schedule(ratio, steps)
    assert torch_lrs(ratio) == pytest.approx(torch_lrs(fixed), abs=1e-12)
    assert torch_lrs(ratio)[:4] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3], abs=1e-9)
    assert [float(mlx_schedule(k)) for k in range(steps)] == pytest.approx(torch_lrs(ratio), abs=1e-8)


def test_warmup_is_set_once():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"data": "x.jsonl", "train": {"warmup_steps": 2, "warmup_ratio": 0.1}})
    assert "train.warmup_steps (2) and train.warmup_ratio (0.1) both set the warmup: keep one" in str(err.value)
