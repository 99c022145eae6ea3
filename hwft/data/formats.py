"""Row formats: each turns one JSON row into a conversation, a list of {role, content}.

Built-in formats are registered through ``hwft_register_data_formats``, the same hook a plugin
uses. A parser raises ``ValueError`` with a message naming the offending field; the loader adds
the file and row number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pluggy

hookimpl = pluggy.HookimplMarker("hwft")

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class DataFormat:
    name: str
    parse: Callable[[dict, dict], list[Message]]  #: (row, columns) -> conversation
    detect: Callable[[dict], bool] | None = None  #: does this row look like this format?
    description: str = ""


def _col(columns: dict, name: str) -> str:
    return columns.get(name, name)


def _text(row: dict, key: str, required: bool) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def parse_alpaca(row: dict, columns: dict) -> list[Message]:
    """alpaca: instruction, optional input, output, optional system (LLaMA-Factory's names)."""
    instruction = _text(row, _col(columns, "instruction"), True)
    extra = _text(row, _col(columns, "input"), False)
    output = _text(row, _col(columns, "output"), True)
    system = _text(row, _col(columns, "system"), False)
    prompt = f"{instruction}\n{extra}" if extra else instruction
    if not prompt.strip():
        raise ValueError(f"field '{_col(columns, 'instruction')}' is empty")
    conversation = [{"role": "system", "content": system}] if system else []
    return conversation + [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": output},
    ]


def parse_messages(row: dict, columns: dict) -> list[Message]:
    """messages: OpenAI-style ``{"messages": [{"role": ..., "content": ...}, ...]}``."""
    key = _col(columns, "messages")
    messages = row.get(key)
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field '{key}' must be a non-empty list of {{role, content}} objects")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{key}[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"{key}[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{key}[{i}].content must be a string")
        if role == "system" and i != 0:
            raise ValueError(f"{key}[{i}] is a system message; only the first message may be one")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"field '{key}' has no assistant message to learn from")
    return out


BUILTIN_FORMATS = (
    DataFormat(
        "alpaca",
        parse_alpaca,
        lambda row: "instruction" in row,
        "instruction / input / output, optional system",
    ),
    DataFormat(
        "messages",
        parse_messages,
        lambda row: "messages" in row,
        "OpenAI-style messages: [{role, content}]",
    ),
)


@hookimpl
def hwft_register_data_formats(register):
    for fmt in BUILTIN_FORMATS:
        register(fmt.name, fmt.parse, detect=fmt.detect, description=fmt.description)


def collect_formats(pm: pluggy.PluginManager) -> dict[str, DataFormat]:
    """Every registered format by name."""
    found: dict[str, DataFormat] = {}

    def register(name, parse, detect=None, description=""):
        found[name] = DataFormat(name, parse, detect, description)

    pm.hook.hwft_register_data_formats(register=register)
    return found
