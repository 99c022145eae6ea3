"""The plugin host: pluggy, the ``hwft`` entry-point group, and the registries hooks fill.

Every backend, built-in or vendor, arrives the same way: a module named by an entry point in
the ``hwft`` group, declaring ``HWFT_PLUGIN_API`` and implementing hooks from
:mod:`hwft.hookspecs`. hwft's own data formats are registered through the same hook by the core
module :mod:`hwft.data.formats`.

Environment:
  ``HWFT_PLUGINS``          comma-separated allow-list of entry-point names (only these load)
  ``HWFT_DISABLE_PLUGINS``  comma-separated deny-list of entry-point names
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from hwft import HWFT_PLUGIN_API, hookspecs
from hwft.errors import SelectionError, did_you_mean
from hwft.records import FIXED_BACKENDS, Availability, Backend, Capability

if TYPE_CHECKING:  # the registries' types; the host imports each registry only when asked for it
    from hwft.data.kinds import DataKinds
    from hwft.families import Families
    from hwft.kernels import Kernels
    from hwft.methods.record import MethodRegistry
    from hwft.use.exporters import Exporters

ENTRY_POINT_GROUP = "hwft"
hookimpl = pluggy.HookimplMarker("hwft")


@dataclass
class PluginInfo:
    """One plugin as ``hwft plugins`` shows it."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    status: str  #: loaded, failed, disabled, refused
    error: str = ""
    hooks: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def api_compatible(plugin_api: str, host_api: str = HWFT_PLUGIN_API) -> bool:
    """Same major version, and the plugin's minor version no newer than the host's
    (plugins/API.md; 2.0 removed what 1.x deprecated, so a 1.x plugin needs the migration there)."""
    try:
        p_major, p_minor = (int(x) for x in str(plugin_api).split(".")[:2])
        h_major, h_minor = (int(x) for x in host_api.split(".")[:2])
    except ValueError:
        return False
    return p_major == h_major and p_minor <= h_minor


def _names(env: str) -> set[str] | None:
    value = os.environ.get(env)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


class PluginHost:
    """Loads plugins once and holds what their hooks registered."""

    def __init__(self, entry_points=None, builtins: dict | None = None):
        self.pm = pluggy.PluginManager("hwft")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        for name, module in (builtins or {}).items():
            self.pm.register(module, name=name)
            self.plugins.append(PluginInfo(name, module.__name__, "hwft", _dist_version("hwft"), "loaded"))
        if entry_points is None:
            entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        self._load_entry_points(entry_points)
        for info in self.plugins:
            plugin = self.pm.get_plugin(info.name)
            if plugin is not None:
                info.hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
        self._backends: dict[str, Backend] | None = None
        self._backend_plugin: dict[str, str] = {}
        self._probes: dict[str, Availability] = {}
        self._registries: dict[str, object] = {}  #: collector -> what it collected (_collected)

    def _load_entry_points(self, entry_points) -> None:
        allow, deny = _names("HWFT_PLUGINS"), _names("HWFT_DISABLE_PLUGINS") or set()
        for ep in sorted(entry_points, key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                ep.name, ep.value, dist.metadata["Name"] if dist else None, dist.version if dist else None, "loaded"
            )
            self.plugins.append(info)
            if (allow is not None and ep.name not in allow) or ep.name in deny:
                info.status = "disabled"
                info.error = "excluded by HWFT_PLUGINS / HWFT_DISABLE_PLUGINS"
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                info.status, info.error = "failed", f"{type(exc).__name__}: {exc}"
                continue
            api = getattr(module, "HWFT_PLUGIN_API", None)
            if api is None or not api_compatible(str(api)):
                info.status = "refused"
                info.error = (
                    f"written for plugin API {api or '(undeclared)'}; this hwft provides "
                    f"plugin API {HWFT_PLUGIN_API} (loads: the same major version with a minor version up to "
                    f"{HWFT_PLUGIN_API}; plugins/API.md says how a 1.x plugin moves to 2.0)"
                )
                continue
            try:
                self.pm.register(module, name=ep.name)
                self.pm.check_pending()
            except pluggy.PluginValidationError as exc:
                self.pm.unregister(name=ep.name)
                info.status, info.error = "refused", f"invalid hook implementation: {exc}"

    # ---------------------------------------------------------------- registries

    @property
    def backends(self) -> dict[str, Backend]:
        """Every registered backend by name, in name order (never registration order)."""
        if self._backends is None:
            found: dict[str, Backend] = {}
            for impl in self.pm.hook.hwft_register_backends.get_hookimpls():
                plugin_name = self.pm.get_name(impl.plugin) or "?"

                def register(backend: Backend, _plugin=plugin_name) -> None:
                    if backend.name in found:
                        raise SelectionError(
                            f"backend '{backend.name}' is registered twice (by plugin "
                            f"'{self._backend_plugin[backend.name]}' and by '{_plugin}'); "
                            f"disable one with HWFT_DISABLE_PLUGINS"
                        )
                    found[backend.name] = backend
                    self._backend_plugin[backend.name] = _plugin

                impl.function(register=register)
            self._backends = dict(sorted(found.items()))
        return self._backends

    def not_installed(self) -> dict[str, str]:
        """Fixed backend names no plugin registered, with the distribution providing each."""
        return {n: d for n, d in FIXED_BACKENDS.items() if n not in self.backends}

    def plugin_of(self, backend_name: str) -> str:
        self.backends  # noqa: B018  (fills the map)
        return self._backend_plugin[backend_name]

    def backend(self, name: str) -> Backend:
        try:
            return self.backends[name]
        except KeyError:
            known = ", ".join(self.backends) or "none"
            if name in FIXED_BACKENDS:
                raise SelectionError(
                    f"backend '{name}' is not installed: it comes with {FIXED_BACKENDS[name]} "
                    f"(installed: {known}; or set backend: auto)"
                ) from None
            raise SelectionError(
                f"no backend named '{name}'{did_you_mean(name, [*self.backends, *FIXED_BACKENDS])} "
                f"(registered: {known}; 'auto' picks the best available)"
            ) from None

    def probe(self, name: str) -> Availability:
        """A backend's availability, probed once per process."""
        if name not in self._probes:
            backend = self.backend(name)
            try:
                self._probes[name] = backend.probe()
            except Exception as exc:
                self._probes[name] = Availability(False, f"probe failed: {type(exc).__name__}: {exc}")
        return self._probes[name]

    def capability(self, name: str) -> Capability:
        """The backend's capability record, its methods narrowed to what its engine implements
        (hwft.methods.MethodRegistry.effective). The fused kernels it runs are the kernels
        registered for it (``kernels().slots(name, engine)``)."""
        backend = self.backend(name)
        return self.methods().effective(backend.capability(), backend.engine)

    def _collected(self, collector: str) -> Any:
        """What the hooks registered, collected once by ``collector`` ("module:function" taking
        the plugin manager; imported on first use, so the host imports no registry it is not asked for)."""
        if collector not in self._registries:
            module, _, name = collector.partition(":")
            self._registries[collector] = getattr(importlib.import_module(module), name)(self.pm)
        return self._registries[collector]

    def kernels(self) -> Kernels:
        """Every registered kernel by id (hwft.kernels.Kernels)."""
        return self._collected("hwft.kernels:collect_kernels")

    def families(self) -> Families:
        """Every engine's model-family table (hwft.families.Families)."""
        return self._collected("hwft.families:collect_families")

    def methods(self) -> MethodRegistry:
        """Every registered method and every engine's implementations of them (hwft.methods.MethodRegistry)."""
        return self._collected("hwft.methods.record:collect_methods")

    def exporters(self) -> Exporters:
        """Every registered export format by format and engine (hwft.use.exporters.Exporters)."""
        return self._collected("hwft.use.exporters:collect_exporters")

    def data_formats(self) -> dict:
        """Row formats by name (hwft.data.formats.DataFormat)."""
        return self._collected("hwft.data.formats:collect_formats")

    def data_kinds(self) -> DataKinds:
        """Every registered kind of example (hwft.data.kinds.DataKinds)."""
        return self._collected("hwft.data.kinds:collect_kinds")

    def loggers(self) -> dict:
        """Experiment trackers by name (hwft.tracking.Logger)."""
        return self._collected("hwft.tracking:collect_loggers")

    def rewards(self) -> dict:
        """GRPO reward functions by name (hwft.rewards.Reward)."""
        return self._collected("hwft.rewards:collect_rewards")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


_HOST: PluginHost | None = None

#: hwft's own plugins, loaded by module name as entry points are: the host depends on none of
#: what they register (they may use the host).
BUILTINS = {
    "core": "hwft.data.formats",
    "core-kinds": "hwft.data.kinds.builtin",
    "core-methods": "hwft.methods.builtin",
    "core-rewards": "hwft.rewards",
    "core-trackers": "hwft.tracking",
}


def get_host() -> PluginHost:
    """The process-wide host, built on first use."""
    global _HOST
    if _HOST is None:
        builtins = dict(BUILTINS)
        if os.environ.get("HWFT_TESTING_REWARDS"):  # set by hwft's pytest plugin (hwft.testing)
            builtins["testing-rewards"] = "hwft.testing.rewards"
        _HOST = PluginHost(builtins={name: importlib.import_module(module) for name, module in builtins.items()})
    return _HOST


def reset_host() -> None:
    """Forget the loaded plugins (tests, or after changing HWFT_PLUGINS)."""
    global _HOST
    _HOST = None
