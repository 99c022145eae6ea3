"""``hwft env``'s report: every backend with its probe and capability record, the kernels that
run on it, and which ``backend: auto`` takes (the CLI prints it; hwft board's machine page shows
it)."""

from __future__ import annotations

from hwft import HWFT_PLUGIN_API, __version__

ENV_SCHEMA = "hwft.env/1"


def env_report() -> dict:
    from hwft.plugins import get_host
    from hwft.select import rank

    host = get_host()
    ranked = rank(host)
    backends = []
    for name, backend in host.backends.items():
        avail = host.probe(name)
        backends.append(
            {
                "name": name,
                "engine": backend.engine,
                "plugin": host.plugin_of(name),
                "description": backend.description,
                "accelerator": backend.accelerator,
                "priority": avail.priority if avail.priority is not None else backend.priority,
                "available": avail.available,
                "reason": avail.reason,
                "devices": [dict(d) for d in avail.devices],
                "details": dict(avail.details),
                "capability": host.capability(name).to_json(),
                "kernels": list(host.kernels().slots(name, backend.engine)),  #: the slots its kernels fill
            }
        )
    return {
        "schema": ENV_SCHEMA,
        "hwft_version": __version__,
        "plugin_api": HWFT_PLUGIN_API,
        "auto": ranked[0] if ranked else None,
        "ranking": ranked,
        "backends": backends,
        "not_installed": host.not_installed(),
    }
