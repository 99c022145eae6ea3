"""The core imports no engine: no module under hwft/ imports torch, mlx or an engine's package,
by name or through importlib with a name it builds; it reaches engines through the records their
plugins register. hwft/testing is the exception: the conformance suite (plugin API 1.0) builds
tiny models with torch. And no module of the core or the engines imports one that imports it
back."""

from __future__ import annotations

import ast

from tests.conftest import REPO

#: Packages that are an engine, need one, or are one's own.
ENGINE_PACKAGES = ("torch", "mlx", "mlx_lm", "peft", "bitsandbytes", "deepspeed", "accelerate", "torch_npu",
                   "liger_kernel", "flash_attn", "hwft_")
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
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.JoinedStr)):
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
    for (relative, package) in PENDING:
        assert any(n.split(".")[0] == package for _, n in engine_imports(REPO / relative)), relative


#: hwft's packages and where their modules are.
PACKAGES = {"hwft": REPO / "hwft", "hwft_torch": REPO / "backends/torch/hwft_torch",
            "hwft_mlx": REPO / "backends/mlx/hwft_mlx", "hwft_ascend": REPO / "backends/ascend/hwft_ascend"}


def module_level_imports(path, modules: dict) -> set[str]:
    """The hwft modules ``path`` imports when it is imported: statements of the module body and
    of its if/try blocks, not those under ``if TYPE_CHECKING`` nor inside functions (an import
    deferred to a call, such as the plugin host's built-in registries)."""

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    out: set[str] = set()
    pending = list(ast.parse(path.read_text(encoding="utf-8")).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        elif isinstance(node, ast.Import):
            out |= {m for a in node.names if (m := owner(a.name))}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out |= {m for a in node.names if (m := owner(f"{node.module}.{a.name}") or owner(node.module))}
    return out


def test_no_module_imports_one_that_imports_it_back():
    """hwft's import graph (the core and the engines, as modules import each other when
    loaded) has no cycle: each cycle found is listed, shortest first."""
    modules = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges = {m: module_level_imports(p, modules) - {m} for m, p in modules.items()}
    cycles = []
    for start in sorted(edges):  # a breadth-first search back to each module
        paths, seen = [[start]], {start}
        while paths and not any(p[-1] == start and len(p) > 1 for p in paths):
            paths = [p + [n] for p in paths for n in sorted(edges[p[-1]]) if n == start or n not in seen]
            seen |= {p[-1] for p in paths}
        cycles += [" -> ".join(p) for p in paths if p[-1] == start and len(p) > 1][:1]
    assert cycles == [], cycles
