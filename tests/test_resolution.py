"""One resolved run: resolved once when it is created, stored with it, executed as stored.

Covers: the run worker executes the stored resolution even when its runyard.yaml changed
after the launch; ``config explain`` prints what a launch stores; a handler sees one
``max_concurrent`` (its config, its context and the engine agree) and where its settings
were written; every command validates the whole instance file, with the file, the key
path and a suggestion for a near miss; an unset ``{env: NAME}`` names the file and key
path; ``{env: NAME}`` references are stored, never their values; older databases without
the resolution column are upgraded and their runs still execute.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml
from runyard import CodePointer, ConfigError, job, step
from runyard.events import EventType
from runyard.execution import execute_job
from runyard.instance import CONFIG_FILE, Instance
from runyard.loader import load_job
from runyard.plugin import API_VERSION, Capabilities, ExecutorConfig, ExecutorSpec, HandlerContext, hookimpl
from runyard.registry import PluginRegistry
from runyard.resolution import ResolvedRun, resolve_run
from runyard.runs import create_run, launch_run, wait_for_run
from runyard.storage import RunRecord, RunStatus, RunStorage
from runyard.storage.sqlite import SqliteRunStorage
from runyard_local.in_process import InProcessStepHandler

from tests.test_storage import _open, pg_schema, pg_url  # noqa: F401 (fixtures)

RUNYARD = Path(sys.executable).parent / "runyard"

TWO_STEPS = """
import os
from runyard import job, step

@step
def emit() -> int:
    return os.getpid()

@step
def double(x: int) -> int:
    return 2

@job
def solo():
    double(emit())
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def ry(
    home: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "RUNYARD_HOME": str(home), **(env or {})}
    return subprocess.run([str(RUNYARD), *args], env=full, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    h = tmp_path / "home"
    h.mkdir()
    yield h
    # No run worker a test started outlives it.
    db = h / "runyard.db"
    if db.exists():
        storage = SqliteRunStorage(db)
        for run in storage.list_runs(limit=1000):
            for stored in storage.get_events(run.run_id, types=[EventType.RUN_LAUNCHED]):
                try:
                    os.killpg(stored.event.data["worker"]["pgid"], signal.SIGKILL)
                except (KeyError, ProcessLookupError, PermissionError):
                    pass
        storage.close()


def _yaml(home: Path, config: dict[str, Any] | str) -> Path:
    path = home / CONFIG_FILE
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path.resolve()


# -- the worker executes what was stored -------------------------------------------------------------


def test_worker_executes_the_stored_resolution_after_runyard_yaml_changed(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _yaml(home, {"executor": {"multiprocess": {"max_concurrent": 2, "start_method": {"env": "RY_START"}}}})
    f = write(tmp_path / "solo.py", TWO_STEPS)
    pointer = CodePointer(file=str(f.resolve()))
    job_def, loc = load_job(pointer, None)
    run = create_run(Instance(home), job_def, pointer=pointer, definitions=loc.definitions)
    stored = ResolvedRun.from_dict(run.resolution or {})
    assert (stored.executor.name, stored.max_concurrent) == ("multiprocess", 2)
    assert stored.executor.config == {"max_concurrent": 2, "start_method": {"env": "RY_START"}}
    assert stored.run_launcher is not None and stored.run_launcher.name == "default"

    # After the launch was resolved the file changes: another executor, a setting that is
    # not even valid, and a run launcher section with a typo. The run is what was resolved.
    _yaml(home, {"executor": {"in_process": {"max_concurrent": "lots"}}, "run_launcher": {"default": {"wrkers": 2}}})
    later = Instance(home)
    assert later.validate() and later.sections["executor"].name == "in_process"  # type: ignore[union-attr]
    monkeypatch.setenv("RY_START", "spawn")  # the default launcher's worker inherits it; read where it is used
    launch_run(later, run)
    result = wait_for_run(later, run.run_id, timeout=60)
    assert not result.timed_out and result.run.status is RunStatus.SUCCESS, [
        s.event for s in later.storage.get_events(run.run_id)
    ]
    (start,) = later.storage.get_events(run.run_id, types=[EventType.RUN_START])
    assert start.event.data["executor"] == "multiprocess" and start.event.data["max_concurrent"] == 2
    (launched,) = later.storage.get_events(run.run_id, types=[EventType.RUN_LAUNCHED])
    step_pids = {s.event.data["pid"] for s in later.storage.get_events(run.run_id, types=[EventType.STEP_START])}
    # multiprocess, not in_process: the steps ran in processes of their own, not in the worker.
    assert launched.event.data["worker"]["pid"] not in step_pids and len(step_pids) == 2
    assert later.storage.get_run(run.run_id).resolution == run.resolution  # type: ignore[union-attr]
    assert str(cfg) in json.dumps(run.resolution)  # it names where each setting came from


def test_a_stored_run_fails_with_the_reason_when_its_env_setting_is_unset_in_the_worker(
    home: Path, tmp_path: Path
) -> None:
    cfg = _yaml(home, {"executor": {"multiprocess": {"start_method": {"env": "RY_UNSET_START"}}}})
    f = write(tmp_path / "solo.py", TWO_STEPS)
    assert "RY_UNSET_START" not in os.environ
    launched = ry(home, "job", "launch", "-f", str(f), "--wait")
    assert launched.returncode == 1, launched.stderr
    run_id = launched.stdout.splitlines()[0]
    storage = Instance(home).storage
    run = storage.get_run(run_id)
    assert run is not None and run.status is RunStatus.FAILURE
    (failure,) = storage.get_events(run_id, types=[EventType.RUN_FAILURE])
    # Not "worker died": the reason, naming the file and the key path.
    assert f"{cfg}: executor.multiprocess.start_method: environment variable 'RY_UNSET_START'" in (
        failure.event.message
    ), failure.event.message


def test_config_explain_prints_what_launch_stores(home: Path, tmp_path: Path) -> None:
    _yaml(home, {"executor": {"multiprocess": {"max_concurrent": 3, "start_method": {"env": "RY_START"}}}})
    run_yaml = write(tmp_path / "run.yaml", "execution:\n  multiprocess: {terminate_grace: 1}\nextra: 1\n")
    f = write(tmp_path / "solo.py", TWO_STEPS)
    env = {"RY_START": "spawn"}
    explained = ry(home, "config", "explain", "-f", str(f), "-c", str(run_yaml), "--json", env=env)
    assert explained.returncode == 0, explained.stderr
    shown = json.loads(explained.stdout)
    launched = ry(home, "job", "launch", "-f", str(f), "-c", str(run_yaml), "--wait", env=env)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    run = Instance(home).storage.get_run(launched.stdout.splitlines()[0])
    assert run is not None and run.resolution is not None
    assert {k: shown[k] for k in run.resolution} == run.resolution
    assert shown["max_concurrent"] == 3 and shown["executor"]["config"]["terminate_grace"] == 1
    grace = next(s for s in shown["executor"]["settings"] if s["key"] == "terminate_grace")
    assert grace == {"key": "terminate_grace", "value": 1, "source": str(run_yaml),
                     "path": "execution.multiprocess.terminate_grace"}
    # And the text form prints the same numbers.
    text = ry(home, "config", "explain", "-f", str(f), "-c", str(run_yaml), env=env).stdout
    assert f"  steps at once: 3   ({home.resolve() / CONFIG_FILE}: executor.multiprocess.max_concurrent)" in text


# -- one max_concurrent --------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class RecorderConfig(ExecutorConfig):
    serial: bool = False
    token: str | None = None


SEEN: list[dict[str, Any]] = []


class RecordingHandler(InProcessStepHandler):
    """The in-process handler, recording what it was given (a real handler: steps run)."""

    def __init__(self, config: RecorderConfig, context: HandlerContext) -> None:
        super().__init__(config, context)
        from runyard.plugin import resolve

        SEEN.append({
            "config": config.max_concurrent,
            "context": context.max_concurrent,
            "where": context.where(),
            "where_serial": context.where("serial"),
            "token": resolve(config.token),
        })


def _serial(config: RecorderConfig) -> Capabilities:
    return Capabilities(enforces_timeouts=True, can_terminate=True, needs_shared_outputs=False,
                        max_concurrency=1 if config.serial else None)


class _Recorder:
    @hookimpl
    def runyard_executors(self) -> list[ExecutorSpec]:
        return [ExecutorSpec(name="recorder", api_version=API_VERSION, handler=f"{__name__}:RecordingHandler",
                             config=RecorderConfig, capabilities=_serial(RecorderConfig()), capabilities_for=_serial,
                             default_max_concurrent=3)]


@step
def one() -> int:
    return 1


@job
def tiny():  # type: ignore[no-untyped-def]
    one()


@pytest.fixture
def recorder(runyard_registry: PluginRegistry) -> Iterator[PluginRegistry]:
    runyard_registry.register(_Recorder(), name="recorder", distribution="runyard-tests")
    SEEN.clear()
    yield runyard_registry
    SEEN.clear()


def test_handler_config_context_and_engine_share_one_max_concurrent(
    recorder: PluginRegistry, runyard_make_instance: Callable[..., Instance]
) -> None:
    inst = runyard_make_instance({"executor": {"recorder": {}}})
    result = execute_job(tiny, instance=inst)
    assert result.success
    (start,) = [e for e in result.events if e.type is EventType.RUN_START]
    assert SEEN[-1]["config"] == SEEN[-1]["context"] == start.data["max_concurrent"] == 3  # the spec's default
    assert SEEN[-1]["where"] == f"{inst.config_source}: executor.recorder"
    stored = ResolvedRun.from_dict(inst.storage.get_run(result.run_id).resolution)  # type: ignore[union-attr, arg-type]
    assert stored.max_concurrent == 3 and stored.max_concurrent_from == "executor 'recorder''s default"

    # A setting that makes the executor serial lowers a configured max_concurrent: one number everywhere.
    inst = runyard_make_instance({"executor": {"recorder": {"max_concurrent": 8}}})
    result = execute_job(tiny, instance=inst, run_config={"execution": {"recorder": {"serial": True}}})
    assert result.success
    (start,) = [e for e in result.events if e.type is EventType.RUN_START]
    assert SEEN[-1]["config"] == SEEN[-1]["context"] == start.data["max_concurrent"] == 1
    assert SEEN[-1]["where_serial"] == "run config: execution.recorder.serial"
    stored = ResolvedRun.from_dict(inst.storage.get_run(result.run_id).resolution)  # type: ignore[union-attr, arg-type]
    assert stored.capabilities.max_concurrency == 1
    assert stored.max_concurrent_from == (
        f"{inst.config_source}: executor.recorder.max_concurrent says 8, lowered to 1 by the executor's other settings"
    )


def test_multi_or_in_process_in_process_mode_runs_one_step_at_a_time_without_rewriting_its_config(
    runyard_instance: Instance,
) -> None:
    rc = {"execution": {"multi_or_in_process": {"mode": "in_process", "max_concurrent": 8}}}
    result = execute_job(tiny, instance=runyard_instance, run_config=rc)
    assert result.success
    (start,) = [e for e in result.events if e.type is EventType.RUN_START]
    assert start.data["max_concurrent"] == 1
    assert {e.data["pid"] for e in result.events if e.type is EventType.STEP_START} == {os.getpid()}
    # multiprocess mode keeps the configured number.
    rc = {"execution": {"multi_or_in_process": {"multiprocess": {"start_method": "fork"}, "max_concurrent": 8}}}
    res = resolve_run(tiny, instance=runyard_instance, run_config=rc, launcher=False)
    assert res.max_concurrent == 8 and res.capabilities.max_concurrency is None


def test_dask_synchronous_scheduler_resolves_to_one_step_at_a_time_without_importing_dask(
    runyard_instance: Instance,
) -> None:
    pytest.importorskip("runyard_dask", reason="the dask plugin is part of this workspace")
    res = resolve_run(tiny, instance=runyard_instance, executor="dask",
                      run_config={"execution": {"dask": {"local_scheduler": "synchronous"}}}, launcher=False)
    assert res.max_concurrent == 1 and res.capabilities.max_concurrency == 1
    code = (
        "import sys\n"
        "from runyard import job, step\n"
        "from runyard.instance import Instance\n"
        "from runyard.resolution import resolve_run\n"
        "@step\ndef one() -> int:\n    return 1\n"
        "@job\ndef tiny():\n    one()\n"
        "r = resolve_run(tiny, instance=Instance.ephemeral(), executor='dask',\n"
        "                run_config={'execution': {'dask': {'local_scheduler': 'threads'}}}, launcher=False)\n"
        "assert r.max_concurrent == 32, r\n"
        "assert 'dask' not in sys.modules, 'resolution imported dask'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# -- every command validates the whole instance file -------------------------------------------------


def test_typo_in_run_launcher_section_fails_job_execute(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", TWO_STEPS)
    cfg = _yaml(home, {"run_launcher": {"dokcer": {}}})
    proc = ry(home, "job", "execute", "-f", str(f))
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith(
        f"error: {cfg}: run_launcher: unknown run launcher 'dokcer' (did you mean 'docker'?); installed run launchers: "
    )
    assert line.count("did you mean") == 1
    assert "Traceback" not in proc.stderr

    _yaml(home, {"run_launcher": {"default": {}}, "executor": {"in_process": {"max_concurent": 1}}})
    proc = ry(home, "job", "execute", "-f", str(f), "--executor", "multiprocess")  # the section is not even used
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {cfg}: executor.in_process: unknown key 'max_concurent'; did you mean 'max_concurrent'? "
        "(allowed keys: max_concurrent, tag_concurrency_limits)"
    )
    assert not (home / "runyard.db").exists() or Instance(home).storage.list_runs() == []


def test_typo_in_the_step_worker_section_fails_job_execute(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", TWO_STEPS)
    cfg = _yaml(home, {"step_worker": {"code_locatons": [str(tmp_path)]}})
    proc = ry(home, "job", "execute", "-f", str(f))
    assert proc.returncode == 2, proc
    (line,) = proc.stderr.splitlines()
    assert line.startswith(
        f"error: {cfg}: step_worker: unknown key 'code_locatons'; did you mean 'code_locations'? (allowed keys: "
    ), line


def test_typo_in_a_launcher_setting_fails_every_command(home: Path, tmp_path: Path) -> None:
    pytest.importorskip("runyard_docker", reason="the docker plugin is part of this workspace")
    f = write(tmp_path / "solo.py", TWO_STEPS)
    cfg = _yaml(home, {"run_launcher": {"docker": {"imgae": "python:3.12"}}})
    for args in (["job", "execute", "-f", str(f)], ["run", "list"], ["config", "explain", "-f", str(f)],
                 ["instance", "info"]):
        proc = ry(home, *args)
        assert proc.returncode == 2, (args, proc)
        (line,) = proc.stderr.splitlines()
        assert line.startswith(f"error: {cfg}: run_launcher.docker: unknown key 'imgae'; did you mean 'image'? ("), (
            args, line)


def test_unset_env_var_names_the_file_and_key_path(home: Path, tmp_path: Path) -> None:
    cfg = _yaml(home, {"storage": {"sqlite": {"path": {"env": "RY_NO_SUCH_DB"}}}})
    proc = ry(home, "run", "list")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {cfg}: storage.sqlite.path: environment variable 'RY_NO_SUCH_DB' is not set "
        "(referenced as {env: RY_NO_SUCH_DB}); set it in the environment of the process that reads this setting"
    )
    # An executor setting: read when the run's handler starts; the run fails and the command exits 2.
    cfg = _yaml(home, {"executor": {"multiprocess": {"start_method": {"env": "RY_NO_SUCH_START"}}}})
    f = write(tmp_path / "solo.py", TWO_STEPS)
    proc = ry(home, "job", "execute", "-f", str(f))
    assert proc.returncode == 2, proc
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {cfg}: executor.multiprocess.start_method: environment variable 'RY_NO_SUCH_START' is not set "
        "(referenced as {env: RY_NO_SUCH_START}); set it in the environment of the process that reads this setting"
    )


def test_unknown_executor_from_each_layer_names_where_it_was_written(
    runyard_make_instance: Callable[..., Instance], tmp_path: Path
) -> None:
    inst = runyard_make_instance({"executor": "multiproces"})
    with pytest.raises(ConfigError) as e:
        execute_job(tiny, instance=inst)
    assert str(e.value).startswith(
        f"{inst.config_source}: executor: unknown executor 'multiproces' (did you mean 'multiprocess'?); installed "
    )
    assert str(e.value).count("did you mean") == 1
    from runyard.config import RunConfig

    rc = RunConfig({"execution": {"in_proces": {}}}, source=str(tmp_path / "run.yaml"))
    with pytest.raises(ConfigError) as e:
        execute_job(tiny, instance=inst, run_config=rc)
    assert str(e.value).startswith(
        f"{tmp_path / 'run.yaml'}: execution: unknown executor 'in_proces' (did you mean 'in_process'?)"
    )
    assert str(e.value).count("did you mean") == 1


# -- secrets -----------------------------------------------------------------------------------------------


def test_env_references_are_stored_never_their_values(
    recorder: PluginRegistry, runyard_make_instance: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "s3cr3t-6f1d0a9c-never-stored"
    monkeypatch.setenv("RY_TOKEN", secret)
    inst = runyard_make_instance({"executor": {"recorder": {"token": {"env": "RY_TOKEN"}}}})
    result = execute_job(tiny, instance=inst)
    assert result.success
    assert SEEN[-1]["token"] == secret  # the handler read it where it was used
    run = inst.storage.get_run(result.run_id)
    assert run is not None and run.resolution is not None
    assert run.resolution["executor"]["config"] == {"token": {"env": "RY_TOKEN"}}
    token = next(s for s in run.resolution["executor"]["settings"] if s["key"] == "token")
    assert token["value"] == {"env": "RY_TOKEN"}
    inst.storage.close()
    for db in inst.home.glob("runyard.db*"):  # type: ignore[union-attr]
        assert secret.encode() not in db.read_bytes(), db


# -- storage ------------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunStorage]:
    if request.param == "sqlite":
        s: RunStorage = SqliteRunStorage(tmp_path / "runs.db")
    else:
        s = _open("postgres", request.getfixturevalue("pg_url"), request.getfixturevalue("pg_schema"))
    yield s
    s.close()


def test_resolution_round_trips_through_storage(storage: RunStorage, runyard_instance: Instance) -> None:
    res = resolve_run(tiny, instance=runyard_instance, run_config={"execution": {"multiprocess": {
        "start_method": {"env": "RY_START"}, "tag_concurrency_limits": [{"key": "db", "limit": 1}]}}})
    run = RunRecord(job_name="tiny", resolution=res.to_dict())
    storage.add_run(run)
    back = storage.get_run(run.run_id)
    assert back == run
    assert ResolvedRun.from_dict(back.resolution) == res  # type: ignore[union-attr, arg-type]


OLD_SQLITE_RUNS = """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, job_name TEXT NOT NULL, code_pointer TEXT, run_config TEXT NOT NULL,
    executor TEXT, tags TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL,
    ended_at REAL, parent_run_id TEXT, step_selection TEXT
);
"""


def test_a_database_from_before_resolutions_is_upgraded_and_its_queued_run_still_executes(
    home: Path, tmp_path: Path
) -> None:
    f = write(tmp_path / "solo.py", TWO_STEPS)
    conn = sqlite3.connect(home / "runyard.db")
    conn.executescript(OLD_SQLITE_RUNS)
    conn.execute(
        "INSERT INTO runs VALUES (?, 'solo', ?, '{}', 'in_process', '{}', 'QUEUED', ?, NULL, NULL, NULL, NULL)",
        ("a" * 32, json.dumps({"file": str(f.resolve())}), time.time()),
    )
    conn.commit()
    conn.close()
    inst = Instance(home)
    old = inst.storage.get_run("a" * 32)
    assert old is not None and old.resolution is None and old.executor == "in_process"
    # The worker of a run recorded before runs kept their resolution resolves it itself.
    proc = ry(home, "api", "execute-run", "a" * 32)
    assert proc.returncode == 0, proc.stderr
    done = inst.storage.get_run("a" * 32)
    assert done is not None and done.status is RunStatus.SUCCESS and done.resolution is None
    (start,) = inst.storage.get_events("a" * 32, types=[EventType.RUN_START])
    assert start.event.data["executor"] == "in_process"


def test_a_postgres_table_from_before_resolutions_gains_the_column(pg_url: str, pg_schema: str) -> None:  # noqa: F811
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{pg_schema}"')
        conn.execute(OLD_SQLITE_RUNS.replace("CREATE TABLE runs", f'CREATE TABLE "{pg_schema}".runyard_runs')
                     .replace("REAL", "DOUBLE PRECISION"))
        conn.execute(f'CREATE TABLE "{pg_schema}".runyard_events (id BIGINT GENERATED ALWAYS AS IDENTITY '
                     'PRIMARY KEY, run_id TEXT NOT NULL, step_key TEXT, type TEXT NOT NULL, '
                     '"timestamp" DOUBLE PRECISION NOT NULL, body TEXT NOT NULL)')
        conn.execute(f'INSERT INTO "{pg_schema}".runyard_runs VALUES (%s, %s, NULL, %s, NULL, %s, %s, %s, NULL, '
                     'NULL, NULL, NULL)', ("b" * 32, "old", "{}", "{}", "SUCCESS", 1.0))
    storage = _open("postgres", pg_url, pg_schema)
    try:
        old = storage.get_run("b" * 32)
        assert old is not None and old.resolution is None and old.status is RunStatus.SUCCESS
        new = RunRecord(job_name="new", resolution={"version": 1})
        storage.add_run(new)
        assert storage.get_run(new.run_id) == new
    finally:
        storage.close()
