"""Chat rendering and label masks: loss only on what the assistant says.

Many templates (SmolLM2's among them) have no ``{% generation %}`` markers, so hwft finds the
assistant spans itself. For the i-th message, if it is the assistant's::

    prefix = render(messages[:i], add_generation_prompt=True)   # ends with "<assistant header>"
    upto   = render(messages[:i+1])                             # ... "<content><end-of-turn>\\n"
    span   = [len(prefix), len(upto.rstrip()))                 # content and end-of-turn token

The full text must extend every ``upto`` (templates that rewrite earlier turns are refused).
Tokens whose characters overlap a span are labels; all others are ``IGNORE_INDEX``. Training on
the end-of-turn token is what teaches the model to stop.

Works with any Hugging Face tokenizer (fast, for offsets); engine-neutral (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hwft.data.formats import Message
from hwft.data.loading import Example
from hwft.errors import DataError, RecipeError

IGNORE_INDEX = -100

#: Built-in templates for ``template:``; a path to a .jinja file works too.
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


def resolve_template(template: str | None, base_dir: Path, tokenizer) -> str:
    """The Jinja chat template to use: the recipe's override, else the tokenizer's own."""
    if template is None:
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            raise RecipeError(
                "the model's tokenizer has no chat template; set template: to a built-in "
                f"({', '.join(TEMPLATES)}) or a .jinja file"
            )
        return own
    if template in TEMPLATES:
        return TEMPLATES[template]
    path = Path(template).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.suffix == ".jinja":
        if not path.is_file():
            raise RecipeError(f"template: file not found: {path}")
        return path.read_text(encoding="utf-8")
    raise RecipeError(
        f"template: '{template}' is neither a built-in ({', '.join(TEMPLATES)}) nor a .jinja file"
    )


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_labels(self) -> int:
        """Tokens the loss is computed on: labels after the first position (the loss shifts)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0  #: examples cut to max_length
    dropped: int = 0  #: examples left with no label token after truncation
    tokens: int = 0
    label_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self, max_length: int) -> str:
        text = (
            f"{self.examples} examples, {self.tokens} tokens ({self.label_tokens} trained); "
            f"{self.truncated} truncated to max_length {max_length}"
        )
        if self.dropped:
            text += f", {self.dropped} dropped (no assistant token left after truncation)"
        return text


class ChatRenderer:
    """Renders conversations with one template and a tokenizer, and masks labels."""

    def __init__(self, tokenizer, template: str):
        self.tokenizer = tokenizer
        self.template = template

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def assistant_spans(self, messages: list[Message], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans the loss is computed on."""
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
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

    def tokenize(self, example: Example) -> Tokenized:
        text, spans = self.assistant_spans(example.messages, example.source)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = []
        for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            inside = any(start < e and end > s for s, e in spans)
            labels.append(token if inside else IGNORE_INDEX)
        return Tokenized(list(enc["input_ids"]), labels)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a one-turn user prompt, ready for generation."""
        text = self.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_examples(
    examples: list[Example], renderer: ChatRenderer, max_length: int
) -> tuple[list[Tokenized], TokenizeStats]:
    """Tokenise, mask and truncate; examples with nothing left to learn are dropped."""
    stats = TokenizeStats()
    out: list[Tokenized] = []
    for example in examples:
        tok = renderer.tokenize(example)
        if len(tok.input_ids) > max_length:
            stats.truncated += 1
            tok = Tokenized(tok.input_ids[:max_length], tok.labels[:max_length])
        if tok.num_labels == 0:
            stats.dropped += 1
            continue
        stats.examples += 1
        stats.tokens += len(tok.input_ids)
        stats.label_tokens += tok.num_labels
        out.append(tok)
    if not out:
        raise DataError(
            f"no example has an assistant token within max_length {max_length}; "
            "raise train.max_length or check the data"
        )
    return out, stats
