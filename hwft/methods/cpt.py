"""cpt: continued pre-training on plain text.

Loss: next-token cross-entropy on every token of the text, divided by the optimizer step's
label tokens N::

    L = -(1/N) * sum_t log p(x_t | x_<t)

Rows pack, stream, and have a held-out loss, as sft's do.
"""

from __future__ import annotations

from hwft.methods.record import Cell, FromLlamaFactory, Method

TEXTS = tuple(
    {"text": f"Document {i}: the quick brown fox jumps over the lazy dog, again and again."} for i in range(6)
)

METHOD = Method(
    name="cpt",
    description="continued pre-training: cross-entropy on every token of plain text",
    kind="text",
    also=("tokens",),
    packs=True,
    streams=True,
    held_out=True,
    sequence_parallel=True,
    llamafactory=FromLlamaFactory("pt"),
    cell=Cell(TEXTS),
)
