"""Entry point of the MLX backend (group ``hwft``, name ``mlx``), as a vendor writes one."""

from __future__ import annotations

import pluggy

from hwft_mlx import device

HWFT_PLUGIN_API = "1.0"
hookimpl = pluggy.HookimplMarker("hwft")


@hookimpl
def hwft_register_backends(register):
    register(device.backend())
