"""Settings of the ecs plugins: validated when runyard.yaml is read (no AWS call), every key
documented, and the task definition and RunTask arguments they make."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import pytest
from runyard import ConfigError
from runyard_ecs import tasks
from runyard_ecs.settings import EcsExecutorConfig, EcsLauncherConfig, LogConfiguration, NetworkConfiguration

DOCS = Path(__file__).resolve().parents[2] / "docs" / "backends" / "ecs.md"


def test_every_setting_is_documented() -> None:
    text = DOCS.read_text()
    for cls in (EcsExecutorConfig, EcsLauncherConfig, NetworkConfiguration, LogConfiguration):
        for field in attrs.fields(cls):
            assert re.search(rf"`{field.name}`", text), f"{cls.__name__}.{field.name} is not in {DOCS.name}"


@pytest.mark.parametrize(("section", "match"), [
    ({"image": "i", "launch_type": "EC2", "capacity_provider_strategy": [{"capacity_provider": "x"}]},
     "give one of them"),
    ({"image": "i", "run_task_kwargs": {"overrides": {}}}, r"run_task_kwargs\.overrides: set by the plugin"),
    ({"image": "i", "secrets": {"TOKEN": "not an arn!"}}, "Secrets Manager ARN"),
    ({"image": "i", "signing_key_secret": "not an arn!"}, r"signing_key_secret: expected a Secrets Manager ARN"),
    ({"image": "i", "secrets": {"RUNYARD_SIGNING_KEY": "/p"}}, r"set by runyard; give the secret as signing_key"),
    ({"image": "i", "launch_type": "LAMBDA"}, "launch_type"),
    ({"image": "i", "volumes": ["relative:/x"]}, "HOST_PATH:CONTAINER_PATH"),
    ({"image": "i", "cpu": "lots"}, "CPU units"),
    ({"image": "i", "bogus": 1}, "bogus"),
])
def test_bad_settings_are_refused_with_the_key(runyard_make_instance: Any, section: dict[str, Any],
                                               match: str) -> None:
    instance = runyard_make_instance({"executor": {"ecs": section}})
    with pytest.raises(ConfigError, match=match) as info:
        instance.check()  # what every command does first; no AWS call is made
    assert "executor.ecs" in str(info.value) and "runyard.yaml" in str(info.value)


def test_the_task_definition_and_run_task_arguments_follow_the_settings() -> None:
    cfg = EcsLauncherConfig(
        image="img:1", launch_type="FARGATE", cpu=512, memory="1024", ephemeral_storage=30,
        network_configuration=NetworkConfiguration(subnets=["s1"], security_groups=["g1"], assign_public_ip=True),
        execution_role_arn="arn:aws:iam::1:role/exec", task_role_arn="arn:aws:iam::1:role/task",
        secrets={"TOKEN": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:t-AbC"},
        signing_key_secret="/runyard/key", config_secret="arn:aws:ssm:eu-west-1:123456789012:parameter/ry",
        tags={"team": "data"}, propagate_tags="TASK_DEFINITION", stop_timeout=10,
        run_task_kwargs={"enableExecuteCommand": True}, env_vars={"A": "1"})
    td = tasks.task_definition(cfg, region="eu-west-1")
    (c,) = td["containerDefinitions"]
    assert td["networkMode"] == "awsvpc" and td["requiresCompatibilities"] == ["FARGATE"]
    assert (td["cpu"], td["memory"], td["ephemeralStorage"]) == ("512", "1024", {"sizeInGiB": 30})
    assert td["executionRoleArn"].endswith("exec") and td["taskRoleArn"].endswith("task")
    assert c["secrets"] == [{"name": "RUNYARD_ECS_CONFIG", "valueFrom": cfg.config_secret},
                            {"name": "RUNYARD_SIGNING_KEY", "valueFrom": "/runyard/key"},
                            {"name": "TOKEN", "valueFrom": cfg.secrets["TOKEN"]}] and c["stopTimeout"] == 10
    assert c["logConfiguration"]["options"]["awslogs-region"] == "eu-west-1"
    kw = tasks.run_task_kwargs(cfg, task_definition_arn="arn:td", command=["x"], env={"A": "1"}, run_id="r1",
                               kind="run", extra_tags={}, started_by="runyard:r1")
    assert kw["launchType"] == "FARGATE" and kw["enableExecuteCommand"] is True
    assert kw["networkConfiguration"]["awsvpcConfiguration"] == {
        "subnets": ["s1"], "securityGroups": ["g1"], "assignPublicIp": "ENABLED"}
    assert {"key": "runyard.run_id", "value": "r1"} in kw["tags"] and {"key": "team", "value": "data"} in kw["tags"]
    assert kw["overrides"]["containerOverrides"][0]["environment"] == [{"name": "A", "value": "1"}]
    assert kw["propagateTags"] == "TASK_DEFINITION" and kw["startedBy"] == "runyard:r1"


def test_env_values_are_read_at_launch(monkeypatch: pytest.MonkeyPatch, runyard_make_instance: Any) -> None:
    from runyard.plugin import EnvVar

    monkeypatch.setenv("ECS_TEST_TOKEN", "s3cret")
    assert tasks.environment({"TOKEN": EnvVar("ECS_TEST_TOKEN")}) == [{"name": "TOKEN", "value": "s3cret"}]
