"""From parsed examples to the micro-batches an engine trains on, the same for every engine.

in memory:  examples -> tokens and masks -> rows (packed or not) -> seeded micro-batches per epoch
streaming:  example stream -> windows of ``shuffle_buffer`` -> the same steps per window
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from hwft.data.batching import Row, batches_per_epoch, make_rows, micro_batches, streamed_batches, total_steps
from hwft.data.chat import ChatRenderer, TokenizeStats, tokenize_examples
from hwft.data.loading import TrainData
from hwft.recipe import Recipe
from hwft.records import Capability

#: Objectives whose rows are token sequences that can be packed.
PACKABLE = ("sft", "cpt")


def packing_enabled(recipe: Recipe, capability: Capability) -> bool:
    """``data.packing`` as written, else on for sft/cpt where the backend can pack (selection
    has already refused an explicit ``packing: true`` on a backend that cannot)."""
    if recipe.data.packing is not None:
        return recipe.data.packing
    return recipe.method.objective in PACKABLE and capability.packing


@dataclass
class Batches:
    iterator: Iterator[tuple[int, list[Row]]]  #: endless (epoch, micro-batch)
    steps: int  #: optimizer steps of the run
    stats: TokenizeStats | None  #: what tokenising found, in memory; None when streaming
    rows: list[Row] | None  #: every row, in memory; None when streaming
    packing: bool

    def describe(self) -> str:
        if self.rows is None:
            return f"streaming, packing {'on' if self.packing else 'off'}"
        tokens = sum(len(r.input_ids) for r in self.rows)
        return f"{len(self.rows)} rows ({tokens} tokens), packing {'on' if self.packing else 'off'}"


def training_batches(data: TrainData, renderer: ChatRenderer, recipe: Recipe, capability: Capability) -> Batches:
    t = recipe.train
    packing = packing_enabled(recipe, capability)
    group = recipe.data.group_by_length and not packing
    if data.streaming:
        for example in data.examples:  # the rows checked up front tokenise, or fail now
            renderer.encode(example, t.max_length, TokenizeStats())
        # Counts over an endless stream would only grow; each example gets a throwaway tally.
        iterator = streamed_batches(
            data.stream(t.seed), lambda e: renderer.encode(e, t.max_length, TokenizeStats()), t.max_length,
            packing, t.micro_batch_size, t.seed, recipe.data.shuffle_buffer, group,
        )
        return Batches(iterator, t.max_steps, None, None, packing)
    tokenized, stats = tokenize_examples(data.examples, renderer, t.max_length)
    rows = make_rows(tokenized, t.max_length, packing)
    per_epoch = batches_per_epoch(len(rows), t.micro_batch_size, group)
    steps = total_steps(per_epoch, t.gradient_accumulation_steps, t.epochs, t.max_steps)
    return Batches(micro_batches(rows, t.micro_batch_size, t.seed, group), steps, stats, rows, packing)
