"""The built-in methods, registered through ``hwft_register_methods`` as a plugin's would be
(the plugin host loads this module by name, as it loads an entry point)."""

from __future__ import annotations

import pluggy

from hwft.methods import cpt, dpo, grpo, kto, orpo, ppo, rm, sft, simpo

hookimpl = pluggy.HookimplMarker("hwft")

BUILTIN = (
    sft.METHOD,
    cpt.METHOD,
    dpo.METHOD,
    orpo.METHOD,
    simpo.METHOD,
    kto.METHOD,
    rm.METHOD,
    grpo.METHOD,
    ppo.METHOD,
)


@hookimpl
def hwft_register_methods(register):
    for method in BUILTIN:
        register(method)
