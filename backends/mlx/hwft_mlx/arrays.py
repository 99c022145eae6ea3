"""Typed views of MLX's array, tree and file helpers.

``mlx.utils.tree_flatten`` is typed to return a list *or* a dict (the dict when a destination
dict is passed), ``mx.load`` an array, a dict or a tuple (by file format and
``return_metadata``), and ``array.item()`` a number that may be complex; these functions pin
the one shape each call site here uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten


def flat(tree: Any) -> list[tuple[str, mx.array]]:
    """(dotted path, array) pairs of a parameter tree, in tree order."""
    pairs = tree_flatten(tree)
    assert isinstance(pairs, list)
    return pairs


def load_arrays(path: str | Path) -> dict[str, mx.array]:
    """The named arrays of a .safetensors file."""
    arrays = mx.load(str(path))
    assert isinstance(arrays, dict), f"{path} holds no named arrays"
    return arrays


def number(a: mx.array) -> float:
    """A one-element real array's value."""
    value = a.item()
    assert isinstance(value, (int, float)), f"{value!r} is not a real number"
    return float(value)
