"""Kernels: fused operators by id, registered per engine, backend and model family through the
``hwft_register_kernels`` hook, chosen by the recipe's ``kernels`` section.

A :class:`Kernel` record names one implementation of one *slot* (what it replaces: rms_norm,
rope, swiglu, cross_entropy, projections, attention) on one engine, the backends it runs on,
the family fast path it needs (:mod:`hwft.families`), the modules it needs installed, and
whether the backend recommends it. Its ``implementation`` is a class (or a ``"module:Class"``
path, imported only when a run applies it) in the shape of LLaMA-Factory v1's kernel classes::

    class MyKernel:
        def __init__(self, job): ...          # the run (hwft.job.Job): recipe, log
        def before_load(self) -> None: ...     # optional: before the weights load
        def needed(self, tuning) -> bool: ...  # optional: whether the run has work for it
        def check(self, model) -> str | None:  # why it cannot apply to this model, or None
        def apply(self, model) -> str:         # patch the model; what was done, for the log
        def undo(self) -> None: ...            # optional: put back what apply changed globally

The recipe chooses (:func:`choose`): ``kernels.use`` is ``auto`` (every recommended kernel that
runs on the backend and whose modules are installed) or a list of ids; the recipe's switches
(``fused_rms_norm``, ``fused_rope``, ``fused_swiglu``, ``fused_cross_entropy``,
``fused_projections``, ``attention``) name a slot: ``true`` (or the attention's name) adds the
backend's kernel for that slot, ``false`` removes it. A named kernel that cannot run is refused
before anything loads; a recommended one that does not fit the model is logged and skipped. A
backend's fused kernels are exactly the kernels registered for it (plugin API 2.0: there is no
other way to claim or apply one).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hwft.errors import UserError, did_you_mean
from hwft.methods.record import resolve

#: What a kernel can replace (the attention slot is chosen by ``kernels.attention``).
SLOTS = ("rms_norm", "rope", "swiglu", "cross_entropy", "projections", "attention")
#: kernels.<switch> -> the slot it switches
SWITCHES = {f"fused_{slot}": slot for slot in SLOTS if slot != "attention"}


@dataclass(frozen=True)
class Kernel:
    """One implementation of one slot on one engine."""

    id: str  #: what kernels.use names (liger_rms_norm, npu_rms_norm, hwft_chunked_cross_entropy, ...)
    slot: str  #: what it replaces (:data:`SLOTS`)
    engine: str  #: the engine it runs in
    description: str
    #: the kernel class (see the module docstring), or a "module:Class" path to it
    implementation: str | Callable
    backends: tuple[str, ...] = ()  #: the backends it runs on; () every backend of its engine
    path: str | None = None  #: the family fast path it needs (hwft.families.Family.paths)
    requires: tuple[str, ...] = ()  #: modules it imports (checked without importing them)
    install: str = ""  #: how to install them, for the message when they are missing
    recommended: bool = False  #: kernels.use: auto takes it

    def runs_on(self, backend: str, engine: str) -> bool:
        return self.engine == engine and (not self.backends or backend in self.backends)

    def missing(self) -> list[str]:
        """The required modules that are not installed."""
        out = []
        for name in self.requires:
            try:
                found = importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                out.append(name)
        return out

    def make(self, job) -> Any:
        return resolve(self.implementation)(job)


@dataclass
class Kernels:
    """Every registered kernel by id, in registration order."""

    by_id: dict[str, Kernel] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)

    def on(self, backend: str, engine: str) -> list[Kernel]:
        """The kernels that run on ``backend`` (of ``engine``)."""
        return [k for k in self.by_id.values() if k.runs_on(backend, engine)]

    def slots(self, backend: str, engine: str) -> tuple[str, ...]:
        """The slots some installed kernel fills on ``backend``: its fused kernels."""
        return tuple(dict.fromkeys(k.slot for k in self.on(backend, engine) if not k.missing()))

    def to_json(self) -> list[dict]:
        return [
            {
                "id": k.id,
                "slot": k.slot,
                "engine": k.engine,
                "backends": list(k.backends),
                "path": k.path,
                "recommended": k.recommended,
                "installed": not k.missing(),
                "plugin": self.owners.get(k.id),
                "description": k.description,
            }
            for k in self.by_id.values()
        ]


@dataclass(frozen=True)
class Chosen:
    """What a recipe chose on one backend: the kernels in the order they apply, and the ids the
    recipe asked for by name (or by a switch), which must apply or fail the run."""

    kernels: tuple[Kernel, ...] = ()
    named: frozenset[str] = frozenset()

    def ids(self) -> list[str]:
        return [k.id for k in self.kernels]

    def in_slot(self, slot: str) -> Kernel | None:
        return next((k for k in self.kernels if k.slot == slot), None)


def choose(recipe, backend: str, engine: str, registry: Kernels) -> tuple[Chosen, list[str]]:
    """(the kernels ``recipe`` runs on ``backend``, the problems that refuse it). A problem
    reads as what the backend cannot do: "kernels.use liger_rms_norm (it runs on cuda, rocm)"."""
    k = recipe.kernels
    here = registry.on(backend, engine)
    problems: list[str] = []
    named: list[Kernel] = []
    if k.use == "auto":
        picked = [kernel for kernel in here if kernel.recommended and not kernel.missing()]
    else:
        picked = []
        for name in k.use:
            kernel = registry.by_id.get(name)
            if kernel is None:
                known = list(registry.by_id)
                problems.append(
                    f"kernels.use {name} (no kernel has that id{did_you_mean(name, known)}; "
                    f"ids here: {', '.join(x.id for x in here) or 'none'})"
                )
            elif not kernel.runs_on(backend, engine):
                where = ", ".join(kernel.backends) or f"the {kernel.engine} engine"
                problems.append(f"kernels.use {name} (it runs on {where})")
            elif kernel.missing():
                problems.append(
                    f"kernels.use {name} (it needs {', '.join(kernel.missing())}"
                    f"{': ' + kernel.install if kernel.install else ''})"
                )
            else:
                picked.append(kernel)
                named.append(kernel)
    for switch, slot in SWITCHES.items():
        setting = getattr(k, switch)
        if setting is False:
            picked = [kernel for kernel in picked if kernel.slot != slot]
        elif setting is True and not any(kernel.slot == slot for kernel in picked):
            kernel = next((x for x in here if x.slot == slot and not x.missing()), None)
            if kernel is not None:
                picked.append(kernel)
                named.append(kernel)
                continue
            absent = next((x for x in here if x.slot == slot), None)
            if absent is not None:
                problems.append(
                    f"kernels.{switch} ({absent.id} needs {', '.join(absent.missing())}"
                    f"{': ' + absent.install if absent.install else ''})"
                )
            else:
                have = [s for s in registry.slots(backend, engine) if s != "attention"]
                problems.append(f"kernels.{switch} (it has: {', '.join(have) or 'no fused kernels'})")
    if k.attention not in ("auto", "eager", "sdpa"):
        kernel = next((x for x in here if x.slot == "attention" and x.id == k.attention), None)
        if kernel is not None and kernel not in picked:
            picked.append(kernel)
            named.append(kernel)
    one_per_slot: dict[str, Kernel] = {}
    for kernel in picked:
        if kernel.slot in one_per_slot:
            problems.append(
                f"kernels.use {kernel.id} (kernel {one_per_slot[kernel.slot].id} already fills its slot, {kernel.slot})"
            )
            continue
        one_per_slot[kernel.slot] = kernel
    order = {slot: i for i, slot in enumerate(SLOTS)}
    chosen = sorted(one_per_slot.values(), key=lambda x: order.get(x.slot, len(order)))
    return Chosen(tuple(chosen), frozenset(x.id for x in named)), problems


class Applied:
    """The kernels a run applied: each slot's live kernel object, and how to undo them all."""

    def __init__(self):
        self.by_slot: dict[str, Any] = {}
        self.lines: list[str] = []

    def get(self, slot: str):
        """The applied kernel object of ``slot`` (its class's instance), or None."""
        return self.by_slot.get(slot)

    def undo(self) -> None:
        for kernel in reversed(list(self.by_slot.values())):
            undo = getattr(kernel, "undo", None)
            if undo is not None:
                undo()
        self.by_slot.clear()


def prepare(job, chosen: Chosen) -> dict[str, Any]:
    """The chosen kernels' objects for ``job``, each ``before_load`` called (before the weights load)."""
    made = {}
    for kernel in chosen.kernels:
        obj = kernel.make(job)
        if hasattr(obj, "before_load"):
            obj.before_load()
        made[kernel.id] = obj
    return made


def apply(job, model, chosen: Chosen, made: dict[str, Any], family, tuning: str) -> Applied:
    """Apply each chosen kernel to ``model`` (of ``family``: hwft.families.Family), trained with
    ``tuning`` (the one that runs, after any fallback). A kernel the run has no use for (its
    ``needed(tuning)`` is false) is left out quietly; one the recipe named that cannot apply
    fails the run in one line; a recommended one is skipped with a line in the log saying why."""
    applied = Applied()
    for kernel in chosen.kernels:
        obj = made[kernel.id]
        if hasattr(obj, "needed") and not obj.needed(tuning):
            continue
        why = None
        if kernel.path and not family.has(kernel.path):
            why = f"model_type {family.model_type or '?'} has no {kernel.path} path on the {kernel.engine} engine"
        if why is None:
            why = obj.check(model)
        if why is not None:
            if kernel.id in chosen.named:
                raise UserError(
                    f"kernels: {kernel.id} cannot apply: {why}; leave it out of kernels.use (or switch it off)"
                )
            job.log(f"kernels: {kernel.id} off: {why}")
            continue
        line = obj.apply(model)
        applied.by_slot[kernel.slot] = obj
        if line:
            applied.lines.append(line)
    return applied


def collect_kernels(pm) -> Kernels:
    """Every record registered through ``hwft_register_kernels``; an id registered twice is an
    error naming both plugins."""
    found = Kernels()
    for impl in pm.hook.hwft_register_kernels.get_hookimpls():
        plugin = pm.get_name(impl.plugin) or "?"

        def register(kernel: Kernel, _plugin=plugin) -> None:
            if not isinstance(kernel, Kernel):
                raise UserError(
                    f"plugin {_plugin}: hwft_register_kernels registered {type(kernel).__name__}, "
                    "not an hwft.kernels.Kernel"
                )
            if kernel.slot not in SLOTS:
                raise UserError(
                    f"plugin {_plugin}: kernel {kernel.id} fills slot {kernel.slot!r}; slots: {', '.join(SLOTS)}"
                )
            if kernel.id in found.by_id:
                raise UserError(
                    f"kernel '{kernel.id}' is registered twice (by plugin '{found.owners[kernel.id]}' "
                    f"and by '{_plugin}'); disable one with HWFT_DISABLE_PLUGINS"
                )
            found.by_id[kernel.id] = kernel
            found.owners[kernel.id] = _plugin

        impl.function(register=register)
    return found
