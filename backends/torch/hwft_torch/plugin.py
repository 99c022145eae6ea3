"""Entry point of the torch backend (group ``hwft``, name ``torch``), as a vendor writes one."""

from __future__ import annotations

import pluggy

from hwft_torch import devices, families, kernels, methods

HWFT_PLUGIN_API = "2.2"
hookimpl = pluggy.HookimplMarker("hwft")


@hookimpl
def hwft_register_backends(register):
    for backend in devices.backends():
        register(backend)


@hookimpl
def hwft_register_method_implementations(register):
    for implementation in methods.IMPLEMENTATIONS:
        register(implementation)


@hookimpl
def hwft_register_exporters(register):
    from hwft_torch.export import EXPORTERS  # imports no engine: the writers import theirs when they run

    for exporter in EXPORTERS:
        register(exporter)


@hookimpl
def hwft_register_kernels(register):
    for kernel in kernels.KERNELS:
        register(kernel)


@hookimpl
def hwft_register_model_families(register):
    for family in families.FAMILIES:
        register(family)
