"""The recipe builder's form, made from the recipe schema itself, and what the backend allows.

:func:`fields` walks :class:`hwft.recipe.Recipe` (and every registered method's own
``method.<name>`` section) as ``hwft.reference`` does for docs/recipe.md: each key with its kind,
default and help text. :func:`refusals` then tries every value of every choice field against the
recipe as it stands, on the backend it names (``auto``: every available one), through the same
checks ``hwft train`` runs (:func:`hwft.recipe.recipe_from_dict`, :func:`hwft.select.select_backend`),
so an option the form disables carries the CLI's own message, and a recipe built from enabled
options only is one ``hwft train`` accepts.
"""

from __future__ import annotations

import copy
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from hwft.errors import UserError
from hwft.reference import _nested


@dataclass
class Field:
    """One key of the form."""

    key: str  #: dotted path, as a CLI override names it (train.lr)
    kind: str  #: bool, choice, int, number, text or yaml (lists, mappings, unions of them)
    help: str
    default: Any  #: JSON value; None for null; "(required)" where there is no default
    choices: list[Any] = field(default_factory=list)  #: for bool and choice: the values offered
    nullable: bool = False  #: null (leave to the default rule) is a value
    section: str = ""  #: the section it belongs to (train, method.dpo, ...)


def _scalar_kind(annotation: Any) -> tuple[str, list[Any], bool]:
    """(kind, choices, nullable) of a field's type."""
    origin, args = get_origin(annotation), get_args(annotation)
    nullable = False
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        nullable = len(rest) < len(args)
        if len(rest) == 1:
            kind, choices, _ = _scalar_kind(rest[0])
            return kind, ([*choices, None] if nullable and kind in ("bool", "choice") else choices), nullable
        if all(a in (int, float) for a in rest):
            return "number", [], nullable
        return "yaml", [], nullable
    if origin is Literal:
        return "choice", list(args), False
    if annotation is bool:
        return "bool", [True, False], False
    if annotation is int:
        return "int", [], False
    if annotation is float:
        return "number", [], False
    if annotation is str:
        return "text", [], False
    return "yaml", [], False


def _default(f) -> Any:
    if f.default_factory is not None:
        value = f.default_factory()
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    if f.default is PydanticUndefined:
        return "(required)"
    return f.default


def _walk(prefix: str, model: type[BaseModel], out: list[Field]) -> None:
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        inner = _nested(f.annotation)
        if inner is not None and get_origin(f.annotation) is not list:
            _walk(f"{key}.", inner, out)
            continue
        kind, choices, nullable = _scalar_kind(f.annotation)
        if inner is not None:  # a list of sections (data.train): edited as YAML
            kind, choices = "yaml", []
        out.append(
            Field(
                key,
                kind,
                " ".join((f.description or "").split()),
                _default(f),
                choices,
                nullable,
                prefix.rstrip(".") or "recipe",
            )
        )


def fields(host) -> list[Field]:
    """Every key of the recipe, then each registered method's section (method.<name>).
    ``backend`` and ``method.objective`` become choices: the installed backends, the registered
    methods."""
    from hwft.methods.lookup import registry
    from hwft.recipe import MethodSpec, Recipe

    out: list[Field] = []
    _walk("", Recipe, out)
    for name, spec in MethodSpec.sections().items():
        _walk(f"method.{name}.", spec, out)
    for f in out:
        if f.key == "backend":
            f.kind, f.choices = "choice", ["auto", *host.backends]
        elif f.key == "method.objective":
            f.kind, f.choices = "choice", registry().names()
    return out


def describe(host) -> list[dict]:
    """The form as JSON (a default the schema builds, such as a section's, as its JSON value)."""
    from pydantic_core import to_jsonable_python

    return [to_jsonable_python(asdict(f), fallback=str) for f in fields(host)]


def set_key(raw: dict, key: str, value: Any) -> dict:
    """A copy of ``raw`` with ``key`` (dotted) set to ``value``, as a CLI override sets it."""
    from hwft.recipe import set_key as set_in_place

    out = copy.deepcopy(raw)
    set_in_place(out, key.split("."), value)
    return out


def removed(raw: dict, key: str) -> dict:
    """A copy of ``raw`` without ``key`` (dotted): the field back to its default."""
    out = copy.deepcopy(raw)
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return out
    node.pop(parts[-1], None)
    return out


def check(raw: dict, host, source: str, base_dir) -> str | None:
    """What ``hwft train`` would refuse this recipe for before reading its data (the schema, the
    backend's capability record, the kernels), as its own message; None if nothing."""
    from hwft.recipe import recipe_from_dict
    from hwft.select import select_backend

    try:
        recipe = recipe_from_dict(raw, source=source, base_dir=base_dir)
        select_backend(recipe, host)
    except UserError as exc:
        return str(exc)
    return None


#: The choice fields whose options depend on the backend (the others are the schema's alone).
BACKEND_DEPENDENT = (
    "backend",
    "method.objective",
    "method.tuning",
    "train.precision",
    "train.optimizer",
    "kernels.attention",
    "kernels.fused_rms_norm",
    "kernels.fused_rope",
    "kernels.fused_swiglu",
    "kernels.fused_cross_entropy",
    "kernels.fused_projections",
    "kernels.compile",
    "parallel.strategy",
    "parallel.zero_stage",
    "data.packing",
)


def refusals(raw: dict, host, source: str, base_dir) -> dict[str, dict[str, str]]:
    """key -> {option (as JSON text) -> why hwft train would refuse the recipe with it}, for the
    backend-dependent choices, judged with the rest of the recipe as it is. Nothing is reported
    for a recipe that does not validate as it stands (its own message says why)."""
    import json

    current = check(raw, host, source, base_dir)
    if current is not None and _schema_error(raw, source, base_dir):
        return {}
    by_key = {f.key: f for f in fields(host)}
    out: dict[str, dict[str, str]] = {}
    for key in BACKEND_DEPENDENT:
        f = by_key.get(key)
        if f is None:
            continue
        for option in f.choices:
            why = check(set_key(raw, key, option), host, source, base_dir)
            # where the recipe is wrong already, only what names this key is this option's doing
            if why is not None and (current is None or (why != current and names(why, key))):
                out.setdefault(key, {})[json.dumps(option)] = why
    return out


def names(message: str, key: str) -> bool:
    """Whether a refusal names ``key`` as hwft's messages do: ``key 'value'``, ``key (why)``,
    ``key: problem`` or ``'key'``."""
    return any(form in message for form in (f"{key} '", f"{key} (", f"{key}: ", f"'{key}'"))


def _schema_error(raw: dict, source: str, base_dir) -> bool:
    from hwft.recipe import recipe_from_dict

    try:
        recipe_from_dict(raw, source=source, base_dir=base_dir)
    except UserError:
        return True
    return False
