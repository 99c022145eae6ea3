"""The ``completion`` kind: a prompt and its completion as plain text (TRL's prompt-completion
rows, no chat template), the loss on the completion's tokens and the end-of-sequence token."""

from __future__ import annotations

from dataclasses import dataclass

from hwft.data.chat import IGNORE_INDEX, ChatRenderer, Tokenized, TokenizeStats
from hwft.data.formats import DataFormat
from hwft.data.kinds import DataKind, Example


@dataclass
class CompletionExample(Example):
    kind = "completion"
    prompt: str
    completion: str


def encode(
    example: CompletionExample, renderer: ChatRenderer, max_length: int, stats: TokenizeStats
) -> list[Tokenized]:
    """Prompt tokens (no labels), then the completion's and the end-of-sequence token (labels),
    cut to ``max_length``; dropped where no completion token is left."""
    tokenizer = renderer.tokenizer
    prompt = list(tokenizer(example.prompt)["input_ids"])
    answer = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]
    if len(prompt + answer) > max_length:
        stats.truncated += 1
    chunks = [Tokenized(ids, labels)] if any(t != IGNORE_INDEX for t in labels) else []
    stats.count(chunks)
    return chunks


def parse(row: dict, mapping) -> CompletionExample:
    for key in ("prompt", "completion"):
        if not isinstance(row.get(mapping.col(key)), str):
            raise ValueError(f"field '{mapping.col(key)}' must be a string")
    return CompletionExample(row[mapping.col("prompt")], row[mapping.col("completion")])


KIND = DataKind(
    "completion",
    "a prompt and its completion as plain text, the loss on the completion",
    CompletionExample,
    "hwft.data.kinds.sequences:sequence_batches",
    encode=encode,
)
FORMAT = DataFormat(
    "completion",
    "completion",
    parse,
    lambda row, m: isinstance(row.get(m.col("prompt")), str) and "completion" in row,
    "prompt + completion as plain text (TRL's prompt-completion rows)",
)
