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


def instance_config(broker: str | None = None, instance: Instance | None = None) -> CeleryConfig:
    """The celery executor's settings in $RUNYARD_HOME/runyard.yaml, or the defaults with
    ``broker`` (the --broker option): there is no default broker to fall back on."""
    instance = instance or Instance.from_env()
    selection = instance.sections.get("executor")
    if selection is not None and selection.name == "celery":
        return instance.plugin_config("executor", selection)
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
) -> None:
    try:
        instance = Instance.from_env()
        cfg = instance_config(broker, instance)
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
        broker_url = broker or resolve(cfg.broker) or ""
        app = make_app(
            broker=broker_url,
            # The configured backend whatever the broker: the engine reads results there, and
            # one written elsewhere (the broker's Redis, say) would leave its step PENDING.
            backend=backend or resolve(cfg.backend),
            include=modules,
            default_queue=resolve(cfg.default_queue) or "runyard",
            config_source=cfg.config_source,
        )
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    # Unique by default: the handler pings the worker running a step by this name.
    name = hostname or f"runyard-{os.getpid()}@{socket.gethostname()}"
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
