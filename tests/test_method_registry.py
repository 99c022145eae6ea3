"""The method registry (hwft.methods): built-ins registered through the hook a plugin uses,
recipes checked against it, capability records narrowed to what an engine implements, and an
out-of-tree method (tests/method_plugin, hwft-lsft) that trains through the hooks alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hwft.errors import RecipeError
from hwft.methods import Implementation, MethodRegistry
from hwft.plugins import get_host, reset_host
from hwft.recipe import recipe_from_dict
from hwft.records import Capability
from tests.conftest import REPO

PLUGIN = REPO / "tests" / "method_plugin"


def test_the_built_in_methods_register_through_the_plugin_hook():
    reset_host()
    host = get_host()
    methods = host.methods()
    assert methods.names()[:9] == ["sft", "cpt", "dpo", "orpo", "simpo", "kto", "rm", "grpo", "ppo"]
    core = next(p for p in host.plugins if p.name == "core-methods")
    assert core.hooks == ["hwft_register_methods"]
    assert {m: methods.methods[m].kind for m in ("sft", "cpt", "dpo", "orpo", "simpo", "kto", "rm", "grpo", "ppo")} == {
        "sft": "chat",
        "cpt": "text",
        "dpo": "preference",
        "orpo": "preference",
        "simpo": "preference",
        "kto": "feedback",
        "rm": "preference",
        "grpo": "prompt",
        "ppo": "prompt",
    }
    assert [m for m in methods.names() if methods.methods[m].packs] == ["sft", "cpt"]
    assert set(methods.sections()) == {"dpo", "orpo", "simpo", "kto", "rm", "grpo", "ppo"}
    # each engine implements each built-in in its own module, registered by its backend plugin
    assert methods.implementation("dpo", "torch").build == "hwft_torch.dpo:build"
    assert methods.implementation("grpo", "mlx").build == "hwft_mlx.group_relative:build"
    assert methods.implementation("simpo", "torch").build == "hwft_torch.simpo:build"
    assert methods.implementation("orpo", "mlx").build == "hwft_mlx.orpo:build"


@pytest.mark.parametrize(
    "method, message",
    [
        (
            {"objective": "dop"},
            "method.objective: 'dop' is not a registered method; did you mean 'dpo'? (registered: sft, "
            "cpt, dpo, orpo, simpo, kto, rm, grpo, ppo",
        ),
        ({"dpoo": {"beta": 1}}, "unknown key 'method.dpoo'; did you mean 'method.dpo'?"),
        ({"objective": "dpo", "dpo": {"betta": 1}}, "unknown key 'method.dpo.betta'; did you mean 'method.dpo.beta'?"),
        ({"dpo": {"beta": 0}}, "method.dpo.beta: Input should be greater than 0 (got 0)"),
        (
            {"grpo": {"loss_type": "ppo"}},
            "method.grpo.loss_type: 'ppo' is not allowed; expected one of 'dapo', 'grpo' or 'dr_grpo'",
        ),
    ],
)
def test_a_recipe_names_a_registered_method_and_its_section_is_checked_by_its_spec(method, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"data": "x.jsonl", "method": method})
    assert message in str(err.value)


def test_every_method_section_has_its_defaults_and_survives_a_round_trip():
    recipe = recipe_from_dict({"data": "x.jsonl", "method": {"objective": "dpo", "dpo": {"beta": 0.25}}})
    assert recipe.method.dpo.beta == 0.25 and recipe.method.grpo.num_generations == 4
    import yaml

    again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again.method.dpo == recipe.method.dpo and again.method.grpo == recipe.method.grpo
    switched = recipe.model_copy(deep=True)
    switched.method.objective = "grpo"  # validated on assignment, sections kept
    assert switched.method.dpo.beta == 0.25


def test_a_backend_runs_what_it_claims_and_its_engine_implements():
    registry = get_host().methods()
    plain = Capability(methods={"sft": ("full", "lora"), "xpo": ("lora",)}, dtypes=("fp32",))
    # a 1.0 record keeps its own claims, less a method the torch engine has no module for
    assert registry.effective(plain, "torch").methods == {"sft": ("full", "lora")}
    # Capability.tunings (1.1): every method the engine implements, plus the claims
    open_record = Capability(methods={}, dtypes=("fp32",), tunings=("full", "lora"))
    assert registry.effective(open_record, "mlx").methods == {
        m: ("full", "lora") for m in ("sft", "cpt", "dpo", "orpo", "simpo", "kto", "rm", "grpo", "ppo")
    }
    # an engine hwft has no implementations for runs its own loop: its claims stand
    assert registry.effective(plain, "vendor-engine").methods == plain.methods
    # an implementation that supports fewer tunings narrows the claim
    narrow = MethodRegistry(
        registry.methods,
        {**registry.implementations, ("cpt", "torch"): Implementation("cpt", "torch", "x:y", ("full",))},
    )
    assert narrow.effective(open_record, "torch").methods["cpt"] == ("full",)
    assert get_host().capability("cpu").methods["grpo"] == ("full", "lora", "qlora")


def installed_plugin(tmp_path: Path) -> dict:
    """The environment of a process in which hwft-lsft is installed: a dist-info with its entry
    point on sys.path, found by importlib.metadata as a pip-installed distribution is."""
    site = tmp_path / "site"
    info = site / "hwft_lsft-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hwft-lsft\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[hwft]\nlsft = hwft_lsft.plugin\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(PLUGIN), str(REPO)])}


def test_an_out_of_tree_method_passes_the_conformance_cells(tmp_path):
    """hwft-lsft, installed, through hwft's conformance suite: on the torch cpu backend its
    full, lora and qlora cells train 4 steps, the loss falls and its own invariant holds (loss
    = (1-eps) nll + eps smoothing at every step); the MLX engine does not implement it, so its
    MLX cells are refused before training with exit code 2. Then `hwft plugins` lists it."""
    env = installed_plugin(tmp_path)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--pyargs",
            "hwft.testing.conformance",
            "--hwft-backend",
            "cpu,mlx",
            "-k",
            "lsft",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = done.stdout[-3000:]
    assert done.returncode == 0, tail + done.stderr[-2000:]
    assert "6 passed" in tail, tail  # cpu: 3 claimed cells; mlx: 3 disclaimed ones refused
    listed = subprocess.run(
        [sys.executable, "-m", "hwft", "plugins", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    methods = {m["name"]: m for m in json.loads(listed.stdout)["methods"]}
    assert methods["lsft"] == {
        "name": "lsft",
        "kind": "chat",
        "engines": ["torch"],
        "plugin": "lsft",
        "section": "lsft",
        "description": "supervised fine-tuning with label smoothing (hwft-lsft)",
    }
    assert methods["dpo"]["engines"] == ["mlx", "torch"] and methods["dpo"]["plugin"] == "core-methods"


def test_the_method_package_touches_nothing_of_hwft():
    """Everything hwft-lsft is lives in its own folder and reaches hwft through imports of
    plugin API 1.1 (hwft.methods, hwft.section, hwft.objective, hwft.data, the torch engine's
    helpers); no file of hwft/ or backends/ names it."""
    for tree in ("hwft", "backends"):
        for path in (REPO / tree).rglob("*.py"):
            assert "lsft" not in path.read_text(encoding="utf-8"), path


def test_both_engines_hand_a_method_the_same_setup_and_take_the_same_objective():
    """The engine contract is one shape (hwft.contract): each engine's Setup has every field of
    the core's Setup protocol, and every built-in objective on either engine gives
    ``loss(model, micro) -> Loss`` besides what the core's Objective shares."""
    import dataclasses
    import importlib

    from hwft.contract import EngineObjective, Setup
    from hwft.methods.record import resolve

    wanted = set(Setup.__annotations__)
    for engine in ("hwft_torch.methods", "hwft_mlx.methods"):
        setup = resolve(f"{engine}:Setup")
        assert wanted <= {f.name for f in dataclasses.fields(setup)}, (engine, wanted)
    protocol = {name for name in dir(EngineObjective) if not name.startswith("_")} | set(
        EngineObjective.__annotations__
    )
    for implementation in get_host().methods().implementations.values():
        module = importlib.import_module(implementation.build.partition(":")[0])
        built = [v for v in vars(module).values() if isinstance(v, type) and hasattr(v, "loss") and hasattr(v, "step")]
        assert built, implementation
        for cls in built:
            declared = set(dir(cls)) | set_in_init(cls)
            assert protocol <= declared, (cls, protocol - declared)


def set_in_init(cls: type) -> set[str]:
    """The attributes the ``__init__`` of ``cls`` or of a class it derives from assigns on ``self``."""
    import ast
    import inspect
    import textwrap

    names = set()
    for base in cls.__mro__:
        init = vars(base).get("__init__")
        if init is None or not inspect.isfunction(init):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
        names |= {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        }
    return names
