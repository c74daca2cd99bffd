"""The plugin registry: discovery, duplicates, broken plugins, API versions, load_object,
and its strictness: hooks that do not exist, hooks without @hookimpl, disabled plugins,
deprecated hooks, installed backends that provide nothing."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import runyard.registry as registry_module
from runyard import PluginError, hookspecs
from runyard.hookspecs import hookspec
from runyard.plugin import API_VERSION, ExecutorSpec, StorageSpec, hookimpl
from runyard.registry import PluginRegistry, default_registry, disabled_from_env, load_object

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


# -- a strict registry -----------------------------------------------------------------------


class Misspelt:
    @hookimpl
    def runyard_executer(self) -> list[ExecutorSpec]:  # the spec is runyard_executors
        return [exec_spec("never-seen")]


class Unmarked:
    def runyard_executors(self) -> list[ExecutorSpec]:  # no @hookimpl: pluggy would ignore it
        return [exec_spec("never-seen")]


class WrongArgument:
    @hookimpl
    def runyard_cli(self, group: object) -> None:  # the spec's argument is `cli`
        pass


def test_a_hook_that_does_not_exist_fails_loudly_with_the_near_name(runyard_registry: PluginRegistry) -> None:
    with pytest.raises(PluginError) as e:
        runyard_registry.register(Misspelt(), name="typo", distribution="typo-dist")
    assert str(e.value) == (
        "plugin 'typo' (typo-dist): it implements hook 'runyard_executer', which runyard does not have "
        "(did you mean 'runyard_executors'?)"
    )
    # Nothing of it is registered: the name is free and its executor does not exist.
    assert "never-seen" not in runyard_registry.names("executor")
    runyard_registry.register(Provides(exec_spec("fixed")), name="typo", distribution="typo-dist")
    assert runyard_registry.executor("fixed").name == "fixed"


def test_a_hook_function_without_hookimpl_fails_loudly(runyard_registry: PluginRegistry) -> None:
    with pytest.raises(PluginError, match=r"plugin 'plain' \(plain-dist\): it defines 'runyard_executors' without "
                                          r"@hookimpl, so runyard would ignore it; decorate it"):
        runyard_registry.register(Unmarked(), name="plain", distribution="plain-dist")
    assert "never-seen" not in runyard_registry.names("executor")


def test_a_hook_taking_an_argument_the_spec_does_not_pass_fails_loudly(runyard_registry: PluginRegistry) -> None:
    with pytest.raises(PluginError) as e:
        runyard_registry.register(WrongArgument(), name="args", distribution="args-dist")
    assert str(e.value) == (
        "plugin 'args' (args-dist): its 'runyard_cli' takes group, which the hook does not pass "
        "(the hook passes: cli); rename or remove the argument"
    )
    # Nothing of it stays registered: the name is free again.
    runyard_registry.register(Provides(exec_spec("after")), name="args", distribution="args-dist")
    assert runyard_registry.executor("after").name == "after"


def _install_dist(site: Path, dist: str, entry_point: str, module: str, source: str) -> None:
    """Install a distribution the way pip lays it out: a module plus a .dist-info whose
    entry_points.txt registers it in the ``runyard`` group (found by importlib.metadata)."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[runyard]\n{entry_point} = {module}\n")


MISSPELT_PLUGIN = (
    "from runyard.plugin import API_VERSION, ExecutorSpec, hookimpl\n\n"
    "@hookimpl\n"
    "def runyard_executer():\n"
    "    return [ExecutorSpec(name='misspelt', api_version=API_VERSION, handler='x:Y')]\n"
)
GOOD_PLUGIN = (
    "from runyard.plugin import API_VERSION, ExecutorSpec, hookimpl\n\n"
    "@hookimpl\n"
    "def runyard_executors():\n"
    "    return [ExecutorSpec(name='goodexec', api_version=API_VERSION,\n"
    "                         handler='runyard_local.in_process:InProcessStepHandler')]\n"
)
EXPLODING_PLUGIN = (
    "import os, pathlib\n"
    "pathlib.Path(os.environ['RY_IMPORTED_MARKER']).write_text('imported')\n"
    "raise RuntimeError('this plugin breaks every command that imports it')\n"
)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    _install_dist(site, "ry-misspelt", "misspelt", "ry_misspelt_plugin", MISSPELT_PLUGIN)
    _install_dist(site, "ry-good", "good", "ry_good_plugin", GOOD_PLUGIN)
    _install_dist(site, "ry-exploding", "exploding", "ry_exploding_plugin", EXPLODING_PLUGIN)
    return site


def _runyard(site: Path, tmp_path: Path, *args: str, disable: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RUNYARD_DISABLE_PLUGINS")}
    env.update(PYTHONPATH=str(site), RUNYARD_HOME=str(tmp_path / "home"),
               RY_IMPORTED_MARKER=str(tmp_path / "imported"))
    if disable is not None:
        env["RUNYARD_DISABLE_PLUGINS"] = disable
    return subprocess.run([sys.executable, "-m", "runyard", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_plugin_list_shows_a_misspelt_plugin_with_the_reason_and_the_others_work(
    site: Path, tmp_path: Path
) -> None:
    done = _runyard(site, tmp_path, "plugin", "list", "--json", disable="exploding")
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["misspelt"]["loads"] is False
    assert rows["misspelt"]["distribution"] == "ry-misspelt"
    assert "hook 'runyard_executer', which runyard does not have (did you mean 'runyard_executors'?)" in (
        rows["misspelt"]["description"]
    )
    assert rows["goodexec"]["loads"] is True and rows["goodexec"]["distribution"] == "ry-good"
    assert rows["in_process"]["loads"] is True
    # Asking for the misspelt plugin's executor names the plugin and the reason.
    job = tmp_path / "job.py"
    job.write_text("from runyard import job, step\n@step\ndef s():\n    return 1\n@job\ndef j():\n    s()\n")
    run = _runyard(site, tmp_path, "job", "execute", "-f", str(job), "--executor", "goodexec", disable="exploding")
    assert run.returncode == 0, run.stderr


def test_a_disabled_plugin_is_not_even_imported_and_is_listed_as_disabled(site: Path, tmp_path: Path) -> None:
    broken = _runyard(site, tmp_path, "plugin", "list", "--json")
    assert (tmp_path / "imported").exists()  # without disabling it, it is imported (and fails)
    rows = {r["name"]: r for r in json.loads(broken.stdout)}
    assert "this plugin breaks every command" in rows["exploding"]["description"]
    (tmp_path / "imported").unlink()

    done = _runyard(site, tmp_path, "plugin", "list", "--json", disable=" exploding , misspelt")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "imported").exists()
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["exploding"] == {"name": "exploding", "kind": "?", "distribution": "ry-exploding", "version": "1.0",
                                 "loads": False, "description": "disabled by RUNYARD_DISABLE_PLUGINS"}
    assert rows["misspelt"]["description"] == "disabled by RUNYARD_DISABLE_PLUGINS"
    assert rows["goodexec"]["loads"] is True


def test_asking_for_an_executor_of_a_disabled_plugin_says_it_is_disabled(runyard_registry: PluginRegistry) -> None:
    reg = PluginRegistry(disabled=["local"])
    assert "in_process" not in reg.names("executor")
    assert [d.plugin for d in reg.disabled] == ["local"]
    reg.register(Provides(exec_spec("mine")), name="local", distribution="x")  # disabled by name, here too
    assert "mine" not in reg.names("executor")
    docker = PluginRegistry(disabled=["docker"])
    with pytest.raises(PluginError) as e:
        docker.executor("docker")
    assert str(e.value).startswith(
        "executor 'docker' is not loaded: plugin 'docker' (runyard-docker "
    )
    assert str(e.value).endswith("is disabled by RUNYARD_DISABLE_PLUGINS; remove 'docker' from RUNYARD_DISABLE_PLUGINS "
                                 "to use it")


def test_disabled_names_come_from_the_environment() -> None:
    assert disabled_from_env({"RUNYARD_DISABLE_PLUGINS": "docker, celery,,"}) == {"docker", "celery"}
    assert disabled_from_env({}) == frozenset()


def test_an_installed_backend_distribution_that_provides_nothing_is_not_told_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every real backend here registers its plugins: the known backend 'lonely' is said to
    # come from pluggy, which is installed and registers nothing in group 'runyard'.
    monkeypatch.setitem(registry_module.KNOWN_BACKENDS["executor"], "lonely", "lonely")
    monkeypatch.setitem(registry_module.EXTRA_DISTRIBUTIONS, "lonely", "pluggy")
    reg = PluginRegistry()
    with pytest.raises(PluginError) as e:
        reg.executor("lonely")
    msg = str(e.value)
    assert msg.startswith(f"executor 'lonely': pluggy {importlib.metadata.version('pluggy')} is installed, but it "
                          "registers no runyard plugin (no entry point in group 'runyard')"), msg
    assert "reinstall" in msg and "is not installed" not in msg


def test_an_installed_backend_whose_plugin_registers_another_name_says_so(runyard_registry: PluginRegistry) -> None:
    reg = PluginRegistry(use_entry_points=False)
    reg.register(Provides(exec_spec("dask-ish")), name="dask", distribution="runyard-dask", version="0.1.0")
    with pytest.raises(PluginError) as e:
        reg.executor("dask")
    assert str(e.value).startswith(
        "executor 'dask': runyard-dask 0.1.0 is installed, but its plugins (dask) register no executor named 'dask'"
    )


def test_a_known_backend_that_is_not_installed_gets_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every backend is installed in this workspace: point k8s at a distribution that is not.
    monkeypatch.setitem(registry_module.EXTRA_DISTRIBUTIONS, "k8s", "runyard-k8s-absent")
    with pytest.raises(PluginError) as e:
        PluginRegistry(use_entry_points=False).executor("k8s")
    assert str(e.value) == 'executor \'k8s\' is not installed: pip install "runyard[k8s]"'


def test_an_unknown_name_close_to_an_installed_one_gets_a_suggestion() -> None:
    with pytest.raises(PluginError, match=r"unknown executor 'in_proces' \(did you mean 'in_process'\?\)"):
        PluginRegistry().executor("in_proces")


# -- deprecating a hook ------------------------------------------------------------------------


class _SpecsWithADeprecatedHook:
    """The real specifications plus a hook deprecated the documented way (pluggy's
    ``warn_on_impl``), as a future runyard would declare one."""

    runyard_executors = hookspecs.runyard_executors
    runyard_run_launchers = hookspecs.runyard_run_launchers
    runyard_storages = hookspecs.runyard_storages
    runyard_cli = hookspecs.runyard_cli

    @hookspec(warn_on_impl=DeprecationWarning(
        "runyard_old_executors is deprecated since API version 1 and will be removed in API version 2; "
        "implement runyard_executors instead"
    ))
    def runyard_old_executors(self) -> list[ExecutorSpec]:
        """Return executors (deprecated: use ``runyard_executors``)."""
        return []


class OldStyle:
    @hookimpl
    def runyard_old_executors(self) -> list[ExecutorSpec]:
        return []


def test_implementing_a_deprecated_hook_warns_and_is_recorded() -> None:
    reg = PluginRegistry(use_entry_points=False, hookspecs_module=_SpecsWithADeprecatedHook())
    with pytest.warns(DeprecationWarning, match="runyard_old_executors is deprecated .* implement runyard_executors"):
        reg.register(OldStyle(), name="old", distribution="old-dist", version="2.0")
    (warning,) = reg.warnings
    assert (warning.plugin, warning.distribution, warning.version) == ("old", "old-dist", "2.0")
    assert "removed in API version 2" in warning.message
    # It still loads: deprecation warns, it does not break.
    assert reg.pm.has_plugin("old")


def test_a_plugin_using_no_deprecated_hook_does_not_warn(recwarn: pytest.WarningsRecorder) -> None:
    reg = PluginRegistry(use_entry_points=False, hookspecs_module=_SpecsWithADeprecatedHook())
    reg.register(Provides(exec_spec("new")), name="new")
    assert reg.warnings == [] and not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
