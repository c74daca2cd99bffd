"""Finds plugins through the ``runyard`` entry-point group and looks them up by name.

Plugin modules are thin (specs only), so discovering, listing and validating config
import no backend library. The registry is strict, plugin by plugin: a plugin that fails
to import, implements a hook that does not exist (a misspelt ``runyard_executer``),
defines a ``runyard_*`` hook function without ``@hookimpl``, or takes arguments a hook
does not have is recorded with the reason and not loaded; the others keep working.
``RUNYARD_DISABLE_PLUGINS=name,...`` keeps plugins from being imported at all. Hooks
deprecated with pluggy's ``warn_on_impl`` warn when a plugin implementing them loads.
"""

from __future__ import annotations

import importlib
import os
import types
import warnings
from collections.abc import Iterable
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
    "executor": {"dask": "dask", "celery": "celery", "docker": "docker", "k8s": "k8s", "ecs": "ecs",
                 "celery_docker": "celery-docker", "celery_k8s": "celery-k8s"},
    "run_launcher": {"docker": "docker", "k8s": "k8s", "ecs": "ecs", "celery_k8s": "celery-k8s"},
    "storage": {"postgres": "postgres"},
}
# The distribution each of those extras installs (postgres only adds a driver to runyard).
EXTRA_DISTRIBUTIONS = {"dask": "runyard-dask", "celery": "runyard-celery", "docker": "runyard-docker",
                       "k8s": "runyard-k8s", "ecs": "runyard-ecs", "celery-docker": "runyard-celery",
                       "celery-k8s": "runyard-celery"}

DISABLE_ENV = "RUNYARD_DISABLE_PLUGINS"
"""Comma-separated entry-point names of plugins not to load (``RUNYARD_DISABLE_PLUGINS=docker,celery``)."""


def disabled_from_env(environ: os._Environ[str] | dict[str, str] | None = None) -> frozenset[str]:
    """The plugin names ``RUNYARD_DISABLE_PLUGINS`` lists (spaces and empty items ignored)."""
    raw = (os.environ if environ is None else environ).get(DISABLE_ENV, "")
    return frozenset(name.strip() for name in raw.split(",") if name.strip())


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


@attrs.frozen
class DisabledPlugin:
    """A plugin left unloaded on purpose (``RUNYARD_DISABLE_PLUGINS``)."""

    plugin: str
    distribution: str
    version: str

    @property
    def reason(self) -> str:
        return f"disabled by {DISABLE_ENV}"


@attrs.frozen
class PluginWarning:
    """A plugin that loaded but uses something deprecated (a hook spec's ``warn_on_impl``)."""

    plugin: str
    distribution: str
    version: str
    message: str


class PluginRegistry:
    """All plugins visible to this process, by kind and name."""

    def __init__(
        self,
        *,
        use_entry_points: bool = True,
        disabled: Iterable[str] | None = None,
        hookspecs_module: types.ModuleType | object = hookspecs,
    ) -> None:
        """``disabled``: entry-point names not to load (default: ``RUNYARD_DISABLE_PLUGINS``).
        ``hookspecs_module``: where the hook specifications are (tests pass their own)."""
        self.pm = pluggy.PluginManager("runyard")
        self.pm.add_hookspecs(hookspecs_module)
        self._load_failures: list[PluginFailure] = []
        self._hook_failures: list[PluginFailure] = []
        self._dist: dict[str, tuple[str, str]] = {}
        self._cache: dict[Kind, dict[str, list[Registered]]] | None = None
        self.disabled_names = frozenset(disabled) if disabled is not None else disabled_from_env()
        self.disabled: list[DisabledPlugin] = []
        self.warnings: list[PluginWarning] = []
        if use_entry_points:
            # Read from the distributions' entry_points.txt: importlib.metadata would cost
            # a fifth of `runyard --help` (see runyard.entrypoints).
            from .entrypoints import entry_points

            self._load_entry_points(entry_points("runyard"))

    def _load_entry_points(self, eps: Iterable[Any]) -> None:
        for ep in eps:
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            if ep.name in self.disabled_names:
                # Not even imported: disabling is how a user gets past a plugin that breaks on import.
                self.disabled.append(DisabledPlugin(ep.name, dist, version))
                continue
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
        """Register a plugin object (a module or any object with hookimpls).

        Raises `PluginError` (and registers nothing of it) when the plugin implements a hook
        that does not exist, defines a hook function without ``@hookimpl``, or takes an
        argument its hook does not pass. A plugin named in ``disabled`` is skipped.
        """
        if name in self.disabled_names:
            self.disabled.append(DisabledPlugin(name, distribution, version))
            return
        if self.pm.has_plugin(name):
            raise PluginError(
                f"two plugins are registered under the entry point name '{name}' "
                f"({self._dist[name][0]} and {distribution}); rename one"
            )
        unmarked = self._unmarked_hooks(plugin)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                self.pm.register(plugin, name=name)
            except pluggy.PluginValidationError as e:
                if self.pm.is_registered(plugin):  # older pluggy versions keep what they added first
                    self.pm.unregister(plugin)
                why = "; ".join(self._argument_problems(plugin)) or " ".join(str(e).split())
                raise PluginError(f"plugin '{name}' ({distribution}): {why}") from None
        unknown = sorted(c.name for c in self.pm.get_hookcallers(plugin) or () if not c.has_spec())
        if unknown or unmarked:
            self.pm.unregister(plugin, name=name)
            raise PluginError(f"plugin '{name}' ({distribution}): " + "; ".join(
                [*(self._unknown_hook_message(h) for h in unknown), *unmarked]
            ))
        self._dist[name] = (distribution, version)
        self._cache = None
        for w in caught:
            if issubclass(w.category, DeprecationWarning | PendingDeprecationWarning | FutureWarning):
                self.warnings.append(PluginWarning(name, distribution, version, str(w.message)))
            # Shown as pluggy would have shown it, now that it is recorded too.
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def _spec_names(self) -> list[str]:
        return sorted(n for n, c in vars(self.pm.hook).items() if isinstance(c, pluggy.HookCaller) and c.has_spec())

    def _unknown_hook_message(self, hook: str) -> str:
        import difflib

        near = difflib.get_close_matches(hook, self._spec_names(), n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"runyard's hooks are {', '.join(self._spec_names())}"
        return f"it implements hook '{hook}', which runyard does not have ({hint})"

    def _argument_problems(self, plugin: object) -> list[str]:
        """Hook implementations taking arguments their hook does not pass."""
        import inspect

        found = []
        for attr in self._spec_names():
            if self.pm.parse_hookimpl_opts(plugin, attr) is None:
                continue
            spec = getattr(self.pm.hook, attr).spec
            try:
                params = [p for p in inspect.signature(getattr(plugin, attr)).parameters if p != "self"]
            except (TypeError, ValueError):
                continue
            extra = [p for p in params if spec is not None and p not in spec.argnames]
            if extra and spec is not None:
                found.append(
                    f"its '{attr}' takes {', '.join(extra)}, which the hook does not pass (the hook passes: "
                    f"{', '.join(spec.argnames) or 'nothing'}); rename or remove the argument"
                )
        return found

    def _unmarked_hooks(self, plugin: object) -> list[str]:
        """Hook-named functions without ``@hookimpl``, which pluggy would silently ignore."""
        found = []
        specs = set(self._spec_names())
        for attr in sorted(specs):
            value = getattr(plugin, attr, None)
            if callable(value) and self.pm.parse_hookimpl_opts(plugin, attr) is None:
                found.append(
                    f"it defines '{attr}' without @hookimpl, so runyard would ignore it; "
                    "decorate it with @runyard.plugin.hookimpl"
                )
        return found

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
        label = _LABEL[kind]
        extra = KNOWN_BACKENDS[kind].get(name)
        installed = ", ".join(self.names(kind)) or "none"
        broken = [f for f in self.failures if name in (f.plugin, f.spec_name)]
        if broken:
            f = broken[0]
            return f"{label} '{name}' is installed ({f.distribution} {f.version}) but failed to load: {f.error}"
        dist_name = EXTRA_DISTRIBUTIONS.get(extra or "")
        off = [d for d in self.disabled if d.plugin == name or (dist_name and d.distribution == dist_name)]
        if off:
            d = off[0]
            return (
                f"{label} '{name}' is not loaded: plugin '{d.plugin}' ({d.distribution} {d.version}) is "
                f"{d.reason}; remove '{d.plugin}' from {DISABLE_ENV} to use it"
            )
        if extra:
            version = _installed_version(dist_name) if dist_name else None
            if version is None:
                return f"{label} '{name}' is not installed: pip install \"runyard[{extra}]\""
            ours = sorted({p for p, (dist, _) in self._dist.items() if dist == dist_name})
            what = (
                f"its plugins ({', '.join(ours)}) register no {label} named '{name}'"
                if ours
                else "it registers no runyard plugin (no entry point in group 'runyard')"
            )
            return (
                f"{label} '{name}': {dist_name} {version} is installed, but {what}; installed {label}s: "
                f"{installed}. Check `runyard plugin list`; a {dist_name} that does not provide it may be "
                f"unfinished or broken: reinstall it (pip install --force-reinstall \"runyard[{extra}]\")"
            )
        import difflib

        near = difflib.get_close_matches(name, self.names(kind), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        return f"unknown {label} '{name}'{hint}; installed {label}s: {installed}"

    def executor(self, name: str) -> ExecutorSpec:
        return self.get("executor", name)

    def run_launcher(self, name: str) -> RunLauncherSpec:
        return self.get("run_launcher", name)

    def storage(self, name: str) -> StorageSpec:
        return self.get("storage", name)

    def add_cli_commands(self, cli: Any) -> None:
        self.pm.hook.runyard_cli(cli=cli)


def _installed_version(distribution: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


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
