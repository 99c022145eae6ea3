"""The hooks a plugin may implement. Built-ins use exactly these, through the same entry points.

Every hook takes a ``register`` callback (the simonw/llm style), so a hook's body is a few
``register(...)`` calls and new keyword arguments can be added without breaking plugins.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("hwft")


@hookspec
def hwft_register_backends(register):
    """Register device backends: ``register(hwft.records.Backend(...))``."""


@hookspec
def hwft_register_data_formats(register):
    """Register row formats: ``register(name, parse, detect=None)``; see hwft.data.formats."""
