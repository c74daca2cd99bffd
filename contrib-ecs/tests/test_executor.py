"""The ecs executor on the emulator: each step attempt an ECS task running the project
image on the real Docker engine, events read back from CloudWatch Logs."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from runyard import ConfigError, EventType, FailureKind, execute_job


def _config(settings: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"execution": {"ecs": {**settings, **more}}}


def test_steps_run_as_tasks_and_their_events_come_from_cloudwatch_logs(
    ecs_instance: Any, ecs_job: Any, ecs_settings: dict[str, Any], boto: Any
) -> None:
    result = execute_job(ecs_job("hello_job"), instance=ecs_instance)
    assert result.success, result.events
    assert result.output_for("plus_one") == 42
    out = "".join(e.data["text"] for e in result.events if e.type is EventType.STEP_STDOUT)
    err = "".join(e.data["text"] for e in result.events if e.type is EventType.STEP_STDERR)
    assert "hello from an ECS task" in out and "to stderr" in err
    # Both steps ran as tasks of the run, tagged with it, and their log streams hold the events.
    ecs = boto("ecs")
    arns = ecs.list_tasks(cluster=ecs_settings["cluster"], startedBy=f"runyard:{result.run_id}",
                          desiredStatus="STOPPED")["taskArns"]
    described = ecs.describe_tasks(cluster=ecs_settings["cluster"], tasks=arns, include=["TAGS"])["tasks"]
    steps = sorted(next(t["value"] for t in d["tags"] if t["key"] == "runyard.step_key") for d in described)
    assert steps == ["hello", "plus_one"]
    assert all(d["lastStatus"] == "STOPPED" and d["containers"][0]["exitCode"] == 0 for d in described)


def test_task_definitions_are_reused_by_content_never_one_revision_per_run(
    ecs_instance: Any, ecs_job: Any, ecs_settings: dict[str, Any], boto: Any
) -> None:
    from runyard_ecs._aws import EcsApi

    def ours() -> list[str]:
        arns = ecs.list_task_definitions(familyPrefix="runyard-")["taskDefinitionArns"]
        return sorted(a for a in arns if re.search(r"task-definition/runyard-[0-9a-f]{20}:", a))

    ecs = boto("ecs")
    assert execute_job(ecs_job("hello_job"), instance=ecs_instance).success
    before = ours()
    EcsApi._registered.clear()  # as a fresh process: found by family and content tag, not registered
    assert execute_job(ecs_job("hello_job"), instance=ecs_instance).success
    assert ours() == before
    # Other settings (memory) are other content: a family of its own, registered once.
    with_tag = {**ecs_settings, "memory": 768}
    other = execute_job(ecs_job("hello_job"), instance=ecs_instance, run_config=_config(with_tag))
    assert other.success
    after = ours()
    assert len(after) == len(before) + 1 and all(a.endswith(":1") for a in after)


def test_an_exit_code_without_an_ending_is_a_failure_of_the_step(ecs_instance: Any, ecs_job: Any) -> None:
    result = execute_job(ecs_job("exit_job"), instance=ecs_instance, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.events if e.type is EventType.STEP_FAILURE]
    assert failure.failure.kind is FailureKind.WORKER_LOST, failure.failure
    assert failure.failure.exit_code == 3 and "exited with code 3" in failure.failure.message


def test_missing_image_is_not_started_with_the_reason(
    runyard_make_instance: Any, ecs_settings: dict[str, Any], ecs_job: Any
) -> None:
    instance = runyard_make_instance({"executor": {"ecs": {**ecs_settings, "image": "runyard-test/absent:nope"}}})
    result = execute_job(ecs_job("hello_job"), instance=instance, raise_on_error=False)
    (failure,) = [e for e in result.events if e.type is EventType.STEP_FAILURE]
    assert failure.failure.kind is FailureKind.NOT_STARTED, failure.failure
    assert "TaskFailedToStart" in failure.failure.message and "absent" in failure.failure.message


def test_the_workers_own_stderr_before_its_start_waits_for_the_start(ecs_instance: Any, ecs_job: Any,
                                                                      ecs_settings: dict[str, Any]) -> None:
    # PYTHONPROFILEIMPORTTIME makes the step worker write to its real stderr while it imports,
    # before it writes its STEP_START: in the task's log those raw lines come first, and
    # StreamedAttempt holds them until the start (what it prints while loading the job, the
    # worker itself reports after its STEP_START).
    rc = _config(ecs_settings, env_vars={"PYTHONPROFILEIMPORTTIME": "1"})
    result = execute_job(ecs_job("hello_job"), instance=ecs_instance, run_config=rc)
    assert result.success, result.events
    for key in ("hello", "plus_one"):
        mine = [e for e in result.events if e.step_key == key]
        assert mine[0].type is EventType.STEP_START, [(e.type.value, str(e.data)[:200]) for e in mine[:3]]
        err = "".join(e.data["text"] for e in mine if e.type is EventType.STEP_STDERR)
        assert "import time:" in err, err[:500]


def test_the_signing_key_reaches_step_tasks_from_secrets_manager_not_the_overrides(
    ecs_instance: Any, ecs_job: Any, ecs_settings: dict[str, Any], boto: Any
) -> None:
    key = boto("secretsmanager").get_secret_value(SecretId=ecs_settings["signing_key_secret"])["SecretString"]
    result = execute_job(ecs_job("hello_job"), instance=ecs_instance)
    assert result.success, result.events  # the step workers verified requests signed with it
    ecs = boto("ecs")
    arns = ecs.list_tasks(cluster=ecs_settings["cluster"], startedBy=f"runyard:{result.run_id}",
                          desiredStatus="STOPPED")["taskArns"]
    described = ecs.describe_tasks(cluster=ecs_settings["cluster"], tasks=arns)["tasks"]
    assert len(described) == 2
    # What a DescribeTasks reader sees holds neither the key nor its variable.
    seen = json.dumps(described, default=str)
    assert key not in seen and "RUNYARD_SIGNING_KEY" not in seen
    (td,) = {d["taskDefinitionArn"] for d in described}
    container = ecs.describe_task_definition(taskDefinition=td)["taskDefinition"]["containerDefinitions"][0]
    assert {"name": "RUNYARD_SIGNING_KEY", "valueFrom": ecs_settings["signing_key_secret"]} in container["secrets"]


def test_without_a_signing_key_secret_nothing_starts_unless_overrides_are_allowed(
    runyard_make_instance: Any, ecs_job: Any, ecs_settings: dict[str, Any], boto: Any
) -> None:
    bare = {k: v for k, v in ecs_settings.items() if k != "signing_key_secret"}
    instance = runyard_make_instance({"executor": {"ecs": bare}})
    before = boto("ecs").list_tasks(cluster=ecs_settings["cluster"], desiredStatus="RUNNING")["taskArns"]
    with pytest.raises(ConfigError, match=r"runyard\.yaml: executor\.ecs\.signing_key_secret: required: .* set "
                       r"secrets_in_overrides: true"):
        execute_job(ecs_job("hello_job"), instance=instance)
    assert boto("ecs").list_tasks(cluster=ecs_settings["cluster"], desiredStatus="RUNNING")["taskArns"] == before
    # The explicit opt-in (for an emulator): a key made for the run, in the overrides.
    allowed = execute_job(ecs_job("hello_job"), instance=instance,
                          run_config=_config(bare, secrets_in_overrides=True))
    assert allowed.success, allowed.events
    ecs = boto("ecs")
    arns = ecs.list_tasks(cluster=ecs_settings["cluster"], startedBy=f"runyard:{allowed.run_id}",
                          desiredStatus="STOPPED")["taskArns"]
    env = ecs.describe_tasks(cluster=ecs_settings["cluster"], tasks=arns[:1])["tasks"][0]["overrides"][
        "containerOverrides"][0]["environment"]
    assert "RUNYARD_SIGNING_KEY" in {e["name"] for e in env}
