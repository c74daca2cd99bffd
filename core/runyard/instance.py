"""The instance: ``$RUNYARD_HOME`` with ``runyard.yaml``, the storage and the output store."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from .config import Selection, did_you_mean, parse_selection, structure, unknown_key
from .errors import ConfigError, PluginChoiceError, PluginError
from .outputs import MemoryOutputStore, OutputStore, open_output_store
from .registry import Kind, PluginRegistry, default_registry
from .storage import RunStorage
from .yamlfile import beside, load_yaml_file

SECTIONS: tuple[Kind, ...] = ("storage", "run_launcher", "executor")
# step_worker: see trust.py; the last four are runyard daemon's (runyard.daemon.settings).
TOP_LEVEL_KEYS = (*SECTIONS, "outputs", "step_worker", "run_coordinator", "run_retries", "run_monitoring", "daemon")
CONFIG_FILE = "runyard.yaml"


def default_home() -> Path:
    return Path(os.environ.get("RUNYARD_HOME") or Path.home() / ".runyard").expanduser()


class Instance:
    """Where runyard keeps its configuration, runs, events and step outputs.

    A missing ``runyard.yaml`` means all defaults: SQLite storage, the default run launcher,
    the built-in default executor, outputs under ``$RUNYARD_HOME/outputs``.
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None,
        *,
        config: Mapping[str, Any] | None = None,
        registry: PluginRegistry | None = None,
    ) -> None:
        self.home = Path(home).resolve() if home is not None else None
        self._registry = registry
        if config is not None:
            self.config_source = "instance config"
            raw = dict(config)
        elif self.home is not None and (self.home / CONFIG_FILE).exists():
            self.config_source = str(self.home / CONFIG_FILE)
            raw = load_yaml_file(self.home / CONFIG_FILE, what="instance config") or {}
        else:
            self.config_source = str(self.home / CONFIG_FILE) if self.home else "instance config"
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{self.config_source}: expected a mapping of sections at the top level")
        unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS), key=str)
        if unknown:
            raise ConfigError(f"{self.config_source}: {unknown_key(unknown[0], TOP_LEVEL_KEYS)}")
        self.sections: dict[str, Selection | None] = {
            s: parse_selection(raw.get(s), source=self.config_source, path=s) for s in SECTIONS
        }
        outputs = raw.get("outputs")
        if outputs is not None and not isinstance(outputs, str):
            raise ConfigError(
                f"{self.config_source}: outputs: expected a path or URL string "
                f"(like /shared/runyard-outputs or s3://bucket/prefix), got {type(outputs).__name__}"
            )
        self._outputs_url = beside(self.home, outputs)  # relative to runyard.yaml's folder
        # What step workers of this instance accept (runyard.trust.StepWorkerSettings).
        self.step_worker_config: Any = raw.get("step_worker")
        # What runyard daemon reads: run_coordinator, run_retries, run_monitoring, daemon.
        self.daemon_config: dict[str, Any] = {
            k: raw[k] for k in ("run_coordinator", "run_retries", "run_monitoring", "daemon") if k in raw
        }

    @classmethod
    def from_env(cls, *, registry: PluginRegistry | None = None, validate: bool = False) -> Instance:
        """The instance at ``$RUNYARD_HOME`` (default ``~/.runyard``).

        ``validate``: check every section of ``runyard.yaml`` against its plugin now (what
        every command does), rather than each section when it is first used.
        """
        instance = cls(default_home(), registry=registry)
        if validate:
            instance.check()
        return instance

    @classmethod
    def ephemeral(cls, *, registry: PluginRegistry | None = None) -> Instance:
        """An in-memory instance that keeps nothing once the process ends."""
        return cls(None, config={}, registry=registry)

    @property
    def is_ephemeral(self) -> bool:
        return self.home is None

    @property
    def registry(self) -> PluginRegistry:
        if self._registry is None:
            self._registry = default_registry()
        return self._registry

    def spec(self, kind: Kind, selection: Selection) -> Any:
        """The spec of the plugin ``selection`` names; an unknown name is a `PluginChoiceError`
        naming the file and key path, with a suggestion for a near miss."""
        return plugin_spec(self.registry, kind, selection)

    def plugin_config(self, kind: Kind, selection: Selection) -> Any:
        """Structure a section's config into its plugin's config class (errors name the path)."""
        spec = self.spec(kind, selection)
        return structure(selection.config, spec.config, source=selection.source, path=selection.path)

    def validate(self) -> list[str]:
        """Check every configured section against its plugin; return the problems found."""
        problems: list[str] = []
        for kind in SECTIONS:
            sel = self.sections[kind]
            if sel is None:
                continue
            try:
                self.plugin_config(kind, sel)
            except Exception as e:  # collect, so the user sees every problem at once
                problems.append(str(e))
        if self.daemon_config:
            from .daemon.settings import settings

            try:
                settings(self)
            except Exception as e:
                problems.append(str(e))
        if self.step_worker_config is not None:
            from .trust import instance_settings

            try:
                instance_settings(self)
            except Exception as e:
                problems.append(str(e))
        return problems

    @property
    def queues_runs(self) -> bool:
        """Whether launches go through the daemon's queue (a ``run_coordinator`` section)."""
        return "run_coordinator" in self.daemon_config

    def check(self) -> None:
        """Raise one `ConfigError` listing every problem of ``runyard.yaml`` (see `validate`)."""
        problems = self.validate()
        if problems:
            raise ConfigError("\n".join(problems))

    @property
    def outputs_url(self) -> str | None:
        """Where step outputs go: the configured ``outputs``, else ``$RUNYARD_HOME/outputs``
        (None for an ephemeral instance, whose outputs stay in memory or a temp dir)."""
        if self._outputs_url:
            return self._outputs_url
        return str(self.home / "outputs") if self.home is not None else None

    @cached_property
    def storage(self) -> RunStorage:
        from .registry import load_object
        from .storage.sqlite import SqliteRunStorage

        if self.home is None:
            return SqliteRunStorage(":memory:")
        sel = self.sections["storage"] or Selection("sqlite", {}, "default", "storage.sqlite")
        spec = self.spec("storage", sel)
        factory = load_object(spec.storage, what=f"storage '{sel.name}'")
        return factory(self.plugin_config("storage", sel), self.home)

    def output_store(self, *, shared: bool) -> OutputStore:
        """The output store for a run; ``shared`` when steps run outside this process."""
        if self.outputs_url is not None:
            return open_output_store(self.outputs_url)
        if not shared:
            return self._memory_store
        return open_output_store(self._temp_outputs)

    @cached_property
    def _memory_store(self) -> MemoryOutputStore:
        return MemoryOutputStore()

    @cached_property
    def _temp_outputs(self) -> str:
        path = tempfile.mkdtemp(prefix="runyard-outputs-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        return path


def plugin_spec(registry: PluginRegistry, kind: Kind, selection: Selection) -> Any:
    """``registry.get(kind, selection.name)``, its error naming where the name was written."""
    try:
        return registry.get(kind, selection.name)
    except PluginError as e:
        from .registry import KNOWN_BACKENDS

        message = str(e)
        name = selection.name
        broken = any(name in (f.plugin, f.spec_name) for f in registry.failures)
        # The registry suggests among installed names; known backends that are not
        # installed are only known here.
        if (name not in registry.names(kind) and name not in KNOWN_BACKENDS[kind] and not broken
                and "did you mean" not in message):
            hint = did_you_mean(name, sorted({*registry.names(kind), *KNOWN_BACKENDS[kind]}))
            message += f"; {hint}" if hint else ""
        raise PluginChoiceError(f"{selection.name_where()}: {message}") from None
