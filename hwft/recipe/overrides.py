"""``key.path=value`` overrides (the CLI's, hwft board's edits) applied to a recipe's mapping
before it is validated, a section's shorthand expanded first."""

from __future__ import annotations

from typing import Any

import yaml

from hwft.errors import RecipeError


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise RecipeError(f"override '{assignment}' is not of the form key.path=value (e.g. train.lr=5e-5)")
    path, _, text = assignment.partition("=")
    parts = [p for p in path.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"override '{assignment}' names no key")
    set_key(raw, parts, yaml.safe_load(text) if text.strip() else "")


#: Sections a recipe may write as one value, and the key that value means: ``model: NAME``,
#: ``data: FILE`` (or a list of files), ``output: DIR``.
SHORTHANDS = {"model": "name", "data": "train", "output": "dir"}


def set_key(raw: dict, parts: list[str], value: Any) -> None:
    """Set the key at ``parts`` (a.b.c as a list) in place, making the sections on the way and
    expanding a section's shorthand (``data: FILE`` with ``data.packing=false`` is
    ``data: {train: FILE, packing: false}``)."""
    node: dict = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if depth == 0 and part in SHORTHANDS and isinstance(child, str | list):
            child = {SHORTHANDS[part]: child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value
