"""The docker executor on the real engine: live events, fd-level output, failure kinds,
step tags, and the checks made before any step starts."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from runyard import ConfigError, EventType, FailureKind, RunStatus, execute_job

from .conftest import SESSION, SESSION_LABEL, TEST_LABELS


def _config(settings: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"execution": {"docker": {**settings, **more}}}


def test_events_arrive_while_the_step_runs_and_output_is_captured_at_fd_level(
    docker_instance: Any, docker_job: Any, tmp_path: Path, run_containers: Any
) -> None:
    go = tmp_path / "go"
    box: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: box.update(result=execute_job(docker_job("stream_job"), instance=docker_instance,
                                                     run_config={"go": str(go)})),
        daemon=True,
    )
    t.start()
    # The step logs, then waits for the go file: its log event must reach storage first.
    deadline = time.monotonic() + 60
    seen = False
    while time.monotonic() < deadline and not seen:
        for run in docker_instance.storage.list_runs(limit=5):
            types = [s.event.type for s in docker_instance.storage.get_events(run.run_id)]
            seen = EventType.STEP_LOG in types
            assert EventType.STEP_SUCCESS not in types
        time.sleep(0.05)
    assert seen, "no STEP_LOG event arrived while the step was waiting"
    go.write_text("go")
    t.join(90)
    result = box["result"]
    assert result.success, result.events
    out = "".join(e.data["text"] for e in result.events if e.type is EventType.STEP_STDOUT)
    err = "".join(e.data["text"] for e in result.events if e.type is EventType.STEP_STDERR)
    assert "python print" in out and "from a subprocess" in out
    assert "subprocess stderr" in err and "python stderr" in err
    assert "python print" not in err and "subprocess stderr" not in out
    # The step ran in a container: its hostname is the container's, not ours.
    import socket

    assert result.output_for("streams") != socket.gethostname()
    assert run_containers(result.run_id) == [] or _wait_gone(run_containers, result.run_id)


def _wait_gone(run_containers: Any, run_id: str) -> bool:
    deadline = time.monotonic() + 10
    while run_containers(run_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    return run_containers(run_id) == []


def test_memory_limit_exceeded_is_an_oom_failure(docker_instance: Any, docker_job: Any) -> None:
    result = execute_job(docker_job("oom_job"), instance=docker_instance)
    assert result.status is RunStatus.FAILURE
    failure = result.failure_for("hog")
    assert failure is not None and failure.kind is FailureKind.OOM, failure
    assert failure.exit_code == 137 and "64m" in failure.message


def test_a_killed_step_is_a_signal_failure(docker_instance: Any, docker_job: Any) -> None:
    result = execute_job(docker_job("signal_job"), instance=docker_instance)
    failure = result.failure_for("killed")
    assert failure is not None and failure.kind is FailureKind.SIGNAL, failure
    assert failure.signal == 9 and failure.exit_code == 137


def test_missing_step_image_fails_before_any_step_starts(
    docker_instance: Any, docker_job: Any, run_containers: Any
) -> None:
    result = execute_job(docker_job("missing_image_job"), instance=docker_instance)
    assert result.status is RunStatus.FAILURE
    assert not any(e.type is EventType.STEP_START for e in result.events)
    failure = result.failure_for("elsewhere") or result.failure_for("one")
    assert failure is not None and failure.kind is FailureKind.NOT_STARTED
    assert "runyard/docker/image" in failure.message and "runyard-test/does-not-exist:1" in failure.message
    assert "runyard docker build-image" in failure.message
    assert run_containers(result.run_id) == []


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"docker_host": "unix:///nonexistent/docker.sock"},
         r"executor\.docker\.docker_host: the Docker engine at unix:///nonexistent/docker.sock is not reachable"),
        ({"image": "runyard-test/not-built:0"},
         r"executor\.docker\.image: image 'runyard-test/not-built:0' is not in the Docker engine and "
         r"executor\.docker\.pull_policy is never; build it with `runyard docker build-image"),
        ({"volumes": ["TMP/missing-dir:/data"]},
         r"executor\.docker\.volumes\[0\]: the host path '\S+/missing-dir' does not exist; create it"),
        ({"volumes": ["runyard-test-no-such-volume:/data"]},
         r"executor\.docker\.volumes\[0\]: Docker volume 'runyard-test-no-such-volume' does not exist; "
         r"create it with `docker volume create"),
        ({"network": "runyard-test-no-such-net"},
         r"executor\.docker\.network\[0\]: network 'runyard-test-no-such-net' does not exist"),
        ({"container_kwargs": {"not_an_arg": 1}},
         r"executor\.docker\.container_kwargs\.not_an_arg: not an argument of the docker SDK"),
        ({"volumes": ["TMP:/a", "TMP:/a/:ro"]},
         r"executor\.docker\.volumes\[1\]: the target /a/ is already mounted by volumes\[0\]"),
        ({"cpus": 1024},
         r"executor\.docker\.cpus: the Docker engine does not accept a container with these settings: "
         r"Range of CPUs is from"),
        ({"memory": "1k"}, r"executor\.docker\.memory: the Docker engine does not accept .*[Mm]inimum memory"),
        ({"container_kwargs": {"cpuset_cpus": "1023"}},
         r"executor\.docker\.container_kwargs\.cpuset_cpus: the Docker engine does not accept .*CPUs"),
        ({"container_kwargs": {"shm_size": "lots", "working_dir": "/tmp"}},
         r"executor\.docker\.container_kwargs\.shm_size: the Docker engine does not accept .*lots"),
    ],
    ids=["daemon-unreachable", "image-missing", "host-path-missing", "volume-missing", "unknown-network",
         "unknown-kwarg", "same-target", "too-many-cpus", "too-little-memory", "bad-kwarg-value", "bad-kwarg-type"],
)
def test_bad_settings_fail_before_any_container_starts(
    runyard_make_instance: Any, docker_settings: dict[str, Any], docker_job: Any, run_containers: Any,
    settings: dict[str, Any], expected: str, tmp_path: Path,
) -> None:
    if "volumes" in settings:
        settings = {"volumes": [v.replace("TMP", str(tmp_path)) for v in settings["volumes"]]}
    instance = runyard_make_instance({"executor": {"docker": {**docker_settings, **settings}}})
    with pytest.raises(ConfigError, match=expected):
        execute_job(docker_job("hello_job"), instance=instance)
    (run,) = instance.storage.list_runs()
    assert run.status is RunStatus.FAILURE
    assert not [s for s in instance.storage.get_events(run.run_id) if s.event.type is EventType.STEP_START]
    assert run_containers(run.run_id) == []


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"pull_policy": "sometimes"}, "executor.docker: pull_policy: expected one of never, if_not_present, always"),
        ({"volumes": ["/data"]}, "executor.docker: volumes[0]: '/data' is not SOURCE:TARGET"),
        ({"volumes": ["/srv:data"]}, "the target 'data' must be an absolute path"),
        ({"volumes": ["/x:/a:rw,ro"]}, "volumes[0]: '/x:/a:rw,ro': mount modes rw and ro conflict"),
        ({"env_vars": ["1BAD"]}, "env_vars[0]: '1BAD' is not NAME or NAME=VALUE"),
        ({"network": "a", "networks": ["b"]}, "network and networks: give one of them"),
        ({"container_kwargs": {"command": "sh"}}, "container_kwargs.command: set by the plugin"),
        ({"container_kwargs": {"name": "mine"}}, "container_kwargs.name: set by the plugin; use (each container gets"),
        ({"container_kwargs": {"init": False}}, "container_kwargs.init: set by the plugin"),
        ({"memory": "lots"}, "memory: expected a size like 512m or 2g"),
        ({"cleanup": "sometimes"}, "cleanup: expected one of always, on_success, never"),
    ],
)
def test_malformed_settings_are_rejected_when_the_config_is_read(
    runyard_make_instance: Any, settings: dict[str, Any], expected: str
) -> None:
    instance = runyard_make_instance({"executor": {"docker": {"image": "x", **settings}}})
    problems = instance.validate()
    assert len(problems) == 1 and expected in problems[0], problems


def test_resource_tags_are_checked_before_any_step_starts(
    runyard_make_instance: Any, docker_settings: dict[str, Any], tmp_path: Path
) -> None:
    job_file = tmp_path / "bad_tags.py"
    job_file.write_text(
        "from runyard import job, step\n"
        "@step(tags={'runyard/resources': 'gpus=1'})\n"
        "def a():\n    return 1\n"
        "@job\ndef bad_tags():\n    a()\n"
    )
    from runyard import CodePointer
    from runyard.plugin import preload_job

    instance = runyard_make_instance({"executor": {"docker": docker_settings}})
    result = execute_job(preload_job(CodePointer(file=str(job_file)), "bad_tags"), instance=instance)
    failure = result.failure_for("a")
    assert failure is not None and failure.kind is FailureKind.NOT_STARTED
    assert "step 'a': tag 'runyard/resources': unknown resource 'gpus'" in failure.message


def test_resource_tags_the_engine_refuses_fail_before_any_step_starts(
    runyard_make_instance: Any, docker_settings: dict[str, Any], tmp_path: Path, run_containers: Any
) -> None:
    job_file = tmp_path / "big_tags.py"
    job_file.write_text(
        "from runyard import job, step\n"
        "@step\ndef a():\n    return 1\n"
        "@step(tags={'runyard/resources': 'cpus=1024'})\n"
        "def b(x):\n    return x\n"
        "@job\ndef big_tags():\n    b(a())\n"
    )
    from runyard import CodePointer
    from runyard.plugin import preload_job

    instance = runyard_make_instance({"executor": {"docker": docker_settings}})
    result = execute_job(preload_job(CodePointer(file=str(job_file)), "big_tags"), instance=instance)
    assert result.status is RunStatus.FAILURE
    failure = result.failure_for("a")
    assert failure is not None and failure.kind is FailureKind.NOT_STARTED
    assert "step 'b': tag 'runyard/resources': cpus: the Docker engine does not accept" in failure.message
    assert not [s for s in instance.storage.get_events(result.run_id) if s.event.type is EventType.STEP_START]
    assert run_containers(result.run_id) == []


def test_step_containers_of_a_crashed_run_worker_are_removed(
    runyard_home: Path, docker_settings: dict[str, Any], run_containers: Any
) -> None:
    import json
    import os
    import signal
    import subprocess
    import sys

    import yaml

    (runyard_home / "runyard.yaml").write_text(yaml.safe_dump({"executor": {"docker": docker_settings}}))
    env = {**os.environ, "RUNYARD_HOME": str(runyard_home)}
    jobs = str(Path(__file__).resolve().parent / "docker_jobs.py")
    out = subprocess.check_output([sys.executable, "-m", "runyard", "job", "launch", "--json", "-f", jobs,
                                   "-j", "slow_job"], env=env, text=True)
    run_id = json.loads(out)["run_id"]
    deadline = time.monotonic() + 60
    while not any(c.status == "running" for c in run_containers(run_id)):
        assert time.monotonic() < deadline, "the step container did not start"
        time.sleep(0.1)
    from runyard import Instance

    instance = Instance(runyard_home)
    (launched,) = [s.event for s in instance.storage.get_events(run_id) if s.event.type is EventType.RUN_LAUNCHED]
    os.killpg(launched.data["worker"]["pgid"], signal.SIGKILL)  # the run worker crashes
    deadline = time.monotonic() + 30
    while run_containers(run_id):
        assert time.monotonic() < deadline, "the crashed run's step container was not removed"
        time.sleep(0.2)
    waited = subprocess.run([sys.executable, "-m", "runyard", "run", "wait", run_id, "--timeout", "30"], env=env,
                            capture_output=True, text=True)
    assert waited.returncode == 1
    assert instance.storage.get_run(run_id).status is RunStatus.FAILURE


def test_kept_containers_are_removed_by_the_cleanup_command(
    runyard_make_instance: Any, docker_settings: dict[str, Any], docker_job: Any, run_containers: Any,
    runyard_home: Path,
) -> None:
    import os
    import subprocess
    import sys

    instance = runyard_make_instance({"executor": {"docker": {**docker_settings, "cleanup": "on_success"}}})
    result = execute_job(docker_job("signal_job"), instance=instance)
    assert result.status is RunStatus.FAILURE
    (kept,) = run_containers(result.run_id)  # the failed step's container, kept for inspection
    assert kept.labels["runyard.step_key"] == "killed" and kept.labels["runyard.kind"] == "step"
    done = subprocess.run([sys.executable, "-m", "runyard", "docker", "cleanup", "--run", result.run_id],
                          env={**os.environ, "RUNYARD_HOME": str(runyard_home)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"removed {kept.name}" in done.stdout
    assert run_containers(result.run_id) == []


def test_settings_reach_the_container(
    runyard_make_instance: Any, docker_settings: dict[str, Any], docker_job: Any, docker_client: Any,
    run_containers: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "hello.txt").write_text("mounted")
    net = docker_client.networks.create(f"runyard-test-net-{tmp_path.name[-8:]}", labels=TEST_LABELS)
    monkeypatch.setenv("PASSED", "from the run worker")
    monkeypatch.setenv("OTHER", "read through {env: OTHER}")
    try:
        instance = runyard_make_instance({"executor": {"docker": {
            **docker_settings,
            # One source at two targets: both mounts must be there.
            "volumes": [*docker_settings["volumes"], f"{data}:/runyard-data:ro", f"{data}:/runyard-data-again"],
            "networks": ["bridge", net.name],
            "env_vars": ["PASSED", "SET=a value", {"FROM_OTHER": {"env": "OTHER"}}, "NOT_SET_ANYWHERE"],
            "labels": {**docker_settings["labels"], "team": "data"},
            "memory": "96m",
            "cpus": 0.5,
            "container_kwargs": {"pids_limit": 64},
            "cleanup": "never",
        }}})
        result = execute_job(docker_job("look_job"), instance=instance)
        assert result.success, result.events
        seen = result.output_for("look")
        assert seen["env"] == {"PASSED": "from the run worker", "SET": "a value",
                               "FROM_OTHER": "read through {env: OTHER}"}
        assert seen["data"] == "mounted" and seen["data_again"] == "mounted"
        assert seen["memory_limit"] == str(96 * 1024 * 1024)
        assert seen["cpu_quota"] == "50000"  # half of the 100 ms period (cgroup v1 or v2)
        (container,) = run_containers(result.run_id)  # kept: cleanup never
        attrs = container.attrs
        assert set(attrs["NetworkSettings"]["Networks"]) == {"bridge", net.name}
        assert attrs["HostConfig"]["PidsLimit"] == 64
        assert attrs["HostConfig"]["Memory"] == 96 * 1024 * 1024 and attrs["HostConfig"]["NanoCpus"] == 5 * 10**8
        assert "NOT_SET_ANYWHERE" not in " ".join(attrs["Config"]["Env"])
        assert container.labels["team"] == "data" and container.labels["runyard.step_key"] == "look"
        assert container.labels["runyard.instance"] == str(instance.home)
    finally:
        mine = {"label": ["team=data", f"{SESSION_LABEL}={SESSION}"]}
        for c in docker_client.containers.list(all=True, filters=mine):
            c.remove(force=True)
        net.remove()


def test_step_containers_stop_themselves_when_the_run_worker_and_its_reaper_die(
    runyard_home: Path, docker_settings: dict[str, Any], run_containers: Any
) -> None:
    import json
    import os
    import signal
    import subprocess
    import sys

    import yaml

    (runyard_home / "runyard.yaml").write_text(
        yaml.safe_dump({"executor": {"docker": {**docker_settings, "heartbeat_timeout": 4}}}))
    env = {**os.environ, "RUNYARD_HOME": str(runyard_home)}
    jobs = str(Path(__file__).resolve().parent / "docker_jobs.py")
    out = subprocess.check_output([sys.executable, "-m", "runyard", "job", "launch", "--json", "-f", jobs,
                                   "-j", "slow_job"], env=env, text=True)
    run_id = json.loads(out)["run_id"]
    deadline = time.monotonic() + 60
    while not any(c.status == "running" for c in run_containers(run_id)):
        assert time.monotonic() < deadline, "the step container did not start"
        time.sleep(0.1)
    # As when the whole machine or container of the run worker goes: nothing on this side
    # is left to remove the step container, which must stop by itself.
    for pid in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"runyard_docker.reaper" in cmd and run_id.encode() in cmd:
            os.kill(int(pid), signal.SIGKILL)
    from runyard import Instance

    instance = Instance(runyard_home)
    (launched,) = [s.event for s in instance.storage.get_events(run_id) if s.event.type is EventType.RUN_LAUNCHED]
    os.killpg(launched.data["worker"]["pgid"], signal.SIGKILL)
    deadline = time.monotonic() + 40
    while any(c.status == "running" for c in run_containers(run_id)):
        assert time.monotonic() < deadline, "the orphaned step container kept running"
        time.sleep(0.2)
    (left,) = run_containers(run_id)
    assert left.attrs["State"]["ExitCode"] == 3
    assert b"no heartbeat from the run worker" in left.logs(stdout=False, stderr=True)
    waited = subprocess.run([sys.executable, "-m", "runyard", "run", "wait", run_id, "--timeout", "30"], env=env,
                            capture_output=True, text=True)
    assert waited.returncode == 1
    done = subprocess.run([sys.executable, "-m", "runyard", "docker", "cleanup", "--run", run_id], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert run_containers(run_id) == []


def test_outputs_the_containers_cannot_write_are_rejected_before_any_step(
    runyard_make_instance: Any, docker_settings: dict[str, Any], docker_job: Any, run_containers: Any
) -> None:
    instance = runyard_make_instance(
        {"executor": {"docker": {**docker_settings, "volumes": [], "mount_outputs": False}}})
    with pytest.raises(ConfigError, match=r"executor\.docker\.mount_outputs: false, but the outputs directory "
                                          r"\S+ is not mounted by volumes"):
        execute_job(docker_job("hello_job"), instance=instance)
    (run,) = instance.storage.list_runs()
    assert not [s for s in instance.storage.get_events(run.run_id) if s.event.type is EventType.STEP_START]
    assert run_containers(run.run_id) == []


def test_local_outputs_with_a_remote_engine_are_rejected_before_any_step(
    runyard_make_instance: Any, docker_settings: dict[str, Any], docker_job: Any, run_containers: Any,
    tcp_engine: str,
) -> None:
    instance = runyard_make_instance(
        {"executor": {"docker": {**docker_settings, "volumes": [], "docker_host": tcp_engine.url}}})
    with pytest.raises(ConfigError, match=r"executor\.docker\.docker_host: the output store is the directory \S+ "
                                          r"on this machine, which containers on the Docker engine at "
                                          r"\S+ cannot reach"):
        execute_job(docker_job("hello_job"), instance=instance)
    (run,) = instance.storage.list_runs()
    assert run_containers(run.run_id) == []


def test_a_volume_of_the_outputs_directory_elsewhere_keeps_its_mount() -> None:
    from runyard_docker import _docker as d

    binds: d.Binds = [("/srv/outputs", "/elsewhere", "ro"), ("/srv/data", "/data", "rw")]
    d.add_bind(binds, "/srv/outputs", "rw")  # not covered by a target: mounted at its own path too
    d.add_bind(binds, "/data/sub", "rw")  # covered by the /data mount: nothing to add
    assert d.sdk_volumes(binds) == ["/srv/outputs:/elsewhere:ro", "/srv/data:/data:rw", "/srv/outputs:/srv/outputs:rw"]


def test_cleanup_keeps_every_container_of_an_unfinished_run(
    runyard_home: Path, docker_settings: dict[str, Any], docker_client: Any, run_containers: Any
) -> None:
    import os
    import subprocess
    import sys

    from runyard import Instance, RunRecord

    instance = Instance(runyard_home)
    run = RunRecord(job_name="hello_job", code_pointer={}, run_config={}, executor="docker", tags={},
                    parent_run_id=None, step_selection=None)
    instance.storage.add_run(run)
    assert instance.storage.set_run_status(run.run_id, RunStatus.STARTED)
    labels = {"runyard.run_id": run.run_id, "runyard.kind": "step", "runyard.instance": str(instance.home),
              **TEST_LABELS}
    # A step container the run worker has created and is about to start.
    created = docker_client.containers.create(docker_settings["image"], ["true"], labels=labels)
    try:
        env = {**os.environ, "RUNYARD_HOME": str(runyard_home)}
        cmd = [sys.executable, "-m", "runyard", "docker", "cleanup"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert [c.id for c in run_containers(run.run_id)] == [created.id]
        assert "1 container(s) of unfinished runs kept" in done.stderr
        assert instance.storage.set_run_status(run.run_id, RunStatus.FAILURE)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert run_containers(run.run_id) == []
    finally:
        if run_containers(run.run_id):
            created.remove(force=True)


def test_cleanup_may_come_from_the_environment(
    runyard_make_instance: Any, docker_settings: dict[str, Any], docker_job: Any, run_containers: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RUNYARD_TEST_CLEANUP", "never")
    instance = runyard_make_instance(
        {"executor": {"docker": {**docker_settings, "cleanup": {"env": "RUNYARD_TEST_CLEANUP"}}}})
    assert instance.validate() == []
    result = execute_job(docker_job("hello_job"), instance=instance)
    try:
        assert result.success, result.events
        kept = run_containers(result.run_id)
        assert sorted(c.labels["runyard.step_key"] for c in kept) == ["one", "plus_one"]  # never: both kept
    finally:
        for c in run_containers(result.run_id):
            c.remove(force=True)


def test_the_reaper_catches_a_create_that_lands_after_its_first_sweep(
    docker_settings: dict[str, Any], docker_client: Any, run_containers: Any
) -> None:
    import uuid

    from runyard_docker.reaper import remove_steps

    run_id = uuid.uuid4().hex
    labels = {"runyard.run_id": run_id, "runyard.kind": "step", **TEST_LABELS}
    errors: list[BaseException] = []

    def sweep() -> None:
        try:
            remove_steps(docker_client, run_id, keep_exited=False, settle=8.0)
        except BaseException as e:  # a sweep that dies leaves containers behind
            errors.append(e)

    sweeping = threading.Thread(target=sweep)
    sweeping.start()
    try:
        time.sleep(2.0)  # a create sent by a worker that just died, landing late
        docker_client.containers.create(docker_settings["image"], ["true"], labels=labels)
        sweeping.join(60)
        assert not sweeping.is_alive()
        assert errors == []
        assert run_containers(run_id) == []
    finally:
        for c in run_containers(run_id):
            c.remove(force=True)


def test_a_read_only_root_filesystem_runs_without_the_heartbeat(
    runyard_make_instance: Any, docker_settings: dict[str, Any], docker_job: Any
) -> None:
    # The heartbeat file cannot be written there: the steps still run, without the watchdog.
    instance = runyard_make_instance(
        {"executor": {"docker": {**docker_settings, "container_kwargs": {"read_only": True}}}})
    result = execute_job(docker_job("hello_job"), instance=instance)
    assert result.success, [e.message for e in result.events if e.type is EventType.STEP_FAILURE]
    assert result.output_for("plus_one") == 2
