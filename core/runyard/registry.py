"""Finds plugins through the ``runyard`` entry-point group and looks them up by name.

Plugin modules are thin (specs only), so discovering, listing and validating config
import no backend library. A plugin that fails to import is recorded and reported;
the others keep working.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal

import attrs
import pluggy

from . import hookspecs
from .errors import PluginError
from .plugin import API_VERSION, ExecutorSpec, RunLauncherSpec, StorageSpec

Kind = Literal["executor", "run_launcher", "storage"]
KINDS: tuple[Kind, ...] = ("executor", "run_launcher", "storage")
_HOOKS = {"executor": "runyard_executors", "run_launcher": "runyard_run_launchers", "storage": "runyard_storages"}
_LABEL = {"executor": "executor", "run_launcher": "run launcher", "storage": "storage"}

# Backends runyard knows of but does not ship in the core distribution: naming one that
# is not installed gets the install command rather than a bare "unknown".
KNOWN_BACKENDS: dict[Kind, dict[str, str]] = {
    "executor": {"dask": "dask", "celery": "celery", "docker": "docker", "k8s": "k8s"},
    "run_launcher": {"docker": "docker", "k8s": "k8s"},
    "storage": {"postgres": "postgres"},
}


@attrs.frozen
class Registered:
    """A spec and the plugin (entry point and distribution) that provided it."""

    kind: Kind
    spec: Any
    plugin: str
    distribution: str
    version: str


@attrs.frozen
class PluginFailure:
    """A plugin whose module could not be loaded, and why."""

    plugin: str
    distribution: str
    version: str
    error: str
    spec_name: str | None = None  # the executor/launcher/storage name, when known


class PluginRegistry:
    """All plugins visible to this process, by kind and name."""

    def __init__(self, *, use_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager("runyard")
        self.pm.add_hookspecs(hookspecs)
        self._load_failures: list[PluginFailure] = []
        self._hook_failures: list[PluginFailure] = []
        self._dist: dict[str, tuple[str, str]] = {}
        self._cache: dict[Kind, dict[str, list[Registered]]] | None = None
        if use_entry_points:
            self._load_entry_points(entry_points(group="runyard"))

    def _load_entry_points(self, eps: Iterable[EntryPoint]) -> None:
        for ep in eps:
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            try:
                module = ep.load()
            except Exception as e:  # a broken plugin must not take the others down
                self._load_failures.append(PluginFailure(ep.name, dist, version, f"{type(e).__name__}: {e}"))
                continue
            try:
                self.register(module, name=ep.name, distribution=dist, version=version)
            except PluginError as e:
                self._load_failures.append(PluginFailure(ep.name, dist, version, str(e)))

    def register(
        self, plugin: types.ModuleType | object, *, name: str, distribution: str = "?", version: str = "?"
    ) -> None:
        """Register a plugin object (a module or any object with hookimpls)."""
        if self.pm.has_plugin(name):
            raise PluginError(
                f"two plugins are registered under the entry point name '{name}' "
                f"({self._dist[name][0]} and {distribution}); rename one"
            )
        self.pm.register(plugin, name=name)
        self._dist[name] = (distribution, version)
        self._cache = None

    @property
    def failures(self) -> list[PluginFailure]:
        """Plugins that failed to import, or whose hooks raised or declared another API version."""
        self._collect()
        return [*self._load_failures, *self._hook_failures]

    def _collect(self) -> dict[Kind, dict[str, list[Registered]]]:
        if self._cache is not None:
            return self._cache
        self._hook_failures = []  # rebuilt with the cache, so nothing is reported twice
        found: dict[Kind, dict[str, list[Registered]]] = {k: {} for k in KINDS}
        for kind in KINDS:
            hook = getattr(self.pm.hook, _HOOKS[kind])
            for impl in hook.get_hookimpls():
                dist, version = self._dist.get(impl.plugin_name, ("?", "?"))
                try:
                    specs = impl.function() or []
                except Exception as e:
                    self._hook_failures.append(
                        PluginFailure(
                            impl.plugin_name, dist, version, f"{_HOOKS[kind]}() raised {type(e).__name__}: {e}"
                        )
                    )
                    continue
                for spec in specs:
                    if getattr(spec, "api_version", None) != API_VERSION:
                        self._hook_failures.append(
                            PluginFailure(
                                impl.plugin_name,
                                dist,
                                version,
                                f"{_LABEL[kind]} '{spec.name}' is built for plugin API version "
                                f"{getattr(spec, 'api_version', '?')}, this runyard has version {API_VERSION}; "
                                "upgrade the plugin or runyard",
                                spec_name=getattr(spec, "name", None),
                            )
                        )
                        continue
                    found[kind].setdefault(spec.name, []).append(
                        Registered(kind, spec, impl.plugin_name, dist, version)
                    )
        self._cache = found
        return found

    def all(self) -> list[Registered]:
        """Every registered spec, including duplicates, sorted by kind and name."""
        found = self._collect()
        return [r for kind in KINDS for name in sorted(found[kind]) for r in found[kind][name]]

    def names(self, kind: Kind) -> list[str]:
        return sorted(self._collect()[kind])

    def get(self, kind: Kind, name: str) -> Any:
        """The spec registered as ``name``; a clear PluginError when missing or claimed twice."""
        regs = self._collect()[kind].get(name)
        if not regs:
            raise PluginError(self._missing_message(kind, name))
        if len(regs) > 1:
            who = " and ".join(f"{r.distribution} (plugin '{r.plugin}')" for r in regs)
            raise PluginError(f"{_LABEL[kind]} '{name}' is provided by both {who}; uninstall one of them")
        return regs[0].spec

    def _missing_message(self, kind: Kind, name: str) -> str:
        extra = KNOWN_BACKENDS[kind].get(name)
        broken = [f for f in self.failures if name in (f.plugin, f.spec_name)]
        if broken:
            f = broken[0]
            return f"{_LABEL[kind]} '{name}' is installed ({f.distribution} {f.version}) but failed to load: {f.error}"
        if extra:
            return f"{_LABEL[kind]} '{name}' is not installed: pip install \"runyard[{extra}]\""
        installed = ", ".join(self.names(kind)) or "none"
        return f"unknown {_LABEL[kind]} '{name}'; installed {_LABEL[kind]}s: {installed}"

    def executor(self, name: str) -> ExecutorSpec:
        return self.get("executor", name)

    def run_launcher(self, name: str) -> RunLauncherSpec:
        return self.get("run_launcher", name)

    def storage(self, name: str) -> StorageSpec:
        return self.get("storage", name)

    def add_cli_commands(self, cli: Any) -> None:
        self.pm.hook.runyard_cli(cli=cli)


def load_object(ref: str, *, what: str) -> Any:
    """Import ``"package.module:attr"``; a PluginError says which plugin piece failed."""
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except ImportError as e:
        raise PluginError(f"{what}: cannot import '{ref}': {e}") from e
    except AttributeError as e:
        raise PluginError(f"{what}: '{ref}' does not exist: {e}") from e
    except Exception as e:  # the module itself failed while importing
        raise PluginError(f"{what}: importing '{ref}' failed: {type(e).__name__}: {e}") from e
    return obj


_default: PluginRegistry | None = None


def default_registry() -> PluginRegistry:
    """The process-wide registry built from installed entry points (built once)."""
    global _default
    if _default is None:
        _default = PluginRegistry()
    return _default
