"""What the kinds whose examples are token sequences share (chat, text, tokens): tokenising a
list of them, and their micro-batches. Each example is encoded by its own kind's record
(``DataKind.encode``), so a run may mix them (cpt on text and tokens rows).

examples -> tokens and masks -> rows (packed or not) -> seeded micro-batches per epoch;
streaming: example stream -> windows of ``shuffle_buffer`` -> the same per window.
"""

from __future__ import annotations

from hwft.data.batching import batches_per_epoch, make_rows, micro_batches, streamed_batches, total_steps
from hwft.data.chat import ChatRenderer, Tokenized, TokenizeStats, empty_error
from hwft.data.kinds import DataKinds, Example
from hwft.data.pipeline import Batches, packing_enabled
from hwft.errors import DataError


def registered() -> DataKinds:
    """The data kinds of the process-wide plugin host."""
    from hwft.plugins import get_host

    return get_host().data_kinds()


def encode(
    example: Example, renderer: ChatRenderer, max_length: int, stats: TokenizeStats, registry: DataKinds | None = None
) -> list[Tokenized]:
    """The sequences of one example, by its kind's record."""
    return (registry or registered()).of(example).encode_one(example, renderer, max_length, stats)


def tokenize_examples(
    examples: list[Example], renderer: ChatRenderer, max_length: int
) -> tuple[list[Tokenized], TokenizeStats]:
    """Tokenise, mask and truncate; examples with nothing left to learn are dropped."""
    stats = TokenizeStats()
    registry = registered()
    out: list[Tokenized] = []
    for example in examples:
        out += encode(example, renderer, max_length, stats, registry)
    if not out:
        raise empty_error(stats, max_length)
    return out, stats


def held_out_rows(examples: list[Example], renderer: ChatRenderer, max_length: int) -> list:
    """data.eval's examples, tokenised like the training rows, one example per row."""
    if not examples:
        return []
    tokenized, _ = tokenize_examples(examples, renderer, max_length)
    return make_rows(tokenized, max_length, packing=False)


def sequence_batches(data, renderer: ChatRenderer, recipe, ranks: int = 1, capability=None) -> Batches:
    """Token sequences with their label masks, packed where packing is on, in seeded
    micro-batches per epoch; streamed in windows of ``shuffle_buffer``. With several ranks, an
    optimizer step takes ``gradient_accumulation_steps`` micro-batches on each (see
    hwft.distributed), so an epoch has ``ranks`` times fewer steps."""
    t = recipe.train
    packing = packing_enabled(recipe, capability) if capability is not None else bool(recipe.data.packing)
    first = next((e for e in data.examples if getattr(e, "media", None)), None)
    if first is not None:
        # Rows with images or videos pack where the family's record says its forward takes packed
        # rows (hwft.vision: Qwen's, each example's own 3-D positions; the engine proves it at
        # load time) and the engine packs them (MLX: mlx-vlm's forward takes no packed mask).
        from hwft.data.media import described
        from hwft.vision import packing_families

        vision = getattr(renderer, "vision", None)
        family = vision.family if vision is not None else None
        packs = family is not None and family.packs and getattr(capability, "media_packing", True)
        if not packs:
            if recipe.data.packing:
                which = family.description if family is not None else "this model"
                raise DataError(
                    f"data.packing: true, but {first.source} has {described(first.media)}, and {which}'s rows with "
                    f"images or videos do not pack here ({', '.join(packing_families())} do on the torch engine); "
                    "set data.packing: false (or leave it unset)"
                )
            packing = False
    if getattr(renderer, "vision", None) is not None and recipe.data.packing is None:
        # A vision-language model on an engine that packs none of its rows (MLX: mlx-vlm's forward)
        packing = packing and getattr(capability, "media_packing", True)
    group = recipe.data.group_by_length and not packing
    registry = registered()
    if data.streaming:
        for example in data.examples:  # the rows checked up front tokenise, or fail now
            encode(example, renderer, t.max_length, TokenizeStats(), registry)
        # Counts over an endless stream would only grow; each example gets a throwaway tally.
        iterator = streamed_batches(
            data.stream(t.seed),
            lambda example: encode(example, renderer, t.max_length, TokenizeStats(), registry),
            t.max_length,
            packing,
            t.micro_batch_size,
            t.seed,
            recipe.data.shuffle_buffer,
            group,
        )
        return Batches(iterator, t.max_steps, None, None, packing)
    tokenized, stats = tokenize_examples(data.examples, renderer, t.max_length)
    rows = make_rows(tokenized, t.max_length, packing)
    per_epoch = batches_per_epoch(len(rows), t.micro_batch_size, group)
    steps = total_steps(per_epoch, t.gradient_accumulation_steps * ranks, t.epochs, t.max_steps)
    return Batches(micro_batches(rows, t.micro_batch_size, t.seed, group), steps, stats, rows, packing)
