"""``runyard celery worker``: a Celery worker that runs runyard steps, from its own code locations
and output stores only, for requests signed with its key (see docs/security.md)."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import click
from runyard import ConfigError, Instance
from runyard.plugin import load_worker_policy, missing_key_error, resolve

from .app import make_app, set_worker_policy
from .settings import CeleryConfig


def instance_config(broker: str | None = None, instance: Instance | None = None,
                    executor: str = "celery") -> CeleryConfig:
    """The settings of the ``executor`` (celery, celery_docker or celery_k8s) section of
    $RUNYARD_HOME/runyard.yaml, or the defaults with ``broker`` (the --broker option): there
    is no default broker to fall back on. celery_docker and celery_k8s have no defaults
    without their section (the container or Job settings)."""
    instance = instance or Instance.from_env()
    selection = instance.sections.get("executor")
    if selection is not None and selection.name == executor:
        return instance.plugin_config("executor", selection)
    if executor != "celery":
        fronted = executor.removeprefix("celery_")
        example = "docker: {image: my-jobs:1}" if fronted == "docker" else "k8s: {image: my-jobs:1, namespace: jobs}"
        raise ConfigError(
            f"{instance.config_source}: executor.{executor} is not set: a worker started with --steps-in {fronted} "
            f"reads its broker and its {'container' if fronted == 'docker' else 'Job'} settings there, e.g. "
            f"executor: {{{executor}: {{broker: redis://127.0.0.1:6379/0, {example}}}}}"
        )
    if broker is None:
        raise ConfigError(
            f"{instance.config_source}: executor.celery.broker is not set and no --broker was given: "
            "say which broker to consume, e.g. --broker redis://127.0.0.1:6379/0, or set executor.celery.broker"
        )
    return CeleryConfig(broker=broker)


def run_worker(
    *,
    queues: list[str],
    concurrency: int | None,
    broker: str | None,
    backend: str | None,
    include: list[str],
    hostname: str | None,
    loglevel: str,
    code_locations: list[str] | None = None,
    output_stores: list[str] | None = None,
    steps_in: str = "process",
) -> None:
    executor = "celery" if steps_in == "process" else f"celery_{steps_in}"
    # Unique by default: the handler pings the worker running a step by this name.
    name = hostname or f"runyard-{os.getpid()}@{socket.gethostname()}"
    try:
        instance = Instance.from_env()
        cfg = instance_config(broker, instance, executor)
        modules = [*(resolve(m) or "" for m in cfg.include), *include]
        # Decided here, before anything is received: what this worker will load and read.
        policy = load_worker_policy(
            instance=instance,
            code_locations=code_locations or (),
            output_stores=output_stores or (),
            default_code_locations=modules,  # the job modules it imports at start
        )
        if policy.signing_key is None:
            raise ConfigError(str(missing_key_error("runyard celery worker")))
        if not policy.code_locations:
            raise ConfigError(
                "runyard celery worker: no code locations: this worker would refuse every step. Name the "
                "directories or modules whose jobs it may run with --code-location DIR_OR_MODULE (repeatable), "
                "`step_worker: {code_locations: [...]}` in runyard.yaml, or executor.celery.include "
                "(see docs/security.md)"
            )
        if not policy.output_stores:
            raise ConfigError(
                "runyard celery worker: no output stores: give --output-store URL (the run's outputs: setting) "
                "or `step_worker: {output_stores: [...]}` in runyard.yaml (see docs/security.md)"
            )
        set_worker_policy(policy)
        task = None
        if steps_in == "docker":
            task = _docker_task(cfg, instance, name)
        elif steps_in == "k8s":
            task = _k8s_task(cfg, instance, name)
        broker_url = broker or resolve(cfg.broker) or ""
        app = make_app(
            broker=broker_url,
            # The configured backend whatever the broker: the engine reads results there, and
            # one written elsewhere (the broker's Redis, say) would leave its step PENDING.
            backend=backend or resolve(cfg.backend),
            include=modules,
            default_queue=resolve(cfg.default_queue) or "runyard",
            config_source=cfg.config_source,
            task=task,
            key=f"executor.{executor}",
        )
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    argv: list[Any] = [
        "worker",
        f"--queues={','.join(queues or [app.conf.task_default_queue])}",
        f"--hostname={name}",
        f"--loglevel={loglevel}",
        "--pool=prefork",
        # Gossip (every worker tracking every other) is not used by runyard; mingle stays on,
        # so a worker that starts late learns the revoked task ids of the others.
        "--without-gossip",
    ]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    sys.stdout.flush()
    app.worker_main(argv)


def _docker_task(cfg: Any, instance: Instance, node: str) -> tuple[str, Any]:
    """The celery_docker task, configured with this worker's container settings; a missing
    runyard-docker is a usage error naming the extra to install."""
    from .docker_settings import DOCKER_TASK_NAME, INSTALL_HINT

    try:
        from . import docker_worker
    except ImportError as e:
        raise ConfigError(f"runyard celery worker --steps-in docker: {INSTALL_HINT} ({e})") from None
    return DOCKER_TASK_NAME, docker_worker.make_task(cfg.docker, instance, node).function()


def _k8s_task(cfg: Any, instance: Instance, node: str) -> tuple[str, Any]:
    """The celery_k8s task, configured with this worker's Job settings, and the worker's
    reaper (started now, before the pool forks: see `k8s_worker.JobReaper`); a missing
    runyard-k8s is a usage error naming the extra to install."""
    from .k8s_settings import INSTALL_HINT, K8S_TASK_NAME

    try:
        from . import k8s_worker
    except ImportError as e:
        raise ConfigError(f"runyard celery worker --steps-in k8s: {INSTALL_HINT} ({e})") from None
    task = k8s_worker.make_task(cfg.k8s, instance, node).function()
    k8s_worker.JobReaper(node).watch_lost_tasks()
    return K8S_TASK_NAME, task
