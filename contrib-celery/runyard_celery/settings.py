"""Settings of the ``celery`` executor and the names on the wire (task, tags, control
command), shared by the plugin module, the engine side (`handler`), the worker side
(`app`, `worker`) and the tests. Imports nothing of Celery or kombu.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import attrs
from runyard.plugin import Capabilities, EnvVar, ExecutorConfig, ExecutorSpec, above

QUEUE_TAG = "celery/queue"
"""Step tag naming the Celery queue its task goes to (default: the ``default_queue`` setting)."""

PRIORITY_TAG = "celery/priority"
"""Step tag giving its task's priority, 0 (lowest) to 9 (highest), on either broker."""

TASK_NAME = "runyard.execute_step"
# The key of a running task's STARTED meta that carries its live events (app._LiveMeta).
LIVE_META_KEY = "runyard_live"
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


_SECONDS = above(0, what="a number of seconds")


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
    queue_timeout: float | None = attrs.field(default=300.0, validator=_SECONDS)
    worker_lost_timeout: float = attrs.field(default=30.0, validator=_SECONDS)
    connect_timeout: float = attrs.field(default=10.0, validator=_SECONDS)
    terminate_grace: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    time_limit_margin: float = attrs.field(default=10.0, validator=_SECONDS)


def as_written(value: Any) -> Any:
    """Settings as plain data, as written: an ``{env: NAME}`` reference stays the reference
    (its value is read where it is used, and may be a secret). For comparing the settings
    two sides were given (celery_docker's digests, celery_k8s's launcher/executor pair)."""
    if isinstance(value, EnvVar):
        return {"env": value.name}
    if attrs.has(type(value)):
        return {f.name: as_written(getattr(value, f.name)) for f in attrs.fields(type(value))}
    if isinstance(value, dict):
        return {str(k): as_written(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_written(v) for v in value]
    return value


def fingerprint(settings: Any) -> dict[str, str]:
    """Per key of a fronted backend's settings (celery_docker's container settings,
    celery_k8s's Job settings), a digest of its value as written (``{env: NAME}``
    unresolved): what the engine sends along with each task so that a worker whose own
    settings differ refuses the step, naming the keys, instead of silently running it with
    other settings. Digests, not values: literal secrets in ``env_vars`` stay off the broker."""
    plain = as_written(settings)
    return {key: hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for key, value in sorted(plain.items())}


def differing_keys(ours: dict[str, str], theirs: Any) -> list[str]:
    """The keys whose digests differ (``theirs`` crossed the broker: anything but a mapping
    of strings is all different)."""
    if not isinstance(theirs, dict):
        return sorted(ours)
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))


def executor_spec(
    *, name: str, handler: str, config: type[ExecutorConfig], supports_resources: bool, description: str, extra: str
) -> ExecutorSpec:
    """One of the celery executors. They differ only in where the worker runs a step (its
    pool process, a container, a Kubernetes Job); everything else comes from the Celery task
    around the step, so it is written once and cannot drift apart between them."""
    return ExecutorSpec(
        name=name,
        api_version=1,
        handler=handler,
        config=config,
        capabilities=Capabilities(
            # The worker running a step stops it, SIGTERM then SIGKILL after the grace: its pool
            # process (see app.stop_step), its container, or its Job's pod (by deleting the Job).
            enforces_timeouts=True,
            can_terminate=True,
            supports_resources=supports_resources,
            max_concurrency=None,
            needs_shared_outputs=True,
            # A task may wait in the broker; poll says when a worker started it, so a step's
            # timeout counts from there and queue_timeout bounds the wait.
            reports_start=True,
        ),
        description=description,
        default_max_concurrent=32,
        extra=extra,
    )
