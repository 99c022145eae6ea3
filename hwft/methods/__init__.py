"""Methods: what ``method.objective`` names, each one module, found through a registry.

The records are in :mod:`hwft.methods.record`; the built-ins (:mod:`~hwft.methods.sft`,
:mod:`~hwft.methods.cpt`, :mod:`~hwft.methods.dpo`, :mod:`~hwft.methods.orpo`,
:mod:`~hwft.methods.simpo`, :mod:`~hwft.methods.kto`, :mod:`~hwft.methods.rm`,
:mod:`~hwft.methods.grpo`, :mod:`~hwft.methods.ppo`) register through ``hwft_register_methods``
from :mod:`hwft.methods.builtin`, the hook a plugin's method uses. Engines register their
implementation of each method through ``hwft_register_method_implementations``. The registered
ones are looked up through :mod:`hwft.methods.lookup`.
"""

from __future__ import annotations

from hwft.methods.record import TUNINGS, Cell, FromLlamaFactory, Implementation, Method, MethodRegistry

__all__ = ["DEFAULT", "TUNINGS", "Cell", "FromLlamaFactory", "Implementation", "Method", "MethodRegistry"]

#: The method a recipe trains when it names none (``method.objective``'s default), and the one
#: a conformance check trains where it needs a plain language-modelling run.
DEFAULT = "sft"
