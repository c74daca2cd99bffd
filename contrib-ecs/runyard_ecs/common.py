"""What the executor and the launcher share: the API client from settings (or from a
launched worker's data), the task definition a task runs (registered from settings and
reused by content, or an existing one) and where its log goes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from runyard import ConfigError
from runyard.plugin import resolve

from . import tasks
from ._aws import AwsError, EcsApi
from .settings import EcsSettings


def connect(cfg: EcsSettings, where: str) -> EcsApi:
    return EcsApi.shared(region=resolve(cfg.region), endpoint_url=resolve(cfg.endpoint_url),
                         profile=resolve(cfg.profile), where=where)


def connect_worker(worker: Mapping[str, Any], where: str) -> EcsApi:
    """The client of the region/endpoint/profile a task was launched with (from the data
    `launch` returned, not from the settings, which may have changed since)."""
    return EcsApi.shared(region=worker.get("region"), endpoint_url=worker.get("endpoint_url"),
                         profile=worker.get("profile"), where=where)


@attrs.frozen
class TaskDefinition:
    arn: str
    container: dict[str, Any]  # the definition of the container runyard runs in
    log: tuple[str, str | None] | None  # (group, stream prefix/container) of its awslogs output


def task_definition(api: EcsApi, cfg: EcsSettings, where: str, *, image: Any = None, cpu: Any = None,
                    memory: Any = None, existing: str | None = None) -> TaskDefinition:
    """The task definition to run: ``existing`` (or ``task_definition``) as it is, else one
    registered from the settings (reused when one with the same content exists)."""
    ref = existing or (resolve(cfg.task_definition) if image is None else None)
    if ref:
        td = api.describe_task_definition(str(ref))
        containers = td.get("containerDefinitions") or []
        container = next((c for c in containers if c.get("name") == cfg.container_name), None)
        if container is None:
            names = ", ".join(repr(c.get("name")) for c in containers)
            raise ConfigError(f"{where}.container_name: task definition {ref} has no container "
                              f"{cfg.container_name!r} (it has {names}); set container_name to one of them")
        return TaskDefinition(td["taskDefinitionArn"], container, _log(container))
    if image is None and cfg.image is None:
        raise ConfigError(f"{where}.image: required unless task_definition names an existing task definition; "
                          "give the image (with python3 and runyard) the tasks run")
    if cfg.launch_type == "FARGATE" and cfg.network_mode in (None, "awsvpc") and cfg.network_configuration is None:
        raise ConfigError(f"{where}.network_configuration: required for FARGATE tasks (awsvpc); give subnets and "
                          "security_groups")
    definition = tasks.task_definition(cfg, image=image, cpu=cpu, memory=memory, region=api.region)
    if cfg.log_configuration.create_group:
        api.ensure_log_group(str(resolve(cfg.log_configuration.group)))
    arn = api.ensure_task_definition(str(resolve(cfg.task_definition_prefix)), definition,
                                     attempts=cfg.run_task_attempts)
    container = definition["containerDefinitions"][0]
    return TaskDefinition(arn, container, _log(container))


def _log(container: Mapping[str, Any]) -> tuple[str, str | None] | None:
    conf = container.get("logConfiguration") or {}
    opts = conf.get("options") or {}
    if conf.get("logDriver") != "awslogs" or not opts.get("awslogs-group"):
        return None
    return opts["awslogs-group"], opts.get("awslogs-stream-prefix")


def log_stream(td: TaskDefinition, task_arn: str) -> tuple[str, str] | None:
    """(group, stream) of a task's output, when the container logs with awslogs and a prefix."""
    if td.log is None or not td.log[1]:
        return None
    return td.log[0], f"{td.log[1]}/{td.container['name']}/{task_arn.rsplit('/', 1)[-1]}"


# A command under /bin/sh, which every image has: as PID 1, python would ignore a SIGKILL
# it sends itself and sh ignores SIGTERM without a trap, so sh passes SIGTERM (StopTask)
# on to the command and exits with its status, 128+N when signal N killed it.
SUPERVISOR = r"""
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
"$@" &
child=$!
wait "$child"; status=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done
exit "$status"
""".strip()


def supervised(command: list[str], prelude: str = "", epilogue: str = "") -> list[str]:
    """``command`` run under `SUPERVISOR` (``prelude`` and ``epilogue``: shell lines
    before the command and before the exit)."""
    script = SUPERVISOR.replace('exit "$status"', f'{epilogue}\nexit "$status"' if epilogue else 'exit "$status"')
    return ["/bin/sh", "-c", f"{prelude}\n{script}" if prelude else script, "runyard-supervisor", *command]


def start_task(api: EcsApi, cfg: EcsSettings, where: str, td: TaskDefinition, kwargs: dict[str, Any],
               **td_args: Any) -> tuple[TaskDefinition, dict[str, Any]]:
    """RunTask; when ECS no longer knows the task definition registered from settings (it
    was deregistered, or an emulator was reset), register it again once and retry."""
    try:
        return td, api.run_task(kwargs, cfg.run_task_attempts)
    except (ConfigError, AwsError) as e:
        if "Unable to find task definition" not in str(e) or td_args.get("existing") or cfg.task_definition:
            raise
    api.forget_task_definition(td.arn)
    td = task_definition(api, cfg, where, **td_args)
    return td, api.run_task({**kwargs, "taskDefinition": td.arn}, cfg.run_task_attempts)
