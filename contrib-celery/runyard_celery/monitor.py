"""The ``celery`` executor's monitor: two threads that learn the outcome of each task sent.

One reads the tasks' states from the result backend and turns them into outcomes:

- PENDING past ``queue_timeout``: if no worker consumes its queue, the task is revoked and
  the step fails NOT_STARTED, saying so; if some do (they are busy), it waits on;
- STARTED: the worker (hostname) running it is noted; asked to stop and silent past the
  grace, the step fails with the stop's kind;
- SUCCESS: the result is the attempt's events (JSON);
- FAILURE: the task itself failed (see `states.task_failure`);
- REVOKED: stopped by `terminate` (timeout, cancel) or by someone else.

The other pings the workers running steps: silent for longer than
``worker_lost_timeout``, the step fails WORKER_LOST.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from runyard.plugin import Event, FailureInfo, FailureKind

from .control import WorkerControl
from .settings import LIVE_META_KEY, CeleryConfig
from .states import CeleryTask, StateReader, live_mark, task_failure

_POLL_MIN, _POLL_MAX = 0.001, 0.02  # backend polling interval bounds while steps are out, seconds
_PING_EVERY = 2.0  # seconds between liveness pings of the workers running steps
# Polling interval when every step out is running: their ends need no haste, but their
# live events (in the STARTED meta, see app._LiveMeta) should reach storage within a second.
_POLL_RUNNING = 0.25
_FAST_FOR = 2.0  # seconds of fast polling after the last change of state
_STOP_CONFIRM = 10.0  # seconds past terminate_grace to wait for a stopped task's end before giving up


class TaskMonitor:
    """The tasks out, under one lock, and the threads that watch them."""

    def __init__(self, config: CeleryConfig, control: WorkerControl, reader: StateReader, *,
                 step_in_pool: bool = True, worker_command: str = "runyard celery worker") -> None:
        self.config = config
        self.worker_command = worker_command  # how to start a worker for these tasks (in messages)
        self.step_in_pool = step_in_pool
        self.control = control
        self.reader = reader
        self.lock = threading.Lock()
        self.tasks: dict[str, CeleryTask] = {}
        self.changed = threading.Event()  # some task's outcome became known
        self.kick = threading.Event()  # wakes the state reader early (a launch, a stop)
        self._closing = threading.Event()
        self._backend_ok_at = time.monotonic()  # the last fetch that the result backend answered
        self._states = threading.Thread(target=self._watch_states, name="runyard-celery-monitor", daemon=True)
        self._pinger = threading.Thread(target=self._watch_workers, name="runyard-celery-pinger", daemon=True)

    def start(self) -> None:
        self._states.start()
        self._pinger.start()

    def close(self) -> None:
        self._closing.set()
        self.kick.set()
        self._states.join(5)
        self._pinger.join(5)

    def finish(self, task: CeleryTask, *, events: list[Event] | None = None,
               failure: FailureInfo | None = None) -> None:
        with self.lock:
            if task.over:
                return
            task.events = events or []
            task.failure = failure
            task.over = True
        self.changed.set()

    def _pending(self) -> list[CeleryTask]:
        with self.lock:
            return [t for t in self.tasks.values() if not t.over]

    def _watch_states(self) -> None:
        interval, last_change = _POLL_MIN, time.monotonic()
        while not self._closing.is_set():
            tasks = self._pending()
            if not tasks:
                self.kick.wait(0.1)
                self.kick.clear()
                interval, last_change = _POLL_MIN, time.monotonic()
                continue
            try:
                metas = self.reader.fetch([t.task_id for t in tasks])
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
                    self.finish(task, failure=FailureInfo(
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
            self.kick.wait(interval)
            self.kick.clear()

    def _backend_unreachable(self, tasks: list[CeleryTask], error: Exception) -> None:
        # Counted from the last answer, not from this failure: the failing call itself may
        # have blocked for up to the socket timeout.
        now = time.monotonic()
        for task in tasks:  # a task sent while the monitor was idle is not blamed for the idle time
            down = now - max(self._backend_ok_at, task.sent)
            if down > self.config.worker_lost_timeout:
                self.finish(task, failure=FailureInfo(
                    kind=FailureKind.WORKER_LOST,
                    message=f"step '{task.step}': the Celery result backend has not answered for {down:.0f}s "
                    f"(worker_lost_timeout; {type(error).__name__}: {error})"))
        time.sleep(0.5)

    def _advance(self, task: CeleryTask, meta: dict[str, Any] | None, now: float) -> bool:
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
            changed = False
            if not task.started or host != task.worker:
                # Also when the host changes: the broker redelivered the task of a worker that
                # died (late acknowledgement) and another worker runs it now.
                with self.lock:
                    task.started = True
                    task.worker = host
                    task.silent_since = None
            streamed = info.get("events") if isinstance(info, dict) else None
            if isinstance(streamed, list) and len(streamed) > task.seen:
                # Events a worker streams while the step runs (the celery_docker task does).
                new = [Event.from_dict(d) for d in streamed[task.seen:]]
                with self.lock:
                    task.streamed.extend(new)
                    task.seen = len(streamed)
                self.changed.set()
                changed = True
            if isinstance(info, dict) and isinstance(info.get(LIVE_META_KEY), dict) and self._take_live(task, info):
                self.changed.set()
                changed = True
            if task.stop_kind is not None and now - task.stop_at > self.config.terminate_grace + _STOP_CONFIRM:
                self.finish(task, failure=FailureInfo(
                    kind=task.stop_kind,
                    message=f"step '{task.step}' was asked to stop; its worker ({task.worker}) did not confirm "
                    f"within {self.config.terminate_grace + _STOP_CONFIRM:g}s"))
                return True
            return changed
        assert meta is not None
        if status == "SUCCESS":
            result = meta["result"]
            # The result holds every event of the attempt: those streamed already are not repeated.
            events = [Event.from_dict(d) for d in result["events"][task.seen:]]
            failure = result.get("failure")
            self.finish(task, events=events, failure=None if failure is None else (
                # Stopped by the engine (timeout, cancel): the engine's reason, not the container's.
                FailureInfo(kind=task.stop_kind, message=f"step '{task.step}' was stopped")
                if task.stop_kind is not None else FailureInfo.from_dict(failure)))
        elif status == "REVOKED":
            if task.expiring:
                return False  # our own revoke at queue_timeout: _check_queue says why
            if task.stop_kind:
                kind, why = task.stop_kind, "was stopped"
            elif task.started:  # revoke(terminate=True) by someone else: the step was interrupted
                kind, why = FailureKind.CANCELED, f"was revoked in Celery while running on {task.worker}"
            else:
                kind, why = FailureKind.NOT_STARTED, "was revoked in Celery (by someone else, or expired)"
            self.finish(task, failure=FailureInfo(kind=kind, message=f"step '{task.step}' {why}"))
        elif status == "FAILURE":
            self.finish(task, failure=task_failure(task, meta, step_in_pool=self.step_in_pool))
        else:  # RETRY or a custom state: runyard's task never retries by itself
            return False
        return True

    def _take_live(self, task: CeleryTask, info: dict[str, Any]) -> bool:
        """Take the live events of ``task``'s STARTED meta not taken yet; whether there were any."""
        live = info[LIVE_META_KEY]
        try:
            first = int(live["from"])
            new = [Event.from_dict(d) for d in live["events"][max(0, task.live_next - first):]]
        except (KeyError, TypeError, ValueError):
            return False
        if not new:
            return False
        with self.lock:
            if task.over:
                return False  # the result has them all
            task.live_next = first + len(live["events"])
            fresh = [ev for ev in new if live_mark(ev) not in task.live_seen]
            task.live_seen.update(live_mark(ev) for ev in fresh)
            task.live.extend(fresh)
        return bool(fresh)

    def _check_queue(self, task: CeleryTask, limit: float) -> None:
        """``queue_timeout`` passed with the task still queued: fail it if no worker consumes
        its queue; if some do, they are busy, and the wait goes on for another period."""
        waited = f"step '{task.step}' waited {limit:g}s (queue_timeout) in queue '{task.queue}' without a worker"
        replies: dict[str, Any] | None = None
        consumers: list[str] = []
        # A loaded worker can be slow to answer: a generous timeout, and a second chance,
        # before calling the queue unserved.
        for _ in range(2):
            try:
                replies = self.control.active_queues()
            except Exception as e:
                replies, problem = None, f"starting it (could not ask the workers which queues they consume: {e})"
                continue
            consumers = sorted(w for w, qs in replies.items() if any(q.get("name") == task.queue for q in qs or ()))
            if consumers:
                break
        if replies is not None:
            if consumers:
                with self.lock:
                    task.sent = time.monotonic()
                    task.checking = False
                return
            if replies:
                problem = (f"starting it: no worker consumes queue '{task.queue}' (workers answering: "
                           f"{', '.join(sorted(replies))}); start one with: {self.worker_command} -q {task.queue}")
            else:
                problem = ("starting it: no Celery worker answered; start one with: "
                           f"{self.worker_command} -q {task.queue}")
        with self.lock:
            if task.over or task.started or task.stop_kind is not None:
                task.checking = False
                return
            task.stop_kind = FailureKind.NOT_STARTED
            task.expiring = True
        # A worker may have taken it since the inspection: stop it there too, not only revoke.
        stop_problem = self.control.stop(task.task_id, None)
        if stop_problem:
            problem += f"; revoking its task failed too ({stop_problem})"
        self.finish(task, failure=FailureInfo(kind=FailureKind.NOT_STARTED, message=f"{waited} {problem}"))

    def _watch_workers(self) -> None:
        """Ping the workers running steps; a step whose worker stays silent is lost."""
        while not self._closing.wait(_PING_EVERY):
            with self.lock:
                running = [t for t in self.tasks.values() if t.started and not t.over and t.worker]
            hosts = sorted({t.worker for t in running if t.worker})
            if not hosts:
                continue
            try:
                replies = self.control.ping(hosts)
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
                    self.control.stop(task.task_id, None)
                    self.finish(task, failure=FailureInfo(
                        kind=FailureKind.WORKER_LOST,
                        message=f"step '{task.step}': Celery worker {task.worker} running it has not answered "
                        f"pings for {now - task.silent_since:.0f}s (worker_lost_timeout); it died or lost the broker"))
