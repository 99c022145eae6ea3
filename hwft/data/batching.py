"""Batch order and padding, engine-neutral so every engine sees the same batches for a seed."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

from hwft.data.chat import IGNORE_INDEX, Tokenized


def micro_batches(num_examples: int, micro_batch_size: int, seed: int) -> Iterator[tuple[int, list[int]]]:
    """Endless (epoch, indices) micro-batches: each epoch a fresh shuffle seeded by (seed, epoch).

    The last micro-batch of an epoch may be smaller; the stream then continues with the next
    epoch, so an optimizer step's micro-batches can straddle two epochs.
    """
    epoch = 0
    while True:
        order = list(range(num_examples))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        for start in range(0, num_examples, micro_batch_size):
            yield epoch, order[start : start + micro_batch_size]
        epoch += 1


def total_steps(num_examples: int, micro_batch_size: int, accumulation: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps for a run: max_steps if given, else enough for ``epochs`` passes."""
    if max_steps:
        return max_steps
    per_epoch = math.ceil(num_examples / micro_batch_size) / accumulation
    return max(1, math.ceil(per_epoch * epochs))


def pad(examples: list[Tokenized], pad_id: int) -> dict[str, list[list[int]]]:
    """Right-pad to the longest row: input_ids, attention_mask (1 real, 0 pad), labels."""
    width = max(len(e.input_ids) for e in examples)
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        gap = width - len(e.input_ids)
        out["input_ids"].append(e.input_ids + [pad_id] * gap)
        out["attention_mask"].append([1] * len(e.input_ids) + [0] * gap)
        out["labels"].append(e.labels + [IGNORE_INDEX] * gap)
    return out
