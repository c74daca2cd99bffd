"""The ``celery`` executor's spec, settings and CLI commands.

Imports nothing of Celery or kombu: runyard imports every plugin module whenever it
discovers plugins, so Celery is imported only when a run uses the executor
(`runyard_celery.handler`) or a worker starts (`runyard_celery.worker`).
"""

from __future__ import annotations

from typing import Any

import attrs
from runyard.plugin import Capabilities, ExecutorConfig, ExecutorSpec, hookimpl

QUEUE_TAG = "celery/queue"
"""Step tag naming the Celery queue its task goes to (default: the ``default_queue`` setting)."""

PRIORITY_TAG = "celery/priority"
"""Step tag giving its task's priority, 0 (lowest) to 9 (highest), on either broker."""

TASK_NAME = "runyard.execute_step"
"""The one Celery task runyard sends: its only argument is a step request as JSON data."""

STOP_COMMAND = "runyard_stop_step"
"""Remote control command of runyard's workers: stop the pool process running a task."""

# Settings the executor relies on; `config_source` may not change them (see app.py).
PINNED_SETTINGS = (
    "task_serializer",
    "result_serializer",
    "accept_content",
    "result_accept_content",
    "task_track_started",
    "task_acks_late",
    "task_reject_on_worker_lost",
)


def _non_negative_or_none(_: Any, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name}: expected a number of seconds > 0 or null, got {value!r}")


def _positive(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name}: expected a number of seconds > 0, got {value!r}")


def _no_pinned(_: Any, attribute: attrs.Attribute, value: dict[str, Any]) -> None:
    pinned = sorted(set(value) & set(PINNED_SETTINGS))
    if pinned:
        raise ValueError(
            f"{attribute.name}: '{pinned[0]}' cannot be changed: the celery executor sends JSON only and relies on "
            f"late acknowledgement and the STARTED state; remove it (pinned: {', '.join(PINNED_SETTINGS)})"
        )


@attrs.frozen(kw_only=True)
class CeleryConfig(ExecutorConfig):
    """Settings of the ``celery`` executor, besides ``max_concurrent`` (default 32: steps sent to
    the broker at once) and ``tag_concurrency_limits``. Workers started with ``runyard celery
    worker`` read the same section of ``runyard.yaml``.

    ``broker``: Celery broker URL (``redis://host:6379/0``, ``amqp://user:pass@host:5672/vhost``);
    required: with no default, steps never go to a broker nobody chose (see docs/backends/celery.md).
    ``backend``: result backend URL; default: the broker's URL when it is Redis. Required with
    an AMQP broker (``rpc://`` is refused: its results reach only the process that sent the task).
    ``include``: modules a worker imports at start (job modules, so that the first step of a
    run does not pay their import).
    ``default_queue``: the queue of steps without a ``celery/queue`` tag.
    ``config_source``: any other Celery settings (``{broker_transport_options: {...}}``), except
    the pinned ones (JSON serialization, late acknowledgement, STARTED tracking).
    ``queue_timeout``: seconds a step may wait in the broker before a worker starts it; then, if
    no worker consumes its queue, it fails NOT_STARTED saying so (workers that consume it but
    are busy restart the wait). null: wait for ever.
    ``worker_lost_timeout``: seconds the worker running a step may fail to answer pings before
    the step fails WORKER_LOST (the whole worker died or lost the broker).
    ``connect_timeout``: seconds to reach the broker and backend when a run starts.
    ``terminate_grace``: seconds between SIGTERM and SIGKILL when a running step is stopped
    (timeout, cancel); 0 kills at once.
    ``time_limit_margin``: a step with a timeout also gets Celery's hard time limit of
    ``timeout + time_limit_margin`` seconds, so that it is killed on the worker even if the run
    worker that should stop it died.
    """

    broker: str = attrs.field(metadata={"required": (
        "add the URL of the Celery broker your workers use, e.g. `broker: redis://127.0.0.1:6379/0` "
        "or `broker: amqp://user:password@host:5672/vhost` (or {env: NAME})"
    )})
    backend: str | None = None
    include: list[str] = attrs.field(factory=list)
    default_queue: str = "runyard"
    config_source: dict[str, Any] = attrs.field(factory=dict, validator=_no_pinned)
    queue_timeout: float | None = attrs.field(default=300.0, validator=_non_negative_or_none)
    worker_lost_timeout: float = attrs.field(default=30.0, validator=_positive)
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    terminate_grace: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    time_limit_margin: float = attrs.field(default=10.0, validator=_positive)


@hookimpl
def runyard_executors() -> list[ExecutorSpec]:
    return [
        ExecutorSpec(
            name="celery",
            api_version=1,
            handler="runyard_celery.handler:CeleryStepHandler",
            config=CeleryConfig,
            capabilities=Capabilities(
                # The worker running a step SIGTERMs (then SIGKILLs) its pool process: see app.stop_step.
                enforces_timeouts=True,
                can_terminate=True,
                supports_resources=False,
                max_concurrency=None,
                needs_shared_outputs=True,
                # A task may wait in the broker; poll says when a worker started it, so a step's
                # timeout counts from there and queue_timeout bounds the wait.
                reports_start=True,
            ),
            description="Each step as a Celery task on Celery workers (runyard celery worker), Redis or RabbitMQ.",
            default_max_concurrent=32,
        )
    ]


@hookimpl
def runyard_cli(cli: Any) -> None:
    import click

    @cli.group("celery")
    def group() -> None:
        """Celery executor: start workers that run runyard steps.

        \b
        Example:
          runyard celery worker -q runyard --concurrency 4
        """

    @group.command("worker")
    @click.option("-q", "--queues", "queues", multiple=True,
                  help="Queue(s) to consume, repeatable or comma-separated (default: default_queue).")
    @click.option("-c", "--concurrency", type=click.IntRange(min=1), default=None,
                  help="Steps run at once: prefork child processes (default: the number of CPUs).")
    @click.option("--broker", default=None, help="Broker URL (default: executor.celery.broker in runyard.yaml).")
    @click.option("--backend", default=None, help="Result backend URL (default: from runyard.yaml).")
    @click.option("-I", "--include", multiple=True, help="Module to import at start (repeatable), e.g. a job module.")
    @click.option("-n", "--hostname", default=None, help="Worker node name (default: runyard@%h plus a suffix).")
    @click.option("-l", "--loglevel", default="WARNING", show_default=True, help="Celery log level.")
    @click.option("--code-location", "code_locations", multiple=True, metavar="DIR_OR_MODULE",
                  help="Directory or module whose jobs this worker may run (repeatable; default: "
                  "step_worker.code_locations in runyard.yaml, else the --include modules).")
    @click.option("--output-store", "output_stores", multiple=True, metavar="URL",
                  help="Output store this worker may read and write (repeatable; default: "
                  "step_worker.output_stores in runyard.yaml, else its outputs: setting).")
    def worker(queues: tuple[str, ...], concurrency: int | None, broker: str | None, backend: str | None,
               include: tuple[str, ...], hostname: str | None, loglevel: str, code_locations: tuple[str, ...],
               output_stores: tuple[str, ...]) -> None:
        """Start a Celery worker that runs the steps of any runyard job it can import.

        Settings come from the celery executor's section of $RUNYARD_HOME/runyard.yaml, and the
        options here override them. A step runs only if its request is signed with the key in
        RUNYARD_SIGNING_KEY (or step_worker.signing_key) and its job and output store are among
        this worker's code locations and output stores; others fail, saying why (docs/security.md).

        \b
        Example:
          RUNYARD_SIGNING_KEY=... runyard celery worker -q runyard,gpu --concurrency 4 \\
              --code-location /srv/jobs --output-store s3://bucket/runyard
        """
        from .worker import run_worker  # imports Celery: only when a worker starts

        run_worker(
            queues=[q for arg in queues for q in arg.split(",") if q],
            concurrency=concurrency,
            broker=broker,
            backend=backend,
            include=list(include),
            hostname=hostname,
            loglevel=loglevel,
            code_locations=list(code_locations),
            output_stores=list(output_stores),
        )
