"""Settings of the ``ecs`` executor and run launcher, and the names on the wire (step tag,
task tags, startedBy). Imports only attrs, re and `runyard.plugin`: no boto3, so listing
plugins and validating runyard.yaml stay fast (see docs/backends/ecs.md for every key).
"""

from __future__ import annotations

import re
from typing import Any

import attrs
from runyard.plugin import ExecutorConfig, RunLauncherConfig, one_of

# Step tag: a JSON object of per-step overrides (docs/backends/ecs.md, "Per-step overrides").
OVERRIDES_TAG = "runyard/ecs"
STEP_OVERRIDE_KEYS = ("cpu", "memory", "image", "task_definition", "env_vars")

# Tags on every task this package starts; `startedBy` is ``runyard:`` + the run id so that a
# forced terminate finds the run's step tasks with one ListTasks call.
TAG_RUN_ID = "runyard.run_id"
TAG_KIND = "runyard.kind"  # "run" or "step"
TAG_STEP_KEY = "runyard.step_key"
TAG_CONTENT = "runyard.content"  # on task definitions registered from settings: their content hash
STARTED_BY_PREFIX = "runyard:"

LAUNCH_TYPES = ("EC2", "FARGATE", "EXTERNAL")
NETWORK_MODES = ("awsvpc", "bridge", "host", "none")
PROPAGATE_TAGS = ("TASK_DEFINITION", "NONE")

# RunTask arguments the settings own: giving them in run_task_kwargs would silently fight
# them, so it is an error naming the setting to use.
RESERVED_RUN_TASK_KWARGS = {
    "cluster": "cluster",
    "taskDefinition": "task_definition",
    "overrides": "(the plugin sets the command and environment; use env_vars, cpu, memory)",
    "launchType": "launch_type",
    "capacityProviderStrategy": "capacity_provider_strategy",
    "networkConfiguration": "network_configuration",
    "tags": "tags",
    "propagateTags": "propagate_tags",
    "count": "(one task per run or step attempt)",
    "startedBy": "(the plugin sets it to find a run's tasks)",
}

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FAMILY = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
# A secret is a Secrets Manager ARN, or a Parameter Store ARN or parameter name.
_SECRET = re.compile(r"^(arn:aws[a-z-]*:(secretsmanager|ssm):[a-z0-9-]+:\d{12}:.+|/?[A-Za-z0-9_.\-/]+)$")
_VOLUME = re.compile(r"^(/[^:]*):(/[^:]*)(:(ro|rw))?$")


def _check_env_vars(_: Any, __: attrs.Attribute, value: dict[str, Any]) -> None:
    for name in value:
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ValueError(f"env_vars.{name}: not a variable name (letters, digits and _, not starting with a digit)")


def _check_secrets(_: Any, __: attrs.Attribute, value: dict[str, Any]) -> None:
    for name, ref in value.items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"secrets.{name}: not a variable name (letters, digits and _)")
        if isinstance(ref, str) and not _SECRET.match(ref):
            raise ValueError(
                f"secrets.{name}: expected a Secrets Manager ARN (arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME) "
                f"or a Parameter Store ARN or name, got {ref!r}"
            )


def _check_secret_ref(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, str) and not _SECRET.match(value):
        raise ValueError(
            f"{attribute.name}: expected a Secrets Manager ARN (arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME) "
            f"or a Parameter Store ARN or name, got {value!r}"
        )


def _check_volumes(_: Any, __: attrs.Attribute, value: list[Any]) -> None:
    for i, spec in enumerate(value):
        if isinstance(spec, str) and not _VOLUME.match(spec):
            raise ValueError(f"volumes[{i}]: expected HOST_PATH:CONTAINER_PATH[:ro|rw] (absolute paths), got {spec!r}")


def _check_kwargs(_: Any, __: attrs.Attribute, value: dict[str, Any]) -> None:
    for key in value:
        if key in RESERVED_RUN_TASK_KWARGS:
            raise ValueError(f"run_task_kwargs.{key}: set by the plugin; use {RESERVED_RUN_TASK_KWARGS[key]} instead")


def _check_size(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    text = str(value) if isinstance(value, int | float | str) and not isinstance(value, bool) else "?"
    # ECS accepts units (1024, "1 vCPU", "2 GB"); reject what is clearly not a size.
    if not re.match(r"^\d+(\.\d+)?( ?(vCPU|vcpu|GB|gb|MB|mb))?$", text):
        raise ValueError(f"{attribute.name}: expected a number of CPU units or MiB (e.g. 256, 512) or "
                         f"'1 vCPU' / '2 GB', got {value!r}")


@attrs.frozen(kw_only=True)
class NetworkConfiguration:
    """awsvpc networking: the task's subnets, security groups and whether it gets a public IP."""

    subnets: list[str] = attrs.field(factory=list)
    security_groups: list[str] = attrs.field(factory=list)
    assign_public_ip: bool = False


@attrs.frozen(kw_only=True)
class CapacityProvider:
    """One entry of a capacity provider strategy."""

    capacity_provider: str
    weight: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    base: int = attrs.field(default=0, validator=attrs.validators.ge(0))


@attrs.frozen(kw_only=True)
class LogConfiguration:
    """Where the tasks' output goes (the awslogs driver), and so where runyard reads it from."""

    group: str = "/runyard/ecs"
    stream_prefix: str = "runyard"
    create_group: bool = True
    region: str | None = None  # default: the settings' region


@attrs.frozen(kw_only=True, slots=False)  # no slots: the executor's config also inherits ExecutorConfig
class EcsSettings:
    """Settings shared by the ``ecs`` executor and the ``ecs`` run launcher.

    See docs/backends/ecs.md for each key with examples.
    """

    cluster: str = "default"
    task_definition: str | None = None
    task_definition_prefix: str = attrs.field(default="runyard")
    container_name: str = "runyard"
    image: str | None = None
    launch_type: str | None = attrs.field(default=None, validator=attrs.validators.optional(one_of(*LAUNCH_TYPES)))
    capacity_provider_strategy: list[CapacityProvider] = attrs.field(factory=list)
    platform_version: str | None = None
    network_mode: str | None = attrs.field(default=None,
                                           validator=attrs.validators.optional(one_of(*NETWORK_MODES)))
    network_configuration: NetworkConfiguration | None = None
    # Any: YAML gives 256 or "1 vCPU"; the validator says what is accepted.
    cpu: Any = attrs.field(default=None, validator=_check_size)
    memory: Any = attrs.field(default=None, validator=_check_size)
    ephemeral_storage: int | None = attrs.field(
        default=None, validator=attrs.validators.optional([attrs.validators.ge(21), attrs.validators.le(200)]))
    execution_role_arn: str | None = None
    task_role_arn: str | None = None
    env_vars: dict[str, str] = attrs.field(factory=dict, validator=_check_env_vars)
    secrets: dict[str, str] = attrs.field(factory=dict, validator=_check_secrets)
    # Where what runyard itself must hand the tasks in secret comes from (docs/backends/ecs.md,
    # "Secrets"): ECS puts the values in the container's environment from the task
    # definition's `secrets`, so they never appear in RunTask's overrides (DescribeTasks).
    signing_key_secret: str | None = attrs.field(default=None, validator=_check_secret_ref)
    config_secret: str | None = attrs.field(default=None, validator=_check_secret_ref)
    secrets_in_overrides: bool = False
    tags: dict[str, str] = attrs.field(factory=dict)
    propagate_tags: str | None = attrs.field(default=None,
                                             validator=attrs.validators.optional(one_of(*PROPAGATE_TAGS)))
    log_configuration: LogConfiguration = attrs.field(factory=LogConfiguration)
    volumes: list[str] = attrs.field(factory=list, validator=_check_volumes)
    stop_timeout: int | None = attrs.field(default=None, validator=attrs.validators.optional(
        [attrs.validators.ge(2), attrs.validators.le(120)]))
    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    run_task_kwargs: dict[str, Any] = attrs.field(factory=dict, validator=_check_kwargs)
    run_task_attempts: int = attrs.field(default=6, validator=attrs.validators.ge(1))
    start_timeout: float = attrs.field(default=600.0, validator=attrs.validators.gt(0))
    missing_grace: float = attrs.field(default=60.0, validator=attrs.validators.ge(0))
    poll_interval: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))

    def __attrs_post_init__(self) -> None:
        # Only checks within this one section: a run config may give some keys (e.g.
        # max_concurrent) over runyard.yaml's, so "image is required" is checked at launch.
        if self.launch_type is not None and self.capacity_provider_strategy:
            raise ValueError("launch_type and capacity_provider_strategy: give one of them (ECS refuses both)")
        reserved = {"RUNYARD_SIGNING_KEY", "RUNYARD_ECS_CONFIG"} & set(self.secrets)
        if reserved:
            name = sorted(reserved)[0]
            key = "signing_key_secret" if name == "RUNYARD_SIGNING_KEY" else "config_secret"
            raise ValueError(f"secrets.{name}: set by runyard; give the secret as {key} instead")
        if isinstance(self.task_definition_prefix, str) and not _FAMILY.match(self.task_definition_prefix):
            raise ValueError(f"task_definition_prefix: letters, digits, - and _ only (up to 200), "
                             f"got {self.task_definition_prefix!r}")


@attrs.frozen(kw_only=True, slots=False)
class EcsExecutorConfig(ExecutorConfig, EcsSettings):
    """``executor: {ecs: {...}}``: each step attempt in an ECS task of its own."""


@attrs.frozen(kw_only=True, slots=False)
class EcsLauncherConfig(RunLauncherConfig, EcsSettings):
    """``run_launcher: {ecs: {...}}``: each run's worker in an ECS task."""
