"""The feedback kind: prompt turns with one answer and whether it is desirable (kto). Each
example is rendered with its own answer and with the answer of the example before it (the first
takes the last's): KTO's mismatched pairs, fixed when the data is prepared, as LLaMA-Factory
pairs them, so that any micro-batch size (1 too) trains. TRL rotates within each micro-batch
instead, which needs two rows per micro-batch."""

from __future__ import annotations

from dataclasses import dataclass, field

from hwft.data.chat import ChatRenderer, Message, Tokenized, TokenizeStats, empty_error
from hwft.data.kinds.chat import ChatExample, Turns
from hwft.data.pipeline import Batches, epochs_of, truncate
from hwft.errors import DataError


@dataclass
class FeedbackExample(Turns):
    """``messages``: the prompt turns; ``completion``: the answer; ``label``: desirable or not."""

    kind = "feedback"
    completion: list[Message] = field(default_factory=list)
    label: bool = False

    def turns(self) -> list[Message]:
        return self.messages + self.completion


@dataclass
class FeedbackItem:
    """A feedback example (kto): prompt + its answer, and the same prompt with another row's
    answer, the mismatched pair KTO's KL baseline is estimated from."""

    sequence: Tokenized  #: the prompt and its own answer, labels on the answer
    mismatched: Tokenized  #: the prompt and another row's answer, labels on that answer
    desirable: bool
    #: (sequence, mismatched) summed log-probabilities under the reference, when precomputed
    reference_logps: tuple[float, float] | None = None

    @property
    def sequences(self) -> tuple[Tokenized, ...]:
        return self.sequence, self.mismatched


def tokenize_answer(renderer: ChatRenderer, example: FeedbackExample, answer: list[Message]) -> Tokenized:
    """The example's prompt turns followed by ``answer`` (its own completion or another row's),
    labels on the answer only."""
    turns = example.messages + answer
    return renderer.tokenize(
        ChatExample(turns, example.tools, source=example.source, media=example.media), len(example.messages)
    )


def feedback_items(
    examples: list[FeedbackExample], renderer: ChatRenderer, max_length: int
) -> tuple[list[FeedbackItem], TokenizeStats]:
    """Each example's prompt with its own answer and with the answer of the example before it.
    Both sequences are cut to ``max_length``; an example whose own answer has no token left is
    dropped (counted)."""
    if len(examples) < 2:
        raise DataError(
            f"kto needs at least 2 feedback rows (its KL baseline pairs each prompt with another row's answer); "
            f"the data has {len(examples)}"
        )
    stats = TokenizeStats()
    items = []
    for i, example in enumerate(examples):
        own = tokenize_answer(renderer, example, example.completion)
        other = tokenize_answer(renderer, example, examples[i - 1].completion)
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


def feedback_batches(data, renderer: ChatRenderer, recipe, ranks: int = 1, capability=None) -> Batches:
    items, stats = feedback_items(data.examples, renderer, recipe.train.max_length)
    iterator, steps = epochs_of(items, recipe, ranks)
    return Batches(iterator, steps, stats, items, False, unit="answers")


def inspect(example: FeedbackExample, renderer: ChatRenderer, max_length: int) -> list[tuple[str, Tokenized]]:
    label = "desirable" if example.label else "undesirable"
    return [(label, tokenize_answer(renderer, example, example.completion))]
