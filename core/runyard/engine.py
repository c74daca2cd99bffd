"""The engine: the one scheduling loop every executor runs on.

It owns the ready queue, ``max_concurrent``, tag concurrency limits, retries with backoff
and jitter, timeouts, skipping downstream of failures and cancellation. A `StepHandler`
only starts, polls and stops single attempts.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from .definitions import CodePointer, FromStep, FromSteps
from .events import STEP_LIVE, STEP_TERMINAL, Event, EventType, FailureInfo, FailureKind
from .plan import ExecutionPlan
from .plugin import Capabilities, StepHandler, StepRequest, TagConcurrencyLimit

EventSink = Callable[[Sequence[Event]], None]


class Cancellation:
    """A token a caller keeps to cancel a run that is executing (from any thread).

    From a signal handler call `cancel_from_signal`, never `cancel`: a handler runs on the
    main thread between two of its bytecodes, maybe while that thread holds a lock `cancel`
    needs (this token's own, when a second SIGTERM interrupts the first one's cancel; the
    engine's; a step handler's), and taking it again hangs the process for good (a run
    worker sent SIGTERM twice did, 1 run in 5 of the run-launcher kit)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requested = False
        self._signaled = False
        self._callbacks: list[Callable[[], None]] = []

    @property
    def requested(self) -> bool:
        return self._requested or self._signaled

    def cancel(self) -> None:
        with self._lock:
            if self._requested:
                return
            self._requested = True
            callbacks = list(self._callbacks)
        for cb in callbacks:
            cb()

    def cancel_from_signal(self) -> None:
        """Ask for the cancel without taking a lock: a plain flag, which the engine's
        threads act on (calling `cancel`) within `FLUSH_EVERY` seconds."""
        self._signaled = True

    def act_on_signal(self) -> None:
        """`cancel`, when a signal asked for it and nothing has cancelled yet. Not from a
        signal handler."""
        if self._signaled and not self._requested:
            self.cancel()

    def subscribe(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)
            already = self._requested
        if already:
            callback()
        else:
            self.act_on_signal()  # signaled before anyone was there to act on it


@attrs.define
class _Attempt:
    key: str
    attempt: int
    attempt_id: str
    handle: Any
    deadline: float | None
    limits: tuple[int, ...]
    drain_until: float = 0.0  # when stopped: the engine stops waiting for it after this
    done: bool = False  # a terminal state was recorded; later reports are ignored
    started: bool = False  # the handler reported that it left its queue (reports_start)
    has_output: bool = False  # this attempt reported STEP_OUTPUT
    reported_start: bool = False  # its STEP_START is recorded (live or from poll): never twice


class StepState:
    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"


@attrs.frozen
class EngineResult:
    states: Mapping[str, str]
    outputs: Mapping[str, str]
    canceled: bool

    @property
    def success(self) -> bool:
        return not self.canceled and all(s == StepState.SUCCESS for s in self.states.values())


_IDLE_MIN, _IDLE_MAX = 0.0005, 0.02  # poll back-off bounds when nothing changes, seconds
FLUSH_EVERY = 0.25
"""Seconds between writes of buffered events to storage while the run goes on. Events
are written in batches (one transaction each), never one by one: a step printing line
after line costs a commit per batch, not per line. A background thread writes the
buffer when the engine's own thread is busy (an in-process step runs on it), so an
event reaches storage within about this long after it was reported."""
FLUSH_EVENTS = 2000  # buffered events that are written at once, without waiting out FLUSH_EVERY
LIVE_TYPES = STEP_LIVE  # what `StepHandler.report` takes; outputs and endings come from `poll`
_KEPT_WHEN_STOPPED = frozenset({EventType.STEP_LOG, EventType.STEP_STDOUT, EventType.STEP_STDERR})
DRAIN_TIMEOUT = 10.0
"""Seconds the engine keeps polling a stopped attempt (timed out, canceled) for the handler
to say it is gone. Counted once per attempt from its stop: a run that is canceled does not
wait for it again. Past it, the engine reports it gave up (an ENGINE event with
``data["gave_up"]``) and moves on; a correct handler never lets it come to that."""


class Engine:
    def __init__(
        self,
        *,
        plan: ExecutionPlan,
        handler: StepHandler,
        capabilities: Capabilities,
        run_id: str,
        sink: EventSink,
        code_pointer: CodePointer,
        output_store: str,
        max_concurrent: int,
        tag_limits: Sequence[TagConcurrencyLimit] = (),
        run_config: Mapping[str, Any] | None = None,
        parent_outputs: Mapping[str, str] | None = None,
        cancellation: Cancellation | None = None,
    ) -> None:
        self.plan = plan
        self.handler = handler
        self.capabilities = capabilities
        self.run_id = run_id
        self.sink = sink
        self.code_pointer = code_pointer
        self.output_store = output_store
        self.max_concurrent = max_concurrent
        self.tag_limits = list(tag_limits)
        self.run_config = dict(run_config or {})
        self.outputs: dict[str, str] = dict(parent_outputs or {})
        self.states: dict[str, str] = {k: StepState.PENDING for k in plan.steps}
        # Appended to by the engine's thread and by handlers reporting live (any thread),
        # drained by whichever thread flushes: deque appends and pops are atomic.
        self._buffer: deque[Event] = deque()
        self._last_flush = time.monotonic()
        self._flush_lock = threading.Lock()
        self._flush_error: BaseException | None = None
        self._flusher_stop = threading.Event()
        self._running: dict[str, _Attempt] = {}
        self._attempts: dict[str, _Attempt] = {}  # every attempt launched, by attempt id
        self._draining: list[_Attempt] = []  # stopped attempts still being reaped
        self._draining_ids: set[str] = set()
        self._lock = threading.Lock()
        self._canceled = False
        self._limit_counts = [0] * len(self.tag_limits)
        self._step_limits = {
            k: tuple(i for i, lim in enumerate(self.tag_limits) if lim.matches(ps.node.step.tags))
            for k, ps in plan.steps.items()
        }
        self._retry_heap: list[tuple[float, int, str, int]] = []
        self._seq = itertools.count()
        self._cancellation = cancellation
        if cancellation is not None:
            cancellation.subscribe(self.cancel)
        handler.connect_reporter(self.report)

    # -- public -------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop launching, stop running steps. Safe to call from any thread or signal handler."""
        self._canceled = True
        if self.capabilities.can_terminate:
            with self._lock:
                running = [a for a in self._running.values() if not a.done]
            for a in running:
                try:
                    self.handler.terminate(a.handle, FailureKind.CANCELED)
                except Exception as e:  # report and go on: the loop still ends the run
                    self._emit(EventType.ENGINE, message=f"terminate of '{a.key}' failed: {e}")

    def report(self, events: Sequence[Event]) -> None:
        """Take events of running attempts from a handler, from any thread (see
        `StepHandler.report`). They are written with the next batch."""
        for ev in events:
            if ev.type not in LIVE_TYPES:
                raise ValueError(
                    f"StepHandler.report takes {', '.join(sorted(t.value for t in LIVE_TYPES))} events only; "
                    f"return {ev.type.value} from poll"
                )
            att = self._attempts.get(ev.attempt_id or "")
            if att is None:
                continue  # not an attempt of this run
            if ev.type is EventType.STEP_START:
                if att.done or att.reported_start:
                    continue
                att.reported_start = True
                if self.capabilities.reports_start and not att.started:
                    att.started = True
                    timeout = self.plan.steps[att.key].node.step.timeout
                    if timeout:
                        att.deadline = time.monotonic() + timeout
            elif att.done and att.attempt_id not in self._draining_ids:
                continue  # ended on its own: what comes after its ending is dropped, as in poll
            self._buffer.append(ev)

    def run(self) -> EngineResult:
        remaining = {k: len(ps.upstream) for k, ps in self.plan.steps.items()}
        ready: deque[tuple[str, int]] = deque((k, 1) for k, n in remaining.items() if n == 0)
        self._remaining = remaining
        self._ready = ready
        error: BaseException | None = None
        flusher = threading.Thread(target=self._flush_in_background, name="runyard-engine-flush", daemon=True)
        try:
            self.handler.setup()
            # Started after setup: a handler may fork there (multiprocess's fork server is
            # forked when the process has no other thread, and exec'd, slower, otherwise).
            flusher.start()
            self._loop()
        except BaseException as e:
            error = e
            raise
        finally:
            try:
                self._stop_all(FailureKind.CANCELED)
            finally:
                try:
                    self._teardown(error)
                finally:
                    self._flusher_stop.set()
                    if flusher.ident is not None:
                        flusher.join()
                    self._flush()
        return EngineResult(self.states, self.outputs, self._canceled)

    def _teardown(self, error: BaseException | None) -> None:
        """Call the handler's teardown, also after `setup` raised. When the run is already
        failing, a teardown that raises too (a handler whose setup never got to create what
        teardown releases) is recorded as an ENGINE event and the original error goes on:
        it is the one that says what is wrong (an unset variable, an unreachable cluster)."""
        try:
            self.handler.teardown()
        except Exception as e:
            if error is None:
                raise
            self._emit(EventType.ENGINE, message=f"teardown failed: {type(e).__name__}: {e}")
        finally:
            self._flush()

    # -- loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        idle = _IDLE_MIN
        while True:
            if self._cancellation is not None:
                self._cancellation.act_on_signal()
            if self._canceled:
                self._finish_cancel()
                return
            now = time.monotonic()
            while self._retry_heap and self._retry_heap[0][0] <= now:
                _, _, key, attempt = heapq.heappop(self._retry_heap)
                self._ready.append((key, attempt))
            progressed = self._launch_ready()
            progressed |= self._poll_running()
            self._check_deadlines()
            self._reap_draining()
            if not self._running and not self._ready and not self._retry_heap:
                return
            if len(self._buffer) >= FLUSH_EVENTS or time.monotonic() - self._last_flush >= FLUSH_EVERY:
                self._flush()
            if progressed:
                idle = _IDLE_MIN
                continue
            timeout = idle
            if self._retry_heap and not self._running:
                timeout = max(0.0, self._retry_heap[0][0] - time.monotonic())
            self.handler.wait(min(timeout, _IDLE_MAX) if self._running else timeout)
            idle = min(idle * 2, _IDLE_MAX)

    def _launch_ready(self) -> bool:
        launched = False
        ready = self._ready
        if not ready:
            return False
        blocked: list[tuple[str, int]] = []
        while ready and len(self._running) < self.max_concurrent:
            key, attempt = ready.popleft()
            limits = self._step_limits[key]
            if limits and any(self._limit_counts[i] >= self.tag_limits[i].limit for i in limits):
                blocked.append((key, attempt))
                continue
            self._launch(key, attempt, limits)
            launched = True
        # Steps held back by a tag limit keep their place at the head of the queue.
        ready.extendleft(reversed(blocked))
        return launched

    def _launch(self, key: str, attempt: int, limits: tuple[int, ...]) -> None:
        ps = self.plan.steps[key]
        step = ps.node.step
        inputs: dict[str, str | list[str]] = {}
        for param, src in ps.node.inputs.items():
            if isinstance(src, FromStep):
                inputs[param] = self.outputs[src.key]
            elif isinstance(src, FromSteps):
                inputs[param] = [self.outputs[k] for k in src.keys]
        attempt_id = uuid.uuid4().hex[:16]
        request = StepRequest(
            run_id=self.run_id,
            step_key=key,
            attempt=attempt,
            attempt_id=attempt_id,
            job_name=self.plan.job.name,
            code_pointer=self.code_pointer,
            output_store=self.output_store,
            inputs=inputs,
            run_config=self.run_config,
            timeout=step.timeout,
            tags=step.tags,
        )
        for i in limits:
            self._limit_counts[i] += 1
        self.states[key] = StepState.RUNNING
        # With a queue in front of the compute, the clock starts when the attempt does.
        queued = self.capabilities.reports_start
        deadline = time.monotonic() + step.timeout if step.timeout and not queued else None
        att = _Attempt(key, attempt, attempt_id, None, deadline, limits)
        self._attempts[attempt_id] = att
        try:
            att.handle = self.handler.launch(request)
        except Exception as e:
            with self._lock:
                self._running[attempt_id] = att
            self._fail(
                att, FailureInfo(kind=FailureKind.NOT_STARTED, message=f"launch failed: {type(e).__name__}: {e}")
            )
            self._release(att)
            return
        with self._lock:
            self._running[attempt_id] = att

    def _poll_running(self) -> bool:
        progressed = False
        for att in list(self._running.values()):
            update = self.handler.poll(att.handle)
            if self.capabilities.reports_start and not att.started and (
                update.started or any(ev.type is EventType.STEP_START for ev in update.events)
            ):
                att.started = True
                timeout = self.plan.steps[att.key].node.step.timeout
                if timeout:
                    att.deadline = time.monotonic() + timeout
            if update.events:
                progressed = True
                for ev in update.events:
                    if ev.type is EventType.STEP_START:
                        if att.reported_start:
                            continue  # reported live already
                        att.reported_start = True
                    self._on_worker_event(att, ev)
            if update.done:
                progressed = True
                if not att.done:
                    failure = update.failure or FailureInfo(
                        kind=FailureKind.WORKER_LOST,
                        message=f"step '{att.key}' ended without reporting success or failure",
                    )
                    self._fail(att, failure)
                self._release(att)
        return progressed

    def _on_worker_event(self, att: _Attempt, ev: Event) -> None:
        if att.done:
            return  # first terminal state wins: late or duplicate reports are dropped
        if ev.type is EventType.STEP_OUTPUT:
            self.outputs[att.key] = ev.data["ref"]
            att.has_output = True
        if ev.type is EventType.STEP_SUCCESS and not att.has_output:
            # A success without the output downstream steps read (the handler lost or
            # reordered the STEP_OUTPUT): a failure of this step, not a KeyError later.
            self._fail(att, FailureInfo(
                kind=FailureKind.WORKER_LOST,
                message=f"step '{att.key}' reported success without reporting its output (no STEP_OUTPUT "
                "before STEP_SUCCESS): the executor lost or reordered the step's events",
            ))
            return
        if ev.type in STEP_TERMINAL:
            self._buffer.append(ev)
            if ev.type is EventType.STEP_SUCCESS:
                att.done = True
                self._succeed(att.key)
            else:
                self._fail(att, ev.failure or FailureInfo(kind=FailureKind.ERROR, message=ev.message), emit=False)
            return
        self._buffer.append(ev)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for att in list(self._running.values()):
            if att.deadline is not None and now >= att.deadline and not att.done:
                timeout = self.plan.steps[att.key].node.step.timeout
                self._terminate(att, FailureKind.TIMEOUT)
                self._fail(
                    att,
                    FailureInfo(
                        kind=FailureKind.TIMEOUT,
                        message=f"step '{att.key}' ran longer than its timeout of {timeout:g}s and was stopped",
                    ),
                )
                self._release(att, draining=True)

    def _terminate(self, att: _Attempt, kind: FailureKind) -> None:
        if att.handle is None:
            return
        try:
            self.handler.terminate(att.handle, kind)
        except Exception as e:
            self._emit(EventType.ENGINE, step_key=att.key, message=f"terminate failed: {type(e).__name__}: {e}")

    def _release(self, att: _Attempt, *, draining: bool = False) -> None:
        with self._lock:
            if self._running.pop(att.attempt_id, None) is None:
                return
        for i in att.limits:
            self._limit_counts[i] -= 1
        if not (draining and att.handle is not None):
            # Not kept past its end: a wide run would hold every attempt (and its request)
            # until it ends, which the garbage collector then walks again and again.
            self._attempts.pop(att.attempt_id, None)
        if draining and att.handle is not None:
            att.drain_until = time.monotonic() + DRAIN_TIMEOUT
            self._draining.append(att)
            self._draining_ids.add(att.attempt_id)

    def _reap_draining(self) -> None:
        # Poll stopped attempts until the backend says they are gone, keeping what they
        # logged and printed up to the stop (a user wants a canceled step's last words) and
        # dropping the rest (their ending: the engine recorded the stop already); one that
        # outlives its drain is given up on, once, and said so.
        if not self._draining:
            return
        still: list[_Attempt] = []
        for a in self._draining:
            try:
                update = self.handler.poll(a.handle)
                self._buffer.extend(ev for ev in update.events if ev.type in _KEPT_WHEN_STOPPED)
                gone = update.done
            except Exception as e:
                self._emit(EventType.ENGINE, step_key=a.key, attempt=a.attempt, attempt_id=a.attempt_id,
                           message=f"polling stopped step '{a.key}' failed: {type(e).__name__}: {e}")
                gone = True
            if gone:
                self._attempts.pop(a.attempt_id, None)
                continue
            if time.monotonic() >= a.drain_until:
                self._attempts.pop(a.attempt_id, None)
                self._emit(
                    EventType.ENGINE,
                    step_key=a.key,
                    attempt=a.attempt,
                    attempt_id=a.attempt_id,
                    message=f"gave up waiting for stopped step '{a.key}' to end after {DRAIN_TIMEOUT:g}s; "
                    "the executor did not stop it",
                    data={"gave_up": True},
                )
                continue
            still.append(a)
        self._draining = still
        self._draining_ids = {a.attempt_id for a in still}

    # -- outcomes ---------------------------------------------------------------------

    def _succeed(self, key: str) -> None:
        self.states[key] = StepState.SUCCESS
        for d in self.plan.steps[key].downstream:
            self._remaining[d] -= 1
            if self._remaining[d] == 0 and self.states[d] == StepState.PENDING:
                self._ready.append((d, 1))

    def _fail(self, att: _Attempt, failure: FailureInfo, *, emit: bool = True) -> None:
        if att.done:
            return
        att.done = True
        if emit:
            self._buffer.append(
                Event(
                    type=EventType.STEP_FAILURE,
                    run_id=self.run_id,
                    step_key=att.key,
                    attempt=att.attempt,
                    attempt_id=att.attempt_id,
                    message=failure.message,
                    data={"failure": failure.to_dict()},
                )
            )
        policy = self.plan.steps[att.key].node.step.retry
        if policy is not None and not self._canceled and policy.should_retry(att.attempt, failure.kind):
            delay = policy.delay_before(att.attempt + 1)
            self._emit(
                EventType.STEP_RETRY,
                step_key=att.key,
                attempt=att.attempt,
                message=f"retrying in {delay:.3g}s (attempt {att.attempt + 1} of {policy.max_retries + 1})",
                data={"delay": delay, "next_attempt": att.attempt + 1, "kind": failure.kind.value},
            )
            self.states[att.key] = StepState.PENDING
            heapq.heappush(self._retry_heap, (time.monotonic() + delay, next(self._seq), att.key, att.attempt + 1))
            return
        self.states[att.key] = StepState.FAILED
        self._skip_downstream(att.key)

    def _skip_downstream(self, failed: str) -> None:
        stack = list(self.plan.steps[failed].downstream)
        while stack:
            k = stack.pop()
            if self.states[k] != StepState.PENDING:
                continue
            self.states[k] = StepState.SKIPPED
            self._emit(EventType.STEP_SKIPPED, step_key=k, message=f"skipped: upstream step '{failed}' did not succeed")
            stack.extend(self.plan.steps[k].downstream)

    def _finish_cancel(self) -> None:
        self._stop_all(FailureKind.CANCELED)
        for k, s in self.states.items():
            if s == StepState.PENDING:
                self.states[k] = StepState.SKIPPED
                self._emit(EventType.STEP_SKIPPED, step_key=k, message="skipped: the run was canceled")
        self._ready.clear()
        self._retry_heap.clear()

    def _stop_all(self, kind: FailureKind) -> None:
        for att in list(self._running.values()):
            if not att.done:
                self._terminate(att, kind)
                self._fail(att, FailureInfo(kind=kind, message=f"step '{att.key}' was stopped: the run was canceled"))
            self._release(att, draining=True)
        # Each stopped attempt is waited for once, up to its own drain deadline: a second
        # call (the run's final clean-up after a cancel) finds nothing left to wait for.
        while self._draining:
            self._reap_draining()
            if self._draining:
                time.sleep(0.01)

    # -- events -----------------------------------------------------------------------

    def _emit(self, type: EventType, **kw: Any) -> None:
        self._buffer.append(Event(type=type, run_id=self.run_id, **kw))

    def _flush(self) -> None:
        """Write what is buffered, in one batch. Called by the engine's thread and by the
        background flusher; the lock keeps batches in order."""
        with self._flush_lock:
            if self._flush_error is not None:
                error, self._flush_error = self._flush_error, None
                raise error  # the background flusher's write failed: the run fails as it would here
            self._last_flush = time.monotonic()
            buffer = self._buffer
            if not buffer:
                return
            # Taken one by one: another thread may be appending. What it appends after the
            # len() is left for the next batch.
            popleft = buffer.popleft
            batch = [popleft() for _ in range(len(buffer))]
            try:
                self.sink(batch)
            except BaseException:
                buffer.extendleft(reversed(batch))  # not written: kept for the next try
                raise

    def _flush_in_background(self) -> None:
        # Writes the buffer while the engine's thread is busy elsewhere (an in-process step
        # runs on it; a handler's poll may block): live events and finished steps reach
        # storage without waiting for it.
        stop = self._flusher_stop
        cancellation = self._cancellation
        while not stop.wait(FLUSH_EVERY):
            if cancellation is not None:
                # A signal's cancel, while the engine's thread runs an in-process step or
                # blocks in a poll: from here, where no lock of that thread is held.
                try:
                    cancellation.act_on_signal()
                except Exception as e:  # noqa: BLE001 - the loop still ends the run
                    self._emit(EventType.ENGINE, message=f"cancel failed: {type(e).__name__}: {e}")
            if not self._buffer or time.monotonic() - self._last_flush < FLUSH_EVERY:
                continue
            try:
                self._flush()
            except BaseException as e:
                self._flush_error = e
                return
