"""The tokens kind: a sequence already tokenised by the model's tokenizer (the ``tokens``
format, data.train's ``random_tokens``), every token a label, split into chunks of
``max_length`` as text is (cpt). Ids are checked against the model's vocabulary before
training (hwft.data.pipeline.Batches.check_vocabulary)."""

from __future__ import annotations

from dataclasses import dataclass

from hwft.data.chat import ChatRenderer, Tokenized, TokenizeStats
from hwft.data.kinds import Example
from hwft.data.kinds.text import chunks_of


@dataclass
class TokensExample(Example):
    kind = "tokens"
    token_ids: list[int]


def encode(example: TokensExample, renderer: ChatRenderer, max_length: int, stats: TokenizeStats) -> list[Tokenized]:
    chunks = chunks_of(example.token_ids, max_length)
    stats.split += len(chunks) > 1
    stats.count(chunks)
    return chunks
