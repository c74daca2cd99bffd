"""Settings of the ``docker`` executor and run launcher, and the names on the wire (step
tags, container labels), shared by the plugin module, the executor, the launcher, the CLI
and the reaper. Imports only attrs, re and `runyard.plugin`: no docker SDK.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
from runyard.plugin import EnvVar, ExecutorConfig, check_env_items, one_of

PULL_POLICIES = ("never", "if_not_present", "always")
CLEANUP_POLICIES = ("always", "on_success", "never")

# Step tag read by the executor (documented in docs/backends/docker.md); resources come
# through runyard's own RESOURCES_TAG.
IMAGE_TAG = "runyard/docker/image"

# Labels on every container this package starts; cleanup finds containers by them.
LABEL_KIND = "runyard.kind"  # "step" or "run"
LABEL_RUN_ID = "runyard.run_id"
LABEL_STEP_KEY = "runyard.step_key"
LABEL_ATTEMPT_ID = "runyard.attempt_id"
LABEL_INSTANCE = "runyard.instance"  # RUNYARD_HOME of the instance, when it has one

# Arguments of containers.create that the settings above own: giving them in
# container_kwargs would silently fight the executor, so it is an error naming the key to use.
RESERVED_KWARGS = {
    "image": "image",
    "command": "(the executor sets the command)",
    "entrypoint": "(the executor runs the image's python; do not replace the entrypoint)",
    "environment": "env_vars",
    "volumes": "volumes",
    "labels": "labels",
    "network": "network",
    "network_mode": "network",
    "name": "(each container gets a name of its own: runyard-step-RUN-STEP-ATTEMPT or runyard-run-RUN; "
            "find them by label)",
    "init": "(always true: docker-init as PID 1 passes SIGTERM on and reaps the step's children)",
    "mem_limit": "memory",
    "nano_cpus": "cpus",
    "detach": "(always detached)",
    "auto_remove": "cleanup",
    "remove": "cleanup",
    "stdout": "(always captured)",
    "stderr": "(always captured)",
    "stream": "(not a create argument)",
}

_VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]+$")
_MEMORY = re.compile(r"^\d+(\.\d+)?[bkmgBKMG]?$")
_MOUNT_MODES = {"ro", "rw", "z", "Z", "shared", "slave", "private", "rshared", "rslave", "rprivate", "nocopy",
                "consistent", "cached", "delegated"}

# Options of which a mount takes one at most.
_EXCLUSIVE_MODES = (
    {"ro", "rw"},
    {"z", "Z"},
    {"shared", "slave", "private", "rshared", "rslave", "rprivate"},
    {"consistent", "cached", "delegated"},
    {"nocopy"},
)


def _one_of(choices: tuple[str, ...]) -> Any:
    return one_of(*choices)


def parse_volume(spec: str) -> tuple[str, str, str]:
    """``SOURCE:TARGET[:MODE]`` -> (source, target, mode); ValueError says what is wrong."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"{spec!r} is not SOURCE:TARGET or SOURCE:TARGET:MODE")
    source, target = parts[0], parts[1]
    mode = parts[2] if len(parts) == 3 else "rw"
    if not (source.startswith("/") or _VOLUME_NAME.match(source)):
        raise ValueError(f"{spec!r}: the source {source!r} is neither an absolute host path nor a volume name")
    if not target.startswith("/"):
        raise ValueError(f"{spec!r}: the target {target!r} must be an absolute path in the container")
    modes = mode.split(",")
    bad = [m for m in modes if m not in _MOUNT_MODES]
    if bad:
        raise ValueError(f"{spec!r}: unknown mount mode {bad[0]!r} (use ro or rw)")
    for group in _EXCLUSIVE_MODES:
        given = [m for m in modes if m in group]
        if len(given) > 1:
            raise ValueError(f"{spec!r}: mount modes {' and '.join(given)} conflict (give one of them)")
    return source, target, mode


def _check_volumes(_: Any, __: attrs.Attribute, value: list[Any]) -> None:
    for i, spec in enumerate(value):
        if isinstance(spec, EnvVar):
            continue
        try:
            parse_volume(spec)
        except ValueError as e:
            raise ValueError(f"volumes[{i}]: {e}") from None


def check_memory(where: str, value: Any) -> None:
    if isinstance(value, str) and not _MEMORY.match(value):
        raise ValueError(f"{where}: expected a size like 512m or 2g, got {value!r}")


def _check_memory(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        check_memory(attribute.name, value)


def _check_cpus(_: Any, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name}: expected a number of CPUs above 0, got {value}")


def _check_kwargs(_: Any, __: attrs.Attribute, value: dict[str, Any]) -> None:
    for key in value:
        if key in RESERVED_KWARGS:
            raise ValueError(f"container_kwargs.{key}: set by the plugin; use {RESERVED_KWARGS[key]} instead")


@attrs.frozen(kw_only=True, slots=False)  # no slots: the executor's config also inherits ExecutorConfig
class DockerSettings:
    """Settings shared by the ``docker`` executor and the ``docker`` run launcher.

    See docs/backends/docker.md for each key with examples.
    """

    image: str
    docker_host: str | None = None
    pull_policy: str = attrs.field(default="if_not_present", validator=_one_of(PULL_POLICIES))
    network: str | None = None
    networks: list[str] = attrs.field(factory=list)
    env_vars: list[Any] = attrs.field(factory=list, validator=check_env_items)
    volumes: list[str] = attrs.field(factory=list, validator=_check_volumes)
    labels: dict[str, str] = attrs.field(factory=dict)
    memory: str | None = attrs.field(default=None, validator=_check_memory)
    cpus: float | None = attrs.field(default=None, validator=_check_cpus)
    container_kwargs: dict[str, Any] = attrs.field(factory=dict, validator=_check_kwargs)
    cleanup: str = attrs.field(default="always", validator=_one_of(CLEANUP_POLICIES))
    mount_outputs: bool = True
    mount_code: bool = True
    terminate_grace: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))

    def __attrs_post_init__(self) -> None:
        if self.network is not None and self.networks:
            raise ValueError("network and networks: give one of them (network: NAME is networks: [NAME])")


@attrs.frozen(kw_only=True, slots=False)
class DockerExecutorConfig(ExecutorConfig, DockerSettings):
    """``executor: {docker: {...}}``: each step attempt in a fresh container.

    ``heartbeat_timeout``: a step container stops itself when the run worker has not
    refreshed its heartbeat for this many seconds (the worker died); 0 turns that off.
    """

    heartbeat_timeout: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))


@attrs.frozen(kw_only=True)
class DockerLauncherConfig(DockerSettings):
    """``run_launcher: {docker: {...}}``: each run's worker in a container.

    ``mount_home``: bind-mount ``RUNYARD_HOME`` at the same path (SQLite storage, outputs,
    runyard.yaml). ``mount_docker_socket``: bind-mount the engine's socket into the run
    container. Whoever holds that socket is root on the engine's machine, so by default
    (None) it is mounted only for runs whose executor is ``docker`` (they need it to start
    step containers); true mounts it for every run, false never.
    """

    mount_home: bool = True
    mount_docker_socket: bool | None = None
