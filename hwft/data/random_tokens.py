"""``data.train: [{random_tokens: {rows, length}}]``: rows of token ids with no file behind them.

For benchmarks at real sizes (configs/bench/): every row is ``length`` ids drawn uniformly, with
replacement, from the tokenizer's ordinary tokens (its vocabulary without the special and added
tokens), seeded by ``train.seed`` and the dataset's place in the recipe, so every arm and every
machine trains on the same rows. Each row is one whole sequence (no padding, no packing
boundaries), every token a label, as the ``tokens`` format's rows are.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from hwft.data.kinds.tokens import TokensExample
from hwft.recipe import RandomTokens, Recipe


@lru_cache(maxsize=4)
def _ordinary_ids(tokenizer_folder: str, trust_remote_code: bool) -> tuple[int, ...]:
    from hwft.models import load_tokenizer

    tokenizer = load_tokenizer(Path(tokenizer_folder), trust_remote_code)
    added = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
    return tuple(i for i in range(len(tokenizer)) if i not in added)


def ordinary_ids(recipe: Recipe) -> tuple[int, ...]:
    """The ids the rows are drawn from: those of model.name's tokenizer (which is model.shape's
    tokenizer too), converted alone for an embedded model not converted yet."""
    from hwft.models import materialise_tokenizer, resolve_model

    model = resolve_model(recipe.model.name, recipe.resolve_path("."), recipe.model.revision)
    return _ordinary_ids(str(materialise_tokenizer(model)), recipe.model.trust_remote_code)


def random_examples(spec: RandomTokens, ids: tuple[int, ...], seed: int, label: str) -> Iterator[TokensExample]:
    rng = random.Random(f"{seed}:random_tokens:{label}")
    for row in range(spec.rows):
        yield TokensExample(rng.choices(ids, k=spec.length), source=f"{label} random row {row}")
