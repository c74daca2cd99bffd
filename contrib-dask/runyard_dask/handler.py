"""The engine side of the ``dask`` executor: each step attempt becomes one Dask task.

Imported only when a run uses the executor (it imports dask, and distributed unless the
config picks a local scheduler). The task is `runyard_dask.remote.run_step_json`, given the
step request as plain JSON data and returning the attempt's events as one JSON string
(`runyard_dask.remote.run_step` under dask's local schedulers: the same, undecoded).

The handler composes the concerns, each in its own module: `cluster` (the client and
cluster, or the local scheduler's pools), `submission` (keys, resources, handles, batched
submission), `fetcher` (reading finished tasks), `starts` (started, or unable to start),
`outcomes` (what a task's end means for its step) and `interrupt` (stopping a step).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import attrs
from runyard.plugin import (
    Event,
    FailureInfo,
    FailureKind,
    HandlerContext,
    StepHandler,
    StepRequest,
    StepUpdate,
    grant_for_run,
    missing_key_error,
    new_signing_key,
    sign_request,
    signing_key_at,
)

from . import remote
from .cluster import DistributedCluster, LocalScheduler
from .fetcher import ResultFetcher
from .interrupt import stop_task
from .outcomes import distributed_outcome, local_outcome, stopped_info
from .settings import DaskConfig
from .starts import StartWatch
from .submission import (
    LIVE_READ_EVERY,
    LIVE_TOPIC_PREFIX,
    RESOURCE_TAGS,
    START_TOPIC,
    DaskHandle,
    dask_key,
    live_mark,
    parse_resources,
    submit_batch,
)

__all__ = ["RESOURCE_TAGS", "START_TOPIC", "DaskHandle", "DaskStepHandler", "dask_key", "parse_resources"]

_RUNNING = StepUpdate.running()  # immutable, so one instance serves every poll
_STARTED = StepUpdate.running(started=True)


class DaskStepHandler(StepHandler):
    """Submits each attempt as a Dask task (`runyard_dask.remote.run_step_json`), keyed by run
    and attempt, with the step's Dask resources; collects results in batches; stops steps
    by canceling the future and interrupting the step on its worker."""

    config: DaskConfig

    def __init__(self, config: DaskConfig, context: HandlerContext) -> None:
        super().__init__(config, context)
        self._client: Any = None  # the distributed client; None with a local scheduler
        self._distributed = DistributedCluster()
        self._local = LocalScheduler()
        self._changed = threading.Event()
        self._fetcher: ResultFetcher | None = None
        self._pending: list[DaskHandle] = []  # launched, to be submitted at the next poll or wait
        self._starts = StartWatch(config)
        self._live_topic = f"{LIVE_TOPIC_PREFIX}{context.run_id}"
        self._by_key: dict[str, DaskHandle] = {}  # running attempts, for their live events
        # Until a step has waited this long, poll needs no look at the cluster.
        limits = [config.no_worker_timeout]
        if config.queue_timeout is not None:
            limits.append(config.queue_timeout)
        self._quiet_for = min(limits)

    # -- setup / teardown -------------------------------------------------------------

    def setup(self) -> None:
        # Every request is signed. A scheduler at `address` serves workers started by someone
        # else, who must share the key; a cluster (or local scheduler) of this run's own gets a
        # key made for the run, and its allowance, from the engine (see _grant).
        key = signing_key_at(self.context.instance_home)
        if key is None and self.config.address is not None:
            raise missing_key_error("executor.dask.address")
        self._key = key if key is not None else new_signing_key().encode()
        self._granted: tuple[str, str, dict[str, Any]] | None = None
        try:
            if self.config.local_scheduler is not None:
                self._local.open(self.config, self.context.max_concurrent)
            else:
                self._distributed.open(self.config)
                self._client = self._distributed.client
                self._client.subscribe_topic(START_TOPIC, self._starts.on_start)
                self._client.subscribe_topic(self._live_topic, self._on_live)
                self._fetcher = ResultFetcher(self._client, self._changed, lambda: len(self._by_key))
                self._fetcher.start()
        except BaseException:
            self.teardown()  # leave nothing half-acquired
            raise

    def teardown(self) -> None:
        remote.drop_grant(self.context.run_id)  # installed in this process by a local scheduler
        if self._fetcher is not None:
            # Kept after it stops: a task ending later is queued for nobody, as before teardown.
            self._fetcher.close()
        self._distributed.close()
        self._client = None
        self._local.close()

    # -- launch / poll / wait / terminate -----------------------------------------------

    def launch(self, request: StepRequest) -> DaskHandle:
        resources = parse_resources(request.step_key, request.tags)
        key = dask_key(request)
        handle = DaskHandle(request, key, resources)
        self._by_key[key] = handle
        payload = sign_request(request, self._key)
        grace = self.config.interrupt_grace
        if self._granted is None and self.config.address is None:
            self._grant(request)
        if self._client is not None:
            if request.timeout is not None or self.config.queue_timeout is not None:
                self._starts.track(handle)
            # Submitted with the other steps launched in this turn of the engine's loop, in
            # one graph (see submission.submit_batch): one message to the scheduler, not one per step.
            handle.payload = payload
            self._pending.append(handle)
            return handle
        else:
            launcher = self._local.launcher
            assert launcher is not None
            if resources:
                raise ValueError(
                    f"step '{request.step_key}' asks for Dask resources {resources}, which only distributed "
                    "workers have; remove local_scheduler or the tag"
                )
            # The launcher has a thread for every step in flight: the step starts at once.
            handle.started = True
            handle.future = launcher.submit(
                self._local.compute, self.config.local_scheduler, self._granted, payload, key, grace
            )
        handle.future.add_done_callback(lambda _f, h=handle: self._on_done(h))
        return handle

    def _grant(self, request: StepRequest) -> None:
        """Give the workers this run started itself its key and allowance (its job's code
        location and its output store), before its first step goes out."""
        grant = (request.run_id, self._key.decode(), grant_for_run(request))
        if self._client is not None:
            from .grant import TrustGrant

            self._client.register_plugin(TrustGrant(*grant), name=f"runyard-trust-{request.run_id}")
        self._granted = grant

    def _submit_pending(self) -> None:
        pending, self._pending = self._pending, []
        submit_batch(self._client, pending, self.config.interrupt_grace, self._on_done, self._stop_remote,
                     self._live_topic)

    def _on_live(self, event: tuple[float, Any]) -> None:
        # On the client's event loop thread: a running step's start, log record or output.
        msg = event[1]
        if not isinstance(msg, dict):
            return
        handle = self._by_key.get(str(msg.get("key")))
        if handle is None:
            return
        try:
            ev = Event.from_dict(msg["event"])
        except (KeyError, TypeError, ValueError):
            return
        self._take_live(handle, [ev])

    def _take_live(self, handle: DaskHandle, events: list[Event]) -> None:
        with handle.lock:
            if handle.reported:
                return  # its ending was reported with every event: this one is in there
            fresh = [ev for ev in events if live_mark(ev) not in handle.live_seen]
            handle.live_seen.update(live_mark(ev) for ev in fresh)
            if not self.reports_connected:
                handle.live.extend(fresh)
                return
        if fresh:
            self.report(fresh)

    def _read_live_file(self, handle: DaskHandle) -> None:
        """Under a local scheduler: the live events the step appended to its file since the last read."""
        path = self._local.live_file(handle.key)
        if path is None:
            return
        try:
            with open(path, "rb") as f:
                f.seek(handle.live_pos)
                data = f.read(1 << 20)
        except OSError:
            return
        cut = data.rfind(b"\n") + 1
        if not cut:
            return
        handle.live_pos += cut
        events = []
        for line in data[:cut].decode("utf-8", errors="replace").splitlines():
            try:
                events.append(Event.from_json(line))
            except (KeyError, TypeError, ValueError):
                continue
        self._take_live(handle, events)

    def _on_done(self, handle: DaskHandle) -> None:
        if self._fetcher is not None:
            self._fetcher.put(handle)  # the fetcher reads it and wakes the engine
        else:
            handle.fetched = True  # a local future holds its result
            self._changed.set()

    def wait(self, timeout: float) -> None:
        if self._pending:
            self._submit_pending()
        # Done callbacks set the flag; the engine polls everything after this returns, so
        # clearing afterwards loses nothing.
        self._changed.wait(timeout)
        self._changed.clear()

    def poll(self, handle: DaskHandle) -> StepUpdate:
        if self._pending:
            self._submit_pending()
        if self._client is None and not handle.reported:
            now = time.monotonic()
            if now >= handle.tail_at:
                handle.tail_at = now + LIVE_READ_EVERY
                self._read_live_file(handle)
        if handle.live:
            with handle.lock:
                live, handle.live = handle.live, []
            update = self.poll(handle)
            return attrs.evolve(update, events=[*live, *update.events])
        # The common case, cheaply: the engine polls every running step on every turn of its
        # loop, so with hundreds in flight this path is most of the handler's cost.
        if (
            not handle.fetched
            and handle.stopped is None
            and handle.submit_error is None
            and time.monotonic() - handle.launched < self._quiet_for
        ):
            return _STARTED if handle.started else _RUNNING
        with handle.lock:
            if handle.reported:
                return StepUpdate.finished()
            stopped = handle.stopped
        future = handle.future
        if handle.submit_error is not None and stopped is None:
            e = handle.submit_error
            return self._report(
                handle,
                StepUpdate.crashed(
                    FailureInfo(
                        kind=FailureKind.NOT_STARTED,
                        message=f"step '{handle.request.step_key}' could not be submitted to Dask: "
                        f"{type(e).__name__}: {e}",
                    )
                ),
            )
        if stopped is not None:
            # The engine has recorded the timeout or cancel; the task is canceled and the
            # step interrupted (see terminate). Its slot is free now.
            return self._report(handle, StepUpdate.crashed(stopped_info(handle, stopped)))
        if not handle.fetched:
            if self._client is not None and not future.done():
                missing = self._starts.check_queued(handle) or self._starts.check_no_worker(handle, self._client)
                if missing is not None:
                    self._client.cancel([future], reason="runyard: the step could not start")
                    return self._report(handle, StepUpdate.crashed(missing))
            return _STARTED if handle.started else _RUNNING
        if self._client is None:
            return self._report(handle, local_outcome(handle))
        return self._report(handle, distributed_outcome(handle))

    def _report(self, handle: DaskHandle, update: StepUpdate) -> StepUpdate:
        if update.done:
            self._by_key.pop(handle.key, None)
            if self._client is None:
                self._read_live_file(handle)  # what came since the last read, before the result's copy
            with handle.lock:
                handle.reported = True
                live, handle.live = handle.live, []
                if handle.live_seen:
                    update = attrs.evolve(update, events=[
                        *live, *(ev for ev in update.events if live_mark(ev) not in handle.live_seen)
                    ])
            if handle.track_start:
                self._starts.forget(handle)
        return update

    def terminate(self, handle: DaskHandle, kind: FailureKind) -> None:
        with handle.lock:
            if handle.stopped is not None or handle.reported:
                return
            handle.stopped = kind
            future = handle.future
        if future is None:
            return  # not submitted yet: submit_batch skips it (or stops it, if it is racing us)
        self._stop_remote(handle, future, kind)
        self._changed.set()

    def _stop_remote(self, handle: DaskHandle, future: Any, kind: FailureKind) -> None:
        stop_task(self._client, handle, future, kind, self._local.stop_file(handle.key))
