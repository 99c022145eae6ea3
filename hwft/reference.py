"""The recipe reference (docs/recipe.md), written from the schema's own help text.

    python -m hwft.reference > docs/recipe.md

Every key of :class:`hwft.recipe.Recipe` with its type, default and description, section by
section, then each built-in method's own ``method.<name>`` section (hwft.methods). A test
regenerates it and fails when docs/recipe.md has drifted from the code.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

HEADER = """# Recipe reference

Generated from the schema's help text by `python -m hwft.reference > docs/recipe.md`; a test
fails when this page and the code drift apart. A recipe is YAML; unknown keys are errors with a
"did you mean", and any key can be set from the command line as `key.path=value`
(`hwft train R.yaml train.lr=1e-4 method.dpo.beta=0.2`).
"""


def _type(annotation: Any) -> str:
    """A reader's name for a field's type."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in args)
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return {bool: "bool", int: "int", float: "number", str: "string"}.get(annotation, str(annotation))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{value!r}`" if value not in ([], {}) else f"`{value}`"
    if field.default is PydanticUndefined:
        return "required"
    value = field.default
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _nested(annotation: Any) -> type[BaseModel] | None:
    """The section type a field holds (directly, in a list, or as an optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _nested(arg)
        if found is not None:
            return found
    return None


def _table(prefix: str, model: type[BaseModel]) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{prefix}{name}` | {_type(field.annotation)} | {_default(field)} | {description} |")
    return lines


def _sections(prefix: str, title: str, model: type[BaseModel], out: list[str]) -> None:
    doc = (model.__doc__ or "").strip()
    out += ["", f"## {title}", ""]
    if doc and model.__module__.startswith("hwft") and not doc.startswith(("Base for", "A whole recipe")):
        out += [" ".join(doc.split()), ""]
    out += _table(prefix, model)
    for name, field in model.model_fields.items():
        inner = _nested(field.annotation)
        if inner is not None:
            many = get_origin(field.annotation) is list
            key = f"{prefix}{name}[]" if many else f"{prefix}{name}"
            _sections(f"{key}.", f"`{key}`", inner, out)


def markdown() -> str:
    """docs/recipe.md: the recipe's sections, then the built-in methods' own sections."""
    from hwft.methods.builtin import BUILTIN
    from hwft.recipe import Recipe

    out = [HEADER.rstrip()]
    out += ["", "## Top level", ""] + _table("", Recipe)
    for name, field in Recipe.model_fields.items():
        inner = _nested(field.annotation)
        if inner is not None:
            _sections(f"{name}.", f"`{name}`", inner, out)
    out += [
        "",
        "## Method sections",
        "",
        "Each method (`method.objective`) may have its own section, `method.<name>`, checked by the "
        "method's own spec; plugins' methods bring theirs (`hwft plugins` lists every method).",
    ]
    for method in BUILTIN:
        if method.section is not None:
            _sections(f"method.{method.name}.", f"`method.{method.name}`: {method.description}", method.section, out)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
