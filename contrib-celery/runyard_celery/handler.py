"""The ``celery`` executor's step handler: each step attempt is one Celery task.

The engine's thread sends tasks (`launch`) and reads what a monitor thread learnt
(`poll`). The monitor reads the tasks' states from the result backend (one MGET per turn
on a key-value backend such as Redis) and turns them into outcomes:

- PENDING past ``queue_timeout``: if no worker consumes its queue, the task is revoked and
  the step fails NOT_STARTED, saying so; if some do (they are busy), it waits on;
- STARTED: the worker (hostname) running it is pinged; silent for longer than
  ``worker_lost_timeout``, the step fails WORKER_LOST;
- SUCCESS: the result is the attempt's events (JSON);
- FAILURE: the task itself failed (the pool child died: WorkerLostError; Celery's hard time
  limit: TimeLimitExceeded);
- REVOKED: stopped by `terminate` (timeout, cancel) or by someone else.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from typing import Any

from celery.backends.base import KeyValueStoreBackend
from kombu.utils.url import maybe_sanitize_url
from runyard import RunyardError
from runyard.plugin import (
    Event,
    FailureInfo,
    FailureKind,
    StepHandler,
    StepRequest,
    StepUpdate,
    missing_key_error,
    resolve,
    sign_request,
    signing_key_at,
)

from .app import broker_priority, make_app
from .plugin import PRIORITY_TAG, QUEUE_TAG, STOP_COMMAND, TASK_NAME, CeleryConfig

_POLL_MIN, _POLL_MAX = 0.001, 0.02  # backend polling interval bounds while steps are out, seconds
_PING_EVERY = 2.0  # seconds between liveness pings of the workers running steps
_POLL_RUNNING = 0.5  # polling interval when every step out is running: their ends need no haste
_FAST_FOR = 2.0  # seconds of fast polling after the last change of state
_INSPECT_TIMEOUT = 3.0  # seconds the workers have to say which queues they consume
_STOP_CONFIRM = 10.0  # seconds past terminate_grace to wait for a stopped task's end before giving up


class CeleryBrokerError(RunyardError):
    """The broker or result backend cannot be reached."""


class _Task:
    """The handle of one attempt: its Celery task and what the monitor learnt of it."""

    __slots__ = ("request", "task_id", "queue", "sent", "started", "worker", "events", "failure",
                 "over", "reported", "stop_kind", "stop_at", "silent_since", "expiring", "checking")

    def __init__(self, request: StepRequest, task_id: str, queue: str) -> None:
        self.request = request
        self.task_id = task_id
        self.queue = queue
        self.sent = time.monotonic()
        self.started = False
        self.worker: str | None = None  # hostname of the worker running it, once STARTED
        self.events: list[Event] = []
        self.failure: FailureInfo | None = None
        self.over = False  # its outcome is known (events or failure)
        self.reported = False
        self.stop_kind: FailureKind | None = None  # set by terminate
        self.stop_at = 0.0
        self.silent_since: float | None = None  # its worker stopped answering pings then
        self.expiring = False  # queue_timeout passed: revoked, the failure is being written
        self.checking = False  # queue_timeout passed: asking the workers whether any consumes its queue

    @property
    def step(self) -> str:
        return self.request.step_key


class CeleryStepHandler(StepHandler):
    """Runs each step attempt as a ``runyard.execute_step`` task on Celery workers."""

    config: CeleryConfig

    # -- life cycle ---------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.config
        # Workers run signed requests only: without a key no step could run, so say so now.
        key = signing_key_at(self.context.instance_home)
        if key is None:
            raise missing_key_error("executor celery")
        self._key = key
        self.broker = resolve(cfg.broker) or ""
        backend = resolve(cfg.backend)
        self.default_queue = resolve(cfg.default_queue) or "runyard"
        self.app = make_app(
            broker=self.broker,
            backend=backend,
            include=(),  # only workers import the job modules
            default_queue=self.default_queue,
            # Redis's default socket timeout is 120 s: a backend that stops answering (a dead
            # link, not a refused connection) would block each fetch that long, far past
            # worker_lost_timeout. Bounded here unless the user set them.
            config_source={"broker_connection_timeout": cfg.connect_timeout,
                           "redis_socket_connect_timeout": cfg.connect_timeout,
                           "redis_socket_timeout": min(cfg.connect_timeout, cfg.worker_lost_timeout),
                           **cfg.config_source},
        )
        # Celery's Redis backend subscribes this process to every task it sends, for
        # AsyncResult.get(); the monitor reads states itself, so nobody would drain them.
        self.app.backend.on_task_call = lambda producer, task_id: None  # type: ignore[method-assign]
        try:
            self._check_reachable()
        except BaseException:
            self.app.close()
            raise
        self._lock = threading.Lock()
        self._tasks: dict[str, _Task] = {}
        self._changed = threading.Event()
        self._kick = threading.Event()
        self._closing = threading.Event()
        self._kv = isinstance(self.app.backend, KeyValueStoreBackend)
        self._backend_ok_at = time.monotonic()  # the last fetch that the result backend answered
        self._monitor = threading.Thread(target=self._watch_states, name="runyard-celery-monitor", daemon=True)
        self._pinger = threading.Thread(target=self._watch_workers, name="runyard-celery-pinger", daemon=True)
        self._monitor.start()
        self._pinger.start()

    def _check_reachable(self) -> None:
        """Fail the run at once, naming the URL, when the broker or backend is down, rather
        than letting the first task's publish retry for ever."""
        timeout = self.config.connect_timeout
        problems: list[str] = []

        def check() -> None:
            try:
                with self.app.connection_for_write() as conn:
                    conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
            except Exception as e:
                problems.append(
                    f"cannot reach the Celery broker at {maybe_sanitize_url(self.broker)} "
                    f"(executor.celery.broker): {type(e).__name__}: {str(e).rstrip('.')}"
                )
                return
            try:
                self.app.backend.get_task_meta("runyard-connection-check")
            except Exception as e:
                problems.append(
                    f"cannot reach the Celery result backend at {maybe_sanitize_url(self.app.conf.result_backend)} "
                    f"(executor.celery.backend): {type(e).__name__}: {str(e).rstrip('.')}"
                )

        thread = threading.Thread(target=check, name="runyard-celery-connect", daemon=True)
        thread.start()
        thread.join(timeout * 2 + 1)
        if thread.is_alive():
            problems.append(
                f"the Celery broker at {maybe_sanitize_url(self.broker)} or its result backend did not answer "
                f"within {timeout * 2 + 1:g}s (executor.celery.connect_timeout is {timeout:g}s)"
            )
        if problems:
            raise CeleryBrokerError(f"{problems[0]}. Start it, or fix the URL (runyard.yaml or the run config).")

    def teardown(self) -> None:
        if not hasattr(self, "_closing"):  # setup failed, and released what it had
            return
        self._closing.set()
        self._kick.set()
        self._monitor.join(5)
        self._pinger.join(5)
        with contextlib.suppress(Exception):
            self.app.close()

    # -- engine calls -------------------------------------------------------------------

    def launch(self, request: StepRequest) -> _Task:
        tags = request.tags
        queue = tags.get(QUEUE_TAG) or self.default_queue
        task = _Task(request, f"{request.run_id}.{request.attempt_id}", queue)
        problem = self._refuse(request)
        if problem is not None:
            task.failure = FailureInfo(kind=FailureKind.NOT_STARTED, message=problem)
            task.over = True
            return task
        options: dict[str, Any] = {"queue": queue, "task_id": task.task_id}
        if PRIORITY_TAG in tags:
            options["priority"] = broker_priority(int(tags[PRIORITY_TAG]), self.broker)
        if request.timeout:
            # A backstop: the engine stops the step at its timeout through terminate; this
            # kills it on the worker even if the run worker died before it could.
            options["time_limit"] = request.timeout + self.config.time_limit_margin
        with self._lock:
            self._tasks[task.task_id] = task
        try:
            self.app.send_task(TASK_NAME, args=[sign_request(request, self._key)], **options)
        except BaseException:
            with self._lock:
                self._tasks.pop(task.task_id, None)
            raise
        self._kick.set()
        return task

    def _refuse(self, request: StepRequest) -> str | None:
        if request.output_store.startswith("memory://"):
            return (
                f"step '{request.step_key}' was not started: Celery workers cannot read the in-memory output "
                "store of this process; run with a RUNYARD_HOME (outputs under it) or set outputs: to a shared "
                "path or URL in runyard.yaml"
            )
        if request.code_pointer.module == "__main__":
            return (
                f"step '{request.step_key}' was not started: job '{request.job_name}' was defined in __main__ "
                "without a file, so no Celery worker can load it; define it in a file (-f) or a module (-m)"
            )
        priority = request.tags.get(PRIORITY_TAG)
        if priority is not None and not (priority.isdigit() and 0 <= int(priority) <= 9):
            return (
                f"step '{request.step_key}' was not started: tag {PRIORITY_TAG}={priority!r} must be an integer "
                "from 0 (lowest) to 9 (highest)"
            )
        return None

    def poll(self, handle: _Task) -> StepUpdate:
        with self._lock:
            if not handle.over:
                return StepUpdate.running(started=handle.started)
            if handle.reported:
                return StepUpdate.finished()
            handle.reported = True
            self._tasks.pop(handle.task_id, None)
        if handle.failure is not None:
            return StepUpdate.crashed(handle.failure, handle.events)
        return StepUpdate.finished(handle.events)

    def wait(self, timeout: float) -> None:
        # The engine polls every attempt after this returns, so clearing after the wait
        # loses nothing: a change after the clear is seen by that poll.
        self._changed.wait(timeout)
        self._changed.clear()

    def terminate(self, handle: _Task, kind: FailureKind) -> None:
        with self._lock:
            if handle.over or handle.stop_kind is not None:
                return
            handle.stop_kind = kind
            handle.stop_at = time.monotonic()
            queued, worker = not handle.started, handle.worker
        problem = self._stop_remote(handle.task_id, worker)
        if queued:
            # Finished whether or not the broker took the revoke: nothing else would end it.
            message = f"step '{handle.step}' was stopped before a worker started it"
            if problem:
                message += f" (revoking its Celery task failed: {problem}; a worker may still run it later)"
            self._finish(handle, failure=FailureInfo(kind=kind, message=message))
        self._kick.set()

    def _stop_remote(self, task_id: str, worker: str | None) -> str | None:
        """Revoke a task and tell the worker running it to stop it; the error, if the broker
        cannot be reached in time, rather than raising or blocking (the engine calls
        terminate from the thread that cancels the run).

        Revoked ids are shared by all workers (and learnt by workers that start later), so a
        queued or reserved task is dropped instead of started. A running one is not touched
        by a revoke: the worker running it SIGTERMs its pool process, SIGKILL after the grace.
        """
        errors: list[str] = []

        def send() -> None:
            try:
                with self._control_connection() as conn:
                    conn.ensure_connection(max_retries=1, interval_start=0, timeout=self.config.connect_timeout)
                    self.app.control.revoke(task_id, connection=conn)
                    self.app.control.broadcast(
                        STOP_COMMAND,
                        arguments={"task_id": task_id, "grace": float(self.config.terminate_grace)},
                        destination=[worker] if worker else None,
                        connection=conn,
                    )
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")

        thread = threading.Thread(target=send, name="runyard-celery-stop", daemon=True)
        thread.start()
        thread.join(self.config.connect_timeout * 2 + 1)
        if thread.is_alive():
            return f"the broker did not answer within {self.config.connect_timeout * 2 + 1:g}s"
        return errors[0] if errors else None

    # -- the monitor --------------------------------------------------------------------

    def _finish(self, task: _Task, *, events: list[Event] | None = None, failure: FailureInfo | None = None) -> None:
        with self._lock:
            if task.over:
                return
            task.events = events or []
            task.failure = failure
            task.over = True
        self._changed.set()

    def _pending(self) -> list[_Task]:
        with self._lock:
            return [t for t in self._tasks.values() if not t.over]

    def _watch_states(self) -> None:
        interval, last_change = _POLL_MIN, time.monotonic()
        while not self._closing.is_set():
            tasks = self._pending()
            if not tasks:
                self._kick.wait(0.1)
                self._kick.clear()
                interval, last_change = _POLL_MIN, time.monotonic()
                continue
            try:
                metas = self._fetch([t.task_id for t in tasks])
                self._backend_ok_at = time.monotonic()
            except Exception as e:
                metas = {}
                self._backend_unreachable(tasks, e)
            changed = False
            now = time.monotonic()
            for task in tasks:
                try:
                    changed |= self._advance(task, metas.get(task.task_id), now)
                except Exception as e:  # a result we cannot read must fail its step, not the monitor
                    self._finish(task, failure=FailureInfo(
                        kind=FailureKind.WORKER_LOST,
                        message=f"step '{task.step}': unreadable Celery result: {type(e).__name__}: {e}"))
                    changed = True
            if changed:
                interval, last_change = _POLL_MIN, now
            elif now - last_change > _FAST_FOR and all(t.started and t.stop_kind is None for t in tasks):
                # Only steps that have been running a while: their end is seen within half a
                # second, and a long step does not cost Redis 50 reads a second. Short steps end
                # within _FAST_FOR and keep the fast pace; a new launch kicks the wait short.
                interval = min(max(interval * 2, _POLL_MAX), _POLL_RUNNING)
            else:
                interval = min(interval * 2, _POLL_MAX)
            self._kick.wait(interval)
            self._kick.clear()

    def _fetch(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        backend = self.app.backend
        if self._kv:
            values = backend.mget([backend.get_key_for_task(i) for i in ids])
            return {i: backend.decode_result(v) for i, v in zip(ids, values, strict=True) if v is not None}
        return {i: backend.get_task_meta(i) for i in ids}

    def _backend_unreachable(self, tasks: list[_Task], error: Exception) -> None:
        # Counted from the last answer, not from this failure: the failing call itself may
        # have blocked for up to the socket timeout.
        now = time.monotonic()
        for task in tasks:  # a task sent while the monitor was idle is not blamed for the idle time
            down = now - max(self._backend_ok_at, task.sent)
            if down > self.config.worker_lost_timeout:
                self._finish(task, failure=FailureInfo(
                    kind=FailureKind.WORKER_LOST,
                    message=f"step '{task.step}': the Celery result backend has not answered for {down:.0f}s "
                    f"(worker_lost_timeout; {type(error).__name__}: {error})"))
        time.sleep(0.5)

    def _advance(self, task: _Task, meta: dict[str, Any] | None, now: float) -> bool:
        status = meta["status"] if meta else "PENDING"
        if status == "PENDING":
            if task.stop_kind is not None:
                return False
            limit = self.config.queue_timeout
            if limit is not None and now - task.sent > limit and not task.checking:
                task.checking = True
                # Asking the workers which queues they consume takes a second: not on this thread.
                threading.Thread(target=self._check_queue, args=(task, limit), daemon=True).start()
            return False
        if status == "STARTED":
            info = meta.get("result") if meta else None
            host = info.get("hostname") if isinstance(info, dict) else None
            if not task.started or host != task.worker:
                # Also when the host changes: the broker redelivered the task of a worker that
                # died (late acknowledgement) and another worker runs it now.
                with self._lock:
                    task.started = True
                    task.worker = host
                    task.silent_since = None
            if task.stop_kind is not None and now - task.stop_at > self.config.terminate_grace + _STOP_CONFIRM:
                self._finish(task, failure=FailureInfo(
                    kind=task.stop_kind,
                    message=f"step '{task.step}' was asked to stop; its worker ({task.worker}) did not confirm "
                    f"within {self.config.terminate_grace + _STOP_CONFIRM:g}s"))
                return True
            return False
        assert meta is not None
        if status == "SUCCESS":
            result = meta["result"]
            self._finish(task, events=[Event.from_dict(d) for d in result["events"]])
        elif status == "REVOKED":
            if task.expiring:
                return False  # our own revoke at queue_timeout: _check_queue says why
            if task.stop_kind:
                kind, why = task.stop_kind, "was stopped"
            elif task.started:  # revoke(terminate=True) by someone else: the step was interrupted
                kind, why = FailureKind.CANCELED, f"was revoked in Celery while running on {task.worker}"
            else:
                kind, why = FailureKind.NOT_STARTED, "was revoked in Celery (by someone else, or expired)"
            self._finish(task, failure=FailureInfo(kind=kind, message=f"step '{task.step}' {why}"))
        elif status == "FAILURE":
            self._finish(task, failure=self._task_failure(task, meta))
        else:  # RETRY or a custom state: runyard's task never retries by itself
            return False
        return True

    def _task_failure(self, task: _Task, meta: dict[str, Any]) -> FailureInfo:
        exc = meta.get("result")
        if isinstance(exc, dict):  # an exception Celery could not rebuild here
            name, text = str(exc.get("exc_type")), str(exc.get("exc_message"))
            module = str(exc.get("exc_module"))
        else:
            name, text, module = type(exc).__name__, str(exc), type(exc).__module__
        where = f" on worker {task.worker}" if task.worker else ""
        if task.stop_kind is not None:
            return FailureInfo(kind=task.stop_kind, message=f"step '{task.step}' was stopped{where}")
        if name == "WorkerLostError":
            sig = re.search(r"signal (\d+)", text)
            code = re.search(r"exitcode (-?\d+)", text)
            return FailureInfo(
                # Killed by a signal is its own kind (as on every executor); exited is worker_lost.
                kind=FailureKind.SIGNAL if sig else FailureKind.WORKER_LOST,
                message=f"step '{task.step}': the Celery pool process running it died{where}: {text}",
                error_class=f"{module}.{name}",
                signal=int(sig.group(1)) if sig else None,
                exit_code=int(code.group(1)) if code else None,
            )
        if name == "TimeLimitExceeded":
            return FailureInfo(
                kind=FailureKind.TIMEOUT,
                message=f"step '{task.step}' was killed by Celery's hard time limit{where}: {text}",
                error_class=f"{module}.{name}",
            )
        return FailureInfo(
            kind=FailureKind.ERROR,
            message=f"step '{task.step}': the Celery task failed{where}: {name}: {text}",
            error_class=f"{module}.{name}",
            traceback=meta.get("traceback"),
        )

    def _check_queue(self, task: _Task, limit: float) -> None:
        """``queue_timeout`` passed with the task still queued: fail it if no worker consumes
        its queue; if some do, they are busy, and the wait goes on for another period."""
        waited = f"step '{task.step}' waited {limit:g}s (queue_timeout) in queue '{task.queue}' without a worker"
        replies: dict[str, Any] | None = None
        consumers: list[str] = []
        # A loaded worker can be slow to answer: a generous timeout, and a second chance,
        # before calling the queue unserved.
        for _ in range(2):
            try:
                with self._control_connection() as conn:
                    replies = self.app.control.inspect(timeout=_INSPECT_TIMEOUT, connection=conn).active_queues() or {}
            except Exception as e:
                replies, problem = None, f"starting it (could not ask the workers which queues they consume: {e})"
                continue
            consumers = sorted(w for w, qs in replies.items() if any(q.get("name") == task.queue for q in qs or ()))
            if consumers:
                break
        if replies is not None:
            if consumers:
                with self._lock:
                    task.sent = time.monotonic()
                    task.checking = False
                return
            if replies:
                problem = (f"starting it: no worker consumes queue '{task.queue}' (workers answering: "
                           f"{', '.join(sorted(replies))}); start one with: runyard celery worker -q {task.queue}")
            else:
                problem = ("starting it: no Celery worker answered; start one with: "
                           f"runyard celery worker -q {task.queue}")
        with self._lock:
            if task.over or task.started or task.stop_kind is not None:
                task.checking = False
                return
            task.stop_kind = FailureKind.NOT_STARTED
            task.expiring = True
        # A worker may have taken it since the inspection: stop it there too, not only revoke.
        stop_problem = self._stop_remote(task.task_id, None)
        if stop_problem:
            problem += f"; revoking its task failed too ({stop_problem})"
        self._finish(task, failure=FailureInfo(kind=FailureKind.NOT_STARTED, message=f"{waited} {problem}"))

    def _control_connection(self) -> Any:
        """A broker connection of our own for remote control, closed after use.

        Not one from the app's pool: waiting for replies leaves a Redis channel with a BRPOP
        outstanding, and kombu closes pooled connections again in every child this process
        forks later (a multiprocess run, say), where reading that BRPOP's reply blocks for ever.
        """
        return self.app.connection_for_write()

    def _ping(self, hosts: list[str]) -> list[dict[str, Any]]:
        with self._control_connection() as conn:
            return self.app.control.ping(destination=hosts, timeout=1.0, connection=conn)

    def _watch_workers(self) -> None:
        """Ping the workers running steps; a step whose worker stays silent is lost."""
        while not self._closing.wait(_PING_EVERY):
            with self._lock:
                running = [t for t in self._tasks.values() if t.started and not t.over and t.worker]
            hosts = sorted({t.worker for t in running if t.worker})
            if not hosts:
                continue
            try:
                replies = self._ping(hosts)
            except Exception:
                replies = []  # the broker is down: silence, as far as the steps are concerned
            alive = {name for reply in replies for name in reply}
            now = time.monotonic()
            for task in running:
                if task.worker in alive:
                    task.silent_since = None
                    continue
                if task.silent_since is None:
                    task.silent_since = now
                elif now - task.silent_since > self.config.worker_lost_timeout:
                    # Revoked should the broker redeliver it; stopped should the worker be alive
                    # after all (cut off from the broker for a while), so it does not run on.
                    self._stop_remote(task.task_id, None)
                    self._finish(task, failure=FailureInfo(
                        kind=FailureKind.WORKER_LOST,
                        message=f"step '{task.step}': Celery worker {task.worker} running it has not answered "
                        f"pings for {now - task.silent_since:.0f}s (worker_lost_timeout); it died or lost the broker"))
