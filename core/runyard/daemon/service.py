"""The daemon: a lease in storage, and four loops run by the lease holder.

One thread does everything, in short passes: renew the lease, then whichever loop is
due. A pass never waits on a run, so a slow launcher delays the others by one call at
most, and nothing is ever done twice by two threads.

* **lease**: ``claim_lease("daemon", holder, ttl)`` every ttl/4; only the holder acts.
  A daemon that stops cleanly releases it (the next takes over at once); one that dies
  is replaced when its lease expires (within ``daemon.lease_ttl`` plus a pass).
* **monitor** (every ``run_monitoring.poll_interval``): every unfinished launched run's
  worker is checked with its launcher's ``check_health``; a gone worker ends the run
  FAILURE (``worker_lost``) with the launcher's reason and the time of death, and its
  running steps are closed with ``worker_lost``.
* **queue** (with ``run_coordinator``, every ``dequeue_interval``): queued runs are
  launched in priority order within the limits.
* **timeouts** (with the monitor): start_timeout, cancel_timeout, max_runtime, and the
  recovery of launches a dead daemon left half done (see `Daemon._starting`).
* **retries** (every 2 s): failed runs whose policy says so get a child run.

Exactly-once launches: a daemon launch writes RUN_STARTING with a fresh launch id, then
calls the launcher, then writes RUN_LAUNCHED with the id. The worker gets the id in its
environment and executes the run only once RUN_LAUNCHED with its id exists and its
RUN_STARTING is still the latest (`runyard.runs.execute_run`). A run left STARTING with no
RUN_LAUNCHED for its latest launch (the daemon died inside the launch) is therefore
launched again by the next lease holder, once that launch is older than the lease ttl:
the new RUN_STARTING fences off any worker the dead daemon may have started.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import attrs

from .. import runs as R
from ..errors import RunyardError
from ..events import EventType, FailureKind
from ..instance import Instance
from ..storage import Lease, RunRecord, RunStatus
from .log import ActionLog
from .queue import Slots, queue_order
from .settings import RETRY_NUMBER_TAG, DaemonSettings, max_runtime, retry_policy, settings

LEASE_NAME = "daemon"
LOOPS = ("monitor", "queue", "timeouts", "retries")
RETRY_INTERVAL = 2.0
RETRY_NAMESPACE = uuid.UUID("6a1c3f2e-8d44-4b8e-9a51-2f0c7d3e9b10")


def retry_run_id(parent_run_id: str) -> str:
    """The id of the retry of ``parent_run_id``: fixed, so that it is created once."""
    return uuid.uuid5(RETRY_NAMESPACE, parent_run_id).hex


@attrs.define
class _Watched:
    """What the daemon remembers of an unfinished run between passes."""

    record: RunRecord
    launcher: Any = None
    launcher_name: str | None = None
    worker: Mapping[str, Any] | None = None
    last_alive: float | None = None  # wall clock: the last time its worker was seen running


class Daemon:
    def __init__(
        self,
        instance: Instance,
        *,
        log: ActionLog | None = None,
        holder: str | None = None,
        config: DaemonSettings | None = None,
    ) -> None:
        self.instance = instance
        self.storage = instance.storage
        self.settings = config or settings(instance)
        self.log = log or ActionLog(self.settings.options.log_format)
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.started_at = time.time()
        self.lease: Lease | None = None
        self._valid_until = 0.0  # monotonic: act only before this (the lease may be lost after)
        self.last_ran: dict[str, float] = {}
        self._watched: dict[str, _Watched] = {}
        self._decided: set[str] = set()  # failed runs whose retry was settled
        self._queued: dict[str, RunRecord] = {}

    # -- lease ---------------------------------------------------------------------------

    @property
    def ttl(self) -> float:
        return self.settings.options.lease_ttl

    def _info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": self.started_at,
            "loops": dict(self.last_ran),
            "intervals": self._intervals(),
            "queue": self.settings.coordinator is not None,
        }

    def _intervals(self) -> dict[str, float]:
        m = self.settings.monitoring.poll_interval
        out = {"monitor": m, "timeouts": m, "retries": RETRY_INTERVAL}
        if self.settings.coordinator is not None:
            out["queue"] = self.settings.coordinator.dequeue_interval
        return out

    def renew(self) -> bool:
        """Take or keep the lease; whether this daemon holds it now."""
        began = time.monotonic()
        was = self.lease is not None
        try:
            lease = self.storage.claim_lease(LEASE_NAME, self.holder, self.ttl, self._info())
        except Exception as e:  # storage unreachable: stop acting once the lease may be gone
            self.log("lease_error", f"cannot renew the lease: {type(e).__name__}: {e}")
            lease = None
            if time.monotonic() < self._valid_until:
                return True
        if lease is None:
            if was:
                self.log("lease_lost", "another daemon holds the lease now; standing by", holder=self.holder)
                self._watched.clear()
            self.lease = None
            self._valid_until = 0.0
            return False
        # Counted from before the claim: the lease may have been granted at any moment since.
        self._valid_until = began + self.ttl * 0.8
        if not was or (self.lease is not None and lease.epoch != self.lease.epoch):
            self.log("lease_acquired", "this daemon acts for the instance now", holder=self.holder,
                     epoch=lease.epoch)
        self.lease = lease
        return True

    @property
    def holds_lease(self) -> bool:
        return self.lease is not None and time.monotonic() < self._valid_until

    def release(self) -> None:
        if self.lease is not None:
            try:
                self.storage.release_lease(LEASE_NAME, self.holder)
            except Exception as e:
                self.log("lease_error", f"could not release the lease: {e}")
            self.lease = None
            self.log("lease_released", "stopped", holder=self.holder)

    # -- running -------------------------------------------------------------------------

    def run_once(self) -> bool:
        """Every loop once (if this daemon gets the lease); whether it held the lease."""
        if not self.renew():
            return False
        for loop in LOOPS:
            self._run_loop(loop)
        self.renew()  # publish the loops' times
        return True

    def run_forever(self, stop: threading.Event) -> None:
        intervals = self._intervals()
        due = dict.fromkeys(intervals, 0.0)
        next_renew = 0.0
        self.log("daemon_started", f"instance {self.instance.home}", holder=self.holder,
                 queue="on" if self.settings.coordinator else "off")
        try:
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_renew:
                    self.renew()
                    next_renew = now + min(self.ttl / 4, 1.0)
                if self.holds_lease:
                    for loop, every in intervals.items():
                        if stop.is_set() or not self.holds_lease:
                            break
                        if time.monotonic() >= due[loop]:
                            self._run_loop(loop)
                            due[loop] = time.monotonic() + every
                    wake = min([*due.values(), next_renew])
                else:
                    wake = next_renew
                stop.wait(max(0.01, wake - time.monotonic()))
        finally:
            self.release()

    def _run_loop(self, loop: str) -> None:
        try:
            getattr(self, f"_{loop}_pass")()
        except Exception as e:  # one bad pass (storage blip) must not end the daemon
            self.log("loop_error", f"{loop}: {type(e).__name__}: {e}", loop=loop)
        self.last_ran[loop] = time.time()

    # -- monitor -------------------------------------------------------------------------

    def _watch(self, run_id: str, status: RunStatus) -> _Watched | None:
        w = self._watched.get(run_id)
        if w is None or w.record.status is not status:
            record = self.storage.get_run(run_id)
            if record is None:
                return None
            if w is None:
                w = self._watched[run_id] = _Watched(record)
            else:
                w.record = record
        return w

    def _monitor_pass(self) -> None:
        states = self.storage.run_states(R.ACTIVE)
        live = {rid for rid, _ in states}
        for rid in list(self._watched):
            if rid not in live:
                self._forget(self._watched.pop(rid))
        for run_id, status in states:
            if not self.holds_lease:
                return
            w = self._watch(run_id, status)
            if w is None:
                continue
            if w.worker is None:
                name, worker = R.worker_info(self.instance, run_id)
                if worker is None:
                    continue  # not launched (yet): the timeouts pass watches it
                w.launcher_name, w.worker = name, worker
            if w.launcher is None:
                try:
                    _, w.launcher = R.get_launcher(self.instance, w.launcher_name, run=w.record)
                except Exception as e:
                    self.log("check_error", f"cannot build the run's launcher: {e}", run=run_id)
                    continue
            # Taken before the check: the worker was alive at some moment after it, so this
            # is a true lower bound of a later death (the time after could be past it).
            asked = time.time()
            try:
                health = w.launcher.check_health(w.record, w.worker)
            except Exception as e:
                self.log("check_error", f"check_health raised {type(e).__name__}: {e}", run=run_id)
                continue
            if health.is_running:
                w.last_alive = asked
            elif health.is_gone:
                self._worker_gone(w, health)

    def _forget(self, w: _Watched) -> None:
        """A watched run ended: ask its launcher once more, as `check_health` is also where a
        launcher cleans up after a worker (reaps the process this daemon started, removes a
        container), and nobody else may ever ask about a finished run."""
        if w.launcher is None or w.worker is None:
            return
        finished = self.storage.get_run(w.record.run_id)
        if finished is None:
            return
        try:
            w.launcher.check_health(finished, w.worker)
        except Exception as e:
            self.log("check_error", f"check_health raised {type(e).__name__}: {e}", run=w.record.run_id)

    def _worker_gone(self, w: _Watched, health: Any) -> None:
        run_id = w.record.run_id
        detected = time.time()
        current = self.storage.get_run(run_id)
        if current is None or current.status not in R.ACTIVE:
            return  # it ended by itself meanwhile
        if current.status is RunStatus.CANCELING:
            if self.storage.transition_run(run_id, RunStatus.CANCELED,
                                           [R._event(run_id, EventType.RUN_CANCELED, "run canceled (worker stopped)")],
                                           only_from=[RunStatus.CANCELING]):
                self.log("canceled", "its worker stopped", run=run_id)
            return
        died_at, after = self._time_of_death(w, health, detected)
        reason = f"run worker died before the run finished: {health.message}"
        lost = R.close_lost_steps(self.instance, run_id, f"step lost: its run worker is gone ({health.message})")
        if R.fail_run(self.instance, run_id, reason, kind=FailureKind.WORKER_LOST, died_at=died_at,
                      detected_at=detected, died_after=after, lost_steps=lost):
            self.log("marked_failed", health.message, run=run_id, job=w.record.job_name, kind="worker_lost",
                     died_at=round(died_at, 3), detected_after=round(detected - died_at, 3))

    def _time_of_death(self, w: _Watched, health: Any, detected: float) -> tuple[float, float | None]:
        """(time of death, last sign of life). The launcher's time if it knows it. Else the
        worker died between its last sign of life (the last check that saw it running, or
        its run's last event, whichever is later) and now: the middle of that interval when
        it is a pass or two long (off by half a poll at most), else, when the daemon was not
        watching (a restart), the last sign of life itself, rather than a guess."""
        after = w.last_alive
        events = self.storage.get_events(w.record.run_id)
        if events:
            after = max(after or 0.0, events[-1].event.timestamp)
        if health.died_at is not None:
            return min(float(health.died_at), detected), after
        if after is None:
            return detected, None
        after = min(after, detected)
        if detected - after <= 2 * self.settings.monitoring.poll_interval + 1.0:
            return (after + detected) / 2, after
        return after, after

    # -- timeouts ------------------------------------------------------------------------

    def _timeouts_pass(self) -> None:
        mon = self.settings.monitoring
        now = time.time()
        for run_id, status in self.storage.run_states(R.ACTIVE):
            if not self.holds_lease:
                return
            w = self._watch(run_id, status)
            if w is None:
                continue
            if status is RunStatus.STARTING:
                self._starting(w, now)
            elif status is RunStatus.CANCELING:
                since = self._last_event_time(run_id, EventType.RUN_CANCELING) or w.record.created_at
                if now - since > mon.cancel_timeout:
                    self._force_cancel(w)
            elif status is RunStatus.STARTED:
                limit = max_runtime(w.record.tags, mon)
                if limit is not None and w.record.started_at is not None and now - w.record.started_at > limit:
                    self._cancel_for_runtime(w, limit)

    def _last_event_time(self, run_id: str, type: EventType) -> float | None:
        events = self.storage.get_events(run_id, types=[type])
        return events[-1].event.timestamp if events else None

    def _starting(self, w: _Watched, now: float) -> None:
        run = w.record
        latest, launched = R.launch_state(self.instance, run.run_id)
        started = self._last_event_time(run.run_id, EventType.RUN_STARTING) or run.created_at
        age = now - started
        timeout = self.settings.monitoring.start_timeout
        if not launched:
            fenced = latest is None or latest.get("launch_id")
            if fenced and age > self.ttl:
                # Whoever was launching it died (its lease is gone, or this pass would not
                # run): nothing was started (no RUN_STARTING), or the worker it may have
                # started is fenced off by the new launch. Launch it again.
                self._launch(run, relaunch=True, why="its launch was interrupted (daemon died mid-launch)")
            elif not fenced and age > timeout:
                if R.fail_run(self.instance, run.run_id,
                              f"the run was never handed to a run worker (launch did not complete in {timeout:g}s)",
                              kind=FailureKind.NOT_STARTED):
                    self.log("marked_failed", "launch never completed", run=run.run_id, kind="not_started")
            return
        if age > timeout:
            if w.launcher is not None and w.worker is not None:
                try:
                    w.launcher.terminate(run, w.worker, force=True)
                except Exception as e:
                    self.log("terminate_error", str(e), run=run.run_id)
            if R.fail_run(self.instance, run.run_id,
                          f"the run worker did not start the run within start_timeout ({timeout:g}s)",
                          kind=FailureKind.NOT_STARTED):
                self.log("marked_failed", f"not started within {timeout:g}s", run=run.run_id, kind="not_started")

    def _force_cancel(self, w: _Watched) -> None:
        run = w.record
        if w.launcher is not None and w.worker is not None:
            try:
                w.launcher.terminate(run, w.worker, force=True)
            except Exception as e:
                self.log("terminate_error", str(e), run=run.run_id)
                return
        timeout = self.settings.monitoring.cancel_timeout
        why = f"cancel forced: the run did not stop within cancel_timeout ({timeout:g}s)"
        if self.storage.transition_run(run.run_id, RunStatus.CANCELED, [R._event(run, EventType.RUN_CANCELED, why)],
                                       only_from=[RunStatus.CANCELING]):
            self.log("cancel_forced", why, run=run.run_id)

    def _cancel_for_runtime(self, w: _Watched, limit: float) -> None:
        run = w.record
        why = f"max_runtime exceeded: the run ran longer than {limit:g}s"
        if not self.storage.transition_run(run.run_id, RunStatus.CANCELING,
                                           [R._event(run, EventType.RUN_CANCELING, why, reason="max_runtime")],
                                           only_from=[RunStatus.STARTED]):
            return
        self.log("canceling", why, run=run.run_id, job=run.job_name)
        if w.launcher is not None and w.worker is not None:
            try:
                w.launcher.terminate(run, w.worker)
            except Exception as e:
                self.log("terminate_error", str(e), run=run.run_id)

    # -- queue ---------------------------------------------------------------------------

    def _queue_pass(self) -> None:
        coordinator = self.settings.coordinator
        if coordinator is None:
            return
        queued_ids = self.storage.run_states([RunStatus.QUEUED])
        if not queued_ids:
            return
        in_flight = []
        for rid, status in self.storage.run_states(R.ACTIVE):
            w = self._watch(rid, status)
            if w is not None:
                in_flight.append(w.record)
        # Queued records do not change while queued: read each once.
        ids = {rid for rid, _ in queued_ids}
        self._queued = {rid: r for rid, r in self._queued.items() if rid in ids}
        for rid in ids - set(self._queued):
            record = self.storage.get_run(rid)
            if record is not None:
                self._queued[rid] = record
        queued = list(self._queued.values())
        slots = Slots(coordinator, in_flight)
        for run in queue_order(queued, coordinator):
            if slots.full or not self.holds_lease:
                return
            if slots.blocked_by(run) is not None:
                continue
            if self._launch(run):
                slots.take(run)

    def _launch(self, run: RunRecord, *, relaunch: bool = False, why: str = "") -> bool:
        launch_id = uuid.uuid4().hex[:16]
        try:
            R.launch_run(self.instance, run, launch_id=launch_id, by=self.holder, relaunch=relaunch)
        except RunyardError as e:
            if "is not QUEUED" in str(e) or "is not STARTING" in str(e):
                return False  # canceled (or launched) meanwhile: nothing to do
            self.log("launch_failed", str(e), run=run.run_id, job=run.job_name)
            return True  # it counts as a slot taken until its failure is seen
        except Exception as e:
            self.log("launch_failed", f"{type(e).__name__}: {e}", run=run.run_id, job=run.job_name)
            return True
        self.log("relaunched" if relaunch else "launched", why, run=run.run_id, job=run.job_name,
                 launch_id=launch_id)
        return True

    # -- retries -------------------------------------------------------------------------

    def _retries_pass(self) -> None:
        window = self.settings.retries.window
        now = time.time()
        # Ids only (a narrow query); a record is read once, for a run not yet decided.
        for run_id, _ in self.storage.run_states([RunStatus.FAILURE]):
            if not self.holds_lease:
                return
            if run_id in self._decided:
                continue
            run = self.storage.get_run(run_id)
            if run is None:
                continue
            if run.ended_at is not None and now - run.ended_at > window:
                self._decided.add(run.run_id)
                continue
            try:
                self._maybe_retry(run)
            except Exception as e:
                self.log("retry_failed", f"{type(e).__name__}: {e}", run=run.run_id, job=run.job_name)
            self._decided.add(run.run_id)

    def failure_kinds(self, run: RunRecord) -> set[str]:
        """The kinds of failure that ended ``run``: the run's own (worker lost, not started),
        or else those of its failed steps."""
        events = self.storage.get_events(run.run_id, types=[EventType.RUN_FAILURE, EventType.STEP_FAILURE])
        run_level = [e.event for e in events if e.event.type is EventType.RUN_FAILURE and e.event.failure]
        if run_level:
            return {run_level[-1].failure.kind.value}  # type: ignore[union-attr]
        return {e.event.failure.kind.value for e in events
                if e.event.type is EventType.STEP_FAILURE and e.event.failure is not None}

    def _maybe_retry(self, run: RunRecord) -> None:
        policy = retry_policy(run.tags, self.settings.retries)
        number = int(run.tags.get(RETRY_NUMBER_TAG, "0") or 0)
        if policy.max_retries <= number:
            return
        kinds = self.failure_kinds(run)
        wanted = {({"raised": "error"}).get(k, k) for k in policy.retry_on}
        if not kinds & wanted:
            self.log("not_retried", f"failure kind {', '.join(sorted(kinds)) or 'unknown'} is not in retry_on",
                     run=run.run_id, job=run.job_name)
            return
        child_id = retry_run_id(run.run_id)
        if self.storage.get_run(child_id) is not None:
            return  # created before (by this daemon before a restart, or another)
        from ..definitions import CodePointer
        from ..loader import load_job

        if not run.code_pointer:
            raise RunyardError("the run has no code pointer: its job cannot be loaded again")
        pointer = CodePointer.from_dict(run.code_pointer)
        job, loc = load_job(pointer, run.job_name)
        selection: Any = run.step_selection
        if policy.strategy == "from_failure":
            try:
                selection = R.reexecution_selection(self.instance, run, job, from_failure=True, steps=None)
            except RunyardError:
                selection = run.step_selection  # every step succeeded: the run as a whole again
        tags = {**run.tags, RETRY_NUMBER_TAG: str(number + 1)}
        try:
            child = R.create_run(
                self.instance, job, pointer=pointer, definitions=loc.definitions, run_config=run.run_config,
                executor=run.executor, tags=tags, step_selection=selection, parent_run_id=run.run_id,
                run_id=child_id,
            )
        except Exception as e:
            if self.storage.get_run(child_id) is not None:
                return  # a racer created it: the fixed id made sure it exists once
            raise e
        self.log("retried", f"retry {number + 1} of {policy.max_retries} ({policy.strategy})", run=run.run_id,
                 child=child.run_id, job=run.job_name, kind=",".join(sorted(kinds)))
        if self.settings.coordinator is None:
            self._launch(child)  # without a queue, it starts now; with one, it waits its turn


def read_status(instance: Instance) -> dict[str, Any]:
    """What `runyard daemon status` shows, and whether the daemon is healthy: a holder
    whose lease is current and whose loops ran within three of their intervals (plus 5 s)."""
    lease = instance.storage.get_lease(LEASE_NAME)
    if lease is None:
        return {"healthy": False, "problem": "no daemon has ever run for this instance", "lease": None}
    info = dict(lease.info)
    loops: dict[str, Any] = {}
    stale = []
    for loop, every in (info.get("intervals") or {}).items():
        last = (info.get("loops") or {}).get(loop)
        age = lease.now - last if last is not None else None
        loops[loop] = {"last_ran": last, "age": age, "interval": every}
        if age is None or age > 3 * every + 5:
            stale.append(loop)
    problem = None
    if lease.is_expired:
        problem = f"the lease of {lease.holder} expired {lease.now - lease.expires_at:.1f}s ago: no daemon is running"
    elif stale:
        problem = f"loop(s) {', '.join(stale)} have not run recently"
    return {
        "healthy": problem is None,
        "problem": problem,
        "lease": {
            "holder": lease.holder, "epoch": lease.epoch, "acquired_at": lease.acquired_at,
            "renewed_at": lease.renewed_at, "expires_at": lease.expires_at, "expired": lease.is_expired,
            "pid": info.get("pid"), "host": info.get("host"), "queue": info.get("queue"),
        },
        "loops": loops,
        "now": lease.now,
    }


def dumps(status: Mapping[str, Any]) -> str:
    return json.dumps(status, indent=2, sort_keys=True)
