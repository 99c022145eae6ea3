"""The chat template and label masks: token ids with the loss only on what the model should say.

Conversations are rendered with the chat template (the tokenizer's own, or ``template:``), tool
definitions passed through the template's ``tools`` argument. Many templates (SmolLM2's among
them) have no ``{% generation %}`` markers, so hwft finds the assistant spans itself. For the
i-th message, if it is the assistant's::

    prefix = render(messages[:i], add_generation_prompt=True)   # ends with "<assistant header>"
    upto   = render(messages[:i+1])                             # ... "<content><end-of-turn>\\n"
    span   = [len(prefix), len(upto.rstrip()))                 # content and end-of-turn token

The full text must extend every ``upto`` (templates that rewrite earlier turns are refused).
Tokens whose characters overlap a span are labels; all others are ``IGNORE_INDEX``. Training on
the end-of-turn token is what teaches the model to stop. An assistant turn marked
``train: False`` (``loss_weight: 0``) is context, not a label; so are all but the last with
``mask_history``. ``train_on_prompt`` makes every token a label.

The first label of every sequence is ``IGNORE_INDEX`` (no token predicts it), so that sequences
can be concatenated (packed) without one predicting the next. How each kind of example becomes
sequences is its own module's (hwft.data.kinds); this one renders the turns they hold.

Works with any Hugging Face tokenizer (fast, for offsets); engine-neutral (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from hwft.data.media import refuse_media
from hwft.errors import DataError, RecipeError
from hwft.textfile import read_text

IGNORE_INDEX = -100

#: One turn: ``{"role": system|user|assistant|tool, "content": str}`` plus, on assistant turns,
#: optional ``tool_calls`` and ``train: False`` (hwft.data.formats).
Message = dict[str, Any]

#: Built-in templates for ``template:``; a path to a .jinja file works too.
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # ChatML with tool definitions, calls and results in the Hermes / Qwen2.5 convention:
    # definitions in the system turn inside <tools>, calls as <tool_call> JSON, results as
    # <tool_response> inside a user turn.
    "chatml-tools": (
        "{%- if tools %}"
        "{{- '<|im_start|>system\n' }}"
        "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
        "{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
        "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
        "{{- '\n</tools>\n\nFor each function call, return a json object with function name and "
        'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
        '"arguments": <args-json-object>}\n</tool_call><|im_end|>\n\' }}'
        "{%- elif messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
        "{%- endif %}"
        "{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}"
        "{%- elif message['role'] == 'tool' %}"
        "{%- if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
        "{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
        "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
        "{%- else %}"
        "{{- '<|im_start|>' + message['role'] }}"
        "{%- if message['content'] %}{{- '\n' + message['content'] }}{%- endif %}"
        "{%- for call in message.get('tool_calls') or [] %}"
        "{{- '\n<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' "
        "+ (call['function']['arguments'] | tojson) + '}\n</tool_call>' }}"
        "{%- endfor %}"
        "{{- '<|im_end|>\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
    ),
}


def resolve_template(template: str | None, base_dir: Path, tokenizer) -> str | None:
    """The Jinja chat template to use: the recipe's override, else the tokenizer's own (None if
    it has none; only conversations need one)."""
    if template is None:
        return getattr(tokenizer, "chat_template", None) or None
    if template in TEMPLATES:
        return TEMPLATES[template]
    path = Path(template).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.suffix == ".jinja":
        if not path.is_file():
            raise RecipeError(f"template: file not found: {path}")
        return read_text(path, RecipeError)
    raise RecipeError(f"template: '{template}' is neither a built-in ({', '.join(TEMPLATES)}) nor a .jinja file")


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  #: ``labels[0]`` is always IGNORE_INDEX
    #: what else the model's forward takes with these tokens: an image row's pixels and grid
    #: (hwft.vision), as arrays whose first dimension concatenates over a batch; None for text
    inputs: dict | None = None
    #: inputs with one value per token (Qwen-VL's mm_token_type_ids: 0 text, 1 image), padded
    #: with 0 beside the token ids; None for text
    token_inputs: dict | None = None
    #: media kind -> how many tokens each of the row's files of that kind became (hwft.vision)
    media_tokens: dict[str, list[int]] | None = None

    @property
    def num_labels(self) -> int:
        """Tokens the loss is computed on."""
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0  #: conversations cut to max_length
    split: int = 0  #: texts (cpt) split into several max_length chunks
    dropped: int = 0  #: examples left with no label token after truncation
    tokens: int = 0
    label_tokens: int = 0
    lengths: list[int] = field(default_factory=list)

    def add(self, tok: Tokenized) -> None:
        self.tokens += len(tok.input_ids)
        self.label_tokens += tok.num_labels
        self.lengths.append(len(tok.input_ids))

    def count(self, chunks: list[Tokenized]) -> None:
        """One example's sequences: counted, or the example dropped where it has none."""
        if not chunks:
            self.dropped += 1
        self.examples += bool(chunks)
        for chunk in chunks:
            self.add(chunk)

    def summary(self, max_length: int) -> str:
        text = (
            f"{self.examples} examples, {self.tokens} tokens ({self.label_tokens} trained); "
            f"{self.truncated} truncated to max_length {max_length}"
        )
        if self.split:
            text += f", {self.split} long texts split into max_length chunks"
        if self.dropped:
            text += f", {self.dropped} dropped (nothing left to learn within max_length)"
        return text


#: Names that cannot occur in real data, to see what a template renders.
_PROBE = "hwft_probe_"


class ChatRenderer:
    """Renders examples with one template and a tokenizer, and masks labels."""

    def __init__(self, tokenizer, template: str | None, mask_history: bool = False, train_on_prompt: bool = False):
        self.tokenizer = tokenizer
        self.template = template
        self.mask_history = mask_history
        self.train_on_prompt = train_on_prompt
        #: the model's image processor and family record (hwft.vision.VisionInputs) where the run
        #: feeds it images; None: rows with media are refused
        self.vision: Any = None

    @classmethod
    def for_recipe(cls, recipe, tokenizer) -> ChatRenderer:
        """The renderer a recipe asks for: its template (or the tokenizer's) and label options."""
        template = resolve_template(recipe.template, recipe.resolve_path("."), tokenizer)
        return cls(tokenizer, template, recipe.data.mask_history, recipe.data.train_on_prompt)

    def render(
        self, messages: list[Message], tools: list[dict] | None = None, add_generation_prompt: bool = False
    ) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    @cached_property
    def tool_support(self) -> set[str]:
        """What of tool use the template renders: 'definitions', 'calls', 'results'."""
        tools = [{"type": "function", "function": {"name": _PROBE + "def", "parameters": {}}}]
        messages = [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": _PROBE + "call", "arguments": {}}}],
            },
            {"role": "tool", "content": _PROBE + "result"},
            {"role": "assistant", "content": "a"},
        ]
        try:
            text = self.render(messages, tools)
        except Exception:  # noqa: BLE001 - a template that cannot render tools at all
            return set()
        return {
            kind
            for kind, probe in (("definitions", "def"), ("calls", "call"), ("results", "result"))
            if _PROBE + probe in text
        }

    def check(self, example) -> None:
        """Refuse an example (of a conversational kind: its ``turns()`` and ``tools``) the
        template would render wrongly (silently dropping tools)."""
        if self.template is None:
            raise RecipeError(
                f"{example.source} is a conversation, but the model's tokenizer has no chat template; "
                f"set template: to a built-in ({', '.join(TEMPLATES)}) or a .jinja file"
            )
        if self.vision is None:
            refuse_media(example)
        turns = example.turns()
        needs = set()
        if example.tools:
            needs.add("definitions")
        if any(m.get("tool_calls") for m in turns):
            needs.add("calls")
        if any(m["role"] == "tool" for m in turns):
            needs.add("results")
        missing = needs - self.tool_support
        if missing:
            raise DataError(
                f"{example.source} uses tools, but the chat template does not render tool "
                f"{' or '.join(sorted(missing))} (they would be dropped silently); set "
                "template: chatml-tools, or use a model whose template supports tools"
            )

    def assistant_spans(
        self, messages: list[Message], tools: list[dict] | None, where: str, first: int = 0
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of trained assistant turns from ``first``."""
        text = self.render(messages, tools)
        spans = []
        for i, message in enumerate(messages):
            if i < first or message["role"] != "assistant" or message.get("train") is False:
                continue
            prefix = self.render(messages[:i], tools, add_generation_prompt=True)
            upto = self.render(messages[: i + 1], tools)
            if not (upto.startswith(prefix) and text.startswith(upto)):
                raise DataError(
                    f"{where}: the chat template renders turn {i} differently inside the whole "
                    f"conversation than on its own, so assistant tokens cannot be located; "
                    f"start conversations with a system or user turn, or set template:"
                )
            end = len(upto.rstrip())
            if end > len(prefix):
                spans.append((len(prefix), end))
        return text, spans

    def encode_text(self, text: str, spans: list[tuple[int, int]]) -> Tokenized:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = []
        for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            inside = any(start < e and end > s for s, e in spans)
            labels.append(token if inside else IGNORE_INDEX)
        if labels:
            labels[0] = IGNORE_INDEX
        return Tokenized(list(enc["input_ids"]), labels)

    def label_spans(
        self, messages: list[Message], tools: list[dict] | None, where: str, first: int = 0
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans trained on: the assistant turns from
        ``first`` (data.mask_history: the last; data.train_on_prompt: all the text)."""
        text, spans = self.assistant_spans(messages, tools, where, first)
        if spans and first == 0 and self.mask_history:
            spans = spans[-1:]
        if spans and first == 0 and self.train_on_prompt:
            spans = [(0, len(text))]
        return text, spans

    def tokenize(self, example, first: int = 0) -> Tokenized:
        """A conversation with labels on its assistant turns (from message ``first``); one with
        images through the model's vision record (hwft.vision)."""
        self.check(example)
        if getattr(example, "media", None):
            assert self.vision is not None, "check() refused media without a vision record"
            tok = self.vision.tokenize(self, example, first)
        else:
            tok = self.encode_text(*self.label_spans(example.messages, example.tools, example.source, first))
        if tok.num_labels == 0:
            raise DataError(
                f"{example.source}: every label is masked: no assistant turn has text to learn "
                "from (empty answers, or loss_weight 0 on every assistant turn)"
            )
        return tok

    def prompt_ids(self, prompt: str | list[Message], tools: list[dict] | None = None) -> list[int]:
        """Token ids of a prompt (text or turns), ready for generation."""
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = self.render(turns, tools, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def empty_error(stats: TokenizeStats, max_length: int) -> DataError:
    return DataError(
        f"no example left to train on: {stats.dropped} of {stats.dropped + stats.examples} "
        f"dropped because no label token is within max_length {max_length}; raise "
        "train.max_length or check the data"
    )
