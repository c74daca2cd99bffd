"""One resolved run: which executor and launcher a run uses, with which settings, how many
steps at once and what the executor can honour, and where each setting came from.

Resolution happens once, when a run is created (`runyard job launch`, `runyard job
execute`, `execute_job`), into a frozen `ResolvedRun` that is stored with the run
(`RunRecord.resolution`). The run worker executes the stored value; it does not look at
its own ``runyard.yaml`` again. ``runyard config explain`` prints the same value, built
by the same function (`resolve_run`).

The stored value is plain JSON. Settings keep ``{env: NAME}`` references as references:
a variable is read when the setting is used, where it is used, and its value is never
stored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from .config import Selection, parse_selection, run_config_source, structure, unstructure
from .errors import ConfigError
from .plugin import Capabilities, ExecutorConfig, ExecutorSpec

if TYPE_CHECKING:
    from .definitions import Definitions, JobDefinition
    from .instance import Instance
    from .registry import Kind, PluginRegistry

BUILTIN_DEFAULT_EXECUTOR = "multi_or_in_process"
DEFAULT_LAUNCHER = "default"
RESOLUTION_VERSION = 1


# -- the value -------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Setting:
    """One setting of a plugin: its value (plain data) and the layer and key path that gave
    it (``source`` ``"default"`` when no layer did)."""

    key: str
    value: Any
    source: str
    path: str


@attrs.frozen(kw_only=True)
class Layer:
    """A layer that named a plugin (a file, the run config, the job, ``--executor``...)."""

    name: str
    source: str
    path: str
    config: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class ResolvedPlugin:
    """The executor or run launcher of a run.

    ``source``: the layer that chose it. ``config_source`` and ``path``: the layer that holds
    its settings (the highest one that gives any, else the chooser) and the key path of its
    section there (``executor.dask`` in runyard.yaml, ``execution.dask`` in a run config).
    ``config``: the settings the layers gave, merged (plain data, ``{env: NAME}`` kept),
    which is what the run worker structures. ``settings``: every setting of the plugin's
    config class with its value and origin. ``layers``: every layer that named it, highest
    first; ``overridden``: layers that named another plugin.
    """

    name: str
    source: str
    config_source: str
    path: str
    config: Mapping[str, Any]
    settings: tuple[Setting, ...] = ()
    layers: tuple[Layer, ...] = ()
    overridden: tuple[Layer, ...] = ()

    def selection(self) -> Selection:
        return Selection(self.name, dict(self.config), self.config_source, self.path)

    def where(self, key: str | None = None) -> str:
        """``source: key.path`` of the section, or of setting ``key`` (where it was set)."""
        if key is not None:
            found = self.setting_sources().get(key)
            if found:
                return found
        return self.selection().where(key)

    def setting_sources(self) -> dict[str, str]:
        """``key -> "source: key.path"`` of each setting a layer gave."""
        return {s.key: f"{s.source}: {s.path}" for s in self.settings if s.source != "default"}


@attrs.frozen(kw_only=True)
class ResolvedRun:
    """Everything configuration decides about a run, decided once (see the module doc).

    ``max_concurrent``: steps running at once; the engine, the handler's config and its
    `HandlerContext` all get this number. ``max_concurrent_from`` says why it is that.
    ``capabilities``: what the executor honours with these settings (checked against the
    job before the run starts). ``run_launcher``: None for a run executed in the calling
    process (``job execute``), which no launcher starts.
    """

    executor: ResolvedPlugin
    max_concurrent: int
    max_concurrent_from: str
    capabilities: Capabilities
    run_launcher: ResolvedPlugin | None = None
    instance_config: str = ""
    version: int = RESOLUTION_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored with the run and printed by ``runyard config explain --json``."""

        def plugin(p: ResolvedPlugin | None) -> dict[str, Any] | None:
            if p is None:
                return None
            return {
                "name": p.name,
                "source": p.source,
                "config_source": p.config_source,
                "path": p.path,
                "config": unstructure(dict(p.config)),
                "settings": [attrs.asdict(s) for s in p.settings],
                "layers": [attrs.asdict(layer) for layer in p.layers],
                "overridden": [attrs.asdict(layer) for layer in p.overridden],
            }

        return {
            "version": self.version,
            "executor": plugin(self.executor),
            "max_concurrent": self.max_concurrent,
            "max_concurrent_from": self.max_concurrent_from,
            "capabilities": attrs.asdict(self.capabilities),
            "run_launcher": plugin(self.run_launcher),
            "instance_config": self.instance_config,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResolvedRun:
        version = data.get("version")
        if version != RESOLUTION_VERSION:
            raise ConfigError(
                f"the run's stored resolution has version {version!r}; this runyard reads version "
                f"{RESOLUTION_VERSION}: run it with the runyard that launched it"
            )

        def plugin(d: Mapping[str, Any] | None) -> ResolvedPlugin | None:
            if d is None:
                return None
            return ResolvedPlugin(
                name=d["name"],
                source=d["source"],
                config_source=d["config_source"],
                path=d["path"],
                config=dict(d["config"]),
                settings=tuple(Setting(**s) for s in d.get("settings", ())),
                layers=tuple(Layer(**layer) for layer in d.get("layers", ())),
                overridden=tuple(Layer(**layer) for layer in d.get("overridden", ())),
            )

        executor = plugin(data["executor"])
        assert executor is not None
        return cls(
            executor=executor,
            max_concurrent=int(data["max_concurrent"]),
            max_concurrent_from=data.get("max_concurrent_from", ""),
            capabilities=Capabilities(**data["capabilities"]),
            run_launcher=plugin(data.get("run_launcher")),
            instance_config=data.get("instance_config", ""),
            version=version,
        )


# -- choosing the executor ------------------------------------------------------------------------


@attrs.frozen
class ResolvedExecutor:
    """The executor's name and merged raw settings, before they are structured."""

    name: str
    config: dict[str, Any]
    layers: tuple[Selection, ...]  # every layer that named this executor, highest first
    overridden: tuple[Selection, ...] = ()  # configured layers that named another executor, highest first


def resolve_executor(
    job: JobDefinition,
    *,
    definitions: Definitions | None = None,
    run_config: Mapping[str, Any] | None = None,
    instance: Instance | None = None,
    override: str | None = None,
) -> ResolvedExecutor:
    """Pick the executor: ``--executor`` > run config ``execution`` > the job's own >
    ``Definitions`` default > the instance's ``executor`` > the built-in default.

    The name comes from the highest layer that names one; its config merges every layer
    that names that same executor, higher layers winning key by key.
    """
    layers: list[Selection] = []
    if override:
        layers.append(Selection(override, {}, "--executor", ""))
    if run_config and run_config.get("execution") is not None:
        sel = parse_selection(run_config["execution"], source=run_config_source(run_config), path="execution")
        if sel:
            layers.append(sel)
    if job.executor:
        layers.append(
            Selection(job.executor, dict(job.executor_config or {}), f"job '{job.name}'", "executor_config", "executor")
        )
    if definitions is not None and definitions.executor is not None:
        sel = parse_selection(definitions.executor, source="Definitions", path="executor")
        if sel:
            layers.append(sel)
    if instance is not None and instance.sections["executor"] is not None:
        layers.append(instance.sections["executor"])  # type: ignore[arg-type]
    layers.append(Selection(BUILTIN_DEFAULT_EXECUTOR, {}, "default", f"executor.{BUILTIN_DEFAULT_EXECUTOR}"))
    name = layers[0].name
    same = tuple(sel for sel in layers if sel.name == name)
    config: dict[str, Any] = {}
    for sel in reversed(same):
        config.update(sel.config)
    # The built-in default is a fallback, not a choice someone made: not worth reporting.
    other = tuple(sel for sel in layers if sel.name != name and sel.source != "default")
    return ResolvedExecutor(name, config, same, other)


def _settings_path(resolved: ResolvedExecutor) -> Selection:
    """The layer whose key path a merged setting is reported under when no single layer
    owns it: the highest one with settings, else the one that chose the executor."""
    return next((sel for sel in resolved.layers if sel.config), resolved.layers[0])


def structure_executor_config(resolved: ResolvedExecutor, spec: ExecutorSpec) -> ExecutorConfig:
    """Structure the merged settings, blaming a bad key on the layer that wrote it."""
    for sel in resolved.layers:
        if not sel.config:
            continue
        try:
            structure(sel.config, spec.config, source=sel.source, path=sel.path)
        except ConfigError as e:
            # A layer may rightly leave a required key to another layer; anything else is its fault.
            if not all("is missing" in line for line in str(e).splitlines()):
                raise
    top = _settings_path(resolved)
    return structure(resolved.config, spec.config, source=top.source, path=top.path)


def _default_of(field: attrs.Attribute) -> tuple[bool, Any]:
    """(has a default, the default) of a config field."""
    default = field.default
    if default is attrs.NOTHING:
        return False, None
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        if default.takes_self:
            return True, None
        return True, default.factory()
    return True, default


def _settings(cls: type, layers: tuple[Selection, ...], path: str) -> tuple[Setting, ...]:
    """Each setting of ``cls`` with its value and the highest layer that set it, or its default."""
    rows: list[Setting] = []
    fields = attrs.fields(cls) if attrs.has(cls) else ()
    for f in fields:
        for sel in layers:
            if f.name in sel.config:
                rows.append(Setting(key=f.name, value=unstructure(sel.config[f.name]), source=sel.source,
                                    path=f"{sel.path}.{f.name}" if sel.path else f.name))
                break
        else:
            has_default, value = _default_of(f)
            rows.append(Setting(key=f.name, value=unstructure(value) if has_default else None,
                                source="default" if has_default else "required, not set", path=f"{path}.{f.name}"))
    return tuple(rows)


def _layer(sel: Selection) -> Layer:
    return Layer(name=sel.name, source=sel.source, path=sel.path, config=unstructure(dict(sel.config)))


# -- capabilities and concurrency -------------------------------------------------------------------


def capabilities_of(spec: ExecutorSpec, config: ExecutorConfig, where: str) -> Capabilities:
    """The spec's capabilities for ``config``; a setting `capabilities_for` rejects (a bad
    ``{env: NAME}`` value, say) is a `ConfigError` naming ``where`` the section is."""
    try:
        return spec.capabilities_of(config)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def effective_max_concurrent(
    name: str, spec: ExecutorSpec, config: ExecutorConfig, caps: Capabilities, where: str
) -> tuple[int, str]:
    """The number of steps a run has running at once, and why.

    A configured ``max_concurrent`` above the spec's own ``max_concurrency`` is an error; a
    lower limit that `capabilities_for` derives from other settings lowers it. Unset, it is
    the spec's ``default_max_concurrent`` (else the number of CPUs), capped by the
    capabilities.
    """
    static = spec.capabilities.max_concurrency
    cap = caps.max_concurrency
    wanted = config.max_concurrent
    if wanted is not None:
        if static is not None and wanted > static:
            raise ConfigError(f"{where}: {wanted} is more than executor '{name}' can run at once ({static})")
        if cap is not None and wanted > cap:
            return cap, f"{where} says {wanted}, lowered to {cap} by the executor's other settings"
        return wanted, where
    if spec.default_max_concurrent:
        n, why = spec.default_max_concurrent, f"executor '{name}''s default"
    else:
        n, why = os.cpu_count() or 1, "the number of CPUs"
    if cap is not None and n > cap:
        return cap, f"what executor '{name}' can run at once with these settings"
    return n, why


# -- the one function -----------------------------------------------------------------------------------


def plugin_spec(registry: PluginRegistry, kind: Kind, selection: Selection) -> Any:
    from .instance import plugin_spec as lookup

    return lookup(registry, kind, selection)


def resolve_launcher(instance: Instance) -> ResolvedPlugin:
    """The instance's run launcher with its settings (validated)."""
    default = Selection(DEFAULT_LAUNCHER, {}, "default", f"run_launcher.{DEFAULT_LAUNCHER}")
    sel = instance.sections["run_launcher"] or default
    spec = plugin_spec(instance.registry, "run_launcher", sel)
    structure(sel.config, spec.config, source=sel.source, path=sel.path)
    return ResolvedPlugin(
        name=sel.name,
        source=sel.source,
        config_source=sel.source,
        path=sel.path,
        config=unstructure(dict(sel.config)),
        settings=_settings(spec.config, (sel,), sel.path),
        layers=(_layer(sel),),
    )


def resolve_run(
    job: JobDefinition,
    *,
    instance: Instance,
    definitions: Definitions | None = None,
    run_config: Mapping[str, Any] | None = None,
    executor: str | None = None,
    launcher: bool = True,
) -> ResolvedRun:
    """Resolve a run of ``job``: the executor and its settings, concurrency, capabilities,
    and (``launcher``) the run launcher. Raises `ConfigError` naming the file and key path
    of whatever is wrong. Imports no backend: only plugins' specs and config classes."""
    resolved = resolve_executor(
        job, definitions=definitions, run_config=run_config, instance=instance, override=executor
    )
    chooser = resolved.layers[0]
    spec: ExecutorSpec = plugin_spec(instance.registry, "executor", chooser)
    config = structure_executor_config(resolved, spec)
    top = _settings_path(resolved)
    if not top.path or top.source == "default":  # no layer gave settings: they would go in runyard.yaml
        top = Selection(resolved.name, {}, instance.config_source, f"executor.{resolved.name}")
    caps = capabilities_of(spec, config, top.where())
    mc_layer = next((sel for sel in resolved.layers if "max_concurrent" in sel.config), top)
    n, why = effective_max_concurrent(resolved.name, spec, config, caps, mc_layer.where("max_concurrent"))
    executor_part = ResolvedPlugin(
        name=resolved.name,
        source=chooser.source,
        config_source=top.source,
        path=top.path,
        config=unstructure(resolved.config),
        settings=_settings(spec.config, resolved.layers, top.path),
        layers=tuple(_layer(sel) for sel in resolved.layers),
        overridden=tuple(_layer(sel) for sel in resolved.overridden),
    )
    return ResolvedRun(
        executor=executor_part,
        max_concurrent=n,
        max_concurrent_from=why,
        capabilities=caps,
        run_launcher=resolve_launcher(instance) if launcher else None,
        instance_config=instance.config_source,
    )


def executor_config(resolution: ResolvedRun, spec: ExecutorSpec) -> ExecutorConfig:
    """The executor's structured config for a resolved run, with ``max_concurrent`` set to
    the run's resolved number (so the handler's config and its context agree)."""
    ex = resolution.executor
    config = structure(dict(ex.config), spec.config, source=ex.config_source, path=ex.path)
    # A new value, not a rewrite of a frozen one: the handler sees one number everywhere.
    return attrs.evolve(config, max_concurrent=resolution.max_concurrent)
