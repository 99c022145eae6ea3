"""Row formats: each turns one row (a dict) into an example of the kind its record names (the
kinds and their typed examples are :mod:`hwft.data.kinds`'; each method names the kind it trains
on, ``hwft.methods.Method.kind``).

Built-in formats: ``alpaca``, ``sharegpt``, ``messages`` (OpenAI style, tool calls, typed
content parts, ``loss_weight``) make chat examples; ``text`` text, ``tokens`` tokens,
``preference`` preference, ``feedback`` feedback and ``prompt`` prompt examples. They register a
:class:`DataFormat` record through ``hwft_register_data_formats``, the same hook a plugin uses.

A message is ``{"role": system|user|assistant|tool, "content": str}`` plus, on assistant turns,
optional ``tool_calls`` (OpenAI shape, ``arguments`` as a dict) and ``train: False`` for a turn
whose ``loss_weight`` is 0. Tool definitions are normalised to ``{"type": "function",
"function": {...}}``, the shape Hugging Face chat templates expect.

``columns`` renames fields (``{expected_name: name_in_file}``) and ``tags`` renames role values
(LLaMA-Factory's ``role_tag``, ``content_tag``, ``user_tag``, ``assistant_tag``,
``observation_tag``, ``function_tag``, ``system_tag``). A parser raises ``ValueError`` naming
the field; the loader adds the file and row.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pluggy

from hwft.data.chat import Message
from hwft.data.kinds import Example
from hwft.data.kinds.chat import ChatExample
from hwft.data.kinds.feedback import FeedbackExample
from hwft.data.kinds.preference import PreferenceExample
from hwft.data.kinds.prompt import PromptExample
from hwft.data.kinds.text import TextExample
from hwft.data.kinds.tokens import TokensExample
from hwft.data.media import PART_TYPES as MEDIA_PARTS
from hwft.data.media import PLACEHOLDERS, Media, from_part
from hwft.errors import UserError, did_you_mean

hookimpl = pluggy.HookimplMarker("hwft")


@dataclass(frozen=True)
class Mapping:
    """A dataset's renames: ``columns`` for fields, ``tags`` for role keys and values."""

    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)

    def col(self, name: str) -> str:
        return self.columns.get(name, name)

    def present(self, row: dict, name: str) -> bool:
        return row.get(self.col(name)) is not None


@dataclass(frozen=True)
class DataFormat:
    """A row format, as ``hwft_register_data_formats`` registers it."""

    name: str  #: what a dataset's ``format:`` names
    kind: str  #: the kind of example it makes (hwft.data.kinds: chat, text, tokens, preference, ...)
    #: (row, mapping) -> an example of ``kind`` (its Example class; a chat format may return a
    #: plain list of ``{role, content}`` turns), raising ValueError naming the field
    parse: Callable[[dict, Mapping], Any]
    detect: Callable[[dict, Mapping], bool] | None = None  #: does this row look like this format?
    description: str = ""


# --------------------------------------------------------------------------------------------
# Fields


def _missing(row: dict, key: str, accepted: tuple[str, ...]) -> ValueError:
    """A missing (or null) field, naming the fields the row has and those this format reads."""
    if key in row:
        return ValueError(f"field '{key}' is null; give it a value, or leave the row out")
    close = difflib.get_close_matches(key, [str(k) for k in row if k not in accepted], n=1, cutoff=0.6)
    hint = f"; if '{close[0]}' holds it, map it with columns: {{{key}: {close[0]}}}" if close else ""
    return ValueError(
        f"missing field '{key}' (the row has {', '.join(sorted(map(str, row))) or 'no fields'}; "
        f"this format reads {', '.join(accepted)}{hint})"
    )


def _text(row: dict, key: str, required: bool, accepted: tuple[str, ...] = ()) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise _missing(row, key, accepted or (key,))
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _json_value(value: Any, where: str) -> Any:
    """A field that LLaMA-Factory and OpenAI exports store either as JSON text or as JSON."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON ({exc.msg})") from None
    return value


def parse_tools(value: Any, where: str = "field 'tools'") -> list[dict] | None:
    """Tool definitions, as JSON text or a list, normalised to OpenAI's function shape."""
    tools = _json_value(value, where)
    if tools is None or tools == []:
        return None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise ValueError(f"{where} must be a list of tool definitions")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ValueError(f"{where}[{i}] must be an object with a 'name'")
        spec = tool.get("function", tool) if tool.get("type", "function") == "function" else tool
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValueError(f"{where}[{i}] has no 'name'")
        out.append({"type": "function", "function": spec})
    return out


def parse_tool_calls(value: Any, where: str) -> list[dict]:
    """Tool calls as ``[{"type": "function", "function": {"name", "arguments": dict}}]`` from
    LLaMA-Factory's ``function_call`` text, a typed content part, or OpenAI's ``tool_calls``."""
    calls = _json_value(value, where)
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise ValueError(f'{where} must hold a tool call: {{"name": ..., "arguments": {{...}}}}')
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{where}: tool call {i} has no 'name'")
        arguments = _json_value(fn.get("arguments", {}), f"{where}: the arguments of '{fn['name']}'")
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": arguments or {}}})
    return out


# --------------------------------------------------------------------------------------------
# Conversations: one reader for ShareGPT's from/value and OpenAI's role/content turns

SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "observation": "tool",
    "function_call": "function_call",
}
OPENAI_ROLES = {
    "user": "user",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "developer": "system",
}
PART_TYPES = ("text", "reasoning", "tool_call")


def _role_map(mapping: Mapping, sharegpt: bool) -> dict[str, str]:
    roles = dict(SHAREGPT_ROLES if sharegpt else OPENAI_ROLES)
    tags = mapping.tags
    for tag, role in (
        ("user_tag", "user"),
        ("assistant_tag", "assistant"),
        ("system_tag", "system"),
        ("observation_tag", "tool"),
        ("function_tag", "function_call"),
    ):
        if tag in tags:
            roles = {k: v for k, v in roles.items() if v != role}
            roles[tags[tag]] = role
    return roles


def _content(value: Any, where: str) -> tuple[str, list[dict], list[Media]]:
    """Text of a turn, tool calls found in typed content parts, and its images, videos and
    audio (each part's placeholder stands where the part stood: hwft.data.media)."""
    if value is None:
        return "", [], []
    if isinstance(value, str):
        return value, [], []
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a string or a list of typed parts")
    text, calls, media = "", [], []
    for j, part in enumerate(value):
        if isinstance(part, str):
            text += part
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        body = part.get("text", part.get("value")) if isinstance(part, dict) else None
        if kind in ("text", "reasoning") and not isinstance(body, str):
            got = "null" if body is None else type(body).__name__
            raise ValueError(f"{where}[{j}] is a {kind} part whose text is {got}; give it a string")
        if kind == "text":
            text += str(body)
        elif kind == "reasoning":
            text += f"<think>\n{body}\n</think>\n\n"
        elif kind == "tool_call":
            calls += parse_tool_calls(body, f"{where}[{j}]")
        elif kind in MEDIA_PARTS:
            found = from_part(part, f"{where}[{j}]")
            media.append(found)
            text += PLACEHOLDERS[found.kind]
        else:
            raise ValueError(
                f"{where}[{j}] is a content part of type {kind!r}; accepted: {', '.join((*PART_TYPES, *MEDIA_PARTS))}"
            )
    return text, calls, media


def parse_turns(items: Any, mapping: Mapping, key: str) -> list[Message]:
    """Turns in ShareGPT (``from``/``value``) or OpenAI (``role``/``content``) shape."""
    if not isinstance(items, list) or not items:
        raise ValueError(f"field '{key}' must be a non-empty list of turns")
    first = items[0] if isinstance(items[0], dict) else {}
    sharegpt = "from" in first and "role" not in first
    role_key = mapping.tags.get("role_tag", "from" if sharegpt else "role")
    content_key = mapping.tags.get("content_tag", "value" if sharegpt else "content")
    roles = _role_map(mapping, sharegpt or "role_tag" in mapping.tags)
    out: list[Message] = []
    for i, turn in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where} must be an object with '{role_key}' and '{content_key}'")
        value = turn.get(role_key)
        role = roles.get(value) if isinstance(value, str) else None
        if role is None:
            raise ValueError(
                f"{where}.{role_key} is {value!r}; expected one of {', '.join(roles)}" + did_you_mean(str(value), roles)
            )
        content = turn.get(content_key)
        if content is None and content_key in turn and not (role == "assistant" and turn.get("tool_calls")):
            raise ValueError(
                f"{where}.{content_key} is null; give the turn's text"
                + (" (an assistant turn may be null only beside its tool_calls)" if role == "assistant" else "")
            )
        text, calls, media = _content(content, f"{where}.{content_key}")
        if role == "function_call":
            role, calls, text = "assistant", calls + parse_tool_calls(text, f"{where}.{content_key}"), ""
        if turn.get("tool_calls"):
            calls += parse_tool_calls(turn["tool_calls"], f"{where}.tool_calls")
        if turn.get("reasoning_content"):
            text = f"<think>\n{turn['reasoning_content']}\n</think>\n\n{text}"
        message: Message = {"role": role, "content": text}
        if calls:
            if role != "assistant":
                raise ValueError(f"{where} is a {role} turn with tool calls; only assistant turns call tools")
            message["tool_calls"] = calls
        if role == "system" and i != 0:
            raise ValueError(f"{where} is a system turn; only the first turn may be one")
        if media:  # gathered into the example's media by hwft.data.media.attach_media
            message["media"] = media
        if role == "assistant" and turn.get("loss_weight") == 0:
            message["train"] = False
        elif role == "assistant" and not text.strip() and not calls:
            raise ValueError(
                f"{where} is an assistant turn with no text and no tool calls: the model would learn to "
                "answer nothing; give its answer, or mark it loss_weight: 0 to keep it as context"
            )
        if role != "assistant" and content_key not in turn:
            raise ValueError(f"{where} has no '{content_key}'")
        # Consecutive tool calls (ShareGPT writes one per turn) become one assistant turn.
        if calls and out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") and not text:
            out[-1]["tool_calls"] += calls
            continue
        out.append(message)
    return out


def _conversation(turns: list[Message], key: str) -> list[Message]:
    """A trainable conversation: it has an assistant turn and ends with one."""
    if not any(m["role"] == "assistant" for m in turns):
        raise ValueError(f"field '{key}' has no assistant turn to learn from")
    if turns[-1]["role"] != "assistant":
        raise ValueError(
            f"field '{key}' ends with a {turns[-1]['role']} turn; the last turn must be the "
            "assistant's (a prompt without an answer belongs in a grpo prompt dataset)"
        )
    return turns


def _system(row: dict, mapping: Mapping) -> list[Message]:
    system = _text(row, mapping.col("system"), False)
    return [{"role": "system", "content": system}] if system else []


def _with_system(system: list[Message], turns: list[Message]) -> list[Message]:
    if system and turns and turns[0]["role"] == "system":
        raise ValueError("the row has both a 'system' field and a system turn; keep one")
    return system + turns


# --------------------------------------------------------------------------------------------
# The formats

ALPACA_FIELDS = ("instruction", "input", "output", "system", "history")


def _alpaca_prompt(row: dict, mapping: Mapping) -> list[Message]:
    accepted = tuple(mapping.col(f) for f in ALPACA_FIELDS)
    instruction = _text(row, mapping.col("instruction"), True, accepted)
    extra = _text(row, mapping.col("input"), False)
    prompt = f"{instruction}\n{extra}" if extra else instruction
    if not prompt.strip():
        raise ValueError(f"field '{mapping.col('instruction')}' is empty")
    turns: list[Message] = []
    history = row.get(mapping.col("history")) or []
    if not isinstance(history, list):
        raise ValueError(f"field '{mapping.col('history')}' must be a list of [instruction, response] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise ValueError(f"{mapping.col('history')}[{i}] must be a pair [instruction, response]")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return _system(row, mapping) + turns + [{"role": "user", "content": prompt}]


def parse_alpaca(row: dict, mapping: Mapping) -> Example:
    """alpaca: instruction, optional input, output, optional system and history."""
    prompt = _alpaca_prompt(row, mapping)
    output = _text(row, mapping.col("output"), True, tuple(mapping.col(f) for f in ALPACA_FIELDS))
    if not output.strip():
        raise ValueError(f"field '{mapping.col('output')}' is empty: the model would learn to answer nothing")
    return ChatExample(prompt + [{"role": "assistant", "content": output}], _tools(row, mapping))


def _tools(row: dict, mapping: Mapping) -> list[dict] | None:
    return parse_tools(row.get(mapping.col("tools")), f"field '{mapping.col('tools')}'")


def _turns_field(row: dict, mapping: Mapping, name: str) -> tuple[str, list[Message]]:
    key = mapping.col(name)
    if row.get(key) is None:
        raise _missing(row, key, (key, mapping.col("system"), mapping.col("tools")))
    return key, parse_turns(row[key], mapping, key)


def parse_sharegpt(row: dict, mapping: Mapping) -> Example:
    """sharegpt: ``conversations`` of ``{from, value}`` turns (human, gpt, system,
    function_call, observation), optional ``system`` and ``tools``."""
    key, turns = _turns_field(row, mapping, "conversations")
    return ChatExample(_with_system(_system(row, mapping), _conversation(turns, key)), _tools(row, mapping))


def parse_messages(row: dict, mapping: Mapping) -> Example:
    """messages: OpenAI-style ``{role, content}`` turns, with ``tool_calls``, typed content
    parts, ``reasoning_content`` and ``loss_weight``; optional ``tools``."""
    key, turns = _turns_field(row, mapping, "messages")
    return ChatExample(_with_system(_system(row, mapping), _conversation(turns, key)), _tools(row, mapping))


def parse_text(row: dict, mapping: Mapping) -> Example:
    """text: ``{"text": ...}`` for continued pre-training."""
    text = _text(row, mapping.col("text"), True, (mapping.col("text"),))
    if not text.strip():
        raise ValueError(f"field '{mapping.col('text')}' is empty")
    return TextExample(text)


def parse_tokens(row: dict, mapping: Mapping) -> Example:
    """tokens: ``{"input_ids": [int, ...]}``, text already tokenized by the model's tokenizer,
    every token a label (cpt). hwft checks the ids against the model's vocabulary before training."""
    key = mapping.col("input_ids")
    ids = row.get(key)
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"field '{key}' must be a list of token ids (integers from 0)")
    if len(ids) < 2:
        raise ValueError(f"field '{key}' holds {len(ids)} token(s); a training sequence needs at least 2")
    return TokensExample(ids)


def _prompt_turns(row: dict, mapping: Mapping) -> list[Message]:
    """The prompt of a preference or prompt-only row, from whichever field it has."""
    for name in ("prompt", "conversations", "messages"):
        key = mapping.col(name)
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            if not value.strip():
                raise ValueError(f"field '{key}' is empty")
            turns = [{"role": "user", "content": value}]
        else:
            turns = parse_turns(value, mapping, key)
        turns = _with_system(_system(row, mapping), turns)
        if turns[-1]["role"] not in ("user", "tool"):
            raise ValueError(f"field '{key}' must end with a user turn (the prompt to answer)")
        return turns
    if row.get(mapping.col("instruction")) is not None:
        return _alpaca_prompt(row, mapping)
    accepted = tuple(mapping.col(n) for n in ("prompt", "conversations", "messages", "instruction"))
    raise _missing(row, mapping.col("prompt"), accepted)


def _answer(value: Any, mapping: Mapping, key: str) -> list[Message]:
    """A chosen or rejected answer: text, one turn, or a list of assistant turns."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"field '{key}' is empty; give an answer's text")
        return [{"role": "assistant", "content": value}]
    turns = parse_turns([value] if isinstance(value, dict) else value, mapping, key)
    if any(t["role"] != "assistant" for t in turns):
        raise ValueError(f"field '{key}' must hold assistant turns only")
    return turns


def parse_preference(row: dict, mapping: Mapping) -> Example:
    """preference: a prompt (``prompt`` text or turns, ``conversations``, ``messages`` or
    alpaca's ``instruction``/``input``) with ``chosen`` and ``rejected`` answers; or
    LLaMA-Factory v1's ``chosen_messages`` / ``rejected_messages`` whole conversations."""
    if row.get("chosen_messages") is not None or row.get("rejected_messages") is not None:
        both = []
        for name in ("chosen_messages", "rejected_messages"):
            if row.get(name) is None:
                raise _missing(row, name, ("chosen_messages", "rejected_messages"))
            both.append(_conversation(parse_turns(row[name], mapping, name), name))
        chosen, rejected = both
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt = chosen[:shared]
        if not prompt or prompt[-1]["role"] == "assistant":
            raise ValueError(
                "chosen_messages and rejected_messages must share the prompt turns and differ in the answer"
            )
        return PreferenceExample(prompt, _tools(row, mapping), chosen=chosen[shared:], rejected=rejected[shared:])
    prompt = _prompt_turns(row, mapping)
    answers = []
    for name in ("chosen", "rejected"):
        key = mapping.col(name)
        if row.get(key) is None:
            raise _missing(row, key, (mapping.col("prompt"), mapping.col("chosen"), mapping.col("rejected")))
        answers.append(_answer(row[key], mapping, key))
    if answers[0] == answers[1]:
        raise ValueError("chosen and rejected are the same answer")
    return PreferenceExample(prompt, _tools(row, mapping), chosen=answers[0], rejected=answers[1])


FEEDBACK_FIELDS = ("prompt", "completion", "messages", "conversations", "instruction", "label")


def _label(row: dict, mapping: Mapping) -> bool:
    key = mapping.col("label")
    if row.get(key) is None:
        raise _missing(row, key, tuple(mapping.col(f) for f in FEEDBACK_FIELDS))
    value = row[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(
        f"field '{key}' is {value!r}; a feedback label is true (a desirable answer) or false (an undesirable one)"
    )


def parse_feedback(row: dict, mapping: Mapping) -> Example:
    """feedback (kto): one answer and whether it is desirable, ``label`` (true or false; the
    ``kto_tag`` of LLaMA-Factory's dataset_info.json). The answer is TRL's ``prompt`` +
    ``completion``, alpaca's ``instruction``/``input`` + ``output``, or the last assistant turn
    of a ``messages`` / ``conversations`` conversation (LLaMA-Factory's kto_en_demo)."""
    label = _label(row, mapping)
    for name in ("messages", "conversations"):
        key = mapping.col(name)
        if row.get(key) is not None and row.get(mapping.col("completion")) is None:
            turns = _with_system(_system(row, mapping), _conversation(parse_turns(row[key], mapping, key), key))
            prompt = turns[:-1]
            if not prompt or prompt[-1]["role"] not in ("user", "tool"):
                raise ValueError(f"field '{key}': the answer (its last turn) must follow a user or tool turn")
            return FeedbackExample(prompt, _tools(row, mapping), completion=turns[-1:], label=label)
    prompt = _prompt_turns(row, mapping)
    key = mapping.col("completion" if row.get(mapping.col("completion")) is not None else "output")
    if row.get(key) is None:
        raise _missing(row, mapping.col("completion"), tuple(mapping.col(f) for f in FEEDBACK_FIELDS))
    return FeedbackExample(prompt, _tools(row, mapping), completion=_answer(row[key], mapping, key), label=label)


REFERENCE_FIELDS = ("reference", "answer", "solution")


def parse_prompt(row: dict, mapping: Mapping) -> Example:
    """prompt: a prompt (``prompt`` text or turns) and an optional reference answer
    (``reference``, ``answer`` or ``solution``) for reward functions."""
    prompt = _prompt_turns(row, mapping)
    reference = None
    for name in REFERENCE_FIELDS:
        value = row.get(mapping.col(name))
        if value is not None:
            reference = value if isinstance(value, str) else json.dumps(value)
            break
    return PromptExample(prompt, _tools(row, mapping), reference=reference)


def _has(*names: str) -> Callable[[dict, Mapping], bool]:
    return lambda row, mapping: all(mapping.present(row, n) for n in names)


BUILTIN_FORMATS = (
    DataFormat(
        "preference",
        "preference",
        parse_preference,
        lambda row, m: _has("chosen", "rejected")(row, m) or "chosen_messages" in row,
        "prompt + chosen + rejected (alpaca, sharegpt, OpenAI or LLaMA-Factory v1 shape)",
    ),
    DataFormat(
        "feedback",
        "feedback",
        parse_feedback,
        lambda row, m: (
            m.present(row, "label")
            and any(m.present(row, n) for n in ("completion", "messages", "conversations", "output"))
        ),
        "prompt + one answer + label: desirable or not (kto; TRL's unpaired shape, LLaMA-Factory's kto_tag)",
    ),
    DataFormat(
        "sharegpt",
        "chat",
        parse_sharegpt,
        _has("conversations"),
        "conversations: [{from, value}] with human/gpt/system/function_call/observation",
    ),
    DataFormat(
        "messages",
        "chat",
        parse_messages,
        _has("messages"),
        "OpenAI-style messages: [{role, content}], tool calls, typed parts",
    ),
    DataFormat(
        "alpaca", "chat", parse_alpaca, _has("instruction"), "instruction / input / output, optional system and history"
    ),
    DataFormat("prompt", "prompt", parse_prompt, _has("prompt"), "prompt with an optional reference answer (grpo)"),
    DataFormat("text", "text", parse_text, _has("text"), "plain text (cpt)"),
    DataFormat("tokens", "tokens", parse_tokens, _has("input_ids"), "input_ids: token ids, tokenized already (cpt)"),
)


@hookimpl
def hwft_register_data_formats(register):
    for fmt in BUILTIN_FORMATS:
        register(fmt)


def collect_formats(pm: pluggy.PluginManager) -> dict[str, DataFormat]:
    """Every registered format by name. A chat format's parser may return a plain list of
    messages (a conversation); it is wrapped as a chat example."""
    found: dict[str, DataFormat] = {}
    owners: dict[str, str] = {}
    for impl in pm.hook.hwft_register_data_formats.get_hookimpls():
        plugin = pm.get_name(impl.plugin) or "?"

        def register(fmt: DataFormat, _plugin=plugin) -> None:
            if not isinstance(fmt, DataFormat):
                raise UserError(
                    f"plugin {_plugin}: hwft_register_data_formats registered {type(fmt).__name__}, "
                    "not an hwft.data.formats.DataFormat (plugin API 2.0)"
                )
            if fmt.name in found:
                raise UserError(
                    f"data format '{fmt.name}' is registered twice (by plugin '{owners[fmt.name]}' and "
                    f"by '{_plugin}'); disable one with HWFT_DISABLE_PLUGINS"
                )

            def parse(row, mapping, _parse=fmt.parse, _name=fmt.name, _kind=fmt.kind):
                out = _parse(row, mapping)
                if isinstance(out, list) and _kind == "chat":
                    out = ChatExample(_conversation(out, _name))
                if not isinstance(out, Example) or out.kind != _kind:
                    got = getattr(out, "kind", None) or type(out).__name__
                    raise ValueError(f"format {_name} makes {_kind} examples, but its parser returned {got}")
                return out

            found[fmt.name] = replace(fmt, parse=parse)
            owners[fmt.name] = _plugin

        impl.function(register=register)
    return found
