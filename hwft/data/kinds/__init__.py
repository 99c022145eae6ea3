"""Data kinds: what a parsed row is, one record each, found through a registry.

============ ================================================== ======================= =====================
kind         its example (:mod:`hwft.data.kinds.<kind>`)        rendered as             built-in methods
============ ================================================== ======================= =====================
chat         a conversation ending with the assistant           a token sequence        sft
text         plain text                                         token sequences         cpt
tokens       token ids, tokenised already                       a token sequence        cpt
preference   prompt turns + a chosen and a rejected answer      a pair of sequences     dpo, orpo, simpo, rm
feedback     prompt turns + one answer, desirable or not        an answer and another   kto
prompt       prompt turns + an optional reference answer        prompt ids              grpo, ppo
============ ================================================== ======================= =====================

A :class:`DataKind` record holds a kind's typed example (a dataclass deriving
:class:`Example`), how an example renders (``encode``, for kinds whose examples are token
sequences with labels: these pack, are held out by data.eval and scored by ``hwft eval``) and
its batcher: ``(TrainData, ChatRenderer, Recipe, ranks, Capability) -> Batches``, the
micro-batches of a run. A data format (:mod:`hwft.data.formats`) says which kind it makes; a
method (:mod:`hwft.methods`) which kind it trains on. The built-ins register through
``hwft_register_data_kinds``, the hook a plugin's kind uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hwft.errors import UserError
from hwft.methods.record import resolve


@dataclass
class Example:
    """What every kind's example has: where it came from. A kind's example is a dataclass
    deriving this one, with its ``kind`` name as a class attribute."""

    kind: ClassVar[str] = ""
    source: str = field(default="", kw_only=True)  #: "file.jsonl row 12", set by the loader

    def prompt_and_reference(self) -> tuple[list[dict], str] | None:
        """The turns before an answer and that answer (what ``hwft eval`` generates against),
        where the example has both; None elsewhere."""
        return None


@dataclass(frozen=True)
class DataKind:
    """One kind of example, as ``hwft_register_data_kinds`` registers it."""

    name: str  #: what formats make and methods train on: chat, text, tokens, preference, feedback, prompt
    description: str  #: one line for `hwft plugins` and the docs
    example: type  #: its example class (an :class:`Example` dataclass whose ``kind`` is ``name``)
    #: (TrainData, ChatRenderer, Recipe, ranks, Capability) -> hwft.data.pipeline.Batches: the
    #: micro-batches of a method that trains on this kind; a callable or a "module:function" path
    batches: str | Callable
    #: (example, ChatRenderer, max_length, TokenizeStats) -> [Tokenized]: the token sequences of
    #: one example, labels marked, truncated or split, counted; None where the kind's examples
    #: are not sequences of their own (a pair, a prompt). Sequence kinds pack, are held out
    #: (data.eval, data.val_size) and are scored by hwft eval.
    encode: str | Callable | None = None
    #: (example, ChatRenderer, max_length) -> [(part, Tokenized)]: what `hwft data inspect`
    #: shows of one example (a pair's chosen and rejected); None: its ``encode``
    inspect: str | Callable | None = None

    @property
    def sequences(self) -> bool:
        """Whether its examples render to token sequences with labels (``encode``)."""
        return self.encode is not None

    def make_batches(self, data, renderer, recipe, ranks: int = 1, capability=None):
        return resolve(self.batches)(data, renderer, recipe, ranks, capability)

    def encode_one(self, example, renderer, max_length: int, stats) -> list:
        if self.encode is None:
            raise UserError(f"{example.source}: {self.name} examples are not token sequences")
        return resolve(self.encode)(example, renderer, max_length, stats)

    def shown(self, example, renderer, max_length: int) -> list:
        if self.inspect is not None:
            return resolve(self.inspect)(example, renderer, max_length)
        from hwft.data.chat import TokenizeStats

        return [("", t) for t in self.encode_one(example, renderer, max_length, TokenizeStats())]


@dataclass
class DataKinds:
    """Every registered kind by name."""

    by_name: dict[str, DataKind] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> DataKind:
        try:
            return self.by_name[name]
        except KeyError:
            raise UserError(
                f"no data kind named {name!r} is registered (registered: {', '.join(self.by_name)}; "
                "plugins add more through hwft_register_data_kinds)"
            ) from None

    def of(self, example: Any) -> DataKind:
        """The record of ``example``'s kind."""
        return self.get(example.kind)

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def to_json(self) -> list[dict]:
        return [
            {
                "name": k.name,
                "example": k.example.__name__,
                "sequences": k.sequences,
                "plugin": self.owners.get(k.name),
                "description": k.description,
            }
            for k in self.by_name.values()
        ]


def collect_kinds(pm) -> DataKinds:
    """Every record registered through ``hwft_register_data_kinds``; a name registered twice is
    an error naming both plugins."""
    found = DataKinds()
    for impl in pm.hook.hwft_register_data_kinds.get_hookimpls():
        plugin = pm.get_name(impl.plugin) or "?"

        def register(kind: DataKind, _plugin=plugin) -> None:
            if not isinstance(kind, DataKind):
                raise UserError(
                    f"plugin {_plugin}: hwft_register_data_kinds registered {type(kind).__name__}, "
                    "not an hwft.data.kinds.DataKind"
                )
            if kind.name in found.by_name:
                raise UserError(
                    f"data kind '{kind.name}' is registered twice (by plugin '{found.owners[kind.name]}' "
                    f"and by '{_plugin}'); disable one with HWFT_DISABLE_PLUGINS"
                )
            if getattr(kind.example, "kind", None) != kind.name:
                raise UserError(
                    f"plugin {_plugin}: data kind '{kind.name}': its example class "
                    f"{kind.example.__name__} says kind {getattr(kind.example, 'kind', None)!r}"
                )
            found.by_name[kind.name] = kind
            found.owners[kind.name] = _plugin

        impl.function(register=register)
    return found
