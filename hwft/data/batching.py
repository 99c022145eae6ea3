"""Rows and micro-batches, engine-neutral so every engine sees the same batches for a seed.

Packing puts several tokenised examples into one row of at most ``max_length`` tokens
(best-fit decreasing: longest first, each into the fullest row it still fits). A packed row
keeps each example's boundaries (``lengths``) and restarts ``position_ids`` at 0 for each; the
engine turns the boundaries into attention kept within each example (a block-diagonal causal
mask, or varlen kernels), so a packed row computes what its examples compute separately.

Without packing, rows are single examples; with ``group_by_length`` each epoch's shuffled rows
are cut into mega-batches of 50 micro-batches, sorted by length inside each, so a micro-batch
holds rows of similar length (less padding) while the order stays random.

Every epoch reshuffles with ``Random(f"{seed}:{epoch}")``. Streaming runs do the same within
windows of ``shuffle_buffer`` examples.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hwft.data.chat import IGNORE_INDEX, Tokenized

MEGA_BATCH = 50  #: micro-batches per length-sorted group


@dataclass
class Row:
    """One row of a micro-batch: one example, or several packed."""

    input_ids: list[int]
    labels: list[int]
    lengths: list[int]  #: the examples' lengths, in order; they sum to len(input_ids)
    ids: list[int] = field(default_factory=list)  #: the examples' indices among the tokenised sequences
    #: the model inputs beside the tokens (image and video rows' pixels and grids:
    #: Tokenized.inputs), each concatenated over the row's examples in order
    inputs: dict | None = None
    #: per-token inputs (Tokenized.token_inputs) over the row's tokens, 0 for a text example's
    token_inputs: dict | None = None

    @property
    def sequences(self) -> tuple[Row, ...]:
        """The token sequences the row runs through the model: itself."""
        return (self,)

    @property
    def position_ids(self) -> list[int]:
        return [p for n in self.lengths for p in range(n)]

    @property
    def num_labels(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def pack_groups(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of total length <= capacity, by best-fit decreasing."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


def make_rows(examples: list[Tokenized], max_length: int, packing: bool) -> list[Row]:
    if not packing:
        return [
            Row(e.input_ids, e.labels, [len(e.input_ids)], [i], e.inputs, e.token_inputs)
            for i, e in enumerate(examples)
        ]
    rows = []
    for group in pack_groups([len(e.input_ids) for e in examples], max_length):
        members = [examples[i] for i in group]
        rows.append(
            Row(
                [t for e in members for t in e.input_ids],
                [t for e in members for t in e.labels],
                [len(e.input_ids) for e in members],
                list(group),
                *packed_inputs(members),
            )
        )
    return rows


def packed_inputs(members: list[Tokenized]) -> tuple[dict | None, dict | None]:
    """The inputs and per-token inputs of examples packed into one row: each input concatenated
    over the examples that have it, in their order (as a batch of them would be); each per-token
    input over all the row's tokens, 0 where an example has none (a text example's)."""
    if not any(e.inputs for e in members):
        return None, None
    import numpy as np

    keys = dict.fromkeys(k for e in members for k in e.inputs or {})
    inputs = {k: np.concatenate([np.asarray(e.inputs[k]) for e in members if e.inputs and k in e.inputs]) for k in keys}
    per_token = dict.fromkeys(k for e in members for k in e.token_inputs or {})
    token_inputs = {
        k: [v for e in members for v in (e.token_inputs or {}).get(k, [0] * len(e.input_ids))] for k in per_token
    }
    return inputs, token_inputs or None


def batch_order(rows: list[Row], micro_batch_size: int, rng: random.Random, group_by_length: bool) -> list[list[Row]]:
    """One pass over ``rows`` as micro-batches, in a seeded random order."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    if group_by_length:
        mega = micro_batch_size * MEGA_BATCH
        order = [
            i
            for s in range(0, len(order), mega)
            for i in sorted(order[s : s + mega], key=lambda i: -len(rows[i].input_ids))
        ]
    batches = [[rows[i] for i in order[s : s + micro_batch_size]] for s in range(0, len(order), micro_batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def micro_batches(
    rows: list[Row], micro_batch_size: int, seed: int, group_by_length: bool = False
) -> Iterator[tuple[int, list[Row]]]:
    """Endless (epoch, rows) micro-batches over rows held in memory.

    The last micro-batch of an epoch may be smaller; the stream then continues with the next
    epoch, so an optimizer step's micro-batches can straddle two epochs.
    """
    epoch = 0
    while True:
        for batch in batch_order(rows, micro_batch_size, random.Random(f"{seed}:{epoch}"), group_by_length):
            yield epoch, batch
        epoch += 1


def streamed_batches(
    examples: Iterator,
    encode: Callable[[Any], list[Tokenized]],
    max_length: int,
    packing: bool,
    micro_batch_size: int,
    seed: int,
    buffer: int,
    group_by_length: bool = False,
) -> Iterator[tuple[int, list[Row]]]:
    """Endless (window, rows) micro-batches from an endless example stream: each window of
    ``buffer`` examples is shuffled, tokenised, packed and batched like an in-memory epoch."""
    window = 0
    while True:
        rng = random.Random(f"{seed}:{window}")
        chunk = [next(examples) for _ in range(buffer)]
        rng.shuffle(chunk)
        tokenized = [t for e in chunk for t in encode(e)]
        rows = make_rows(tokenized, max_length, packing)
        for batch in batch_order(rows, micro_batch_size, rng, group_by_length):
            yield window, batch
        window += 1


def batches_per_epoch(num_rows: int, micro_batch_size: int, group_by_length: bool) -> int:
    if not group_by_length:
        return math.ceil(num_rows / micro_batch_size)
    mega = micro_batch_size * MEGA_BATCH
    full, rest = divmod(num_rows, mega)
    return full * MEGA_BATCH + math.ceil(rest / micro_batch_size)


def total_steps(batches: int, accumulation: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps for a run: max_steps if given, else enough for ``epochs`` passes."""
    if max_steps:
        return max_steps
    return max(1, math.ceil(batches / accumulation * epochs))


def efficiency(batches: list[list[Row]]) -> float:
    """Real tokens over computed tokens, each micro-batch padded to its longest row."""
    real = sum(len(r.input_ids) for b in batches for r in b)
    computed = sum(len(b) * max(len(r.input_ids) for r in b) for b in batches)
    return real / computed if computed else 0.0


def segment_ids(rows: list[Row], width: int) -> list[list[int]]:
    """Per row and position, the index of the example a token belongs to; right padding up to
    ``width`` is one more segment. Engines build a block-diagonal causal mask from these
    (attend where the segments are equal and the key is not later than the query)."""
    out = []
    for row in rows:
        ids = [k for k, n in enumerate(row.lengths) for _ in range(n)]
        out.append(ids + [len(row.lengths)] * (width - len(ids)))
    return out


def pad(rows: list[Row], pad_id: int) -> dict[str, list[list[int]]]:
    """Right-pad to the longest row: input_ids, labels, position_ids and a 2D attention_mask
    (1 real, 0 pad). Packed rows also need their ``lengths`` for a block-diagonal mask."""
    width = max(len(r.input_ids) for r in rows)
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": [], "position_ids": []}
    for r in rows:
        gap = width - len(r.input_ids)
        out["input_ids"].append(r.input_ids + [pad_id] * gap)
        out["attention_mask"].append([1] * len(r.input_ids) + [0] * gap)
        out["labels"].append(r.labels + [IGNORE_INDEX] * gap)
        out["position_ids"].append(r.position_ids + list(range(gap)))
    return out
