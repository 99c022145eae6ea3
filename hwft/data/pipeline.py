"""From parsed examples to the micro-batches an engine trains on, the same for every engine.

A method (hwft.methods) names the kind of example it trains on; the kind's record
(hwft.data.kinds) names its batcher, which tokenises the examples and draws them into seeded
micro-batches: token rows, packed or not (chat, text, tokens: :mod:`hwft.data.kinds.sequences`),
pairs (:mod:`~hwft.data.kinds.preference`), answers with their mismatched pairs
(:mod:`~hwft.data.kinds.feedback`) or prompts (:mod:`~hwft.data.kinds.prompt`). This module
holds what every batcher returns and shares.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from hwft.data.batching import batches_per_epoch, micro_batches, total_steps
from hwft.data.chat import Tokenized, TokenizeStats
from hwft.errors import DataError
from hwft.methods.lookup import method
from hwft.records import Capability


def packing_enabled(recipe, capability: Capability) -> bool:
    """``data.packing`` as written, else on for methods whose rows pack (sft, cpt) where the
    backend can pack (selection has already refused an explicit ``packing: true`` on a backend
    that cannot)."""
    if recipe.data.packing is not None:
        return recipe.data.packing
    return method(recipe.method.objective).packs and capability.packing


@dataclass
class Batches:
    iterator: Iterator[tuple[int, list]]  #: endless (epoch, micro-batch of rows, pairs or prompts)
    steps: int  #: optimizer steps of the run
    stats: TokenizeStats | None  #: what tokenising found, in memory; None when streaming
    #: every item (a row, a pair, an answer, a prompt: each with its ``sequences``), in memory;
    #: None when streaming
    rows: list | None
    packing: bool
    unit: str = "rows"

    def describe(self) -> str:
        if self.rows is None or self.stats is None:
            return f"streaming, packing {'on' if self.packing else 'off'}"
        text = f"{len(self.rows)} {self.unit} ({self.stats.tokens} tokens)"
        return text + (f", packing {'on' if self.packing else 'off'}" if self.unit == "rows" else "")

    def check_vocabulary(self, size: int, model: str) -> None:
        """Refuse token ids the model's embedding has no row for (a tokenizer with tokens added
        after the model was saved): the lookup would fail mid-step, or on an accelerator corrupt
        memory. Streamed data is checked as it is read, by the engine's embedding lookup."""
        for index, item in enumerate(self.rows or []):
            sequences = [t.input_ids for t in item.sequences]
            highest = max((max(ids) for ids in sequences if ids), default=-1)
            if highest >= size:
                raise DataError(
                    f"{self.unit[:-1]} {index + 1} of the tokenised data has token id {highest}, but the model "
                    f"{model} has {size} embedding rows; the tokenizer has tokens the model does not (added after "
                    "it was saved?). Use the model's own tokenizer, or resize its embeddings and save it again"
                )

    def summary(self, max_length: int) -> str:
        """One line for the run's log: what tokenising found, and what will be trained on."""
        if self.rows is None or self.stats is None or self.unit == "prompts":
            dropped = f", {self.stats.dropped} longer prompts dropped" if self.stats and self.stats.dropped else ""
            return self.describe() + dropped
        return f"{self.stats.summary(max_length)}; {self.describe()}"


def training_batches(data, renderer, recipe, capability: Capability, ranks: int = 1) -> Batches:
    """The micro-batches of a run, for any method: through the batcher of the kind its record
    names. With several ranks, an optimizer step takes ``gradient_accumulation_steps``
    micro-batches on each (see hwft.distributed), so an epoch has ``ranks`` times fewer steps."""
    from hwft.plugins import get_host

    kind = get_host().data_kinds().get(method(recipe.method.objective).kind)
    return kind.make_batches(data, renderer, recipe, ranks, capability)


def epochs_of(items: list, recipe, ranks: int, steps_per_batch_group: int = 1) -> tuple[Iterator, int]:
    """(seeded micro-batches of ``items`` per epoch, the run's optimizer steps): how the kinds
    whose items are not packed rows (pairs, answers, prompts) batch; a group of items serves
    ``steps_per_batch_group`` steps (a rollout batch, num_iterations)."""
    t = recipe.train
    per_epoch = batches_per_epoch(len(items), t.micro_batch_size, False)
    steps = total_steps(per_epoch, t.gradient_accumulation_steps * ranks, t.epochs, None)
    steps = t.max_steps or steps * steps_per_batch_group
    return micro_batches(items, t.micro_batch_size, t.seed), steps


def truncate(tok: Tokenized, max_length: int) -> Tokenized:
    return Tokenized(tok.input_ids[:max_length], tok.labels[:max_length])
