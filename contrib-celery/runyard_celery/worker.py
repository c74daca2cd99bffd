"""``runyard celery worker``: a Celery worker that runs runyard steps of any job it can import."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import click
from runyard import ConfigError, Instance
from runyard.plugin import resolve

from .app import make_app
from .plugin import CeleryConfig


def instance_config(broker: str | None = None) -> CeleryConfig:
    """The celery executor's settings in $RUNYARD_HOME/runyard.yaml, or the defaults with
    ``broker`` (the --broker option): there is no default broker to fall back on."""
    instance = Instance.from_env()
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
) -> None:
    try:
        cfg = instance_config(broker)
        broker_url = broker or resolve(cfg.broker) or ""
        app = make_app(
            broker=broker_url,
            # The configured backend whatever the broker: the engine reads results there, and
            # one written elsewhere (the broker's Redis, say) would leave its step PENDING.
            backend=backend or resolve(cfg.backend),
            include=[*(resolve(m) or "" for m in cfg.include), *include],
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
