"""The recipe's datasets, parsed: sources -> rows -> examples, mixed by weight.

Every row is parsed before any weight loads (in memory), so a bad row at the end of a large
file is found in seconds; a streamed dataset is checked on its first rows and the rest as it is
read. Errors name the file, the row and the field.

Mixing: with weights, each dataset contributes ``round(total * w_i / sum(w))`` examples per
epoch, where ``total`` is the sum of all datasets' sizes. A dataset smaller than its share is
repeated (each pass in a new order), a larger one is sub-sampled; the draw is seeded, so the mix
is the same for the same seed. Without weights, datasets are concatenated. A streamed mix draws
each next example from dataset ``i`` with probability ``w_i / sum(w)``, restarting a dataset
that runs out.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hwft.data.formats import DataFormat, Mapping
from hwft.data.kinds import Example
from hwft.data.kinds.chat import Turns
from hwft.data.media import attach_media, locate
from hwft.data.random_tokens import ordinary_ids, random_examples
from hwft.data.reading import iter_rows
from hwft.data.registry import lookup, read_registry
from hwft.errors import DataError, RecipeError, did_you_mean
from hwft.methods import DEFAULT
from hwft.methods.lookup import method, registry
from hwft.recipe import DatasetSpec, RandomTokens, Recipe

#: How many rows of a streamed dataset are parsed up front, before any weight loads.
STREAM_CHECK_ROWS = 64

THINK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


@dataclass
class Source:
    """One dataset of the recipe, resolved: where its rows are and how to read them."""

    label: str  #: "data.train[0]" or "data.train[1] (identity)"
    path: Path | None  #: None for random_tokens
    format: str  #: a format name or "auto"
    mapping: Mapping
    max_samples: int | None
    weight: float | None
    random: RandomTokens | None = None  #: data.train's random_tokens (hwft.data.random_tokens)
    #: where a row's image, video and audio paths are relative to: the registry's folder
    #: (LLaMA-Factory's dataset_dir) for a registry entry, else the data file's folder
    media_dir: Path | None = None


def resolve_sources(recipe: Recipe, specs: list[DatasetSpec], split: str = "train") -> list[Source]:
    out = []
    registry_path = recipe.resolve_path(recipe.data.registry) if recipe.data.registry else None
    registry = read_registry(registry_path) if registry_path and any(s.name for s in specs) else {}
    for i, spec in enumerate(specs):
        label = f"data.{split}[{i}]"
        if spec.name is not None:
            assert registry_path is not None  # DataSpec refuses a registry name without data.registry
            entry = lookup(registry, registry_path, spec.name, recipe.method.objective)
            out.append(
                Source(
                    f"{label} ({spec.name})",
                    entry.path,
                    spec.format if spec.format != "auto" else entry.format,
                    Mapping({**entry.columns, **spec.columns}, {**entry.tags, **spec.tags}),
                    spec.max_samples or entry.max_samples,
                    spec.weight,
                    media_dir=registry_path.parent,
                )
            )
        elif spec.random_tokens is not None:
            out.append(Source(label, None, "tokens", Mapping(), None, spec.weight, spec.random_tokens))
        else:
            assert spec.path is not None  # DatasetSpec holds a path, a name or random_tokens
            out.append(
                Source(
                    label,
                    recipe.resolve_path(spec.path),
                    spec.format,
                    Mapping(spec.columns, spec.tags),
                    spec.max_samples,
                    spec.weight,
                )
            )
    return out


def detect_format(
    row: dict, mapping: Mapping, formats: dict[str, DataFormat], objective: str, where: str
) -> DataFormat:
    """The format a row looks like, preferring formats of the objective's kind (a grpo row with
    a reference ``answer`` is a prompt row, not an alpaca one)."""
    wanted = registry().methods[objective].kind if objective in registry() else None
    ordered = sorted(formats.values(), key=lambda f: f.kind != wanted)
    for fmt in ordered:
        if fmt.detect and fmt.detect(row, mapping):
            return fmt
    raise DataError(
        f"{where}: cannot tell the row's format from its fields {sorted(map(str, row))}; "
        f"set format: to one of {', '.join(formats)} (or map fields with columns:)"
    )


def _strip_think(messages: list | None) -> None:
    for m in messages or []:
        if m["role"] == "assistant" and "<think>" in m["content"]:
            m["content"] = THINK.sub("", m["content"])


def read_examples(
    source: Source,
    formats: dict[str, DataFormat],
    objective: str = DEFAULT,
    reasoning: str = "keep",
    streaming: bool = False,
) -> Iterator[Example]:
    """Parse a source's rows one by one; the first bad row is an error naming it."""
    trains = method(objective)
    wanted = trains.kind
    if source.path is None:
        raise DataError(f"{source.label}: no file to read (random_tokens rows are made, not read)")
    rows = iter_rows(source.path, streaming)
    if source.max_samples:
        rows = itertools.islice(rows, source.max_samples)
    fmt = None
    if source.format != "auto":
        fmt = formats.get(source.format)
        if fmt is None:
            raise DataError(
                f"{source.label} ({source.path}): unknown data format '{source.format}'"
                f"{did_you_mean(source.format, formats)} "
                f"(known: auto, {', '.join(formats)})"
            )
    for file, number, row in rows:
        where = f"{file} row {number}"
        if fmt is None:
            fmt = detect_format(row, source.mapping, formats, objective, where)
        try:
            example = fmt.parse(row, source.mapping)
            if isinstance(example, Turns):
                attach_media(example, row, source.mapping)
        except ValueError as exc:
            raise DataError(f"{where} ({fmt.name} format): {exc}") from None
        if isinstance(example, Turns) and example.media:
            folder = source.media_dir or (source.path.parent if source.path.is_file() else source.path)
            locate(example.media, folder, where)
        if not trains.reads(example.kind):
            raise DataError(
                f"{where}: a {example.kind} row ({fmt.name} format), but objective '{objective}' trains "
                f"on {wanted} rows ({', '.join(f.name for f in formats.values() if trains.reads(f.kind))}); "
                "set format: or method.objective:"
            )
        if reasoning == "strip":
            for turns in (getattr(example, name, None) for name in ("messages", "chosen", "rejected", "completion")):
                _strip_think(turns)
        example.source = where
        for converted in trains.convert(example):
            converted.source = where
            yield converted


def load_examples(
    path: Path,
    format: str = "auto",
    formats: dict[str, DataFormat] | None = None,
    columns: dict | None = None,
    max_samples: int | None = None,
    tags: dict | None = None,
    objective: str = DEFAULT,
    reasoning: str = "keep",
) -> list[Example]:
    """Every example of one file or folder (a convenience for scripts and tests)."""
    if formats is None:
        from hwft.plugins import get_host

        formats = get_host().data_formats()
    source = Source(str(path), Path(path), format, Mapping(columns or {}, tags or {}), max_samples, None)
    return list(read_examples(source, formats, objective, reasoning))


def check_settings(recipe: Recipe) -> None:
    """Data settings that do not fit together."""
    if recipe.data.streaming and not recipe.train.max_steps:
        raise RecipeError("data.streaming needs train.max_steps: a stream has no known length")
    chosen, methods = method(recipe.method.objective), registry()

    def which(flag: str) -> str:
        return " and ".join(m.name for m in methods if getattr(m, flag))

    if recipe.data.streaming and not chosen.streams:
        raise RecipeError(
            f"data.streaming applies to {which('streams')}, not to {chosen.name} "
            f"({chosen.kind} rows are read into memory); remove it"
        )
    if recipe.data.eval and not chosen.held_out:
        raise RecipeError(
            f"data.eval measures the loss of {which('held_out')} runs; objective {chosen.name} "
            "has no held-out loss yet; remove data.eval"
        )
    if recipe.data.val_size and (recipe.data.streaming or not chosen.held_out):
        raise RecipeError(
            f"data.val_size holds out in-memory {which('held_out')} examples; it cannot split a "
            f"stream or {chosen.name} rows; remove it"
        )
    if recipe.train.eval_every and not (recipe.data.eval or recipe.data.val_size):
        raise RecipeError("train.eval_every needs data.eval or data.val_size (the held-out examples to evaluate on)")
    for split, specs in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        for i, spec in enumerate(specs):
            if spec.random_tokens is not None and not chosen.reads("tokens"):
                readers = " and ".join(m.name for m in methods if m.reads("tokens"))
                raise RecipeError(
                    f"data.{split}[{i}].random_tokens: rows of token ids, every one a label, train "
                    f"{readers}; objective {chosen.name} trains on {chosen.kind} rows"
                )
    if recipe.data.packing and not chosen.packs:
        raise RecipeError(f"data.packing applies to {which('packs')} rows, not to {chosen.name}; remove it")


def mix(parts: list[list[Example]], weights: list[float], seed: int) -> list[Example]:
    """Each part's share of the epoch is proportional to its weight (see the module docstring)."""
    total, wsum = sum(len(p) for p in parts), sum(weights)
    out: list[Example] = []
    for i, (part, weight) in enumerate(zip(parts, weights, strict=True)):
        quota = max(1, round(total * weight / wsum))
        rng = random.Random(f"{seed}:mix:{i}")
        while quota > 0:
            order = list(range(len(part)))
            rng.shuffle(order)
            out += [part[j] for j in order[:quota]]
            quota -= len(order)
    return out


@dataclass
class TrainData:
    """The training data as the core hands it to a backend.

    In memory, ``examples`` holds every example (already mixed). Streaming, ``examples`` holds
    only the rows checked up front, and :meth:`stream` reads the files lazily and endlessly.
    """

    sources: list[Source]
    examples: list[Example]
    streaming: bool
    stream_factory: Callable[[int], Iterator[Example]] | None = None
    eval_examples: list[Example] = field(default_factory=list)  #: data.eval, in memory

    def stream(self, seed: int) -> Iterator[Example]:
        if self.stream_factory is None:
            raise RuntimeError("not a streamed dataset")
        return self.stream_factory(seed)

    def describe(self) -> str:
        held_out = f", {len(self.eval_examples)} held-out" if self.eval_examples else ""
        if self.streaming:
            return f"{len(self.sources)} streamed dataset(s){held_out}"
        return f"{len(self.examples)} training examples{held_out}"


def load_train_data(recipe: Recipe, formats: dict[str, DataFormat]) -> TrainData:
    check_settings(recipe)
    sources = resolve_sources(recipe, recipe.data.train)
    weights = [s.weight for s in sources]

    def read(source: Source, streaming: bool = False) -> Iterator[Example]:
        if source.random is not None:
            return random_examples(source.random, ordinary_ids(recipe), recipe.train.seed, source.label)
        return read_examples(source, formats, recipe.method.objective, recipe.data.reasoning, streaming)

    held_out = [e for s in resolve_sources(recipe, recipe.data.eval, "eval") for e in read(s)]
    if recipe.data.eval and not held_out:
        raise DataError("data.eval holds no examples")
    if recipe.data.streaming:
        checked = []
        for s in sources:  # parse the first rows now: a wrong format fails before weights load
            checked += list(itertools.islice(read(s, True), STREAM_CHECK_ROWS))

        def factory(seed: int) -> Iterator[Example]:
            return interleave([lambda s=s: read(s, True) for s in sources], weights, seed)

        return TrainData(sources, checked, True, factory, held_out)
    parts = [list(read(s)) for s in sources]
    if recipe.data.val_size:
        parts, validation = split_validation(parts, recipe.data.val_size, recipe.train.seed)
        held_out += validation
    given = [w for w in weights if w is not None]  # every dataset's weight, or none (DataSpec)
    if given:
        examples = mix(parts, given, recipe.train.seed)
    else:
        examples = [e for part in parts for e in part]
    if not examples:
        raise DataError("the training data holds no examples")
    return TrainData(sources, examples, False, eval_examples=held_out)


def split_validation(parts: list[list[Example]], size: float, seed: int) -> tuple[list[list[Example]], list[Example]]:
    """Hold out ``size`` of all examples (a fraction below 1, else a count), drawn with ``seed``
    across every dataset before mixing, so no held-out example is also trained on."""
    where = [(i, j) for i, part in enumerate(parts) for j in range(len(part))]
    count = round(len(where) * size) if size < 1 else int(size)
    if not 1 <= count < len(where):
        raise DataError(
            f"data.val_size {size} holds out {count} of {len(where)} training examples; "
            "give a fraction or count that leaves at least one example on each side"
        )
    chosen = set(random.Random(f"{seed}:val_size").sample(where, count))
    kept = [[e for j, e in enumerate(part) if (i, j) not in chosen] for i, part in enumerate(parts)]
    return kept, [parts[i][j] for i, j in sorted(chosen)]


def interleave(
    readers: list[Callable[[], Iterator[Example]]], weights: list[float | None], seed: int
) -> Iterator[Example]:
    """Endless examples from streamed sources (each reader starts one pass over a source): in
    turn without weights, else each next example drawn from source i with probability
    w_i / sum(w), a source that runs out starting over."""
    given = [w for w in weights if w is not None]  # every reader's weight, or none (DataSpec)
    if not given:
        while True:
            for read in readers:
                yield from read()

    def endless(read: Callable[[], Iterator[Example]]) -> Iterator[Example]:
        while True:
            yield from read()

    streams = [endless(r) for r in readers]
    rng = random.Random(f"{seed}:interleave")
    while True:
        (stream,) = rng.choices(streams, weights=given)
        yield next(stream)
