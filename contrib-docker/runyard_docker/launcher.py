"""The ``docker`` run launcher: each run's worker in a container.

The container runs ``python3 -m runyard_docker.run_worker RUN_ID`` (``runyard api
execute-run`` plus self-removal) with the instance's ``RUNYARD_HOME`` bind-mounted at the
same path, so the SQLite storage, the outputs and runyard.yaml are the same files inside
and out. Storage the container could not reach is rejected before anything starts: SQLite
on an engine of another machine, or with ``mount_home: false``; PostgreSQL at a loopback
address from a container that does not share the host's network.

The engine's socket is mounted in the run container only for runs whose executor is
``docker`` (``mount_docker_socket``): it gives root on the engine's machine. A watcher
process started on this machine (`reaper` ``--run-container``) removes the run's
containers once the run container exits, whether or not it could remove itself.

``terminate`` sends SIGTERM (the worker cancels the run and stops its step containers);
with ``force`` it removes every container labelled with the run id, step containers
included. ``check_health`` turns a run container killed by a signal (OOM kills included)
or vanished before the run ended into a DEAD worker, and one that exited by itself (or
removed itself after the run) into a FINISHED one; the message carries the exit status and
the container's last log lines, and what is left of the run is removed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import docker
import docker.errors
from runyard import ConfigError, Instance
from runyard.plugin import (
    RunLauncher,
    RunRecord,
    WorkerHealth,
    locate_storage,
    make_private_dirs,
    open_private,
    resolve,
)

from . import _docker as d
from .settings import LABEL_KIND, LABEL_RUN_ID, DockerLauncherConfig

WHERE = "run_launcher.docker"
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}
_TAIL_LINES = 20
_END_TAG = "docker"  # file name prefix of the kept end records (RunLauncher.remember_end)


class DockerRunLauncher(RunLauncher):
    config: DockerLauncherConfig

    # -- launch -------------------------------------------------------------------------

    def launch(self, run: RunRecord) -> dict[str, Any]:
        cfg = self.config
        docker_host = resolve(cfg.docker_host)
        client = d.connect(docker_host, WHERE)
        kwargs = d.check_container_kwargs(cfg, WHERE)
        image = str(resolve(cfg.image))
        d.ensure_image(client, image, str(resolve(cfg.pull_policy)), WHERE, f"{WHERE}.image")
        networks = d.network_names(cfg)
        d.check_networks(client, networks, f"{WHERE}.networks" if cfg.networks else f"{WHERE}.network")
        binds = d.volume_binds(client, cfg, WHERE)
        env = d.environment(cfg, WHERE)
        if self.instance_home is None:
            raise ConfigError(f"{WHERE}: an instance without a RUNYARD_HOME cannot launch runs in containers")
        instance = Instance(self.instance_home)
        self._check_storage(client, instance, networks, binds)
        if instance.outputs_url:
            d.bind_outputs(client, cfg, binds, instance.outputs_url, WHERE)
        code = d.code_dir(run.code_pointer or {})
        if code is not None and cfg.mount_code:
            d.bind_code(client, binds, code, WHERE)
        if self._needs_socket(run) and d.is_local_engine(client):
            sock = _socket_path(docker_host)
            if sock:
                binds.append((sock, "/var/run/docker.sock", "rw"))
        name = d.safe_name("runyard-run", run.run_id[:12], os.urandom(3).hex())
        labels = d.base_labels(cfg, "run", run.run_id, self.instance_home)
        args: dict[str, Any] = {
            "image": image,
            "command": ["python3", "-m", "runyard_docker.run_worker", run.run_id],
            "labels": labels,
            "environment": {
                **env,
                # RUNYARD_HOME, and the launch id when `runyard daemon` launches (see worker_env).
                **self.worker_env({}),
                "RUNYARD_HOME": self.instance_home,
                "RUNYARD_DOCKER_CONTAINER": name,
                "RUNYARD_DOCKER_CLEANUP": d.cleanup_policy(cfg, WHERE),
                "PYTHONUNBUFFERED": "1",
            },
            "volumes": d.sdk_volumes(binds),
            "name": name,
            "init": True,  # docker-init passes SIGTERM on: the worker cancels the run cleanly
            "detach": True,
            **d.limits(resolve(cfg.memory), cfg.cpus),
            **kwargs,
        }
        if networks:
            first = networks[0]
            if first in ("host", "none") or first.startswith("container:"):
                args["network_mode"] = first
            else:
                args["network"] = first
        try:
            container = client.containers.create(**args)
        except (docker.errors.DockerException, TypeError, ValueError) as e:
            # Settings only the engine can judge (mount modes, CPUs beyond the host's, values
            # of container_kwargs): say which key, not just the engine's words.
            found = d.probe(client, args, kwargs)
            if found is None:
                raise ConfigError(f"{WHERE}: could not create the run container: {d._short(e, 600)}") from None
            raise d.probe_error(WHERE, found) from None
        try:
            for extra in networks[1:]:
                client.networks.get(extra).connect(container)
            container.start()
        except BaseException:
            container.remove(force=True, v=True)
            raise
        self._start_watcher(run.run_id, container.id, docker_host)
        return {"container_id": container.id, "container_name": name, "docker_host": docker_host, "image": image}

    def _start_watcher(self, run_id: str, container_id: str, docker_host: str | None) -> None:
        """A process on this machine that removes the run's containers once the run
        container exits (see `reaper`): the run container cannot always remove itself
        (no socket mounted, a remote engine) and dies with whatever runs inside it."""
        env = {**os.environ, "RUNYARD_HOME": str(self.instance_home),
               "RUNYARD_DOCKER_CLEANUP": d.cleanup_policy(self.config, WHERE)}
        env.pop("RUNYARD_DOCKER_REAPER_HOST", None)
        if docker_host:
            env["RUNYARD_DOCKER_REAPER_HOST"] = docker_host
        logs = Path(str(self.instance_home)) / "logs"
        make_private_dirs(logs)  # owner-only, like everything in the instance
        with open(open_private(logs / f"docker-watch-{run_id}.log"), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "runyard_docker.reaper", "--run-container", run_id, container_id],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True, close_fds=True,
            )
        # Nobody waits for it here (this process usually exits first): reap it if we outlive it.
        threading.Thread(target=proc.wait, daemon=True).start()

    def _needs_socket(self, run: RunRecord) -> bool:
        """The socket gives root on the engine's machine to any code in the container: mount
        it only where the run worker must start step containers, unless told otherwise."""
        if self.config.mount_docker_socket is not None:
            return bool(self.config.mount_docker_socket)
        return run.executor == "docker"

    def _check_storage(
        self, client: Any, instance: Instance, networks: list[str], binds: d.Binds
    ) -> None:
        """Reject storage the run container could not reach, saying why and what to do."""
        where = locate_storage(instance)
        if where.path is not None:  # a file (SQLite): the container needs the same path
            path = where.path
            if not d.is_local_engine(client):
                raise ConfigError(
                    f"{WHERE}: the run's storage is {where.label} ({path}), which a container on the Docker engine at "
                    f"{client.api.base_url} cannot reach: bind mounts name paths on the engine's machine. Use "
                    "storage: {postgres: {url: ...}} reachable from the containers, or a Docker engine on this machine"
                )
            home = str(Path(self.instance_home or "/").resolve())
            if self.config.mount_home:
                d.add_bind(binds, home, "rw")
            if not d.covered(binds, str(path.parent)):
                if self.config.mount_home:
                    d.add_bind(binds, str(path.parent), "rw")
                else:
                    raise ConfigError(
                        f"{WHERE}.mount_home: false, but the run's {where.label} storage {path} is not mounted by "
                        "volumes, so the run worker in the container could not reach it; set mount_home: true, mount "
                        "its directory at the same path with volumes, or use PostgreSQL storage"
                    )
            return
        home = str(Path(self.instance_home or "/").resolve())
        if self.config.mount_home:
            d.add_bind(binds, home, "rw")
        elif not d.covered(binds, home):
            raise ConfigError(
                f"{WHERE}.mount_home: false, but RUNYARD_HOME {home} is not mounted by volumes, so the run worker "
                "in the container would not find runyard.yaml (and would use other storage); set mount_home: true "
                "or mount it at the same path with volumes"
            )
        host = where.host
        if host is not None:  # a database server
            shares_host_net = bool(networks) and networks[0] == "host"
            if (host in _LOOPBACK or where.is_local_socket) and not shares_host_net:
                shown = "a unix socket" if where.is_local_socket else host
                raise ConfigError(
                    f"{WHERE}: the run's storage is {where.label} at {shown}, which a container on a bridge network "
                    "cannot reach (there, 127.0.0.1 is the container itself). Set network: host in "
                    f"run_launcher.docker (and executor.docker), or give storage.{where.name} an address the "
                    "containers can reach (for example the host's docker0 address 172.17.0.1, with the server "
                    "listening on it)"
                )

    # -- terminate and health -------------------------------------------------------------

    def _client(self, worker: Mapping[str, Any]) -> Any:
        return d.connect(worker.get("docker_host"), WHERE)

    @staticmethod
    def _gone(worker: Mapping[str, Any], e: BaseException) -> str:
        shown = worker.get("docker_host") or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        return (f"{WHERE}.docker_host: the Docker engine at {shown} is not reachable "
                f"({type(e).__name__}: {d._short(e)}); {d.START_HINT}")

    def terminate(self, run: RunRecord, worker: Mapping[str, Any], *, force: bool = False) -> None:
        client = self._client(worker)
        try:
            if force:
                d.remove_containers(client, {LABEL_RUN_ID: run.run_id})
                return
            container = client.containers.get(worker["container_id"])
            if container.status == "running":
                container.kill(signal="SIGTERM")
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if "is not running" not in str(e):
                raise
        except Exception as e:
            if not d.engine_gone(e):
                raise
            raise ConfigError(self._gone(worker, e)) from None

    def check_health(self, run: RunRecord, worker: Mapping[str, Any]) -> WorkerHealth:
        try:
            client = self._client(worker)
        except ConfigError as e:
            return WorkerHealth.unknown(str(e))
        name = worker.get("container_name") or worker.get("container_id", "?")[:12]
        try:
            container = client.containers.get(worker["container_id"])
        except docker.errors.NotFound:
            self._remove_steps(client, run)
            recorded = self.remembered_end(run, tag=_END_TAG)
            if recorded is not None:
                return recorded
            if run.status.is_finished:
                # It removed itself (or the watcher did) once the run had ended.
                return WorkerHealth.finished(f"run container {name} is gone; the run is {run.status.value}")
            return WorkerHealth.dead(
                f"run container {name} vanished (removed from outside, or the Docker engine lost it)"
            )
        except docker.errors.APIError as e:
            return WorkerHealth.unknown(f"cannot inspect run container {name}: {e}")
        except Exception as e:
            if not d.engine_gone(e):
                raise
            return WorkerHealth.unknown(self._gone(worker, e))
        state = container.attrs.get("State", {})
        if container.status in ("created", "running", "restarting", "paused"):
            return WorkerHealth.running()
        code = state.get("ExitCode")
        oom = bool(state.get("OOMKilled"))
        try:
            logs = container.logs(tail=_TAIL_LINES).decode("utf-8", errors="replace").strip()
        except docker.errors.APIError:
            logs = ""
        message = f"run container {name} {d.describe_exit(code, oom)}"
        if logs:
            message += f"; last log lines:\n{logs}"
        try:
            policy = d.cleanup_policy(self.config, WHERE)
        except ConfigError:
            policy = "always"  # the variable is gone since launch: leave nothing behind
        # docker-init exits 128+N when the worker dies of signal N: killed (OOM included),
        # not an exit of its own.
        killed = oom or not isinstance(code, int) or code > 128
        died_at = _finished_at(state.get("FinishedAt"))
        health = (WorkerHealth.dead(message) if killed else WorkerHealth.finished(message))
        health = attrs.evolve(health, died_at=died_at)
        # Several processes may ask at once (`run wait`, the watcher's own check): keep the
        # answer for those who come after the container is removed, or they would only
        # see it vanished, and the run's failure would depend on who asked first.
        self.remember_end(run, health, tag=_END_TAG)
        if policy != "never":
            self._remove_steps(client, run)
            if policy == "always":
                try:
                    container.remove(force=True, v=True)
                except docker.errors.APIError:
                    pass
        return health

    @staticmethod
    def _remove_steps(client: Any, run: RunRecord) -> None:
        # Steps of a run whose worker is gone have nobody to report to: stop and remove them.
        try:
            d.remove_containers(client, {LABEL_RUN_ID: run.run_id, LABEL_KIND: "step"})
        except docker.errors.APIError:
            pass


def _finished_at(text: Any) -> float | None:
    """Docker's ``State.FinishedAt`` (RFC 3339 with nanoseconds) as seconds since the epoch:
    the container's time of death, recorded by the engine rather than guessed by a poller."""
    if not isinstance(text, str) or text.startswith("0001-"):
        return None
    import datetime

    base, _, frac = text.rstrip("Z").partition(".")
    try:
        when = datetime.datetime.fromisoformat(base).replace(tzinfo=datetime.UTC)
    except ValueError:
        return None
    digits = "".join(c for c in frac if c.isdigit())[:6]
    return when.timestamp() + (int(digits) / 10 ** len(digits) if digits else 0.0)


def _socket_path(docker_host: str | None) -> str | None:
    url = docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if url.startswith("unix://"):
        return url[len("unix://"):]
    return None
