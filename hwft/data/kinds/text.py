"""The text kind: plain text for continued pre-training (cpt), every token a label, the
end-of-sequence token appended, split into chunks of ``max_length``."""

from __future__ import annotations

from dataclasses import dataclass

from hwft.data.chat import IGNORE_INDEX, ChatRenderer, Tokenized, TokenizeStats
from hwft.data.kinds import Example


@dataclass
class TextExample(Example):
    kind = "text"
    text: str


def chunks_of(ids: list[int], max_length: int) -> list[Tokenized]:
    """``ids`` in pieces of ``max_length``, every token but each piece's first a label; a piece
    of one token (nothing to predict) is left out."""
    out = []
    for start in range(0, len(ids), max_length):
        piece = ids[start : start + max_length]
        if len(piece) > 1:
            out.append(Tokenized(piece, [IGNORE_INDEX] + piece[1:]))
    return out


def encode(example: TextExample, renderer: ChatRenderer, max_length: int, stats: TokenizeStats) -> list[Tokenized]:
    tokenizer = renderer.tokenizer
    ids = list(tokenizer(example.text)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    chunks = chunks_of(ids, max_length)
    stats.split += len(chunks) > 1
    stats.count(chunks)
    return chunks
