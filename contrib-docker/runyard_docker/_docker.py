"""What the executor and the launcher share: the engine connection, the checks made
before anything starts, and the container arguments built from `DockerSettings`.

Imports the docker SDK: imported only by `executor`, `launcher` and the CLI commands.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import docker
import docker.errors
import docker.models.containers
from runyard import ConfigError
from runyard.plugin import RESOURCES_TAG, EnvVar, environment_from, parse_resources_tag, resolve, signal_name

from .settings import (
    CLEANUP_POLICIES,
    LABEL_INSTANCE,
    LABEL_KIND,
    LABEL_RUN_ID,
    PULL_POLICIES,
    RESERVED_KWARGS,
    DockerSettings,
    check_memory,
    parse_volume,
)

START_HINT = "start it (on this project's machines: bash scripts/services.sh docker) or set docker_host"
BUILD_HINT = "build it with `runyard docker build-image --tag IMAGE` (see docs/backends/docker.md)"
ALLOWED_KWARGS = (
    set(docker.models.containers.RUN_CREATE_KWARGS)
    | set(docker.models.containers.RUN_HOST_CONFIG_KWARGS)
    | {"ports"}
) - set(RESERVED_KWARGS)

_clients: dict[str | None, docker.DockerClient] = {}
_clients_lock = threading.Lock()


def connect(docker_host: str | None, where: str) -> docker.DockerClient:
    """A client for the engine, checked with a ping; a ConfigError says how to fix it."""
    with _clients_lock:
        client = _clients.get(docker_host)
    if client is not None:
        # A long-lived process (a monitor, a run worker) may outlive the engine it first
        # reached: check again, so that a dead engine gets the message below, not a raw error.
        try:
            client.ping()
            return client
        except Exception:
            with _clients_lock:
                _clients.pop(docker_host, None)
    shown = docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        if docker_host:
            client = docker.DockerClient(base_url=docker_host, timeout=60)
        else:
            client = docker.from_env(timeout=60)
        client.ping()
    except Exception as e:
        raise ConfigError(
            f"{where}.docker_host: the Docker engine at {shown} is not reachable "
            f"({type(e).__name__}: {_short(e)}); {START_HINT}"
        ) from None
    with _clients_lock:
        _clients[docker_host] = client
    return client


def _short(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def is_local_engine(client: docker.DockerClient) -> bool:
    """Whether the engine runs on this machine (a unix socket): bind mounts of this
    machine's paths then mean the same files in the container."""
    # docker-py names a unix socket connection http+docker://localhost (older: localunixsocket).
    url = client.api.base_url
    return url.startswith(("http+docker://localhost", "http+docker://localunixsocket")) or urlparse(
        url
    ).scheme in ("unix", "http+unix")


def ensure_image(client: docker.DockerClient, image: str, pull_policy: str, where: str, setting: str) -> None:
    """Make sure ``image`` is there according to ``pull_policy``; ConfigError otherwise."""
    if pull_policy not in PULL_POLICIES:
        raise ConfigError(f"{where}.pull_policy: expected one of {', '.join(PULL_POLICIES)}, got {pull_policy!r}")
    present = True
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        present = False
    except docker.errors.APIError as e:
        raise ConfigError(f"{setting}: cannot inspect image {image!r}: {_short(e)}") from None
    if pull_policy == "never":
        if not present:
            raise ConfigError(
                f"{setting}: image {image!r} is not in the Docker engine and {where}.pull_policy is never; "
                f"{BUILD_HINT}, or set pull_policy: if_not_present to pull it"
            )
        return
    if present and pull_policy == "if_not_present":
        return
    try:
        repo, tag = _split_tag(image)
        client.images.pull(repo, tag=tag)
    except Exception as e:
        if present:  # pull_policy always, but the local copy will do
            return
        raise ConfigError(
            f"{setting}: image {image!r} is not in the Docker engine and pulling it failed ({_short(e)}); "
            f"{BUILD_HINT}, or push it to a registry the engine can reach"
        ) from None


def _split_tag(image: str) -> tuple[str, str | None]:
    if "@" in image:
        return image, None
    name, _, tag = image.rpartition(":")
    if name and "/" not in tag:
        return name, tag
    return image, "latest"


def check_networks(client: docker.DockerClient, names: Iterable[str], where: str) -> None:
    for i, name in enumerate(names):
        if name in ("host", "none", "bridge") or name.startswith("container:"):
            continue
        try:
            client.networks.get(name)
        except docker.errors.NotFound:
            raise ConfigError(
                f"{where}[{i}]: network {name!r} does not exist in the Docker engine; "
                f"create it with `docker network create {name}` or fix the name"
            ) from None
        except docker.errors.APIError as e:
            raise ConfigError(f"{where}[{i}]: cannot inspect network {name!r}: {_short(e)}") from None


def network_names(settings: DockerSettings) -> list[str]:
    if settings.network is not None:
        return [str(resolve(settings.network))]
    return [str(resolve(n)) for n in settings.networks]


# (source, target, mode) of each mount. A list, not a mapping keyed by source: one source
# may be mounted at several targets (and the outputs directory both at a volume's target
# and at its own path).
Binds = list[tuple[str, str, str]]


def sdk_volumes(binds: Binds) -> list[str]:
    """The SDK's ``volumes`` argument: ``SOURCE:TARGET:MODE`` strings."""
    return [f"{source}:{target}:{mode}" for source, target, mode in binds]


def volume_binds(client: docker.DockerClient, settings: DockerSettings, where: str) -> Binds:
    """The configured ``volumes``, checked; bad specs raise."""
    binds: Binds = []
    targets: dict[str, int] = {}
    for i, raw in enumerate(settings.volumes):
        spec = str(resolve(raw))
        try:
            source, target, mode = parse_volume(spec)
        except ValueError as e:
            raise ConfigError(f"{where}.volumes[{i}]: {e}") from None
        if source.startswith("/"):
            # Inside a run container (the launcher sets RUNYARD_DOCKER_CONTAINER) this
            # machine's paths are not all visible: the engine resolves them on the host.
            if is_local_engine(client) and "RUNYARD_DOCKER_CONTAINER" not in os.environ and not os.path.exists(source):
                raise ConfigError(
                    f"{where}.volumes[{i}]: the host path {source!r} does not exist; create it or fix the path "
                    "(Docker would otherwise create an empty root-owned directory there)"
                )
        else:
            try:
                client.volumes.get(source)
            except docker.errors.NotFound:
                raise ConfigError(
                    f"{where}.volumes[{i}]: Docker volume {source!r} does not exist; create it with "
                    f"`docker volume create {source}` (runyard does not create volumes, so none is left behind)"
                ) from None
        normalized = target.rstrip("/") or "/"
        if normalized in targets:
            raise ConfigError(
                f"{where}.volumes[{i}]: the target {target} is already mounted by volumes[{targets[normalized]}]; "
                "a container path takes one mount"
            )
        targets[normalized] = i
        binds.append((source, target, mode))
    return binds


def add_bind(binds: Binds, path: str, mode: str = "rw") -> None:
    """Bind ``path`` at the same path in the container, unless a mount already covers it."""
    path = os.path.abspath(path)
    if not covered(binds, path):
        binds.append((path, path, mode))


def covered(binds: Binds, path: str) -> bool:
    """Whether a mount's target holds ``path``."""
    return any((path.rstrip("/") + "/").startswith(target.rstrip("/") + "/") for _, target, _ in binds)


def bind_outputs(client: docker.DockerClient, settings: DockerSettings, binds: Binds, store: str, where: str) -> None:
    """Make the run's output store reachable from the containers, or say why it cannot be.

    A file store is bind-mounted at the same path (``mount_outputs``) unless a volume
    covers it; bind mounts name paths on the engine's machine, so with a remote engine
    only a volume the user set up (a shared filesystem there) or an fsspec store will do."""
    if store.startswith("memory://"):
        raise ConfigError(
            f"{where}: steps run in containers and cannot reach the in-memory output store {store}; "
            "use an instance with a RUNYARD_HOME (outputs under it) or set outputs to a path or fsspec URL"
        )
    path = outputs_path(store)
    if path is None:
        return  # an fsspec URL: the containers reach it themselves
    path = os.path.abspath(path)
    if covered(binds, path):
        return
    if not is_local_engine(client):
        raise ConfigError(
            f"{where}.docker_host: the output store is the directory {path} on this machine, which containers "
            f"on the Docker engine at {client.api.base_url} cannot reach (bind mounts name paths on the engine's "
            "machine); use an fsspec output store they can reach (outputs: s3://..., gcs://...), mount a shared "
            "filesystem at that path with volumes, or use a Docker engine on this machine"
        )
    if not settings.mount_outputs:
        raise ConfigError(
            f"{where}.mount_outputs: false, but the outputs directory {path} is not mounted by volumes; "
            "the steps' containers could not write their outputs (read-only or missing). Set mount_outputs: true "
            "or add a volume mounting it at the same path"
        )
    os.makedirs(path, exist_ok=True)
    add_bind(binds, path, "rw")


def bind_code(client: docker.DockerClient, binds: Binds, path: str, where: str) -> None:
    """Mount the job's directory read-only at the same path (``mount_code``), which only
    means the same files on an engine of this machine, unless a volume covers it."""
    path = os.path.abspath(path)
    if covered(binds, path):
        return
    if not is_local_engine(client):
        raise ConfigError(
            f"{where}.mount_code: the job's code is in {path} on this machine, which containers on the Docker "
            f"engine at {client.api.base_url} cannot see (bind mounts name paths on the engine's machine); bake "
            "the code into the image (`runyard docker build-image --code DIR`) and set mount_code: false"
        )
    add_bind(binds, path, "ro")


def environment(settings: DockerSettings, where: str) -> dict[str, str]:
    """``env_vars`` as a mapping; ``NAME`` takes this process's value (skipped when unset)."""
    return environment_from(settings.env_vars, where)


def limits(memory: str | None, cpus: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if memory is not None:
        out["mem_limit"] = memory
        out["memswap_limit"] = memory  # no swap beyond the limit: exceeding it is an OOM kill
    if cpus is not None:
        out["nano_cpus"] = int(cpus * 1e9)
    return out


def parse_resources(raw: str, step_key: str) -> dict[str, Any]:
    """The ``runyard/resources`` tag, in runyard's one grammar (a dict, JSON or
    ``memory=64m,cpus=0.5``: `runyard.plugin.parse_resources_tag`); the docker executor
    knows ``memory`` and ``cpus``."""
    where = f"step '{step_key}': tag '{RESOURCES_TAG}'"
    data = parse_resources_tag(raw, step_key=step_key)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key == "memory":
            try:
                check_memory("memory", str(value))
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
            out["memory"] = str(value)
        elif key == "cpus":
            try:
                cpus = float(value)
            except ValueError:
                raise ConfigError(f"{where}: cpus: expected a number, got {value!r}") from None
            if cpus <= 0:
                raise ConfigError(f"{where}: cpus: expected a number above 0, got {value!r}")
            out["cpus"] = cpus
        else:
            raise ConfigError(f"{where}: unknown resource {key!r} (the docker executor knows memory and cpus)")
    return out


def check_container_kwargs(settings: DockerSettings, where: str) -> dict[str, Any]:
    for key in settings.container_kwargs:
        if key in RESERVED_KWARGS:
            raise ConfigError(f"{where}.container_kwargs.{key}: set by the plugin; use {RESERVED_KWARGS[key]}")
        if key not in ALLOWED_KWARGS:
            raise ConfigError(
                f"{where}.container_kwargs.{key}: not an argument of the docker SDK's containers.run/create "
                f"(allowed: {', '.join(sorted(ALLOWED_KWARGS))})"
            )
    cleanup_policy(settings, where)
    # Top-level {env: NAME} values are read now, as every other setting's are.
    return {k: resolve(EnvVar(v["env"])) if _is_env_ref(v) else v for k, v in settings.container_kwargs.items()}


def _is_env_ref(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"env"} and isinstance(value["env"], str)


def cleanup_policy(settings: DockerSettings, where: str) -> str:
    """``cleanup``, read now (it may be ``{env: NAME}``) and checked."""
    try:
        policy = str(resolve(settings.cleanup))
    except ConfigError as e:
        raise ConfigError(f"{where}.cleanup: {e}") from None
    if policy not in CLEANUP_POLICIES:
        raise ConfigError(f"{where}.cleanup: expected one of {', '.join(CLEANUP_POLICIES)}, got {policy!r}")
    return policy


def engine_gone(e: BaseException) -> bool:
    """Whether ``e`` says the engine could not be reached (rather than refused something)."""
    import requests.exceptions

    return isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout) or (
        isinstance(e, docker.errors.DockerException) and not isinstance(e, docker.errors.APIError)
    )


def base_labels(settings: DockerSettings, kind: str, run_id: str, instance_home: str | None) -> dict[str, str]:
    labels = {str(k): str(resolve(v)) for k, v in settings.labels.items()}
    labels.update({LABEL_KIND: kind, LABEL_RUN_ID: run_id})
    if instance_home:
        labels[LABEL_INSTANCE] = instance_home
    return labels


def outputs_path(output_store: str) -> str | None:
    """The directory of a file output store (None for fsspec or memory stores)."""
    parsed = urlparse(output_store)
    if parsed.scheme == "file":
        return parsed.path
    if parsed.scheme == "":
        return output_store
    return None


def code_dir(code_pointer: Mapping[str, Any]) -> str | None:
    file = code_pointer.get("file")
    return str(Path(file).resolve().parent) if file else None


def remove_containers(client: docker.DockerClient, labels: Mapping[str, str]) -> list[str]:
    """Force-remove every container carrying all ``labels``; returns their names."""
    filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
    removed: list[str] = []
    for c in client.containers.list(all=True, filters=filters):
        try:
            c.remove(force=True, v=True)
            removed.append(c.name)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if "already in progress" not in str(e):
                raise
    return removed


def _try_create(client: docker.DockerClient, args: Mapping[str, Any]) -> str | None:
    """Create (never start) and remove a container with ``args``; the engine's or the SDK's
    objection, if any."""
    args = {k: v for k, v in args.items() if k != "name"}
    args["labels"] = {**args.get("labels", {}), LABEL_KIND: "probe"}
    try:
        container = client.containers.create(**args)
    except docker.errors.APIError as e:
        return str(e.explanation or e)
    except (docker.errors.DockerException, TypeError, ValueError) as e:
        return _short(e, 600)
    try:
        container.remove(force=True, v=True)
    except docker.errors.APIError:
        pass
    return None


def probe(client: docker.DockerClient, args: Mapping[str, Any], kwargs_keys: Iterable[str]) -> tuple[str, str] | None:
    """Check that the engine accepts a container with ``args`` (mount modes, CPUs beyond the
    host's, values of container_kwargs), before any starts: None, or (key, objection)
    where key is the setting to blame (``cpus``, ``container_kwargs.shm_size``, ...; ""
    when it cannot tell)."""
    error = _try_create(client, args)
    if error is None:
        return None
    kwargs_keys = [k for k in kwargs_keys if k in args]
    if kwargs_keys:
        without = {k: v for k, v in args.items() if k not in kwargs_keys}
        if _try_create(client, without) is None:
            bad = [k for k in kwargs_keys if _try_create(client, {**without, k: args[k]}) is not None]
            return (f"container_kwargs.{bad[0]}" if len(bad) == 1 else "container_kwargs"), error
    low = error.lower()
    for key, words in (("cpus", ("cpu",)), ("memory", ("memory", "swap")),
                       ("volumes", ("mode", "mount", "volume", "bind")), ("network", ("network",))):
        if any(w in low for w in words):
            return key, error
    return "", error


def probe_error(where: str, found: tuple[str, str], sep: str = ".") -> ConfigError:
    key, error = found
    return ConfigError(
        f"{where}{sep + key if key else ''}: the Docker engine does not accept a container with these settings: "
        f"{error}; fix the value"
    )


def safe_name(*parts: str) -> str:
    """A container name from parts (Docker allows [a-zA-Z0-9][a-zA-Z0-9_.-]*)."""
    name = "-".join(re.sub(r"[^a-zA-Z0-9_.-]+", "_", p) for p in parts if p)
    return name[:200]


def describe_exit(code: int | None, oom: bool) -> str:
    if oom:
        return f"was killed for exceeding its memory limit (OOM, exit code {code})"
    if code is not None and code > 128:  # docker-init reports a signal as 128 + its number
        return f"was killed by {signal_name(code - 128)} (exit code {code})"
    return f"exited with code {code}"
