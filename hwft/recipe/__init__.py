"""The recipe: what to train, never where.

- :mod:`hwft.recipe.schema`: the sections, typed, with help text (``hwft.reference`` renders
  them as docs/recipe.md);
- :mod:`hwft.recipe.errors`: pydantic's errors as one message naming each key;
- :mod:`hwft.recipe.overrides`: ``key.path=value`` overrides and the sections' shorthands;
- :mod:`hwft.recipe.loading`: a file (or a LLaMA-Factory YAML) read, overridden and validated.

Load with :func:`load_recipe`, which also applies ``key.path=value`` overrides from the CLI.
"""

from hwft.recipe.errors import format_validation_error
from hwft.recipe.loading import load_recipe, parse_recipe_text, recipe_from_dict
from hwft.recipe.overrides import SHORTHANDS, apply_override, set_key
from hwft.recipe.schema import (
    ADAPTER_TUNINGS,
    BenchSpec,
    DatasetSpec,
    DataSpec,
    EvalSpec,
    FreezeSpec,
    KernelSpec,
    LoraSpec,
    MethodSpec,
    ModelSpec,
    OutputSpec,
    ParallelSpec,
    Precision,
    QLoraSpec,
    RandomTokens,
    Recipe,
    TrainSpec,
    Tuning,
)

__all__ = [
    "ADAPTER_TUNINGS",
    "SHORTHANDS",
    "BenchSpec",
    "DataSpec",
    "DatasetSpec",
    "EvalSpec",
    "FreezeSpec",
    "KernelSpec",
    "LoraSpec",
    "MethodSpec",
    "ModelSpec",
    "OutputSpec",
    "ParallelSpec",
    "Precision",
    "QLoraSpec",
    "RandomTokens",
    "Recipe",
    "TrainSpec",
    "Tuning",
    "apply_override",
    "format_validation_error",
    "load_recipe",
    "parse_recipe_text",
    "recipe_from_dict",
    "set_key",
]
