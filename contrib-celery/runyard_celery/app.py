"""The Celery application both sides build from the same settings, and runyard's one task.

The run worker (the engine's process) sends tasks with it; ``runyard celery worker`` runs
them. Messages and results are JSON only: the task's single argument is a signed step
request (`runyard.plugin.sign_request`), its result the attempt's events as dicts. Step
outputs never travel through Celery: the worker writes them to the output store named in
the request (one of the worker's own output stores), and downstream steps read them there.

The app knows runyard's task and nothing else: Celery's built-in tasks (``celery.accumulate``,
``celery.chord_unlock``, ``celery.map``, ``celery.starmap``, ``celery.chunks``,
``celery.group``, ``celery.chain``, ``celery.chord``, ``celery.backend_cleanup``) and any
task a module imported at start defines are never registered, so a worker rejects a message
naming one as an unregistered task. Several of them call other tasks named in their JSON
arguments, or delete results; none is needed by runyard.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from celery.app.registry import TaskRegistry
from celery.utils.log import get_logger
from celery.worker import state as worker_state
from celery.worker.control import control_command, ok
from celery.worker.request import Request
from runyard import ConfigError
from runyard.plugin import (
    EventType,
    StepInterrupted,
    WorkerPolicy,
    execute_trusted_step,
    load_worker_policy,
    refusal_event,
)

from .settings import LIVE_META_KEY, STOP_COMMAND, TASK_NAME

logger = get_logger(__name__)

JSON_ONLY = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
}

# Why each setting: see docs/backends/celery.md, "Failure behaviour".
RELIABILITY = {
    # Acknowledge after the step ran: a message whose worker vanished is redelivered by the
    # broker rather than lost.
    "task_acks_late": True,
    # ...but when only the pool child running a step dies (SIGKILL, OOM), the parent worker
    # records WorkerLostError instead of requeueing, and the engine's retry policy decides:
    # a step that kills its process must not be redelivered for ever.
    "task_reject_on_worker_lost": False,
    # The STARTED state tells queued from running (queue_timeout vs. the step's timeout) and
    # says which worker runs the step (worker_lost_timeout).
    "task_track_started": True,
    # A worker reserves one message per free process, so a queued step waits for the first
    # free worker rather than behind a busy one.
    "worker_prefetch_multiplier": 1,
    "broker_connection_retry_on_startup": True,
    # RabbitMQ closes the channel of a delivery unacknowledged for longer than its
    # consumer_timeout (30 min by default): a step longer than that. Without this, Celery
    # calls that unrecoverable and the worker exits, killing every step it runs. With it,
    # the worker opens a new channel; the broker requeues the long step's message, and
    # `_AtMostOnceRequest` drops the copy instead of starting the step a second time.
    "broker_channel_error_retry": True,
    # ...and the steps running meanwhile go on (Celery 6 will cancel them by default).
    "worker_cancel_long_running_tasks_on_connection_loss": False,
    "worker_hijack_root_logger": False,
    # Priorities 0-9 on both brokers (see `broker_priority`).
    "task_queue_max_priority": 9,
    "broker_transport_options": {"priority_steps": list(range(10)), "queue_order_strategy": "priority"},
}


def broker_kind(url: str) -> str:
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme in ("redis", "rediss", "sentinel"):
        return "redis"
    if scheme in ("amqp", "amqps", "pyamqp"):
        return "amqp"
    return scheme


def broker_priority(priority: int, broker: str) -> int:
    """runyard's 0 (lowest) .. 9 (highest) as the broker understands it: RabbitMQ serves
    higher numbers first, kombu's Redis transport lower ones."""
    return 9 - priority if broker_kind(broker) == "redis" else priority


def default_backend(broker: str, backend: str | None, *, key: str = "executor.celery") -> str:
    if backend:
        scheme = urlsplit(backend).scheme
        if scheme in ("rpc", "disabled", ""):
            raise ConfigError(
                f"{key}.backend: {backend!r} cannot be used: the celery executor reads task states (queued, "
                "started, done) by task id, from any process; rpc:// delivers them only to the process that sent "
                "the task. Use a shared backend such as redis://host:6379/1"
            )
        return backend
    if broker_kind(broker) == "redis":
        return broker
    raise ConfigError(
        f"{key}.backend: required with the broker {urlsplit(broker).scheme}://...: give a result backend "
        "URL, e.g. backend: redis://127.0.0.1:6379/1"
    )


class _RunyardTasksOnly(TaskRegistry):
    """A task registry that keeps one of runyard's tasks only: whatever else registers itself
    (Celery's built-ins at finalization, a ``@shared_task`` in an included module) is left out."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.only = name

    def __setitem__(self, name: str, task: Any) -> None:
        if name == self.only:
            super().__setitem__(name, task)


def make_app(
    *,
    broker: str,
    backend: str | None,
    include: Sequence[str] = (),
    default_queue: str = "runyard",
    config_source: Mapping[str, Any] | None = None,
    task: tuple[str, Any] | None = None,
    key: str = "executor.celery",
) -> Celery:
    """The Celery app for these settings, with runyard's task registered: by default the one
    that runs a step in the pool process; ``task`` = (name, function) registers another
    instead (the ``celery_docker`` executor's)."""
    name, body = task or (TASK_NAME, _run_step)
    app = Celery("runyard", broker=broker, backend=default_backend(broker, backend, key=key), include=list(include),
                 set_as_current=False, tasks=_RunyardTasksOnly(name))
    conf: dict[str, Any] = {**RELIABILITY, "task_default_queue": default_queue}
    user = dict(config_source or {})
    if "broker_transport_options" in user:
        conf["broker_transport_options"] = {**conf["broker_transport_options"], **user.pop("broker_transport_options")}
    conf.update(user)
    conf.update(JSON_ONLY)  # last: config_source cannot reintroduce pickle (the config class refuses it too)
    app.conf.update(conf)
    app.task(name=name, bind=True, Request=_AtMostOnceRequest)(body)
    return app


class _AtMostOnceRequest(Request):
    """A redelivered message starts its step only if no worker has it in hand.

    Late acknowledgement means a message comes back when its channel closes before the
    step ended: the worker died (the step should run again elsewhere), or only the channel
    went (RabbitMQ's consumer_timeout, a network blip) while the step runs on. The task's
    state in the result backend tells them apart: STARTED by a worker that still answers,
    or already over, and the copy is acknowledged and dropped."""

    def revoked(self) -> bool:
        if super().revoked():
            return True
        if not self.delivery_info.get("redelivered"):
            return False
        why = _already_in_hand(self)
        if why is None:
            return False
        logger.warning("runyard: not starting task %s again (its message was redelivered): %s", self.id, why)
        original = worker_state.requests.get(self.id)
        worker_state.task_ready(self)  # also pops requests[id], which may be the original's
        if original is not None and original is not self:
            worker_state.requests[self.id] = original
        self.acknowledge()
        return True


def _already_in_hand(request: Request) -> str | None:
    """Why the redelivered ``request`` must not start its step, or None to start it."""
    held = [*worker_state.active_requests, *worker_state.reserved_requests]
    if any(r.id == request.id and r is not request for r in held):
        return "this worker holds it already"
    try:
        meta = request.task.backend.get_task_meta(request.id)
    except Exception as e:  # the backend is unreachable: starting a second copy is worse than waiting
        return f"its state could not be read from the result backend ({e}); the run's monitor decides"
    state = meta.get("status")
    if state == "PENDING":
        return None  # it never started: it was reserved by a worker that went away
    if state != "STARTED":
        return f"it is over already ({state})"
    info = meta.get("result")
    host = info.get("hostname") if isinstance(info, dict) else None
    if not host:
        return None
    if host == request.hostname:
        return None  # this worker restarted: the step it ran is gone with the old process
    # A worker whose channel was just closed is reconnecting and answers a few seconds late.
    deadline = time.monotonic() + REDELIVERY_PING
    while time.monotonic() < deadline:
        try:
            if request.task.app.control.ping(destination=[host], timeout=1.0):
                return f"worker {host} is running it"
        except Exception:  # noqa: S110 - no answer either way
            time.sleep(0.5)
    return None  # that worker is gone: run it here (the run worker's monitor follows the new host)


# How long a worker given a redelivered message asks the worker that started it whether it lives.
REDELIVERY_PING = 10.0


def _interrupt(signum: int, frame: Any) -> None:
    raise StepInterrupted(message=f"step stopped by signal {signal.Signals(signum).name} on its Celery worker")


# What this worker runs: set by `runyard celery worker` before the pool forks, from the
# worker's own settings (runyard.yaml, its options), never from a message.
_policy: WorkerPolicy | None = None


def set_worker_policy(policy: WorkerPolicy) -> None:
    global _policy
    _policy = policy


_LIVE = (EventType.STEP_START, EventType.STEP_LOG, EventType.STEP_STDOUT, EventType.STEP_STDERR)
_LIVE_EVERY = 0.2  # seconds between two writes of a task's live events to the result backend
_LIVE_WINDOW = 200  # events a write carries at most (the latest): the result has them all


class _LiveMeta:
    """Publishes a running step's start, log records and output as its task's STARTED
    meta (the hostname and pid Celery puts there, plus ``runyard_live``: ``{"from": index
    of the first event carried, "events": [...]}``), where the engine's monitor reads
    every running task's state anyway: no extra round trip on the engine's side. At most
    one backend write per `_LIVE_EVERY` seconds; a timer writes what a burst left."""

    def __init__(self, task: Any) -> None:
        self.task = task
        # The task's request is thread-local: a timer thread must name the task itself.
        self.task_id = task.request.id
        self.base = {"pid": os.getpid(), "hostname": getattr(task.request, "hostname", None)}
        self.events: list[dict[str, Any]] = []
        self.first = 0  # index of self.events[0] among every live event of the attempt
        self.lock = threading.Lock()
        self.last = 0.0
        self.timer: threading.Timer | None = None
        self.dirty = False
        self.closed = False  # the task's result is next: a STARTED state must never follow it

    def __call__(self, ev: Any) -> None:
        if ev.type not in _LIVE:
            return
        with self.lock:
            if self.closed:
                return
            self.events.append(ev.to_dict())
            if len(self.events) > _LIVE_WINDOW:
                drop = len(self.events) - _LIVE_WINDOW
                del self.events[:drop]
                self.first += drop
            self.dirty = True
            if time.monotonic() - self.last < _LIVE_EVERY:
                if self.timer is None:
                    self.timer = threading.Timer(_LIVE_EVERY, self.send)
                    self.timer.daemon = True
                    self.timer.start()
                return
        self.send()

    def send(self) -> None:
        with self.lock:
            self.timer = None
            if not self.dirty or self.closed:
                return
            self.dirty = False
            self.last = time.monotonic()
            meta = {**self.base, LIVE_META_KEY: {"from": self.first, "events": list(self.events)}}
            try:
                self.task.update_state(task_id=self.task_id, state="STARTED", meta=meta)
            except Exception:  # noqa: S110 - a live copy lost is not the step's failure: the result has it
                pass

    def close(self) -> None:
        with self.lock:
            timer, self.timer = self.timer, None
            self.closed = True  # the result follows with every event
        if timer is not None:
            timer.cancel()


def worker_policy(request: Any) -> WorkerPolicy | dict[str, Any]:
    """This worker's policy, or the task result refusing ``request`` when its settings are invalid."""
    if _policy is not None:
        return _policy
    try:  # a worker started some other way than `runyard celery worker`
        return load_worker_policy()
    except Exception as e:
        return {"events": [refusal_event(request, f"this worker's trust settings are invalid: {e}").to_dict()]}


def _run_step(task: Any, request: Any) -> dict[str, Any]:
    """Run one step attempt in this pool process; the events are the result (JSON).

    The request runs only if signed with this worker's key and inside its allowance;
    otherwise the result is one STEP_FAILURE saying why, and nothing was imported or read.
    SIGTERM (sent by `stop_step`) raises StepInterrupted in the step, so its ``finally``
    blocks run and the attempt reports a failure; the pool process lives on.
    """
    policy = worker_policy(request)
    if isinstance(policy, dict):
        return policy
    previous = signal.signal(signal.SIGTERM, _interrupt)
    live = _LiveMeta(task)
    try:
        events = execute_trusted_step(request, policy, on_event=live)
    finally:
        live.close()
        signal.signal(signal.SIGTERM, previous)
    return {"events": [ev.to_dict() for ev in events]}


@control_command(args=[("task_id", str), ("grace", float)], signature="<task_id> <grace>", name=STOP_COMMAND)
def stop_step(state: Any, task_id: str, grace: float = 5.0, **kwargs: Any) -> dict[str, Any]:
    """Remote control command run by the worker's main process: SIGTERM the pool process
    running ``task_id``, and SIGKILL it ``grace`` seconds later if it still runs that task.

    Celery's own ``revoke(terminate=True)`` sends one signal and forgets the task at once, so
    a step that survives the signal (it catches it, or sits in C code) would run on.
    """
    for request in list(worker_state.active_requests):
        pid = request.worker_pid
        if request.id != task_id or not pid:
            continue

        def escalate(request: Any = request, pid: int = pid) -> None:
            if request in worker_state.active_requests and request.worker_pid == pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        try:
            os.kill(pid, signal.SIGKILL if grace <= 0 else signal.SIGTERM)
        except ProcessLookupError:
            return ok("already gone")
        if grace > 0:
            timer = threading.Timer(grace, escalate)
            timer.daemon = True
            timer.start()
        return ok(f"stopping pid {pid}")
    if any(r.id == task_id for r in [*worker_state.active_requests, *worker_state.reserved_requests]):
        # Handed to a pool process that has not yet said which it is (no worker_pid): too
        # late for the revoke, too early to signal. Stop it as soon as its pid is known.
        def stop_once_started() -> None:
            deadline = time.monotonic() + ACCEPT_WAIT
            while time.monotonic() < deadline:
                known = [r for r in list(worker_state.active_requests) if r.id == task_id]
                if any(r.worker_pid for r in known):
                    stop_step(state, task_id, grace)
                    return
                if not known and not any(r.id == task_id for r in list(worker_state.reserved_requests)):
                    return  # dropped as revoked, or over
                time.sleep(0.02)

        threading.Thread(target=stop_once_started, name="runyard-stop-pending", daemon=True).start()
        return ok("stopping once it starts")
    return ok("not running here")


# How long a stop waits for a task this worker already holds to get its pool process.
ACCEPT_WAIT = 30.0
