"""The plugin registry: discovery, duplicates, broken plugins, API versions, load_object."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from runyard import PluginError
from runyard.plugin import API_VERSION, ExecutorSpec, StorageSpec, hookimpl
from runyard.registry import PluginRegistry, default_registry, load_object

HANDLER = "runyard_local.in_process:InProcessStepHandler"


def exec_spec(name: str, *, api_version: int = API_VERSION, description: str = "") -> ExecutorSpec:
    return ExecutorSpec(name=name, handler=HANDLER, api_version=api_version, description=description)


class Provides:
    def __init__(self, *specs: ExecutorSpec) -> None:
        self.specs = list(specs)

    @hookimpl
    def runyard_executors(self) -> list[ExecutorSpec]:
        return self.specs


class Broken:
    @hookimpl
    def runyard_executors(self) -> list[ExecutorSpec]:
        raise RuntimeError("backend library missing")

    @hookimpl
    def runyard_storages(self) -> list[StorageSpec]:
        return [StorageSpec(name="brokenstore", storage="x:y", api_version=API_VERSION)]


def test_installed_plugins_are_found() -> None:
    reg = PluginRegistry()
    assert "in_process" in reg.names("executor")
    assert "sqlite" in reg.names("storage")
    (in_process,) = [r for r in reg.all() if r.spec.name == "in_process"]
    assert in_process.kind == "executor"
    assert in_process.plugin == "local"
    assert in_process.distribution == "runyard"
    assert reg.executor("in_process").handler == HANDLER
    assert default_registry() is default_registry()


def test_registry_without_entry_points_is_empty() -> None:
    reg = PluginRegistry(use_entry_points=False)
    assert reg.names("executor") == [] and reg.all() == []
    with pytest.raises(PluginError) as e:
        reg.executor("in_process")
    assert str(e.value) == "unknown executor 'in_process'; installed executors: none"


def test_registered_plugin_is_found(runyard_registry: PluginRegistry) -> None:
    mine = exec_spec("mine", description="my executor")
    runyard_registry.register(Provides(mine), name="myplugin", distribution="my-dist", version="1.2")
    assert runyard_registry.executor("mine") is mine
    (reg,) = [r for r in runyard_registry.all() if r.spec.name == "mine"]
    assert (reg.plugin, reg.distribution, reg.version) == ("myplugin", "my-dist", "1.2")


def test_two_plugins_claiming_one_executor_name(runyard_registry: PluginRegistry) -> None:
    runyard_registry.register(Provides(exec_spec("fast")), name="p1", distribution="dist-one")
    runyard_registry.register(Provides(exec_spec("fast")), name="p2", distribution="dist-two")
    with pytest.raises(PluginError) as e:
        runyard_registry.executor("fast")
    assert str(e.value) == (
        "executor 'fast' is provided by both dist-one (plugin 'p1') and dist-two (plugin 'p2'); uninstall one of them"
    )
    # Both stay listed, so `runyard plugin list` shows the clash.
    assert [r.distribution for r in runyard_registry.all() if r.spec.name == "fast"] == ["dist-one", "dist-two"]
    # Other executors are unaffected.
    assert runyard_registry.executor("in_process").name == "in_process"


def test_claiming_a_built_in_executor_name_names_both_distributions(runyard_registry: PluginRegistry) -> None:
    runyard_registry.register(
        Provides(exec_spec("in_process")), name="impostor", distribution="evil-dist"
    )
    with pytest.raises(PluginError) as e:
        runyard_registry.executor("in_process")
    assert "runyard (plugin 'local')" in str(e.value)
    assert "evil-dist (plugin 'impostor')" in str(e.value)


def test_two_plugins_with_one_entry_point_name(runyard_registry: PluginRegistry) -> None:
    runyard_registry.register(Provides(), name="same", distribution="dist-a")
    with pytest.raises(PluginError) as e:
        runyard_registry.register(Provides(), name="same", distribution="dist-b")
    assert str(e.value) == (
        "two plugins are registered under the entry point name 'same' (dist-a and dist-b); rename one"
    )


def test_a_plugin_whose_hook_raises_is_reported_and_others_keep_working(runyard_registry: PluginRegistry) -> None:
    runyard_registry.register(Broken(), name="broken", distribution="broken-dist", version="0.9")
    runyard_registry.register(Provides(exec_spec("fine")), name="fine", distribution="ok")
    assert "fine" in runyard_registry.names("executor")
    assert "in_process" in runyard_registry.names("executor")
    assert runyard_registry.storage("brokenstore").storage == "x:y"  # its other hook still counts
    (failure,) = runyard_registry.failures
    assert (failure.plugin, failure.distribution, failure.version) == ("broken", "broken-dist", "0.9")
    assert failure.error == "runyard_executors() raised RuntimeError: backend library missing"


def test_failures_are_not_repeated_when_plugins_are_added_later(runyard_registry: PluginRegistry) -> None:
    runyard_registry.register(Broken(), name="broken", distribution="broken-dist")
    runyard_registry.names("executor")
    runyard_registry.register(Provides(exec_spec("later")), name="later")
    runyard_registry.names("executor")
    runyard_registry.all()
    assert [f.plugin for f in runyard_registry.failures] == ["broken"]


def test_spec_with_another_api_version_is_not_loaded(runyard_registry: PluginRegistry) -> None:
    old = exec_spec("oldexec", api_version=API_VERSION + 1)
    new = exec_spec("newexec")
    runyard_registry.register(Provides(old, new), name="oldplugin", distribution="old-dist", version="3.0")
    assert "oldexec" not in runyard_registry.names("executor")
    assert runyard_registry.executor("newexec") is new
    (failure,) = runyard_registry.failures
    assert (failure.plugin, failure.distribution) == ("oldplugin", "old-dist")
    assert failure.error == (
        f"executor 'oldexec' is built for plugin API version {API_VERSION + 1}, this runyard has version "
        f"{API_VERSION}; upgrade the plugin or runyard"
    )


def test_asking_for_an_incompatible_executor_says_why(runyard_registry: PluginRegistry) -> None:
    # The entry point is called `oldplugin`, the executor `oldexec` (like `local` providing
    # `in_process`): asking for `oldexec` must not claim it is unknown.
    old = exec_spec("oldexec", api_version=API_VERSION + 1)
    runyard_registry.register(Provides(old), name="oldplugin", distribution="old-dist", version="3.0")
    with pytest.raises(PluginError) as e:
        runyard_registry.executor("oldexec")
    msg = str(e.value)
    assert "unknown executor" not in msg, msg
    assert "API version" in msg and "old-dist" in msg


# -- load_object -----------------------------------------------------------------------------


def test_load_object_imports_module_attributes() -> None:
    from runyard_local.in_process import InProcessStepHandler

    assert load_object(HANDLER, what="executor 'in_process'") is InProcessStepHandler
    assert load_object("runyard.plugin:ExecutorSpec.__name__", what="x") == "ExecutorSpec"
    import runyard.events

    assert load_object("runyard.events", what="x") is runyard.events


def test_load_object_missing_module() -> None:
    with pytest.raises(PluginError) as e:
        load_object("no_such_pkg.handler:Handler", what="executor 'ghost'")
    assert str(e.value) == (
        "executor 'ghost': cannot import 'no_such_pkg.handler:Handler': No module named 'no_such_pkg'"
    )


def test_load_object_missing_attribute() -> None:
    with pytest.raises(PluginError) as e:
        load_object("runyard_local.in_process:NoSuchHandler", what="executor 'ghost'")
    assert str(e.value).startswith(
        "executor 'ghost': 'runyard_local.in_process:NoSuchHandler' does not exist: "
    )
    assert "NoSuchHandler" in str(e.value)


def test_load_object_module_that_fails_on_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A handler module that raises something other than ImportError when imported is a
    # plugin failure too: the user must learn which executor's code broke.
    (tmp_path / "ry_broken_handler.py").write_text("raise RuntimeError('missing credentials file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(PluginError) as e:
            load_object("ry_broken_handler:Handler", what="executor 'brittle'")
        assert str(e.value).startswith("executor 'brittle': ")
        assert "missing credentials file" in str(e.value)
    finally:
        sys.modules.pop("ry_broken_handler", None)
