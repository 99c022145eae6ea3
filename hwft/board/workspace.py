"""The folder hwft board may read and write: every path it is given resolves inside it.

A path from the page (a recipe to load or save, an upload, a run) and every path a recipe names
(its data files, registry, template, adapter, output folder, and a model given as a folder) are
resolved, symbolic links followed, and refused unless they land inside ``--workspace``.
"""

from __future__ import annotations

import os
from pathlib import Path

from hwft.errors import UserError


class OutsideWorkspace(UserError):
    """A path that resolves outside the workspace (403)."""


class Workspace:
    def __init__(self, root: str | Path, runs: str | Path = "runs"):
        self.root = Path(root).expanduser().resolve()
        self.runs = self.inside(runs, "--runs")
        self.state = self.root / ".hwft-board"  #: the board's own files: logs of what it started

    def inside(self, path: str | Path, what: str = "path") -> Path:
        """``path`` (relative to the workspace, or absolute) resolved; refused outside it."""
        text = str(path)
        if "\x00" in text:
            raise OutsideWorkspace(f"{what}: a NUL byte is not allowed in a path")
        p = Path(text).expanduser()
        resolved = (p if p.is_absolute() else self.root / p).resolve()
        if resolved != self.root and not resolved.is_relative_to(self.root):
            raise OutsideWorkspace(
                f"{what} {text!r} is outside the workspace {self.root} (hwft board --workspace sets it)"
            )
        return resolved

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root)) if path != self.root else "."

    def recipes(self) -> list[str]:
        """Recipe files in the workspace: configs/ first, then the rest (runs' own copies and the
        board's folder left out), at most three folders deep."""
        skip = {self.state, self.runs, self.root / ".venv", self.root / ".git", self.root / "node_modules"}
        found = []
        for folder, dirs, files in os.walk(self.root):
            here = Path(folder)
            depth = len(here.relative_to(self.root).parts)
            dirs[:] = sorted(d for d in dirs if here / d not in skip and not d.startswith(".") and depth < 3)
            found += [self.relative(here / f) for f in sorted(files) if f.endswith((".yaml", ".yml"))]
        return sorted(found, key=lambda p: (not p.startswith("configs/"), p))

    #: The recipe the board opens on where the workspace has it: the README's main job, whose
    #: data lies in the workspace (configs/ sorted alphabetically starts with bench.yaml, whose
    #: data a newcomer does not have).
    START = "configs/quickstart.yaml"

    def first_recipe(self, recipes: list[str]) -> str | None:
        """The recipe the board loads when it opens: the quickstart, else the first listed."""
        return self.START if self.START in recipes else (recipes[0] if recipes else None)

    def check_recipe_paths(self, recipe) -> None:
        """Every path the recipe names must be inside the workspace."""
        named = [(f"data.train[{i}].path", d.path) for i, d in enumerate(recipe.data.train)]
        named += [(f"data.eval[{i}].path", d.path) for i, d in enumerate(recipe.data.eval)]
        named += [("data.registry", recipe.data.registry), ("model.adapter", recipe.model.adapter)]
        if recipe.template and recipe.template.endswith(".jinja"):
            named.append(("template", recipe.template))
        name = recipe.model.name
        if os.path.isabs(os.path.expanduser(name)) or name.startswith((".", "~")):
            named.append(("model.name", name))
        for key, value in named:
            if value:
                self.inside(recipe.resolve_path(value), key)
        self.inside(
            Path(recipe.output.dir).expanduser()
            if Path(recipe.output.dir).expanduser().is_absolute()
            else self.root / recipe.output.dir,
            "output.dir",
        )
