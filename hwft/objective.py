"""What every engine's objectives share: drawing micro-batches, epochs, logged statistics.

An objective turns the data into optimizer steps. An engine's loop calls, for each step,
``step(model, n)`` for the step's micro-batches, then ``loss(model, micro) -> Loss`` for each,
backpropagates ``Loss.value`` and records ``Loss.stats`` (the same shape on every engine:
:class:`hwft.contract.EngineObjective`). The micro-batch losses of a step add up to the step's
loss: each is normalised by a count taken over the whole step (label tokens, pairs, completion
tokens), so gradient accumulation equals one big batch. The engine-specific halves live in each
backend (``hwft_torch.objective``, ``hwft_mlx.objective``); this part imports no engine.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from hwft.data.batching import Row
from hwft.data.pipeline import Batches
from hwft.distributed import ALONE, Collective
from hwft.extras import Extra


@dataclass
class Loss:
    """One micro-batch's loss, what it computed, and the statistics it logs."""

    value: Any  #: this micro-batch's share of the step's loss (an engine's scalar array)
    tokens: int  #: non-padding tokens computed
    trained: int  #: tokens the loss is taken on
    attended: int = 0  #: causal attention pairs computed, sum over sequences of L(L+1)/2 (FLOP model)
    examples: tuple[int, ...] = ()  #: indices of the sequences trained on (sft, cpt)
    #: statistics to log (their means are), each an engine scalar or one per item, recorded by
    #: the loop once the micro-batch is computed (MLX evaluates them with the gradient)
    stats: dict[str, Any] = field(default_factory=dict)


class Objective:
    """Shared book-keeping: drawing a step's micro-batches and this rank's share of them,
    epochs (items drawn / items per epoch) and logged statistics, reduced over ranks."""

    #: Modules the method trains beside the model (:class:`Extra`); the engine attaches, shards,
    #: saves and checkpoints them.
    extras: tuple[Extra, ...] = ()

    def __init__(self, batches: Batches, collective: Collective = ALONE):
        self.batches = batches
        self.collective, self.world = collective, collective.world
        self.drawn = 0  #: items (rows, pairs, prompts) drawn so far
        self.micro_batches = 0  #: micro-batches drawn so far: the data position a checkpoint keeps
        self.window = 0
        self.stats: dict[str, list[float]] = defaultdict(list)
        #: The context a method that generates (``Method.generates``) samples in: the engine sets
        #: its parallel strategy's (ZeRO-3 gathers the weights once for it).
        self.whole_model: Callable[[], AbstractContextManager] = nullcontext

    def step(self, model: Any, step: int) -> Sequence[Any]:
        """This rank's micro-batches of optimizer step ``step`` (each method's own)."""
        raise NotImplementedError

    def loss(self, model: Any, micro: Any) -> Loss:
        """One micro-batch's share of the step's loss (each method's own, on each engine)."""
        raise NotImplementedError

    def draw(self, count: int) -> list[list]:
        """The next ``count`` micro-batches of items."""
        out = []
        for _ in range(count):
            self.window, items = next(self.batches.iterator)
            self.drawn += len(items)
            self.micro_batches += 1
            out.append(items)
        return out

    def skip(self, micro_batches: int) -> None:
        """Resuming: advance the (seeded, deterministic) data stream past what the checkpointed
        run drew, so the next step draws exactly what it would have."""
        self.draw(micro_batches)

    #: Optimizer steps one draw of data serves (GRPO: num_iterations steps per rollout batch).
    span = 1

    def resumable(self, step: int) -> bool:
        """Whether a checkpoint after ``step`` holds everything the next step needs: the steps
        a draw serves are done (a GRPO rollout batch is not kept in checkpoints)."""
        return step % self.span == 0

    def position(self) -> dict:
        """The data position a checkpoint records."""
        return {"micro_batches": self.micro_batches, "items": self.drawn, "epoch": self.epoch()}

    def draw_step(self, accumulation: int) -> tuple[list[list], list[list]]:
        """One optimizer step: ``accumulation`` micro-batches per rank. Every rank draws the
        whole step alike (its totals normalise each share of the loss) and trains its share:
        (the step's micro-batches, this rank's)."""
        micro = self.draw(accumulation * self.world.size)
        return micro, self.world.share(micro)

    def step_shares(self, accumulation: int, count) -> list[tuple[list, int]]:
        """This rank's micro-batches of the next step, each with ``count(step's micro-batches)``:
        the normaliser over the whole step (label tokens, pairs) that makes the shares add up."""
        micro, mine = self.draw_step(accumulation)
        total = count(micro)
        self.step_micro_batches = len(micro)  # every rank's: a per-micro-batch term (the router's) is their mean
        return [(batch, total) for batch in mine]

    def epoch(self) -> float:
        """Passes over the items so far; streaming: the shuffle window being read."""
        if self.batches.rows:
            return round(self.drawn / len(self.batches.rows), 4)
        return self.window

    def note(self, **values: float) -> None:
        for key, value in values.items():
            self.stats[key].append(float(value))

    def record(self, stats: dict[str, Any]) -> None:
        """Note a computed micro-batch's ``Loss.stats``: one value or one per item (a list, or an
        engine array the loop has turned into one); means are logged."""
        for key, value in stats.items():
            values = value.tolist() if hasattr(value, "tolist") else value
            for v in values if isinstance(values, list) else [values]:
                self.note(**{key: v})

    def log_metrics(self) -> dict[str, float]:
        """The mean of each statistic noted since the last call, over all ranks' notes. A rank
        may not have noted every key (kto's micro-batch of desirable answers only has no
        rewards/rejected): the keys are agreed first, so every rank sums the same list."""
        keys = sorted(k for k, v in self.stats.items() if v)
        if self.world.size > 1:
            keys = sorted({k for rank in self.collective.gather(keys) for k in rank})
        totals = self.collective.sum([x for k in keys for x in (sum(self.stats[k]), len(self.stats[k]))])
        self.stats.clear()
        return {k: totals[2 * i] / max(totals[2 * i + 1], 1) for i, k in enumerate(keys)}


def precompute_reference(model, batches: Batches, batch_size: int, logps_of) -> None:
    """Store on each item of ``batches.rows`` its ``reference_logps``: ``logps_of(model, chunk)`` -> one pair of
    floats per item, under ``model`` as it is now, in eval mode (before the first update the
    policy is the reference: dpo's and kto's ``reference: precomputed``, and MLX's always). The
    caller turns gradients off where its engine needs that."""
    items = batches.rows
    assert items is not None, "a reference is precomputed over data held in memory (not streamed)"
    was_training = model.training
    model.eval()
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        for item, pair in zip(chunk, logps_of(model, chunk), strict=True):
            item.reference_logps = tuple(pair)
    model.train(was_training)


def sequence_pairs(rows: list[Row]) -> int:
    """Causal attention pairs of the rows' examples: sum of L(L+1)/2."""
    return sum(n * (n + 1) // 2 for r in rows for n in r.lengths)


def step_label_count(micro: list[list[Row]]) -> int:
    """Label tokens of one optimizer step's micro-batches: the sft/cpt loss's normaliser."""
    return sum(row.num_labels for batch in micro for row in batch)


def step_pair_count(micro: list[list]) -> int:
    """Preference pairs of one optimizer step's micro-batches: the DPO loss's normaliser."""
    return sum(len(batch) for batch in micro)


class PairSteps(Objective):
    """What every preference-pair objective (dpo, orpo, simpo, on each engine) draws for a step:
    this rank's micro-batches of pairs, each with the step's pair count (``self.accumulation``
    is the recipe's gradient_accumulation_steps)."""

    accumulation: int

    def step(self, model, step: int) -> list[tuple[list, int]]:
        return self.step_shares(self.accumulation, step_pair_count)


def pair_counts(micro: tuple[list, int]) -> Loss:
    """Tokens computed and trained in a micro-batch of preference pairs (chosen and rejected)."""
    pairs, _ = micro
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return Loss(None, sum(len(t.input_ids) for t in seqs), sum(t.num_labels for t in seqs))


class FeedbackSteps(PairSteps):
    """kto's steps on each engine: micro-batches of feedback items, each with the step's item
    count; ``rewards/margins`` is logged as the mean desirable reward less the mean undesirable
    one (each answer has one reward, so the margin is of the means, as TRL logs it)."""

    def log_metrics(self) -> dict[str, float]:
        out = super().log_metrics()
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


def feedback_counts(micro: tuple[list, int]) -> Loss:
    """Tokens computed (each answer and its mismatched pair) and trained (the answers) in a
    micro-batch of feedback items."""
    items, _ = micro
    return Loss(
        None,
        sum(len(i.sequence.input_ids) + len(i.mismatched.input_ids) for i in items),
        sum(i.sequence.num_labels for i in items),
    )
