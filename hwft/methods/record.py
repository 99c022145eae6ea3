"""What a method is to hwft: the record a ``hwft_register_methods`` hook registers, the
implementations engines register for it, and the registry both end up in.

A method is one module of the core (sft, cpt, dpo, orpo, simpo, kto, rm, grpo and ppo are
:mod:`hwft.methods.sft` and its siblings; a plugin's is its own module). Its :class:`Method`
record says everything the core decides about it: the ``method.<name>`` recipe section and its
settings, the kind of example it trains on (hwft.data.kinds: the data formats that make that
kind feed it, and the kind's batcher makes its micro-batches), whether its rows pack, the
metrics it logs, its traits (whether it generates, runs sequence-parallel, how many sequences an
item is, what LLaMA-Factory calls it) and the invariants the conformance suite holds a backend to. What the loss *is* on
an engine lives in that engine, one module per method,
registered as an :class:`Implementation` keyed by (method, engine).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from importlib import import_module
from pathlib import Path
from typing import Any, Protocol

from hwft.errors import RecipeError, SelectionError, did_you_mean

#: The tunings a method can run with, in the recipe's order.
TUNINGS = ("full", "lora", "qlora")


def resolve(target: str | Callable) -> Callable:
    """A callable, or a ``"package.module:name"`` path to one, imported on first use (so that
    registering a method or an engine's implementation of it imports no engine)."""
    if not isinstance(target, str):
        return target
    module, _, name = target.partition(":")
    return getattr(import_module(module), name)


@dataclass(frozen=True)
class Cell:
    """How the conformance suite trains a method: 4 steps of fp32 at a constant learning rate on
    ``rows`` (every step sees them all), so the loss falls on any correct backend."""

    rows: tuple[Mapping[str, Any], ...]  #: the dataset, a few rows of the method's kind
    settings: Mapping[str, Any] = field(default_factory=dict)  #: method.<section> for the cell
    #: (metrics of the 4 steps, the output folder) -> None, raising AssertionError naming what
    #: broke; the loss falling and the result being saved are checked for every method
    invariants: Callable[[list[dict], Path], None] | None = None
    recipe: Mapping[str, Any] = field(default_factory=dict)  #: other recipe sections to set


class LlamaFactoryFile(Protocol):
    """A LLaMA-Factory training YAML as a method's translation reads it (hwft.llamafactory)."""

    def get(self, key: str, default: Any = None) -> Any:
        """The file's value of ``key``, or ``default`` where it has none."""
        ...

    def refuse(self, key: str, why: str) -> RecipeError:
        """The error for a key whose value hwft cannot honour: ``why`` follows the value."""
        ...

    def error(self, text: str) -> RecipeError:
        """An error about the file as a whole (a key it lacks), naming the file."""
        ...

    def note(self, text: str) -> None:
        """A line for the translated recipe's header: how a key was read, where it is not 1:1."""
        ...


@dataclass(frozen=True)
class FromLlamaFactory:
    """What a LLaMA-Factory training YAML means by this method (:mod:`hwft.llamafactory`)."""

    stage: str  #: the ``stage`` that names it: pt, sft, rm, kto, dpo, ppo
    #: under its stage, the ``pref_loss`` values that mean this method (stage dpo: dpo is sigmoid,
    #: ipo and hinge; orpo; simpo); () where the stage alone names it
    pref_loss: tuple[str, ...] = ()
    #: the LLaMA-Factory keys it reads (beside those every method reads); a key that only other
    #: methods read is ignored under this one, as LLaMA-Factory ignores it
    keys: tuple[str, ...] = ()
    #: keys that are refused under any other method (they would change nothing there, and a
    #: user who wrote them meant this method)
    only: tuple[str, ...] = ()
    #: (file, pref_loss or None) -> its ``method.<name>`` settings, raising file.refuse(...) for a
    #: value it cannot honour; None: no settings
    section: Callable[[LlamaFactoryFile, str | None], dict] | None = None
    #: (the translated ``train`` settings, its section) -> None: what it changes there (ppo:
    #: max_length is cutoff_len + max_new_tokens)
    train: Callable[[dict, dict], None] | None = None
    #: a file without ``stage`` means this method (LLaMA-Factory's default stage)
    default: bool = False


def _one(recipe) -> int:
    return 1


@dataclass(frozen=True)
class Method:
    """One training method, as a recipe's ``method.objective`` names it."""

    name: str  #: the method.objective value (sft, cpt, dpo, orpo, simpo, kto, rm, grpo, ppo, or a plugin's)
    description: str  #: one line for `hwft plugins` and the docs
    #: the kind of example it trains on (hwft.data.kinds: chat, text, tokens, preference,
    #: feedback, prompt, or a plugin's); the kind's batcher makes its micro-batches
    kind: str
    #: other kinds it trains on as they are, batched by its own kind's batcher (cpt: tokens rows
    #: with its text rows)
    also: tuple[str, ...] = ()
    #: other kinds of example it also reads, each with the function (or "module:function" path)
    #: that turns one into examples of its own kind (kto: a preference pair into two answers)
    converts: Mapping[str, str | Callable] = field(default_factory=dict)
    #: what the model outputs: ``causal_lm`` (next-token logits: every method that generates) or
    #: ``score`` (one scalar per sequence from a head on the last hidden state: a reward model,
    #: saved so that transformers' AutoModelForSequenceClassification loads it)
    head: str = "causal_lm"
    #: method.<name>: its settings, a :class:`hwft.section.Section` with help text; None: none
    section: type | None = None
    packs: bool = False  #: its rows are token sequences that data.packing may pack
    streams: bool = False  #: data.streaming can feed it
    held_out: bool = False  #: data.eval / data.val_size measure its held-out loss
    #: the statistics it logs besides loss, lr, grad_norm and the throughput figures
    metrics: tuple[str, ...] = ()
    #: (metric, short label) shown beside the loss on the progress line
    headline: tuple[tuple[str, str], ...] = ()
    #: recipe -> whether each step also runs a frozen reference forward (the bench's FLOPs)
    reference: Callable[[Any], bool] | None = None
    #: (recipe, plugin host) -> None, raising a UserError: checks before any weight loads
    check: Callable[[Any, Any], None] | None = None
    cell: Cell | None = None  #: how the conformance suite trains it
    #: its rows may carry images that the engine feeds the model beside the tokens (hwft.vision):
    #: sft's conversations, dpo/orpo/simpo's pairs with image prompts, grpo's image prompts
    media: bool = False
    #: it samples completions while it trains (grpo, ppo): the engine hands its objective the
    #: parallel strategy's ``whole_model`` context to generate in (ZeRO-3 gathers the weights)
    generates: bool = False
    #: its rows may be split over ranks by parallel.sequence_parallel (one sequence per row:
    #: sft, cpt)
    sequence_parallel: bool = False
    #: recipe -> the sequences one item of a micro-batch runs through the model with gradients
    #: (a preference pair 2, a kto answer with its mismatched pair 2, a grpo prompt its
    #: num_generations): ``hwft plan`` counts activations by it
    sequences: Callable[[Any], int] = _one
    #: what a LLaMA-Factory training YAML calls it; None: LLaMA-Factory has no such stage
    llamafactory: FromLlamaFactory | None = None

    def reads(self, kind: str) -> bool:
        """Whether it trains on examples of ``kind``: its own, one it takes as they are, or one it
        converts."""
        return kind == self.kind or kind in self.also or kind in self.converts

    def convert(self, example) -> list:
        """``example`` as examples this method trains on."""
        if example.kind == self.kind or example.kind in self.also:
            return [example]
        return list(resolve(self.converts[example.kind])(example))

    def runs_reference(self, recipe) -> bool:
        return bool(self.reference and self.reference(recipe))

    def rows_per_micro_batch(self, recipe) -> int:
        """Sequences one micro-batch runs through the model with gradients."""
        return recipe.train.micro_batch_size * self.sequences(recipe)


@dataclass(frozen=True)
class Implementation:
    """An engine's implementation of a method, registered through
    ``hwft_register_method_implementations``.

    ``build(setup)`` returns the engine's objective (an :class:`hwft.objective.Objective`
    subclass) from what the engine's loop prepared (``hwft_torch.methods.Setup`` on the torch
    engine, ``hwft_mlx.methods.Setup`` on MLX). It may be a ``"module:function"`` path, so that
    registering imports no engine.
    """

    method: str
    engine: str  #: torch, mlx, or a vendor engine's name
    build: str | Callable
    tunings: tuple[str, ...] = TUNINGS  #: the tunings it supports

    def make(self, setup):
        return resolve(self.build)(setup)


class MethodRegistry:
    """Every registered method by name, and every engine's implementations of them."""

    def __init__(
        self,
        methods: dict[str, Method],
        implementations: dict[tuple[str, str], Implementation],
        owners: dict[str, str] | None = None,
    ):
        self.methods = dict(sorted(methods.items(), key=lambda kv: (_ORDER.get(kv[0], len(_ORDER)), kv[0])))
        self.implementations = implementations
        self.owners = owners or {}  #: method -> the plugin that registered it

    def engines(self, name: str) -> list[str]:
        """The engines that implement method ``name``."""
        return sorted(e for (m, e) in self.implementations if m == name)

    def to_json(self) -> list[dict]:
        return [
            {
                "name": m.name,
                "kind": m.kind,
                "engines": self.engines(m.name),
                "plugin": self.owners.get(m.name),
                "section": m.name if m.section is not None else None,
                "description": m.description,
            }
            for m in self.methods.values()
        ]

    def __contains__(self, name: str) -> bool:
        return name in self.methods

    def __iter__(self):
        return iter(self.methods.values())

    def names(self) -> list[str]:
        return list(self.methods)

    def get(self, name: str) -> Method:
        """The method ``name``, or a RecipeError with a did-you-mean."""
        try:
            return self.methods[name]
        except KeyError:
            raise RecipeError(self.unknown(name)) from None

    def unknown(self, name: str) -> str:
        return (
            f"method.objective: {name!r} is not a registered method{did_you_mean(str(name), self.methods)} "
            f"(registered: {', '.join(self.methods)}; plugins add more through hwft_register_methods)"
        )

    def sections(self) -> dict[str, type]:
        """method.<name> sections by name."""
        return {m.name: m.section for m in self.methods.values() if m.section is not None}

    def implemented(self, engine: str) -> dict[str, Implementation]:
        """The methods an engine implements, by name."""
        return {m: impl for (m, e), impl in self.implementations.items() if e == engine}

    def effective(self, record, engine: str):
        """What a backend on ``engine`` runs: the methods its capability record claims (or, with
        ``record.tunings``, every method the engine implements) that the engine implements, each
        with the tunings both allow. An engine with no implementations registered here runs its
        own training loop, and its record's claims stand as written."""
        implemented = self.implemented(engine)
        if not implemented:
            return record
        claims = dict(record.methods)
        for name in implemented:
            if record.tunings and name in self.methods:
                claims[name] = tuple(dict.fromkeys((*claims.get(name, ()), *record.tunings)))
        methods = {}
        for name, tunings in claims.items():
            if name in implemented:
                allowed = tuple(t for t in TUNINGS if t in tunings and t in implemented[name].tunings)
                if allowed:
                    methods[name] = allowed
        return replace(record, methods=methods)

    def implementation(self, method: str, engine: str) -> Implementation:
        try:
            return self.implementations[(method, engine)]
        except KeyError:
            have = ", ".join(self.implemented(engine)) or "none"
            raise SelectionError(
                f"the {engine} engine does not implement method '{method}' (it implements: {have})"
            ) from None


#: Built-ins first, in the order the docs present them; plugins' methods after, by name.
_ORDER = {name: i for i, name in enumerate(("sft", "cpt", "dpo", "orpo", "simpo", "kto", "rm", "grpo", "ppo"))}


def collect_methods(pm) -> MethodRegistry:
    """What every ``hwft_register_methods`` and ``hwft_register_method_implementations`` hook
    registered; a name registered twice is an error naming both plugins."""
    methods: dict[str, Method] = {}
    owners: dict[str, str] = {}
    implementations: dict[tuple[str, str], Implementation] = {}
    for impl in pm.hook.hwft_register_methods.get_hookimpls():
        plugin = pm.get_name(impl.plugin)

        def register(method: Method, _plugin=plugin) -> None:
            if method.name in methods:
                raise SelectionError(
                    f"method '{method.name}' is registered twice (by plugin '{owners[method.name]}' "
                    f"and by '{_plugin}'); disable one with HWFT_DISABLE_PLUGINS"
                )
            methods[method.name], owners[method.name] = method, _plugin

        impl.function(register=register)

    def register_implementation(implementation: Implementation) -> None:
        implementations[(implementation.method, implementation.engine)] = implementation

    pm.hook.hwft_register_method_implementations(register=register_implementation)
    return MethodRegistry(methods, implementations, owners)
