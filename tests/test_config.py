"""Instance configuration (runyard.yaml), config errors and the executor precedence."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from runyard import ConfigError, Definitions, PluginError, job, step
from runyard.execution import BUILTIN_DEFAULT_EXECUTOR, execute_job, resolve_executor
from runyard.instance import CONFIG_FILE, Instance
from runyard.outputs import FileOutputStore
from runyard.plugin import API_VERSION, Capabilities, EventType, ExecutorSpec, hookimpl
from runyard.registry import PluginRegistry
from runyard.storage.sqlite import SqliteRunStorage

RUNYARD = Path(sys.executable).parent / "runyard"
IN_PROCESS_HANDLER = "runyard_local.in_process:InProcessStepHandler"
ALLOWED_EXECUTOR_KEYS = "max_concurrent, tag_concurrency_limits"


@step
def emit(value: int) -> int:
    return value


@job
def plain_job():  # type: ignore[no-untyped-def]
    emit(1)


def _write_yaml(home: Path, text: str) -> None:
    (home / CONFIG_FILE).write_text(text)


# -- runyard.yaml ---------------------------------------------------------------------------


def test_missing_config_file_means_defaults(runyard_home: Path, runyard_registry: PluginRegistry) -> None:
    assert not (runyard_home / CONFIG_FILE).exists()
    inst = Instance(runyard_home, registry=runyard_registry)
    assert inst.sections == {"storage": None, "run_launcher": None, "executor": None}
    assert inst.validate() == []
    assert isinstance(inst.storage, SqliteRunStorage)
    assert Path(inst.storage.path) == runyard_home.resolve() / "runyard.db"
    store = inst.output_store(shared=True)
    assert isinstance(store, FileOutputStore) and store.base == runyard_home.resolve() / "outputs"
    assert resolve_executor(plain_job, instance=inst).name == BUILTIN_DEFAULT_EXECUTOR == "multi_or_in_process"
    result = execute_job(plain_job, instance=inst)
    assert result.success and result.run.executor == "multi_or_in_process"
    inst.storage.close()


def test_empty_config_file_means_defaults(runyard_home: Path, runyard_registry: PluginRegistry) -> None:
    _write_yaml(runyard_home, "# nothing configured yet\n")
    inst = Instance(runyard_home, registry=runyard_registry)
    assert inst.sections == {"storage": None, "run_launcher": None, "executor": None}
    assert inst.validate() == []


def test_malformed_yaml_names_file_and_line(runyard_home: Path, runyard_registry: PluginRegistry) -> None:
    _write_yaml(runyard_home, "storage: sqlite\nexecutor: [in_process]]\noutputs: /tmp/x\n")
    with pytest.raises(ConfigError) as e:
        Instance(runyard_home, registry=runyard_registry)
    path = (runyard_home / CONFIG_FILE).resolve()
    # The wording is libyaml's (or PyYAML's, without libyaml); the place is ours.
    assert str(e.value).startswith(f"{path}:2:23: malformed YAML: ")


def test_malformed_yaml_tab_indent(runyard_home: Path, runyard_registry: PluginRegistry) -> None:
    _write_yaml(runyard_home, "executor:\n\tin_process: {}\n")
    with pytest.raises(ConfigError) as e:
        Instance(runyard_home, registry=runyard_registry)
    assert str(e.value).startswith(f"{(runyard_home / CONFIG_FILE).resolve()}:2:1: malformed YAML: ")


def test_unknown_top_level_key_lists_allowed_keys(runyard_make_instance: Callable[..., Instance]) -> None:
    with pytest.raises(ConfigError) as e:
        runyard_make_instance({"executor": "in_process", "exector": "in_process"})
    assert str(e.value).endswith(
        f"{CONFIG_FILE}: unknown key 'exector'; did you mean 'executor'? "
        "(allowed keys: storage, run_launcher, executor, outputs, step_worker, run_coordinator, run_retries, "
        "run_monitoring, daemon)"
    )


def test_top_level_must_be_a_mapping(runyard_home: Path, runyard_registry: PluginRegistry) -> None:
    _write_yaml(runyard_home, "- executor\n- storage\n")
    with pytest.raises(ConfigError) as e:
        Instance(runyard_home, registry=runyard_registry)
    assert str(e.value) == f"{(runyard_home / CONFIG_FILE).resolve()}: expected a mapping of sections at the top level"


def test_unknown_key_in_plugin_section_gives_key_path(runyard_make_instance: Callable[..., Instance]) -> None:
    inst = runyard_make_instance({"executor": {"in_process": {"foo": 1}}})
    expected = f"{inst.config_source}: executor.in_process: unknown key 'foo' (allowed keys: {ALLOWED_EXECUTOR_KEYS})"
    assert inst.validate() == [expected]
    with pytest.raises(ConfigError) as e:
        execute_job(plain_job, instance=inst)
    assert str(e.value) == expected
    assert inst.storage.list_runs() == []


def test_unknown_key_error_names_the_file_even_with_executor_override(
    runyard_make_instance: Callable[..., Instance],
) -> None:
    # `--executor in_process` picks the executor; the bad key still lives in runyard.yaml,
    # and the message must send the user there, not to the command line.
    inst = runyard_make_instance({"executor": {"in_process": {"foo": 1}}})
    with pytest.raises(ConfigError) as e:
        execute_job(plain_job, instance=inst, executor="in_process")
    assert str(e.value) == (
        f"{inst.config_source}: executor.in_process: unknown key 'foo' (allowed keys: {ALLOWED_EXECUTOR_KEYS})"
    )


def test_unknown_key_in_storage_section(runyard_make_instance: Callable[..., Instance]) -> None:
    inst = runyard_make_instance({"storage": {"sqlite": {"pth": "x.db"}}})
    assert inst.validate() == [
        f"{inst.config_source}: storage.sqlite: unknown key 'pth'; did you mean 'path'? (allowed keys: path)"
    ]
    with pytest.raises(ConfigError) as e:
        inst.storage  # noqa: B018
    assert str(e.value) == inst.validate()[0]


def test_wrong_type_gives_path_expected_and_found(runyard_make_instance: Callable[..., Instance]) -> None:
    inst = runyard_make_instance({"executor": {"in_process": {"max_concurrent": "abc"}}})
    expected = f"{inst.config_source}: executor.in_process.max_concurrent: expected an integer, got 'abc' (a string)"
    assert inst.validate() == [expected]
    with pytest.raises(ConfigError) as e:
        execute_job(plain_job, instance=inst)
    assert str(e.value) == expected


def test_nested_wrong_types_are_all_reported(runyard_make_instance: Callable[..., Instance]) -> None:
    inst = runyard_make_instance(
        {"executor": {"in_process": {"tag_concurrency_limits": [{"key": "db", "limit": 1}, {"key": 5, "limit": "x"}]}}}
    )
    src = inst.config_source
    assert inst.validate() == [
        f"{src}: executor.in_process.tag_concurrency_limits[1].key: expected a string or {{env: NAME}}, "
        "got 5 (an integer)\n"
        f"{src}: executor.in_process.tag_concurrency_limits[1].limit: expected an integer, got 'x' (a string)"
    ]


def test_section_config_must_be_a_mapping(runyard_make_instance: Callable[..., Instance]) -> None:
    with pytest.raises(ConfigError) as e:
        runyard_make_instance({"executor": {"in_process": 4}})
    assert str(e.value).endswith(
        f"{CONFIG_FILE}: executor.in_process: expected a mapping of settings, got 4 (an integer)"
    )


def test_outputs_must_be_a_string(runyard_make_instance: Callable[..., Instance]) -> None:
    with pytest.raises(ConfigError) as e:
        runyard_make_instance({"outputs": 3})
    assert "outputs: expected a path or URL string" in str(e.value)


def test_outputs_setting_moves_the_output_store(runyard_make_instance: Callable[..., Instance], tmp_path: Path) -> None:
    inst = runyard_make_instance({"outputs": str(tmp_path / "elsewhere")})
    result = plain_job.execute_in_process(instance=inst)
    assert result.output_for("emit") == 1
    assert [p.name[:6] for p in (tmp_path / "elsewhere" / result.run_id).iterdir()] == [".pack-"]


# -- {env: NAME} ----------------------------------------------------------------------------


def test_env_reference_is_accepted_and_resolved_when_used(
    runyard_make_instance: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("RY_DB", raising=False)
    inst = runyard_make_instance({"storage": {"sqlite": {"path": {"env": "RY_DB"}}}})
    assert inst.validate() == []  # accepted where a string is, without reading the variable
    db = tmp_path / "from-env.db"
    monkeypatch.setenv("RY_DB", str(db))
    assert inst.storage.path == str(db)  # resolved when the storage opens
    result = plain_job.execute_in_process(instance=inst)
    assert result.success
    assert db.exists()
    # The config keeps the reference, never the value.
    assert inst.plugin_config("storage", inst.sections["storage"]).path.name == "RY_DB"  # type: ignore[arg-type]
    inst.storage.close()


def test_missing_env_var_is_a_config_error(
    runyard_make_instance: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RY_DB", raising=False)
    inst = runyard_make_instance({"storage": {"sqlite": {"path": {"env": "RY_DB"}}}})
    with pytest.raises(ConfigError) as e:
        inst.storage  # noqa: B018
    assert str(e.value) == (
        f"{inst.config_source}: storage.sqlite.path: environment variable 'RY_DB' is not set "
        "(referenced as {env: RY_DB}); set it in the environment of the process that reads this setting"
    )


def test_env_reference_with_other_keys_is_not_a_string(runyard_make_instance: Callable[..., Instance]) -> None:
    inst = runyard_make_instance({"storage": {"sqlite": {"path": {"env": "RY_DB", "default": "x"}}}})
    (problem,) = inst.validate()
    assert problem.startswith(f"{inst.config_source}: storage.sqlite.path: expected a string or {{env: NAME}}, got ")


# -- plugin names ---------------------------------------------------------------------------


def test_unknown_plugin_name_lists_installed_names(runyard_make_instance: Callable[..., Instance]) -> None:
    inst = runyard_make_instance({"executor": "nope"})
    installed = ", ".join(inst.registry.names("executor"))
    assert "in_process" in installed
    expected = f"{inst.config_source}: executor: unknown executor 'nope'; installed executors: {installed}"
    assert inst.validate() == [expected]
    with pytest.raises(PluginError) as e:
        execute_job(plain_job, instance=inst)
    assert str(e.value) == expected


def test_unknown_storage_name_lists_installed_storages(runyard_make_instance: Callable[..., Instance]) -> None:
    inst = runyard_make_instance({"storage": "mongo"})
    assert inst.validate() == [
        f"{inst.config_source}: storage: unknown storage 'mongo'; installed storages: postgres, sqlite"
    ]


def test_known_backend_installed_but_providing_nothing_says_so(
    runyard_make_instance: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A known backend whose distribution is installed but registers no plugin (an unfinished
    # or broken install) gets "reinstall", not "pip install" advice. Every real backend here
    # registers its plugins, so the backend 'lonely' is said to come from pluggy, which is
    # installed and registers nothing in group 'runyard'.
    import importlib.metadata

    from runyard import registry

    monkeypatch.setitem(registry.KNOWN_BACKENDS["executor"], "lonely", "lonely")
    monkeypatch.setitem(registry.EXTRA_DISTRIBUTIONS, "lonely", "pluggy")
    version = importlib.metadata.version("pluggy")
    inst = runyard_make_instance({"executor": "lonely"})
    (problem,) = inst.validate()
    assert problem.startswith(
        f"{inst.config_source}: executor: executor 'lonely': pluggy {version} is installed, but it registers "
        "no runyard plugin"
    ), problem
    assert 'pip install --force-reinstall "runyard[lonely]"' in problem
    with pytest.raises(PluginError) as e:
        execute_job(plain_job, instance=inst)
    assert str(e.value) == problem
    with pytest.raises(PluginError) as e:
        execute_job(plain_job, instance=inst, executor="lonely")
    assert str(e.value) == problem.replace(f"{inst.config_source}: executor:", "--executor:", 1)


def test_validate_collects_every_problem(runyard_make_instance: Callable[..., Instance]) -> None:
    inst = runyard_make_instance(
        {"storage": {"sqlite": {"bogus": 1}}, "executor": {"in_process": {"max_concurrent": True}}}
    )
    src = inst.config_source
    assert inst.validate() == [
        f"{src}: storage.sqlite: unknown key 'bogus' (allowed keys: path)",
        f"{src}: executor.in_process.max_concurrent: expected an integer, got True (a boolean)",
    ]


# -- executor precedence --------------------------------------------------------------------


class _Executors:
    """A plugin providing several executors that all reuse the in-process handler."""

    def __init__(self, *names: str) -> None:
        self.names = names

    @hookimpl
    def runyard_executors(self) -> list[ExecutorSpec]:
        caps = Capabilities(enforces_timeouts=True, can_terminate=True, max_concurrency=1, needs_shared_outputs=False)
        return [ExecutorSpec(name=n, handler=IN_PROCESS_HANDLER, capabilities=caps, default_max_concurrent=1,
                             api_version=API_VERSION)
                for n in self.names]


LAYERS = ("e_override", "e_runconfig", "e_job", "e_defs", "e_instance")


@pytest.fixture
def layered(runyard_make_instance: Callable[..., Instance], runyard_registry: PluginRegistry) -> Instance:
    runyard_registry.register(_Executors(*LAYERS), name="layers", distribution="runyard-tests")
    return runyard_make_instance({"executor": {"e_instance": {"max_concurrent": 1}}})


@job(executor="e_job", executor_config={"max_concurrent": 1})
def job_with_executor():  # type: ignore[no-untyped-def]
    emit(2)


def _cases(inst: Instance) -> list[tuple[dict, str]]:
    defs = Definitions(jobs=[job_with_executor], executor={"e_defs": {}})
    rc = {"execution": {"e_runconfig": {"max_concurrent": 1}}}
    return [
        ({"job": job_with_executor, "override": "e_override", "run_config": rc, "definitions": defs}, "e_override"),
        ({"job": job_with_executor, "run_config": rc, "definitions": defs}, "e_runconfig"),
        ({"job": job_with_executor, "definitions": defs}, "e_job"),
        ({"job": plain_job, "definitions": defs}, "e_defs"),
        ({"job": plain_job}, "e_instance"),
    ]


def test_executor_precedence_resolve(layered: Instance) -> None:
    for kw, expected in _cases(layered):
        kw = dict(kw)
        j = kw.pop("job")
        assert resolve_executor(j, instance=layered, **kw).name == expected, kw
    # Without any layer: the built-in default.
    assert resolve_executor(plain_job).name == "multi_or_in_process"
    assert resolve_executor(plain_job, instance=Instance.ephemeral()).name == "multi_or_in_process"


def test_executor_precedence_end_to_end(layered: Instance) -> None:
    for kw, expected in _cases(layered):
        kw = dict(kw)
        j = kw.pop("job")
        override = kw.pop("override", None)
        result = execute_job(j, instance=layered, executor=override, **kw)
        assert result.success, (expected, result.events)
        assert result.run.executor == expected
        assert layered.storage.get_run(result.run_id).executor == expected  # type: ignore[union-attr]


def test_builtin_default_end_to_end(runyard_instance: Instance) -> None:
    result = execute_job(plain_job, instance=runyard_instance)
    assert result.success, result.events
    assert result.run.executor == "multi_or_in_process"
    # Each step in a process of its own: not this one.
    starts = [e for e in result.events if e.type is EventType.STEP_START]
    assert starts and all(e.data["pid"] != os.getpid() for e in starts)


def test_config_merges_layers_naming_the_same_executor(layered: Instance) -> None:
    limits = [{"key": "db", "limit": 1}]
    resolved = resolve_executor(
        plain_job,
        instance=Instance(None, config={"executor": {"e_x": {"max_concurrent": 8, "tag_concurrency_limits": limits}}}),
        run_config={"execution": {"e_x": {"max_concurrent": 2}}},
        override="e_x",
    )
    assert resolved.name == "e_x"
    assert resolved.config == {"max_concurrent": 2, "tag_concurrency_limits": limits}
    assert [sel.source for sel in resolved.layers] == ["--executor", "run config", "instance config"]
    # A layer naming another executor contributes nothing.
    other = resolve_executor(job_with_executor, run_config={"execution": {"e_other": {"max_concurrent": 3}}})
    assert other.name == "e_other" and other.config == {"max_concurrent": 3}


def test_execute_in_process_always_uses_in_process(layered: Instance) -> None:
    result = job_with_executor.execute_in_process(instance=layered)
    assert result.success
    assert result.run.executor == "in_process"

    @job(executor="dask", executor_config={"n_workers": 8})
    def dask_job():  # type: ignore[no-untyped-def]
        emit(3)

    # Even when the job names an executor that is not installed.
    result = dask_job.execute_in_process(instance=layered)
    assert result.success and result.run.executor == "in_process"
    assert result.output_for("emit") == 3


def test_execute_in_process_ignores_an_instance_executor_that_is_not_installed(
    runyard_make_instance: Callable[..., Instance],
) -> None:
    inst = runyard_make_instance({"executor": {"dask": {"n_workers": 4}}})
    result = plain_job.execute_in_process(instance=inst)
    assert result.success and result.run.executor == "in_process"


def test_bad_execution_section_in_run_config() -> None:
    with pytest.raises(ConfigError) as e:
        execute_job(plain_job, run_config={"execution": {"a": {}, "b": {}}})
    assert str(e.value) == (
        "run config: execution: expected a single-key mapping naming the plugin, "
        "like `execution: {in_process: {}}`, got a mapping"
    )


def test_in_process_rejects_more_concurrency_than_it_has() -> None:
    with pytest.raises(ConfigError) as e:
        execute_job(plain_job, run_config={"execution": {"in_process": {"max_concurrent": 4}}})
    assert str(e.value) == (
        "run config: execution.in_process.max_concurrent: 4 is more than executor 'in_process' can run at once (1)"
    )


# -- runyard instance validate ----------------------------------------------------------------


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RUNYARD_HOME": str(home)}
    return subprocess.run([str(RUNYARD), *args], env=env, capture_output=True, text=True, timeout=60)


def test_instance_validate_reports_problems(runyard_home: Path) -> None:
    (runyard_home / CONFIG_FILE).write_text(
        yaml.safe_dump({"storage": {"sqlite": {"bogus": 1}}, "executor": {"in_process": {"max_concurrent": "abc"}}})
    )
    proc = _cli(runyard_home, "instance", "validate")
    assert proc.returncode == 2, proc
    path = runyard_home.resolve() / CONFIG_FILE
    assert proc.stderr.splitlines() == [
        f"error: {path}: storage.sqlite: unknown key 'bogus' (allowed keys: path)",
        f"error: {path}: executor.in_process.max_concurrent: expected an integer, got 'abc' (a string)",
    ]
    assert "Traceback" not in proc.stderr


def test_instance_validate_ok_and_unparseable(runyard_home: Path) -> None:
    (runyard_home / CONFIG_FILE).write_text("executor: in_process\n")
    ok = _cli(runyard_home, "instance", "validate")
    assert ok.returncode == 0, ok
    assert ok.stdout.strip() == f"{runyard_home.resolve() / CONFIG_FILE}: ok"
    (runyard_home / CONFIG_FILE).write_text("executor: in_process\nbogus: 1\n")
    bad = _cli(runyard_home, "instance", "validate")
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        f"error: {runyard_home.resolve() / CONFIG_FILE}: unknown key 'bogus' "
        "(allowed keys: storage, run_launcher, executor, outputs, step_worker, run_coordinator, run_retries, "
        "run_monitoring, daemon)"
    )
