"""What every objective hands the training loop, and the one for sft and cpt.

An objective turns the data into optimizer steps. The loop (:mod:`hwft_torch.engine`) calls, for
each step, ``step(model, n)`` for the step's micro-batches, then ``loss(model, micro)`` for each
(under autocast) and backpropagates it. The micro-batch losses of a step add up to the step's
loss: each is normalised by a count taken over the whole step (label tokens, pairs,
completion tokens), so gradient accumulation equals one big batch.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from hwft.data.batching import Row, pad
from hwft.data.pipeline import Batches
from hwft_torch.losses import causal_lm_loss


@dataclass
class Loss:
    value: torch.Tensor  #: this micro-batch's share of the step's loss
    tokens: int  #: non-padding tokens computed
    trained: int  #: tokens the loss is taken on


class Objective:
    """Shared book-keeping: epochs (items drawn / items per epoch) and logged statistics."""

    def __init__(self, batches: Batches):
        self.batches = batches
        self.drawn = 0
        self.window = 0
        self.stats: dict[str, list[float]] = defaultdict(list)

    def draw(self, count: int) -> list[list]:
        """The next ``count`` micro-batches of items."""
        out = []
        for _ in range(count):
            self.window, items = next(self.batches.iterator)
            self.drawn += len(items)
            out.append(items)
        return out

    def epoch(self) -> float:
        """Passes over the items so far; streaming: the shuffle window being read."""
        if self.batches.rows:
            return round(self.drawn / len(self.batches.rows), 4)
        return self.window

    def note(self, **values: float) -> None:
        for key, value in values.items():
            self.stats[key].append(float(value))

    def log_metrics(self) -> dict[str, float]:
        """The mean of each statistic noted since the last call."""
        out = {k: sum(v) / len(v) for k, v in self.stats.items() if v}
        self.stats.clear()
        return out


def block_causal_mask(rows: list[Row], width: int, dtype: torch.dtype | None) -> torch.Tensor:
    """(batch, 1, width, width) mask letting each token attend to earlier tokens of its own
    example only; right padding forms one more block, so no query row is fully masked.

    ``dtype`` None gives a boolean mask (True = attend, as sdpa reads it); a float dtype gives
    the additive form eager attention adds to its scores (0 or the dtype's minimum).
    """
    segments = torch.empty(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids = [k for k, n in enumerate(row.lengths) for _ in range(n)]
        segments[b] = torch.tensor(ids + [len(row.lengths)] * (width - len(ids)))
    same = segments[:, :, None] == segments[:, None, :]
    mask = (same & torch.ones(width, width, dtype=torch.bool).tril())[:, None]
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def to_tensors(rows: list[Row], pad_id: int, attention: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs for a micro-batch, keeping attention within each packed example.

    flash_attention_2 runs padding-free: all rows are concatenated into one sequence and the
    kernel finds the examples from where ``position_ids`` restart (varlen). Other kernels get
    right-padded rows and, when a row packs several examples, a block-diagonal causal mask
    (position ids alone do not isolate examples for sdpa or eager attention).
    """
    if attention == "flash_attention_2":
        flat = {
            "input_ids": [t for r in rows for t in r.input_ids],
            "labels": [t for r in rows for t in r.labels],
            "position_ids": [p for r in rows for p in r.position_ids],
        }
        return {k: torch.tensor([v], device=device) for k, v in flat.items()}
    batch = {k: torch.tensor(v) for k, v in pad(rows, pad_id).items()}
    if any(len(r.lengths) > 1 for r in rows):
        width = batch["input_ids"].shape[1]
        batch["attention_mask"] = block_causal_mask(rows, width, torch.float32 if attention == "eager" else None)
    return {k: v.to(device) for k, v in batch.items()}


class LanguageModelling(Objective):
    """sft and cpt: next-token cross-entropy on the label tokens of (packed) rows
    (:func:`hwft_torch.losses.causal_lm_loss`), normalised by the step's label tokens."""

    def __init__(self, batches: Batches, accumulation: int, pad_id: int, attention: str, device: torch.device):
        super().__init__(batches)
        self.accumulation, self.pad_id, self.attention, self.device = accumulation, pad_id, attention, device

    def step(self, model, step: int) -> list[tuple[list[Row], int]]:
        micro = self.draw(self.accumulation)
        num_items = sum(row.num_labels for batch in micro for row in batch)
        return [(batch, num_items) for batch in micro]

    def loss(self, model, micro: tuple[list[Row], int]) -> Loss:
        rows, num_items = micro
        tensors = to_tensors(rows, self.pad_id, self.attention, self.device)
        labels = tensors.pop("labels")
        logits = model(**tensors).logits
        return Loss(causal_lm_loss(logits, labels, num_items), sum(len(r.input_ids) for r in rows),
                    sum(r.num_labels for r in rows))
