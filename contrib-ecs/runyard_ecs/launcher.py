"""The ``ecs`` run launcher: each run's worker in an ECS task.

``launch`` checks that the task could reach the run's storage, then calls RunTask (retried,
see `_aws`) with the run worker as the container's command: ``runyard api execute-run
RUN_ID`` under a small ``/bin/sh`` supervisor that passes SIGTERM on (StopTask cancels
the run cleanly) and exits with the worker's status, 128+N when a signal killed it. The
worker finds the instance at ``RUNYARD_HOME``: a host volume at the same path (EC2), or,
when none covers it, the instance's runyard.yaml is passed in ``RUNYARD_ECS_CONFIG`` and
written there by the supervisor.

``check_health`` reads DescribeTasks: every state up to STOPPED is RUNNING (a task stuck
before RUNNING beyond ``start_timeout`` is stopped and DEAD); STOPPED is FINISHED for an
ordinary exit and DEAD for TaskFailedToStart, an OOM stop, a signal or no exit code, with
the stop code, reason and the last lines of the task's CloudWatch log; a task ECS does
not know (MISSING, or ``[]`` just after RunTask) is UNKNOWN for ``missing_grace`` seconds,
then DEAD. ``terminate`` is StopTask; with ``force`` it first ends a started run FAILURE
(`RunLauncher.record_forced_end`: StopTask always lets the worker see SIGTERM, and it would
cancel the run cleanly), then stops the run's step tasks too.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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

from . import tasks
from ._aws import AwsError, error_types
from .common import connect, connect_worker, log_stream, start_task, supervised, task_definition
from .settings import STARTED_BY_PREFIX, EcsLauncherConfig
from .tasks import CONFIG_ENV

WHERE = "run_launcher.ecs"
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}
_TAIL_LINES = 20
# RunTask's overrides may hold at most 8 KiB of text in all.
_MAX_CONFIG = 6000

# Before the worker: write the instance's runyard.yaml when it was passed in the environment
# (RUNYARD_HOME not mounted); around it, lines in the task's log (RUNYARD_RUN_ID is set by launch).
_PRELUDE = r"""
if [ -n "$RUNYARD_ECS_WRITE_CONFIG" ]; then
  umask 077; mkdir -p "$RUNYARD_HOME" && printf '%s\n' "$RUNYARD_ECS_CONFIG" > "$RUNYARD_HOME/runyard.yaml" || exit 2
fi
unset RUNYARD_ECS_CONFIG RUNYARD_ECS_WRITE_CONFIG
echo "runyard: run worker for run $RUNYARD_RUN_ID starting" >&2
""".strip()
_EPILOGUE = 'echo "runyard: run worker for run $RUNYARD_RUN_ID exited with status $status" >&2'


class EcsRunLauncher(RunLauncher):
    config: EcsLauncherConfig

    # -- launch -------------------------------------------------------------------------

    def launch(self, run: RunRecord) -> dict[str, Any]:
        cfg = self.config
        if self.instance_home is None:
            raise ConfigError(f"{WHERE}: an instance without a RUNYARD_HOME cannot launch runs on ECS")
        home = str(Path(self.instance_home).resolve())
        instance = Instance(self.instance_home)
        mounted = self._check_storage(instance, home)
        api = connect(cfg, WHERE)
        td = task_definition(api, cfg, WHERE)
        env: dict[str, Any] = {**cfg.env_vars, "RUNYARD_HOME": home, "PYTHONUNBUFFERED": "1",
                               "RUNYARD_RUN_ID": run.run_id}
        if not mounted:
            config_file = Path(home) / "runyard.yaml"
            text = config_file.read_text() if config_file.is_file() else ""
            env["RUNYARD_ECS_WRITE_CONFIG"] = "1"
            if cfg.config_secret:
                # ECS gives the task the secret's value (the task definition's `secrets`).
                api.put_secret(str(resolve(cfg.config_secret)), "config_secret", text)
            elif not cfg.secrets_in_overrides:
                raise ConfigError(
                    f"{WHERE}.config_secret: required: RUNYARD_HOME {home} is not mounted in the task "
                    "(volumes), so the run worker needs the instance's runyard.yaml, and RunTask's overrides can be "
                    "read by whoever may call DescribeTasks; give the ARN of a Secrets Manager secret (or a Parameter "
                    "Store SecureString) for runyard to keep it in, mount the home, or, for an emulator or a trusted "
                    "account only, set secrets_in_overrides: true")
            elif len(text) > _MAX_CONFIG:
                raise ConfigError(
                    f"{WHERE}.volumes: RUNYARD_HOME {home} is not mounted in the task, and its runyard.yaml "
                    f"({len(text)} characters) is too long to pass in RunTask's overrides (8 KiB in all); mount "
                    "the home at the same path with volumes, or bake it into the image"
                )
            else:
                env[CONFIG_ENV] = text  # secrets_in_overrides: readable by DescribeTasks
        started_by = STARTED_BY_PREFIX + run.run_id
        kwargs = tasks.run_task_kwargs(
            cfg, task_definition_arn=td.arn,
            command=supervised(["python3", "-m", "runyard", "api", "execute-run", run.run_id], _PRELUDE, _EPILOGUE),
            env=env, run_id=run.run_id, kind="run", extra_tags={}, started_by=started_by)
        try:
            td, task = start_task(api, cfg, WHERE, td, kwargs)
        except AwsError as e:
            raise ConfigError(f"{WHERE}: could not start the run worker task of run {run.run_id}: {e}") from None
        arn = task["taskArn"]
        stream = log_stream(td, arn)
        return {
            "task_arn": arn,
            "cluster": cfg.cluster,
            "region": api.region,
            # Where to ask later (not secrets): health checks and terminate may run elsewhere,
            # after the settings or the variables they name have changed.
            "endpoint_url": resolve(cfg.endpoint_url),
            "profile": resolve(cfg.profile),
            "container_name": cfg.container_name,
            "started_by": started_by,
            "log_group": stream[0] if stream else None,
            "log_stream": stream[1] if stream else None,
            "task_definition": td.arn,
            "start_timeout": cfg.start_timeout,
            "missing_grace": cfg.missing_grace,
        }

    def _covered(self, path: str) -> bool:
        for spec in self.config.volumes:
            parts = str(spec).split(":")
            if parts[0] == parts[1] and (path == parts[0] or path.startswith(parts[0].rstrip("/") + "/")):
                return True
        return False

    def _check_storage(self, instance: Instance, home: str) -> bool:
        """Reject storage the task could not reach; say whether RUNYARD_HOME is mounted."""
        where = locate_storage(instance)
        mounted = self._covered(home)
        if where.path is not None:
            if not self._covered(str(Path(where.path).parent)):
                raise ConfigError(
                    f"{WHERE}: the run's storage is {where.label} ({where.path}), a file on this machine that an ECS "
                    "task cannot reach; use storage: {postgres: {url: ...}} at an address the tasks reach, or (EC2 "
                    f"container instances on this machine only) mount its directory at the same path with "
                    f"{WHERE}.volumes"
                )
            return mounted
        if where.host is not None:
            if (where.host in _LOOPBACK or where.is_local_socket) and self.config.network_mode != "host":
                shown = "a unix socket" if where.is_local_socket else where.host
                raise ConfigError(
                    f"{WHERE}: the run's storage is {where.label} at {shown}, which a task cannot reach (in the "
                    f"task, 127.0.0.1 is the task itself); give storage.{where.name} an address the tasks reach "
                    f"(an RDS endpoint), or set {WHERE}.network_mode: host (EC2 tasks on the database's machine)"
                )
        return mounted

    # -- terminate and health -------------------------------------------------------------

    def terminate(self, run: RunRecord, worker: Mapping[str, Any], *, force: bool = False) -> None:
        api = connect_worker(worker, WHERE)
        cluster = worker["cluster"]
        reason = f"runyard: run {run.run_id} {'killed' if force else 'canceled'}"
        if force:
            # StopTask warns the worker (SIGTERM; SIGKILL only after stopTimeout), which would
            # then cancel the run cleanly: the run fails first, and the worker's end is fenced out.
            try:
                self.record_forced_end(run, f"ECS StopTask of task {worker['task_arn'].rsplit('/', 1)[-1]}")
            except Exception:  # storage unreachable here: stopping the task matters more
                pass
        api.stop_task(cluster, worker["task_arn"], reason)
        if force:
            self._stop_steps(api, run, worker)

    @staticmethod
    def _stop_steps(api: Any, run: RunRecord, worker: Mapping[str, Any]) -> None:
        # Steps of a run whose worker is gone have nobody to report to: stop them.
        for arn in api.run_tasks(worker["cluster"], worker.get("started_by") or STARTED_BY_PREFIX + run.run_id):
            api.stop_task(worker["cluster"], arn, f"runyard: run {run.run_id} is over")

    def check_health(self, run: RunRecord, worker: Mapping[str, Any]) -> WorkerHealth:
        arn = str(worker.get("task_arn", "?"))
        short = arn.rsplit("/", 1)[-1]
        try:
            api = connect_worker(worker, WHERE)
            task, failure = api.describe_task(worker["cluster"], arn)
        except (ConfigError, *error_types()) as e:
            return WorkerHealth.unknown(f"cannot describe ECS task {short}: {type(e).__name__}: {e}")
        if task is None:
            return self._missing(api, run, worker, short, failure or "MISSING")
        self._forget_missing(run)
        state = tasks.read_task(task, str(worker.get("container_name", "")),
                                start_timeout=float(worker.get("start_timeout", 600)))
        if state.phase == "running":
            return WorkerHealth.running()
        if state.phase == "stuck":
            api.stop_task(worker["cluster"], arn, "runyard: stuck before RUNNING")
            self._stop_steps(api, run, worker)
            return WorkerHealth.dead(
                f"ECS task {short} of run {run.run_id} was still {state.status} after "
                f"{float(worker.get('start_timeout', 600)):g}s (start_timeout); runyard stopped it"
                + (f" ({state.reason})" if state.reason else ""))
        message = f"ECS task {short} of run {run.run_id} {state.describe()}"
        if worker.get("log_group") and worker.get("log_stream"):
            try:
                tail = api.log_tail(worker["log_group"], worker["log_stream"], _TAIL_LINES)
            except error_types():
                tail = []
            if tail:
                message += "; last log lines:\n" + "\n".join(tail)
        clean = state.phase == "exited" and state.exit_code is not None and state.exit_code <= 128
        try:
            self._stop_steps(api, run, worker)
        except error_types():
            pass
        return WorkerHealth.finished(message) if clean else WorkerHealth.dead(message)

    # A task ECS does not know is UNKNOWN for a while (DescribeTasks may say [] just after
    # RunTask; an emulator restart or a deregistered cluster forgets tasks for good): the
    # first sighting is kept in a file, since each health check may be another process.
    def _missing_file(self, run: RunRecord) -> Path | None:
        if self.instance_home is None:
            return None
        return Path(self.instance_home) / "logs" / f"ecs-run-{run.run_id}.missing"

    def _forget_missing(self, run: RunRecord) -> None:
        path = self._missing_file(run)
        if path is not None and path.exists():
            path.unlink(missing_ok=True)

    def _missing(self, api: Any, run: RunRecord, worker: Mapping[str, Any], short: str, reason: str) -> WorkerHealth:
        if run.status.is_finished:
            return WorkerHealth.finished(f"ECS task {short} is gone ({reason}); the run is {run.status.value}")
        grace = float(worker.get("missing_grace", 60))
        path = self._missing_file(run)
        now = time.time()
        first = now
        if path is not None:
            try:
                first = float(json.loads(path.read_text())["first"])
            except (OSError, ValueError, KeyError, TypeError):
                try:
                    make_private_dirs(path.parent)
                    with open(open_private(path, os.O_WRONLY | os.O_TRUNC), "w") as f:
                        f.write(json.dumps({"first": now}))
                except OSError:
                    pass
        if now - first < grace:
            return WorkerHealth.unknown(f"ECS does not know task {short} ({reason}) for {now - first:.0f}s; "
                                        f"waiting up to {grace:g}s (missing_grace) before calling it gone")
        try:
            self._stop_steps(api, run, worker)
        except error_types():
            pass
        return WorkerHealth.dead(f"ECS task {short} of run {run.run_id} vanished: ECS has not known it ({reason}) "
                                 f"for {now - first:.0f}s (missing_grace {grace:g}s)")
