"""Methods: what ``method.objective`` names, each one module, found through a registry.

The built-ins (:mod:`~hwft.methods.sft`, :mod:`~hwft.methods.cpt`, :mod:`~hwft.methods.dpo`,
:mod:`~hwft.methods.orpo`, :mod:`~hwft.methods.simpo`, :mod:`~hwft.methods.kto`, :mod:`~hwft.methods.rm`, :mod:`~hwft.methods.grpo`, :mod:`~hwft.methods.ppo`) register
through ``hwft_register_methods``, the hook a plugin's method uses; the records are in :mod:`hwft.methods.record`. Engines register their
implementation of each method through ``hwft_register_method_implementations``.
"""

from __future__ import annotations

import pluggy

from hwft.methods import cpt, dpo, grpo, kto, orpo, ppo, rm, sft, simpo
from hwft.methods.record import TUNINGS, Cell, Implementation, Method, MethodRegistry

hookimpl = pluggy.HookimplMarker("hwft")

BUILTIN = (sft.METHOD, cpt.METHOD, dpo.METHOD, orpo.METHOD, simpo.METHOD, kto.METHOD, rm.METHOD, grpo.METHOD, ppo.METHOD)

__all__ = ["BUILTIN", "TUNINGS", "Cell", "Implementation", "Method", "MethodRegistry", "registry", "method"]


@hookimpl
def hwft_register_methods(register):
    for method in BUILTIN:
        register(method)


def registry() -> MethodRegistry:
    """The methods of the process-wide plugin host."""
    from hwft.plugins import get_host

    return get_host().methods()


def method(name: str) -> Method:
    """The registered method ``name`` (a RecipeError with a did-you-mean if there is none)."""
    return registry().get(name)
