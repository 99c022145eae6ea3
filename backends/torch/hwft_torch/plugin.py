"""Entry point of the torch backend (group ``hwft``, name ``torch``), as a vendor writes one."""

from __future__ import annotations

import pluggy

from hwft_torch import devices

HWFT_PLUGIN_API = "1.0"
hookimpl = pluggy.HookimplMarker("hwft")


@hookimpl
def hwft_register_backends(register):
    for backend in devices.backends():
        register(backend)
