"""runyard's pytest plugin: fixtures for a temporary instance, and the conformance kit.

Registered through the ``pytest11`` entry point, so installing runyard makes the fixtures
available to any test suite. It only provides fixtures: it changes nothing by itself.

An executor's tests subclass `ExecutorConformance` (from `runyard.testing.conformance`)
and say which executor to test::

    from runyard.testing.conformance import ExecutorConformance

    class TestMyExecutor(ExecutorConformance):
        executor = "my_executor"
        executor_config = {"max_concurrent": 4}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import pytest
except ImportError:  # step workers import runyard.testing.jobs without pytest installed
    pytest = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from runyard.instance import Instance
    from runyard.registry import PluginRegistry


if pytest is not None:

    @pytest.fixture
    def runyard_registry() -> PluginRegistry:
        """A plugin registry of its own (installed plugins included) for registering throwaway plugins.

        ``runyard_registry.register(module_or_object, name="my_plugin")`` adds one without
        touching the process-wide registry.
        """
        from runyard.registry import PluginRegistry

        return PluginRegistry()


    @pytest.fixture
    def runyard_home(tmp_path: Path) -> Path:
        """An empty instance directory (``RUNYARD_HOME``) under pytest's tmp_path."""
        home = tmp_path / "runyard-home"
        home.mkdir()
        return home


    @pytest.fixture
    def runyard_instance(runyard_home: Path, runyard_registry: PluginRegistry) -> Iterator[Instance]:
        """An `Instance` with SQLite storage and file outputs in a temporary directory."""
        from runyard.instance import Instance

        inst = Instance(runyard_home, registry=runyard_registry)
        yield inst
        inst.storage.close()


    @pytest.fixture
    def runyard_make_instance(
        runyard_home: Path, runyard_registry: PluginRegistry
    ) -> Callable[..., Instance]:
        """A factory: ``runyard_make_instance({"executor": {"threadpool": {}}})`` writes
        ``runyard.yaml`` with that content and returns the instance."""
        import yaml

        from runyard.instance import CONFIG_FILE, Instance

        def make(config: dict[str, Any] | None = None) -> Instance:
            if config is not None:
                (runyard_home / CONFIG_FILE).write_text(yaml.safe_dump(config))
            return Instance(runyard_home, registry=runyard_registry)

        return make
