"""What runyard asks ECS for, and what it makes of ECS's answers: the task definition
built from settings, RunTask's arguments, and the reading of a described task (pure data,
no AWS calls; the calls are in `_aws`).

Reading a task (`read_task`), as ECS documents its lifecycle:

* PROVISIONING, PENDING, ACTIVATING, RUNNING, DEACTIVATING, STOPPING, DEPROVISIONING: the
  task lives (``running``); one still before RUNNING after ``start_timeout`` is stuck; one
  DEACTIVATING to DEPROVISIONING whose container has STOPPED with an exit code is read as
  STOPPED (below): the worker is over, only ECS's clean-up is left;
* STOPPED with ``stopCode`` TaskFailedToStart: it never started (``not_started``), whatever
  the exit code says (usually None);
* STOPPED with an ``OutOfMemoryError`` reason, or exit code 137 with an OOM reason: ``oom``;
* STOPPED with exit code 0: ``exited`` cleanly; another code: ``exited`` with it; None
  without TaskFailedToStart: ``lost`` (the container never reported an exit: a host or
  Spot interruption, an agent disconnect), never success.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Mapping
from typing import Any

import attrs
from runyard.plugin import SIGNING_KEY_ENV, resolve, signal_name

from .settings import TAG_RUN_ID, EcsSettings

# The instance's runyard.yaml, for a run task whose RUNYARD_HOME is not mounted.
CONFIG_ENV = "RUNYARD_ECS_CONFIG"
LIVE_STATES = ("PROVISIONING", "PENDING", "ACTIVATING", "RUNNING", "DEACTIVATING", "STOPPING", "DEPROVISIONING")
STARTING_STATES = ("PROVISIONING", "PENDING", "ACTIVATING")
STOPPING_STATES = ("DEACTIVATING", "STOPPING", "DEPROVISIONING")


def task_definition(cfg: EcsSettings, *, image: str | None = None, cpu: Any = None, memory: Any = None,
                    region: str) -> dict[str, Any]:
    """RegisterTaskDefinition's arguments (without family and tags) from the settings."""
    log = cfg.log_configuration
    container: dict[str, Any] = {
        "name": cfg.container_name,
        "image": str(resolve(image or cfg.image)),
        "essential": True,
        "logConfiguration": {
            "logDriver": "awslogs",
            "options": {
                "awslogs-group": str(resolve(log.group)),
                "awslogs-region": str(resolve(log.region) or region),
                "awslogs-stream-prefix": str(resolve(log.stream_prefix)),
                **({"awslogs-create-group": "true"} if log.create_group else {}),
            },
        },
    }
    secrets = {k: str(resolve(v)) for k, v in cfg.secrets.items()}
    if cfg.signing_key_secret:
        secrets[SIGNING_KEY_ENV] = str(resolve(cfg.signing_key_secret))
    if cfg.config_secret:
        secrets[CONFIG_ENV] = str(resolve(cfg.config_secret))
    if secrets:
        container["secrets"] = [{"name": k, "valueFrom": v} for k, v in sorted(secrets.items())]
    if cfg.stop_timeout is not None:
        container["stopTimeout"] = cfg.stop_timeout
    volumes = []
    mounts = []
    for i, spec in enumerate(cfg.volumes):
        parts = str(resolve(spec)).split(":")
        name = f"runyard-volume-{i}"
        volumes.append({"name": name, "host": {"sourcePath": parts[0]}})
        mounts.append({"sourceVolume": name, "containerPath": parts[1],
                       "readOnly": len(parts) > 2 and parts[2] == "ro"})
    if mounts:
        container["mountPoints"] = mounts
    out: dict[str, Any] = {"containerDefinitions": [container]}
    if volumes:
        out["volumes"] = volumes
    fargate = cfg.launch_type == "FARGATE"
    mode = cfg.network_mode or ("awsvpc" if fargate else None)
    if mode:
        out["networkMode"] = mode
    if cfg.launch_type:
        out["requiresCompatibilities"] = [cfg.launch_type]
    cpu = cpu if cpu is not None else cfg.cpu
    memory = memory if memory is not None else cfg.memory
    if cpu is not None:
        out["cpu"] = str(cpu)
    if memory is not None:
        out["memory"] = str(memory)
    elif not fargate:
        # EC2 needs a memory figure at the task or the container level.
        container["memoryReservation"] = 256
    if cfg.ephemeral_storage is not None:
        out["ephemeralStorage"] = {"sizeInGiB": cfg.ephemeral_storage}
    if cfg.execution_role_arn:
        out["executionRoleArn"] = str(resolve(cfg.execution_role_arn))
    if cfg.task_role_arn:
        out["taskRoleArn"] = str(resolve(cfg.task_role_arn))
    return out


def environment(values: Mapping[str, Any]) -> list[dict[str, str]]:
    """Container override environment; ``{env: NAME}`` values are read here, at launch."""
    return [{"name": k, "value": str(resolve(v) or "")} for k, v in sorted(values.items())]


def run_task_kwargs(cfg: EcsSettings, *, task_definition_arn: str, command: list[str], env: Mapping[str, Any],
                    run_id: str, kind: str, extra_tags: Mapping[str, str], started_by: str,
                    cpu: Any = None, memory: Any = None) -> dict[str, Any]:
    override: dict[str, Any] = {"name": cfg.container_name, "command": command, "environment": environment(env)}
    overrides: dict[str, Any] = {"containerOverrides": [override]}
    if cpu is not None:
        overrides["cpu"] = str(cpu)
    if memory is not None:
        overrides["memory"] = str(memory)
    tags = {**{k: str(resolve(v)) for k, v in cfg.tags.items()}, TAG_RUN_ID: run_id, "runyard.kind": kind,
            **extra_tags}
    kwargs: dict[str, Any] = {
        **cfg.run_task_kwargs,
        "cluster": cfg.cluster,
        "taskDefinition": task_definition_arn,
        "overrides": overrides,
        "count": 1,
        "startedBy": started_by[:128],
        "tags": [{"key": k, "value": v[:256]} for k, v in tags.items()],
    }
    if cfg.launch_type:
        kwargs["launchType"] = cfg.launch_type
    if cfg.capacity_provider_strategy:
        kwargs["capacityProviderStrategy"] = [
            {"capacityProvider": c.capacity_provider, "weight": c.weight, "base": c.base}
            for c in cfg.capacity_provider_strategy
        ]
    if cfg.platform_version:
        kwargs["platformVersion"] = cfg.platform_version
    net = cfg.network_configuration
    if net is not None:
        kwargs["networkConfiguration"] = {"awsvpcConfiguration": {
            "subnets": list(net.subnets), "securityGroups": list(net.security_groups),
            "assignPublicIp": "ENABLED" if net.assign_public_ip else "DISABLED"}}
    if cfg.propagate_tags:
        kwargs["propagateTags"] = cfg.propagate_tags
    return kwargs


@attrs.frozen
class TaskState:
    """A described task, read: ``phase`` is running, stuck, not_started, oom, exited or lost."""

    phase: str
    status: str
    exit_code: int | None = None
    stop_code: str = ""
    reason: str = ""

    @property
    def is_over(self) -> bool:
        return self.phase not in ("running",)

    def describe(self) -> str:
        """What happened, in words: exit code and signal, stop code and reason."""
        parts = []
        if self.exit_code is not None:
            parts.append(f"exited with code {self.exit_code}")
            if self.exit_code > 128:
                parts[-1] += f" (killed by {signal_name(self.exit_code - 128)})"
        elif self.phase == "not_started":
            parts.append("failed to start")
        elif self.status == "STOPPED":
            parts.append("stopped without an exit code")
        if self.stop_code:
            parts.append(f"stop code {self.stop_code}")
        if self.reason:
            parts.append(f"reason: {self.reason}")
        return ", ".join(parts) or self.status


def _created(task: Mapping[str, Any]) -> float | None:
    value = task.get("createdAt")
    if isinstance(value, _dt.datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    return None


def read_task(task: Mapping[str, Any], container_name: str, *, start_timeout: float,
              now: float | None = None) -> TaskState:
    status = str(task.get("lastStatus") or "")
    stop_code = str(task.get("stopCode") or "")
    reason = str(task.get("stoppedReason") or "")
    container = next((c for c in task.get("containers") or [] if c.get("name") == container_name), None)
    if container is None and task.get("containers"):
        container = task["containers"][0]
    code = container.get("exitCode") if container else None
    creason = str((container or {}).get("reason") or "")
    if creason and creason not in reason:
        reason = f"{reason}; {creason}" if reason else creason
    # A task whose essential container has exited with a code is over for runyard, while
    # ECS still stops it (DEACTIVATING, STOPPING, DEPROVISIONING: tens of seconds on Fargate
    # while its network interface is released): waiting for STOPPED would hold each step, and
    # its max_concurrent slot, that long after its ending.
    exited = code is not None and (container or {}).get("lastStatus") == "STOPPED"
    if status != "STOPPED" and not (exited and status in STOPPING_STATES):
        created = _created(task)
        now = time.time() if now is None else now
        if status in STARTING_STATES and created is not None and now - created > start_timeout:
            return TaskState("stuck", status, None, stop_code, reason)
        return TaskState("running", status, None, stop_code, reason)
    if stop_code == "TaskFailedToStart":
        return TaskState("not_started", status, code, stop_code, reason)
    if "OutOfMemoryError" in reason or (code == 137 and "memory" in reason.lower()):
        return TaskState("oom", status, code, stop_code, reason)
    if code is None:
        return TaskState("lost", status, None, stop_code, reason)
    return TaskState("exited", status, int(code), stop_code, reason)
