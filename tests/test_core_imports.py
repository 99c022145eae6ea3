"""The core imports no engine: no module under hwft/ imports torch, mlx or an engine's package,
by name or through importlib with a name it builds; it reaches engines through the records their
plugins register. hwft/testing is the exception: the conformance suite (plugin API 1.0) builds
tiny models with torch."""

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
