"""AWS behaviour no emulator reproduces, on a FAKE: botocore's `Stubber` answers the calls
with responses shaped like AWS's (capacity, memory and AGENT ``failures[]``, throttling,
"Too many concurrent attempts" on registration, DescribeTasks ``[]`` just after RunTask, a
task stuck in PENDING, ``exitCode`` None, an OutOfMemoryError stop). These tests prove
what runyard-ecs does with such answers; they cannot prove AWS sends them as written (see
docs/backends/ecs.md, "What the tests cannot cover")."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from botocore.exceptions import ClientError
from botocore.stub import ANY, Stubber
from runyard import ConfigError
from runyard.plugin import FailureKind, RunRecord, RunStatus, StepRequest
from runyard_ecs import _aws, tasks
from runyard_ecs._aws import AwsError, EcsApi

ARN = "arn:aws:ecs:us-east-1:123456789012:task/c/0123456789abcdef"
TD = "arn:aws:ecs:us-east-1:123456789012:task-definition/runyard-x:1"
KW = {"cluster": "c", "taskDefinition": TD, "count": 1}


class FakeAws:
    """EcsApi with stubbed clients (a FAKE: no AWS, no emulator) and a recorded sleep."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.api = EcsApi(region="us-east-1", endpoint_url="http://aws.invalid", profile=None, where="executor.ecs",
                          sleep=self.sleeps.append)
        self.ecs_once = Stubber(self.api.ecs_once)
        self.ecs = Stubber(self.api.ecs)
        self.logs = Stubber(self.api.logs)
        for s in (self.ecs_once, self.ecs, self.logs):
            s.activate()

    def done(self) -> None:
        for s in (self.ecs_once, self.ecs, self.logs):
            s.assert_no_pending_responses()


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake")
    monkeypatch.setattr(EcsApi, "_registered", {})
    fake = FakeAws()
    yield fake
    fake.done()


def _task(status: str = "RUNNING", **more: Any) -> dict[str, Any]:
    task: dict[str, Any] = {"taskArn": ARN, "lastStatus": status, "containers": [{"name": "runyard"}]}
    task.update(more)
    return task


def _failure(reason: str) -> dict[str, Any]:
    return {"tasks": [], "failures": [{"arn": "arn:aws:ecs:us-east-1:123456789012:container-instance/c/1",
                                       "reason": reason}]}


@pytest.mark.parametrize("reason", ["RESOURCE:MEMORY", "RESOURCE:CPU", "AGENT",
                                    "Capacity is unavailable at this time. Please try again later or in a "
                                    "different availability zone"])
def test_run_task_placement_failures_are_retried_with_growing_backoff(aws: Any, reason: str) -> None:
    aws.ecs_once.add_response("run_task", _failure(reason), KW)
    aws.ecs_once.add_response("run_task", _failure(reason), KW)
    aws.ecs_once.add_response("run_task", {"tasks": [_task("PROVISIONING")], "failures": []}, KW)
    assert aws.api.run_task(dict(KW), attempts=5)["taskArn"] == ARN
    assert len(aws.sleeps) == 2 and aws.sleeps[1] > aws.sleeps[0] * 0.74  # 1 s then 2 s, each ±50% jitter


def test_run_task_throttling_is_retried_then_gives_up_with_the_reason(aws: Any) -> None:
    for _ in range(3):
        aws.ecs_once.add_client_error("run_task", "ThrottlingException", "Rate exceeded", 400, expected_params=KW)
    with pytest.raises(AwsError, match="3 times; last: ThrottlingException: Rate exceeded"):
        aws.api.run_task(dict(KW), attempts=3)
    assert len(aws.sleeps) == 2


def test_configuration_errors_are_never_retried(aws: Any) -> None:
    aws.ecs_once.add_client_error("run_task", "InvalidParameterException",
                                  "subnets can not be empty.", 400, expected_params=KW)
    with pytest.raises(ConfigError, match="InvalidParameterException: subnets can not be empty"):
        aws.api.run_task(dict(KW), attempts=5)
    assert aws.sleeps == []
    aws.ecs_once.add_response("run_task", _failure("MISSING"), KW)
    with pytest.raises(AwsError, match="MISSING"):
        aws.api.run_task(dict(KW), attempts=5)
    assert aws.sleeps == []


def test_a_task_definition_is_registered_once_per_content_and_reused(aws: Any) -> None:
    definition = {"containerDefinitions": [{"name": "runyard", "image": "img:1", "essential": True}]}
    digest = _aws.content_hash(definition)
    family = f"runyard-{digest}"
    aws.ecs.add_client_error("describe_task_definition", "ClientException", "Unable to describe task definition.",
                             400, expected_params={"taskDefinition": family, "include": ["TAGS"]})
    aws.ecs_once.add_response("register_task_definition", {"taskDefinition": {"taskDefinitionArn": f"{TD}"}},
                              {"family": family, "tags": [{"key": "runyard.content", "value": digest}],
                               **definition})
    assert aws.api.ensure_task_definition("runyard", definition) == TD
    # Again in this process: no call at all. In another process: found by its family, not registered.
    assert aws.api.ensure_task_definition("runyard", definition) == TD
    EcsApi._registered.clear()
    aws.ecs.add_response("describe_task_definition",
                         {"taskDefinition": {"taskDefinitionArn": TD, "status": "ACTIVE"},
                          "tags": [{"key": "runyard.content", "value": digest}]},
                         {"taskDefinition": family, "include": ["TAGS"]})
    assert aws.api.ensure_task_definition("runyard", definition) == TD


def test_concurrent_registrations_wait_and_reuse_the_winners_revision(aws: Any) -> None:
    definition = {"containerDefinitions": [{"name": "runyard", "image": "img:2", "essential": True}]}
    digest = _aws.content_hash(definition)
    family = f"runyard-{digest}"
    aws.ecs.add_client_error("describe_task_definition", "ClientException", "Unable to describe task definition.",
                             400, expected_params={"taskDefinition": family, "include": ["TAGS"]})
    aws.ecs_once.add_client_error(
        "register_task_definition", "ClientException",
        "Too many concurrent attempts to create a new revision of the specified family.", 400,
        expected_params={"family": family, "tags": [{"key": "runyard.content", "value": digest}], **definition})
    aws.ecs.add_response("describe_task_definition",
                         {"taskDefinition": {"taskDefinitionArn": TD.replace(":1", ":7"), "status": "ACTIVE"},
                          "tags": [{"key": "runyard.content", "value": digest}]},
                         {"taskDefinition": family, "include": ["TAGS"]})
    assert aws.api.ensure_task_definition("runyard", definition).endswith(":7")
    assert len(aws.sleeps) == 1


def test_a_task_stuck_in_pending_is_stuck_after_start_timeout_and_exit_code_none_is_never_success() -> None:
    created = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    pending = _task("PENDING", createdAt=created)
    assert tasks.read_task(pending, "runyard", start_timeout=600, now=created.timestamp() + 10).phase == "running"
    assert tasks.read_task(pending, "runyard", start_timeout=600, now=created.timestamp() + 601).phase == "stuck"
    lost = _task("STOPPED", stopCode="SpotInterruption", stoppedReason="Your Spot Task was interrupted.",
                 containers=[{"name": "runyard", "exitCode": None}])
    state = tasks.read_task(lost, "runyard", start_timeout=600)
    assert state.phase == "lost" and "without an exit code" in state.describe()
    failed = _task("STOPPED", stopCode="TaskFailedToStart", stoppedReason="CannotPullContainerError: denied",
                   containers=[{"name": "runyard"}])
    assert tasks.read_task(failed, "runyard", start_timeout=600).phase == "not_started"
    oom = _task("STOPPED", stopCode="EssentialContainerExited", stoppedReason="Essential container in task exited",
                containers=[{"name": "runyard", "exitCode": 137,
                             "reason": "OutOfMemoryError: Container killed due to memory usage"}])
    state = tasks.read_task(oom, "runyard", start_timeout=600)
    assert state.phase == "oom" and "OutOfMemoryError" in state.describe() and "SIGKILL" in state.describe()


def test_a_task_whose_container_exited_is_over_while_ecs_still_deprovisions_it() -> None:
    # Fargate: after the container exits, the task spends tens of seconds DEACTIVATING to
    # DEPROVISIONING (its network interface); the exit code is known from the start of it.
    for status in ("DEACTIVATING", "STOPPING", "DEPROVISIONING"):
        done = _task(status, stopCode="EssentialContainerExited",
                     containers=[{"name": "runyard", "lastStatus": "STOPPED", "exitCode": 0}])
        state = tasks.read_task(done, "runyard", start_timeout=600)
        assert (state.phase, state.exit_code, state.is_over) == ("exited", 0, True)
    # Not before the container has stopped with a code: a StopTask in progress is still live.
    stopping = _task("STOPPING", containers=[{"name": "runyard", "lastStatus": "RUNNING"}])
    assert tasks.read_task(stopping, "runyard", start_timeout=600).phase == "running"
    no_code = _task("DEPROVISIONING", containers=[{"name": "runyard", "lastStatus": "STOPPED"}])
    assert tasks.read_task(no_code, "runyard", start_timeout=600).phase == "running"


# -- the launcher's health on the fake -------------------------------------------------------


def _run() -> RunRecord:
    return RunRecord(run_id="r1", job_name="j", status=RunStatus.STARTED)


WORKER = {"task_arn": ARN, "cluster": "c", "region": "us-east-1", "endpoint_url": "http://aws.invalid",
          "container_name": "runyard", "started_by": "runyard:r1", "log_group": "/g", "log_stream": "p/runyard/x",
          "start_timeout": 600, "missing_grace": 30}


@pytest.fixture
def launcher(aws: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Any:
    from runyard_ecs import launcher as mod
    from runyard_ecs.settings import EcsLauncherConfig

    monkeypatch.setattr(mod, "connect_worker", lambda worker, where: aws.api)
    return mod.EcsRunLauncher(EcsLauncherConfig(image="img:1"), str(tmp_path))


def _no_steps(aws: Any) -> None:
    aws.ecs.add_response("list_tasks", {"taskArns": []},
                         {"cluster": "c", "startedBy": "runyard:r1", "desiredStatus": "RUNNING"})


def test_describe_tasks_empty_just_after_run_task_is_unknown_not_dead(aws: Any, launcher: Any) -> None:
    aws.ecs.add_response("describe_tasks", {"tasks": [], "failures": []}, {"cluster": "c", "tasks": [ARN]})
    health = launcher.check_health(_run(), WORKER)
    assert health.status.value == "unknown" and "missing_grace" in health.message


def test_a_task_stuck_in_pending_is_stopped_and_dead(aws: Any, launcher: Any) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=700)
    aws.ecs.add_response("describe_tasks", {"tasks": [_task("PENDING", createdAt=old)], "failures": []},
                         {"cluster": "c", "tasks": [ARN]})
    aws.ecs.add_response("stop_task", {"task": _task("PENDING")}, {"cluster": "c", "task": ARN, "reason": ANY})
    _no_steps(aws)
    health = launcher.check_health(_run(), WORKER)
    assert health.status.value == "dead" and "still PENDING after 600s" in health.message


def test_a_stopped_task_without_exit_code_is_dead_with_stop_code_reason_and_log(aws: Any, launcher: Any) -> None:
    stopped = _task("STOPPED", stopCode="TaskFailedToStart",
                    stoppedReason="ResourceInitializationError: unable to pull secrets",
                    containers=[{"name": "runyard"}])  # AWS leaves exitCode out: it is None to us
    aws.ecs.add_response("describe_tasks", {"tasks": [stopped], "failures": []}, {"cluster": "c", "tasks": [ARN]})
    aws.logs.add_response("get_log_events", {"events": [{"timestamp": 1, "message": "last words"}]},
                          {"logGroupName": "/g", "logStreamName": "p/runyard/x", "limit": 20, "startFromHead": False})
    _no_steps(aws)
    health = launcher.check_health(_run(), WORKER)
    assert health.status.value == "dead"
    assert "TaskFailedToStart" in health.message and "unable to pull secrets" in health.message
    assert "last words" in health.message


def test_the_executor_turns_stop_codes_into_failure_kinds(aws: Any) -> None:
    from runyard_ecs.executor import Attempt, EcsStepHandler
    from runyard_ecs.settings import EcsExecutorConfig

    handler = EcsStepHandler.__new__(EcsStepHandler)
    handler.config = EcsExecutorConfig(image="img:1")
    req = StepRequest.from_dict({"run_id": "r1", "step_key": "s", "job_name": "j", "code_pointer": {"module": "m"},
                                 "run_config": {}, "output_store": "file:///tmp/x", "attempt": 1, "inputs": {},
                                 "attempt_id": "a1"})

    def kind(task: dict[str, Any], started: bool = True) -> FailureKind:
        att = Attempt(req, {})
        att.task_arn = ARN
        att.started_step = started
        return handler._lost(att, tasks.read_task(task, "runyard", start_timeout=600)).kind

    def stopped(code: Any, **more: Any) -> dict[str, Any]:
        return _task("STOPPED", containers=[{"name": "runyard", "exitCode": code}], **more)

    assert kind(stopped(None, stopCode="TaskFailedToStart")) is FailureKind.NOT_STARTED
    assert kind(stopped(137, stoppedReason="OutOfMemoryError: Container killed")) is FailureKind.OOM
    assert kind(stopped(143)) is FailureKind.SIGNAL
    assert kind(stopped(None, stopCode="SpotInterruption")) is FailureKind.WORKER_LOST
    assert kind(stopped(1), started=False) is FailureKind.NOT_STARTED
    assert kind(stopped(1)) is FailureKind.WORKER_LOST


def test_client_errors_are_client_errors() -> None:
    # The adapter's error list is what callers catch without importing botocore.
    assert ClientError in _aws.error_types()
