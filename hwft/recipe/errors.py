"""A recipe's validation errors as one message naming every key that is wrong, with the keys
that would be accepted ("did you mean")."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError

from hwft.errors import did_you_mean
from hwft.recipe.schema import MethodSpec, Recipe


def _section_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys at a location in the schema (for "did you mean")."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None and issubclass(model, MethodSpec) and str(part) in MethodSpec.sections():
            model = MethodSpec.sections()[str(part)]  # a method's own section
            continue
        if field is None:
            break
        ann = field.annotation
        sub = getattr(ann, "__args__", (ann,))
        nested = [a for a in (ann, *sub) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            for a in sub:  # list[DatasetSpec]
                for inner in getattr(a, "__args__", ()):
                    if isinstance(inner, type) and issubclass(inner, BaseModel):
                        nested.append(inner)
        if not nested:
            return []
        model = nested[0]
    keys = list(model.model_fields)
    return keys + list(MethodSpec.sections()) if model is MethodSpec else keys


_TYPE_WORDS = {
    "float_parsing": "a number",
    "float_type": "a number",
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _dotted(loc: tuple) -> str:
    """('data', 'train', 0, 'path') -> 'data.train[0].path'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def format_validation_error(err: ValidationError, source: str) -> str:
    """One readable message for every problem pydantic found, each naming its key."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # Drop pydantic's union-branch labels such as "str" or "list[...]".
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in {"str", "list"})))
        key = _dotted(loc) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            parent = _dotted(loc[:-1])
            choices = {f"{parent}.{k}" if parent else k: k for k in _section_keys(Recipe, loc[:-1])}
            lines.append(f"unknown key '{key}'{did_you_mean(key, choices)}")
        elif kind == "missing":
            lines.append(f"missing required key '{key}'")
        elif kind == "literal_error":
            expected = e.get("ctx", {}).get("expected", "")
            lines.append(f"{key}: {e['input']!r} is not allowed; expected one of {expected}")
        elif kind == "unknown_method":
            lines.append(f"{key}: {e['msg']}")
        elif kind == "value_error":
            lines.append(f"{key}: {e['msg'].removeprefix('Value error, ')}")
        elif kind in _TYPE_WORDS:
            lines.append(f"{key}: expected {_TYPE_WORDS[kind]}, got {e['input']!r}")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    head = f"invalid recipe {source}:"
    if len(lines) == 1:
        return f"{head} {lines[0]}"
    return head + "".join(f"\n  - {line}" for line in lines)
