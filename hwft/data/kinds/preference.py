"""The preference kind: prompt turns with a chosen and a rejected answer (dpo, orpo, simpo, rm),
rendered as two sequences that share the prompt's tokens, labels on the answers only."""

from __future__ import annotations

from dataclasses import dataclass, field

from hwft.data.chat import ChatRenderer, Message, Tokenized, TokenizeStats, empty_error
from hwft.data.kinds.chat import ChatExample, Turns
from hwft.data.pipeline import Batches, epochs_of, truncate


@dataclass
class PreferenceExample(Turns):
    """``messages``: the prompt turns; ``chosen`` / ``rejected``: the assistant turns after them."""

    kind = "preference"
    chosen: list[Message] = field(default_factory=list)
    rejected: list[Message] = field(default_factory=list)

    def turns(self) -> list[Message]:
        return self.messages + self.chosen + self.rejected


@dataclass
class PreferencePair:
    """A preference example as two sequences sharing the prompt's tokens."""

    chosen: Tokenized
    rejected: Tokenized
    prompt_length: int  #: tokens shared by both, before the answers
    #: (chosen, rejected) summed log-probabilities under the reference, when precomputed (dpo)
    reference_logps: tuple[float, float] | None = None

    @property
    def sequences(self) -> tuple[Tokenized, ...]:
        return self.chosen, self.rejected


def tokenize_pair(renderer: ChatRenderer, example: PreferenceExample) -> PreferencePair:
    """Prompt + chosen and prompt + rejected, labels on the answers only."""
    n = len(example.messages)
    chosen, rejected = (
        renderer.tokenize(
            ChatExample(example.messages + answer, example.tools, source=example.source, media=example.media), n
        )
        for answer in (example.chosen, example.rejected)
    )
    shared = 0
    for a, b in zip(chosen.input_ids, rejected.input_ids, strict=False):  # up to the shorter
        if a != b:
            break
        shared += 1
    return PreferencePair(chosen, rejected, shared)


def preference_pairs(
    examples: list[PreferenceExample], renderer: ChatRenderer, max_length: int
) -> tuple[list[PreferencePair], TokenizeStats]:
    """Tokenised pairs, both answers cut to ``max_length``; a pair whose chosen or rejected answer
    has no token left is dropped (counted)."""
    stats = TokenizeStats()
    pairs = []
    for example in examples:
        pair = tokenize_pair(renderer, example)
        if max(len(pair.chosen.input_ids), len(pair.rejected.input_ids)) > max_length:
            stats.truncated += 1
            pair = PreferencePair(
                truncate(pair.chosen, max_length),
                truncate(pair.rejected, max_length),
                min(pair.prompt_length, max_length),
            )
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


def preference_batches(data, renderer: ChatRenderer, recipe, ranks: int = 1, capability=None) -> Batches:
    """Micro-batches of pairs, seeded per epoch."""
    pairs, stats = preference_pairs(data.examples, renderer, recipe.train.max_length)
    iterator, steps = epochs_of(pairs, recipe, ranks)
    return Batches(iterator, steps, stats, pairs, False, unit="pairs")


def inspect(example: PreferenceExample, renderer: ChatRenderer, max_length: int) -> list[tuple[str, Tokenized]]:
    pair = tokenize_pair(renderer, example)
    return [("chosen", pair.chosen), ("rejected", pair.rejected)]
