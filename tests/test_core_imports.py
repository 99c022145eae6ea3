"""The core imports no engine: no module under hwft/ imports torch, mlx or an engine's package,
by name or through importlib with a name it builds; it reaches engines through the records their
plugins register. hwft/testing is the exception: the conformance suite (plugin API 1.0) builds
tiny models with torch. And no module of the core or the engines imports one that imports it
back."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

#: Packages that are an engine, need one, or are one's own.
ENGINE_PACKAGES = (
    "torch",
    "mlx",
    "mlx_lm",
    "peft",
    "bitsandbytes",
    "deepspeed",
    "accelerate",
    "torch_npu",
    "liger_kernel",
    "flash_attn",
    "hwft_",
)
#: Known exceptions, each with why and what removes it.
PENDING: dict[tuple[str, str], str] = {}


def engine_imports(path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.JoinedStr)
        ):
            names = ["importlib.import_module(f'...')"]  # a module name built from parts
        for name in names:
            if name.startswith(("importlib.import_module(", "hwft_")) or name.split(".")[0] in ENGINE_PACKAGES:
                found.append((node.lineno, name))
    return found


def test_no_core_module_imports_an_engine():
    offences = []
    for path in sorted((REPO / "hwft").rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative.startswith("hwft/testing/"):
            continue
        for line, name in engine_imports(path):
            if (relative, name.split(".")[0]) not in PENDING:
                offences.append(f"{relative}:{line} imports {name}")
    assert offences == [], "\n".join(offences)
    # each pending exception is still real (remove it from PENDING once it is gone)
    for relative, package in PENDING:
        assert any(n.split(".")[0] == package for _, n in engine_imports(REPO / relative)), relative


#: hwft's packages and where their modules are.
PACKAGES = {
    "hwft": REPO / "hwft",
    "hwft_torch": REPO / "backends/torch/hwft_torch",
    "hwft_mlx": REPO / "backends/mlx/hwft_mlx",
    "hwft_ascend": REPO / "backends/ascend/hwft_ascend",
    "hwft_xpu": REPO / "plugins/hwft-xpu/hwft_xpu",
}


def hwft_modules() -> dict[str, Path]:
    modules = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path: Path, modules: dict, name: str = "") -> set[str]:
    """Every hwft module ``path`` (the module ``name``) imports, wherever the statement is: at
    module level, inside a function (run on a call), under ``if TYPE_CHECKING`` (read by the
    type checker); importing ``a.b.c`` imports the packages ``a.b`` and ``a`` too, except the
    packages the module itself lies in (being imported already when it runs). A registry's
    ``"module:function"`` paths are not imports: they name what a plugin registered, loaded
    when it is used."""
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def with_packages(imported: str) -> set[str]:
        parts = imported.split(".")
        return ({".".join(parts[:i]) for i in range(1, len(parts))} - own | {imported}) & set(modules)

    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {p for a in node.names if (m := owner(a.name)) for p in with_packages(m)}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                m = owner(f"{node.module}.{a.name}") or owner(node.module)
                if m:
                    out |= with_packages(m)
    return out


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def test_no_module_imports_one_that_imports_it_back(tmp_path):
    """hwft's import graph (the core, the engines and the bundled device plugin; every import
    statement, those inside functions and for the type checker too) has no cycle; a cycle
    planted in a copy of the core is found."""
    modules = hwft_modules()
    edges = {m: imports_of(p, modules, m) - {m} for m, p in modules.items()}
    assert import_cycles(edges) == []
    planted = tmp_path / "recipe.py"  # the schema asking the CLI for something, inside a function
    planted.write_text(
        modules["hwft.recipe"].read_text(encoding="utf-8") + "\n\ndef _late():\n    from hwft.cli import main\n"
    )
    edges["hwft.recipe"] = imports_of(planted, modules, "hwft.recipe") - {"hwft.recipe"}
    assert any({"hwft.recipe", "hwft.cli"} <= set(c) for c in import_cycles(edges))


# ---------------------------------------------------------------------------- a method lives in its own modules


def method_names_used(path, names: set[str]) -> list[str]:
    """Where ``path``'s code names a method: a string equal to a method's name (compared,
    a default, a key), an attribute (``recipe.method.grpo``) or a keyword argument named after
    one. Docstrings and messages' prose are not code; an engine's table of its implementations
    names each (``Implementation("grpo", ...)``: the method's registration, not a guess)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            skip.add(id(body[0].value))  # a docstring
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Implementation" and node.args:
            skip.add(id(node.args[0]))
        if isinstance(node, ast.JoinedStr):  # an f-string's text is prose
            skip |= {id(v) for v in node.values}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in names and id(node) not in skip:
            found.append(f"{node.lineno}: the string {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in names:
            found.append(f"{node.lineno}: the attribute .{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg in names:
            found.append(f"{node.lineno}: the keyword {node.arg}=")
    return found


def test_no_file_outside_a_method_s_own_modules_names_a_method(tmp_path):
    """What a method is (its section, its traits, what LLaMA-Factory calls it) lives in its
    record (hwft/methods/<name>.py); what its loss is on an engine, in the engine's module its
    implementation names. Everywhere else the core and the engines ask the record."""
    import importlib.util

    from hwft.plugins import get_host, reset_host

    reset_host()  # the installed plugins alone, whatever another test registered
    registry = get_host().methods()
    names = set(registry.names())
    own = set()
    for implementation in registry.implementations.values():
        if isinstance(implementation.build, str):  # "module:function": the method's module on that engine
            own.add(Path(importlib.util.find_spec(implementation.build.partition(":")[0]).origin).resolve())
    offences = []
    for root in [REPO / "hwft", *PACKAGES.values()]:
        for path in sorted(root.rglob("*.py")):
            if path.resolve() in own or (REPO / "hwft" / "methods") in path.parents:
                continue
            offences += [f"{path.relative_to(REPO)}:{where}" for where in method_names_used(path, names)]
    assert sorted(set(offences)) == [], "\n".join(sorted(set(offences)))
    planted = tmp_path / "select.py"  # the test sees a name planted in the core
    planted.write_text(
        'def problems(recipe):\n    """Refuse what grpo cannot do."""\n'
        '    if recipe.method.objective == "grpo" and recipe.method.grpo.beta:\n        return []\n'
    )
    assert method_names_used(planted, names) == ["3: the string 'grpo'", "3: the attribute .grpo"]


def test_a_training_process_imports_bitsandbytes_only_to_quantise(tiny_llama, tmp_path):
    """`hwft train` in a process of its own, LoRA: bitsandbytes (which peft imports whenever it is
    installed, and whose import pulls in Inductor) is left out, so neither is imported; the run
    trains as ever. A caller's in-process `main([...])` (the tests') leaves imports alone."""
    import os
    import subprocess
    import sys

    from tests.conftest import write_recipe

    recipe = write_recipe(tmp_path, tiny_llama, train={"max_steps": 1})
    probe = (
        "import sys; sys.argv = ['hwft', 'train', sys.argv[1]]; from hwft.cli import main; code = main(); "
        "print(code, sys.modules.get('bitsandbytes', 'unimported'), 'torch._inductor.compile_fx' in sys.modules)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", probe, str(recipe)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "0 None False", done.stdout
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
