"""Reading a recipe: the file's text as YAML (``safe_load``), a LLaMA-Factory training YAML
translated as it is, the overrides applied, then validation against the schema; every problem
a RecipeError naming the file, the key or the line."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from hwft import llamafactory
from hwft.errors import RecipeError
from hwft.recipe.errors import format_validation_error
from hwft.recipe.overrides import apply_override
from hwft.recipe.schema import Recipe
from hwft.textfile import read_text


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file; raise :class:`RecipeError` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    raw = parse_recipe_text(read_text(path, RecipeError), str(path))
    imported = None
    if llamafactory.looks_like(raw):  # LLaMA-Factory's training YAML, as it is
        imported = llamafactory.translate(raw, path)
        raw = imported.recipe
    for assignment in overrides or []:
        apply_override(raw, assignment)
    recipe = recipe_from_dict(raw, source=str(path), base_dir=path.resolve().parent)
    recipe._imported = imported
    return recipe


def parse_recipe_text(text: str, source: str) -> dict:
    """A recipe file's text as its mapping; a RecipeError names ``source`` and where the YAML breaks."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{source} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source} must hold a mapping of sections (model, data, method, ...)")
    return raw


def recipe_from_dict(raw: dict, source: str = "<recipe>", base_dir: str | Path = ".") -> Recipe:
    """Validate an already-parsed recipe mapping."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from None
    recipe._base_dir = str(base_dir)
    return recipe
