"""From parsed examples to the micro-batches an engine trains on, the same for every engine.

Each method (hwft.methods) names the batcher its examples go through; the built-in ones:

sft, cpt   examples -> tokens and masks -> rows (packed or not) -> seeded micro-batches per epoch;
           streaming: example stream -> windows of ``shuffle_buffer`` -> the same per window
dpo, orpo, preference rows -> (prompt + chosen, prompt + rejected) pairs -> micro-batches of pairs
simpo
kto        feedback rows -> (prompt + answer, prompt + the previous row's answer) -> micro-batches
grpo       prompt rows -> prompt token ids (+ reference answer) -> micro-batches of prompts; a
           rollout batch is one optimizer step's prompts, reused ``num_iterations`` steps
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from hwft.data.batching import batches_per_epoch, make_rows, micro_batches, streamed_batches, total_steps
from hwft.data.chat import (ChatRenderer, FeedbackItem, PreferencePair, TokenizeStats, Tokenized, empty_error,
                            tokenize_examples)
from hwft.data.formats import Example
from hwft.data.loading import TrainData
from hwft.errors import DataError, RecipeError
from hwft.methods import method
from hwft.recipe import Recipe
from hwft.records import Capability

def packing_enabled(recipe: Recipe, capability: Capability) -> bool:
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
    rows: list | None  #: every row (sft, cpt), pair (dpo, orpo, simpo), answer (kto) or prompt (grpo), in memory; None when streaming
    packing: bool
    unit: str = "rows"

    def describe(self) -> str:
        if self.rows is None:
            return f"streaming, packing {'on' if self.packing else 'off'}"
        text = f"{len(self.rows)} {self.unit} ({self.stats.tokens} tokens)"
        return text + (f", packing {'on' if self.packing else 'off'}" if self.unit == "rows" else "")

    def check_vocabulary(self, size: int, model: str) -> None:
        """Refuse token ids the model's embedding has no row for (a tokenizer with tokens added
        after the model was saved): the lookup would fail mid-step, or on an accelerator corrupt
        memory. Streamed data is checked as it is read, by the engine's embedding lookup."""
        for index, item in enumerate(self.rows or ()):
            sequences = [t.input_ids for t in sequences_of(item)]
            highest = max((max(ids) for ids in sequences if ids), default=-1)
            if highest >= size:
                raise DataError(
                    f"{self.unit[:-1]} {index + 1} of the tokenised data has token id {highest}, but the model "
                    f"{model} has {size} embedding rows; the tokenizer has tokens the model does not (added after "
                    "it was saved?). Use the model's own tokenizer, or resize its embeddings and save it again"
                )

    def summary(self, max_length: int) -> str:
        """One line for the run's log: what tokenising found, and what will be trained on."""
        if self.rows is None or self.unit == "prompts":
            dropped = f", {self.stats.dropped} longer prompts dropped" if self.stats and self.stats.dropped else ""
            return self.describe() + dropped
        return f"{self.stats.summary(max_length)}; {self.describe()}"


def sequences_of(item) -> list[Tokenized]:
    """The token sequences of a row, pair or feedback item."""
    if isinstance(item, PreferencePair):
        return [item.chosen, item.rejected]
    if isinstance(item, FeedbackItem):
        return [item.sequence, item.mismatched]
    return [item]


@dataclass
class Prompt:
    """A GRPO prompt: token ids ready for generation, and what reward functions see."""

    input_ids: list[int]
    text: str  #: the last user turn
    reference: str | None  #: the row's reference answer, if any


def training_batches(data: TrainData, renderer: ChatRenderer, recipe: Recipe, capability: Capability,
                     ranks: int = 1) -> Batches:
    """The micro-batches of a run, for any method: through the batcher its record names. With
    several ranks, an optimizer step takes ``gradient_accumulation_steps`` micro-batches on each
    (see hwft.distributed), so an epoch has ``ranks`` times fewer steps."""
    return method(recipe.method.objective).make_batches(data, renderer, recipe, ranks, capability)


def sequence_batches(data: TrainData, renderer: ChatRenderer, recipe: Recipe, ranks: int = 1,
                     capability: Capability | None = None) -> Batches:
    """Token sequences with their label masks (sft, cpt), packed where packing is on, in seeded
    micro-batches per epoch; streamed in windows of ``shuffle_buffer``."""
    t = recipe.train
    packing = packing_enabled(recipe, capability) if capability is not None else bool(recipe.data.packing)
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
    steps = total_steps(per_epoch, t.gradient_accumulation_steps * ranks, t.epochs, t.max_steps)
    return Batches(micro_batches(rows, t.micro_batch_size, t.seed, group), steps, stats, rows, packing)


def held_out_rows(examples: list[Example], renderer: ChatRenderer, max_length: int) -> list:
    """data.eval's examples, tokenised like the training rows, one example per row."""
    if not examples:
        return []
    tokenized, _ = tokenize_examples(examples, renderer, max_length)
    return make_rows(tokenized, max_length, packing=False)


def _epochs_of(items: list, recipe: Recipe, ranks: int, steps_per_batch_group: int = 1) -> tuple[Iterator, int]:
    t = recipe.train
    per_epoch = batches_per_epoch(len(items), t.micro_batch_size, False)
    steps = total_steps(per_epoch, t.gradient_accumulation_steps * ranks, t.epochs, None)
    steps = t.max_steps or steps * steps_per_batch_group
    return micro_batches(items, t.micro_batch_size, t.seed), steps


def truncate(tok: Tokenized, max_length: int) -> Tokenized:
    return Tokenized(tok.input_ids[:max_length], tok.labels[:max_length])


def preference_pairs(examples: list[Example], renderer: ChatRenderer, max_length: int) -> tuple[list[PreferencePair], TokenizeStats]:
    """Tokenised pairs, both answers cut to ``max_length``; a pair whose chosen or rejected answer
    has no token left is dropped (counted)."""
    stats = TokenizeStats()
    pairs = []
    for example in examples:
        pair = renderer.tokenize_preference(example)
        if max(len(pair.chosen.input_ids), len(pair.rejected.input_ids)) > max_length:
            stats.truncated += 1
            pair = PreferencePair(truncate(pair.chosen, max_length), truncate(pair.rejected, max_length),
                                  min(pair.prompt_length, max_length))
        if not (pair.chosen.num_labels and pair.rejected.num_labels):
            stats.dropped += 1
            continue
        stats.examples += 1
        stats.add(pair.chosen)
        stats.add(pair.rejected)
        pairs.append(pair)
    if not pairs:
        raise empty_error(stats, max_length)
    return pairs, stats


def preference_batches(data: TrainData, renderer: ChatRenderer, recipe: Recipe, ranks: int = 1,
                       capability: Capability | None = None) -> Batches:
    pairs, stats = preference_pairs(data.examples, renderer, recipe.train.max_length)
    iterator, steps = _epochs_of(pairs, recipe, ranks)
    return Batches(iterator, steps, stats, pairs, False, unit="pairs")


def feedback_items(examples: list[Example], renderer: ChatRenderer, max_length: int) -> tuple[list[FeedbackItem], TokenizeStats]:
    """Each feedback example's prompt with its own answer, and with the answer of the example
    before it (the first takes the last's): KTO's mismatched pairs, fixed here, when the data is
    prepared, as LLaMA-Factory pairs them, so that any micro-batch size (1 too) trains. TRL
    rotates within each micro-batch instead, which needs two rows per micro-batch. Both
    sequences are cut to ``max_length``; an example whose own answer has no token left is
    dropped (counted)."""
    if len(examples) < 2:
        raise DataError(
            f"kto needs at least 2 feedback rows (its KL baseline pairs each prompt with another row's answer); "
            f"the data has {len(examples)}"
        )
    stats = TokenizeStats()
    items = []
    for i, example in enumerate(examples):
        own = renderer.tokenize_answer(example, example.completion)
        other = renderer.tokenize_answer(example, examples[i - 1].completion)
        if max(len(own.input_ids), len(other.input_ids)) > max_length:
            stats.truncated += 1
            own, other = truncate(own, max_length), truncate(other, max_length)
        if not own.num_labels:
            stats.dropped += 1
            continue
        stats.examples += 1
        stats.add(own)
        items.append(FeedbackItem(own, other, bool(example.label)))
    if not items:
        raise empty_error(stats, max_length)
    return items, stats


def feedback_batches(data: TrainData, renderer: ChatRenderer, recipe: Recipe, ranks: int = 1,
                     capability: Capability | None = None) -> Batches:
    items, stats = feedback_items(data.examples, renderer, recipe.train.max_length)
    iterator, steps = _epochs_of(items, recipe, ranks)
    return Batches(iterator, steps, stats, items, False, unit="answers")


def prompt_items(examples: list[Example], renderer: ChatRenderer, max_prompt_length: int,
                 objective: str) -> tuple[list[Prompt], TokenizeStats]:
    """Prompt token ids (rendered with the generation prompt); prompts longer than
    ``max_prompt_length`` are dropped (counted). ``objective``: the method whose section sets
    max_new_tokens (named in the message)."""
    stats = TokenizeStats()
    prompts = []
    for example in examples:
        renderer.check(example)
        ids = renderer.prompt_ids(example.messages, example.tools)
        if len(ids) > max_prompt_length:
            stats.dropped += 1
            continue
        users = [m["content"] for m in example.messages if m["role"] == "user"]
        stats.examples += 1
        stats.tokens += len(ids)
        stats.lengths.append(len(ids))
        prompts.append(Prompt(ids, users[-1] if users else "", example.reference))
    if not prompts:
        raise DataError(
            f"no prompt left to train on: all {stats.dropped} are longer than train.max_length minus "
            f"method.{objective}.max_new_tokens ({max_prompt_length} tokens); raise train.max_length"
        )
    return prompts, stats


def prompt_batches(data: TrainData, renderer: ChatRenderer, recipe: Recipe, ranks: int = 1,
                   capability: Capability | None = None) -> Batches:
    objective = recipe.method.objective  # grpo, ppo: a section with max_new_tokens and num_iterations
    g = getattr(recipe.method, objective)
    room = recipe.train.max_length - g.max_new_tokens
    if room < 1:
        raise RecipeError(
            f"train.max_length ({recipe.train.max_length}) leaves no room for a prompt before "
            f"method.{objective}.max_new_tokens ({g.max_new_tokens}); raise train.max_length"
        )
    prompts, stats = prompt_items(data.examples, renderer, room, objective)
    iterator, steps = _epochs_of(prompts, recipe, ranks, g.num_iterations)
    return Batches(iterator, steps, stats, prompts, False, unit="prompts")
