"""Entry point of hwft-lsft (group ``hwft``, name ``lsft``)."""

from __future__ import annotations

import pluggy

from hwft.methods import Implementation
from hwft_lsft.method import METHOD

HWFT_PLUGIN_API = "2.0"
hookimpl = pluggy.HookimplMarker("hwft")


@hookimpl
def hwft_register_methods(register):
    register(METHOD)


@hookimpl
def hwft_register_method_implementations(register):
    # a path, so that registering imports no engine (torch loads when a run builds the loss)
    register(Implementation("lsft", "torch", "hwft_lsft.torch_objective:build"))
