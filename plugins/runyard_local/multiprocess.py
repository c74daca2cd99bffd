"""The ``multiprocess`` executor: each step attempt in an OS process of its own, and the
``multi_or_in_process`` executor, which is ``multiprocess`` unless the run config selects
``in_process``.

How step processes start (``start_method``):

- ``forkserver`` (default): a per-run fork server (`runyard_local.mp_zygote`), started at
  `setup`, has runyard and each job loaded, from its code pointer, and forks a process per
  step: milliseconds per step. It is forked from the run worker when that has no other
  thread (ready in a millisecond, no lock can be held by a thread the fork lost), and
  exec'd as a fresh interpreter otherwise (~0.1 s; nothing of the run worker is copied).
- ``fork``: fork the run worker itself. The fastest start, and the job need not be
  importable, but the step inherits a copy of everything the run worker holds, which is
  unsafe if other threads of it hold locks at the moment of the fork.
- ``spawn``: the fork server execs a fresh interpreter per step, which imports runyard
  and the job again: for code that is not fork-safe, at the price of an interpreter start
  and the imports on every step.

With every method a step process has its own process group; stopping a step (timeout,
cancel) sends SIGTERM to the group, then SIGKILL after ``terminate_grace`` seconds, and
the group is killed when the step ends, so nothing a step starts outlives it. Its stdout
and stderr go, at the file-descriptor level, to per-attempt files, stored as the step's
STEP_STDOUT and STEP_STDERR events when it ends. A process that ends without reporting
becomes a failure naming its signal (SIGNAL, or OOM when the kernel's OOM killer struck)
or its exit code (WORKER_LOST).

This module is the handler (attempts, outcomes, captured output); starting and stopping
the processes is `runyard_local.mp_backends`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import attrs
from runyard import ConfigError
from runyard.plugin import (
    STEP_TERMINAL,
    Event,
    EventType,
    FailureInfo,
    FailureKind,
    GroupStop,
    HandlerContext,
    StepHandler,
    StepRequest,
    StepUpdate,
    resolve,
    signal_name,
)

from .in_process import InProcessStepHandler
from .mp_backends import LOAD_HINT, TAIL_CHARS, _Backend, _DirectFork, _ForkServer
from .plugin import START_METHODS, MultiOrInProcessConfig, MultiprocessConfig

_MAX_CAPTURE = 8 << 20  # bytes of each of stdout and stderr stored per attempt
# A running step's files are first read this long after its launch, then every
# _TAIL_EVERY: steps shorter than that (most, in a wide job) cost no extra reads, and a
# line a step writes reaches the engine within _TAIL_EVERY (plus its flush interval).
_FIRST_TAIL, _TAIL_EVERY = 0.15, 0.2
_TAIL_CHUNK = 1 << 20  # bytes of one stream read per tail
_LIVE = (EventType.STEP_START, EventType.STEP_LOG)  # what a step process's events file holds, live
_HOST = socket.gethostname()



class _Attempt:
    """The handle of one attempt: where its files are and what became of its process."""

    __slots__ = ("request", "id", "out", "err", "events", "noted", "exit", "failure",
                 "reported", "stopping", "pid", "group_stop", "oom0", "started",
                 "tail_at", "ev_pos", "ev_seen", "out_pos", "err_pos")

    def __init__(self, request: StepRequest, id: str, directory: str) -> None:
        self.request = request
        self.id = id
        base = os.path.join(directory, id)
        self.out, self.err, self.events = f"{base}.out", f"{base}.err", f"{base}.events"
        self.noted = False  # its process said, on the done pipe, that its events are written
        self.exit: dict[str, Any] | None = None  # {"code", "signal", "oom", "pid"} once it ended
        self.failure: FailureInfo | None = None  # ended without a process (not started, lost)
        self.reported = False
        self.stopping = False
        self.pid: int | None = None  # fork: its process, forked by the run worker
        self.group_stop: GroupStop | None = None  # fork: SIGTERM sent, SIGKILL after the grace period
        self.oom0: int | None = None
        self.started = 0.0
        # Reading the files while the step runs (`MultiprocessStepHandler._tail`): when
        # next, and how far each file has been reported.
        self.tail_at = time.monotonic() + _FIRST_TAIL
        self.ev_pos = 0  # bytes of the events file read
        self.ev_seen = 0  # events parsed from those bytes
        self.out_pos = 0  # bytes of stdout reported
        self.err_pos = 0

    @property
    def over(self) -> bool:
        return self.noted or self.exit is not None or self.failure is not None

    def spec(self, done_fd: int) -> dict[str, Any]:
        """What its step process needs (see `runyard_local.mp_child`)."""
        return {"id": self.id, "request": self.request.to_dict(), "out": self.out, "err": self.err,
                "events": self.events, "done_fd": done_fd}

    def remove_files(self) -> None:
        for path in (self.out, self.err, self.events, f"{self.events}.tmp"):
            with contextlib.suppress(OSError):
                os.unlink(path)


class MultiprocessStepHandler(StepHandler):
    """Runs every step attempt in an OS process of its own (see the module docstring)."""

    config: MultiprocessConfig

    def setup(self) -> None:
        if os.name != "posix":
            raise ConfigError("the multiprocess executor needs a POSIX system (fork, process groups)")
        method = resolve(self.config.start_method)
        if method not in START_METHODS:
            raise ConfigError(
                f"{self.context.where('start_method')}: expected one of {', '.join(START_METHODS)}, got {method!r}"
            )
        self.method = method
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._dir = tempfile.mkdtemp(prefix=f"runyard-mp-{self.context.run_id[:12]}-")
        backend: _Backend = _DirectFork(self._dir, self._lock) if method == "fork" else _ForkServer(
            self._dir, spawn=method == "spawn"
        )
        try:
            backend.open()
        except BaseException:
            # Release what this setup started at once; teardown, which the engine calls
            # after a setup that raised too, then finds nothing to close.
            backend.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._backend = backend

    def launch(self, request: StepRequest) -> _Attempt:
        att = _Attempt(request, f"a{next(self._seq)}", self._dir)
        if self.method != "fork" and request.code_pointer.module == "__main__":
            # No other process can import the engine's __main__; fail clearly, not with
            # "defines no job" from whatever __main__ the step process would have.
            att.failure = FailureInfo(
                kind=FailureKind.NOT_STARTED,
                message=f"step '{request.step_key}' was not started: job '{request.job_name}' was defined in "
                "__main__ without a file (an interactive session, python -c, a notebook), so no other process "
                f"can load it. {LOAD_HINT}",
            )
            return att
        self._backend.start(att)
        return att

    def poll(self, handle: _Attempt) -> StepUpdate:
        if handle.reported:
            return StepUpdate.finished()
        if not handle.over:
            self._backend.collect()
            if not handle.over:
                if time.monotonic() < handle.tail_at:
                    return StepUpdate.running()
                handle.tail_at = time.monotonic() + _TAIL_EVERY
                return StepUpdate.running(self._tail(handle))
        handle.reported = True
        try:
            update = self._outcome(handle)
        finally:
            handle.remove_files()
        return update

    def _tail(self, att: _Attempt) -> list[Event]:
        """What a running step reported and wrote since the last look: its new events
        (STEP_START, log records) and its new whole lines of stdout and stderr."""
        req = att.request
        found: list[Event] = []
        data = _read_from(f"{att.events}.tmp", att.ev_pos)
        cut = data.rfind(b"\n") + 1
        if cut:
            att.ev_pos += cut
            for line in data[:cut].decode("utf-8", errors="replace").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    ev = Event.from_json(line)
                    att.ev_seen += 1
                    if ev.type in _LIVE:
                        found.append(ev)
        now = time.time()
        streams = ((EventType.STEP_STDOUT, att.out, "out_pos"), (EventType.STEP_STDERR, att.err, "err_pos"))
        for type_, path, slot in streams:
            pos = getattr(att, slot)
            if pos >= _MAX_CAPTURE // 2:
                continue  # past what is stored from the start: the end comes with the ending
            # Never past the head of the output that `_read_capped` keeps of a huge one.
            data = _read_from(path, pos, min(_TAIL_CHUNK, _MAX_CAPTURE // 2 - pos))
            # Cut at a newline byte, which is never inside a UTF-8 sequence.
            cut = data.rfind(b"\n") + 1
            if cut:
                setattr(att, slot, pos + cut)
                found.append(Event(type=type_, run_id=req.run_id, step_key=req.step_key, attempt=req.attempt,
                                   attempt_id=req.attempt_id, timestamp=now,
                                   data={"text": data[:cut].decode("utf-8", errors="replace")}))
        return found

    def terminate(self, handle: _Attempt, kind: FailureKind) -> None:
        with self._lock:
            if handle.stopping or handle.over:
                return
            handle.stopping = True
        self._backend.stop(handle, float(self.config.terminate_grace))

    def wait(self, timeout: float) -> None:
        self._backend.wait(timeout)

    def teardown(self) -> None:
        # Also called after a setup that raised: release only what setup got to, so that
        # setup's own error is the one the run reports.
        backend = getattr(self, "_backend", None)
        try:
            if backend is not None:
                backend.close()
        finally:
            if getattr(self, "_dir", None):
                shutil.rmtree(self._dir, ignore_errors=True)

    # -- outcomes --------------------------------------------------------------------

    def _outcome(self, att: _Attempt) -> StepUpdate:
        req = att.request
        if att.failure is not None:
            return StepUpdate.crashed(att.failure, self._captured(att, time.time()))
        # A process that died mid-step left its events so far in the .tmp file.
        events = _read_events(att.events) or _read_events(f"{att.events}.tmp")
        if att.ev_seen:
            # Those read while it ran were reported then.
            events = [ev for i, ev in enumerate(events) if i >= att.ev_seen or ev.type not in _LIVE]
        ends = [i for i, ev in enumerate(events) if ev.type in STEP_TERMINAL or ev.type is EventType.STEP_OUTPUT]
        if ends and events[ends[-1]].type in STEP_TERMINAL:
            end = ends[-1]
            failure = events[end].failure
            if failure is not None and failure.kind is FailureKind.NOT_STARTED:
                # The step process could not load the job (spawn loads it there): say why.
                failure = attrs.evolve(failure, message=f"{failure.message}. {LOAD_HINT}")
                events[end] = attrs.evolve(events[end], message=failure.message, data={"failure": failure.to_dict()})
            # Output events go where execute_step puts its own: before the output and the ending.
            at = ends[0]
            return StepUpdate.finished([*events[:at], *self._captured(att, events[at].timestamp), *events[at:]])
        exit = att.exit or {"code": None, "signal": None}  # (noted, yet no ending: cannot happen)
        if not events and not att.ev_seen:
            # It died before execute_step could report anything, its STEP_START included:
            # say when and where it started, as the worker would have.
            events = [
                Event(
                    type=EventType.STEP_START, run_id=req.run_id, step_key=req.step_key, attempt=req.attempt,
                    attempt_id=req.attempt_id, timestamp=exit.get("started") or time.time(),
                    data={"pid": exit.get("pid"), "host": _HOST},
                )
            ]
        captured = self._captured(att, time.time())
        stderr = next((ev.data["text"] for ev in captured if ev.type is EventType.STEP_STDERR), "")
        return StepUpdate.crashed(_exit_failure(req, exit, stderr), [*events, *captured])

    def _captured(self, att: _Attempt, timestamp: float) -> list[Event]:
        req = att.request
        found = []
        streams = ((EventType.STEP_STDOUT, att.out, att.out_pos), (EventType.STEP_STDERR, att.err, att.err_pos))
        for type_, path, pos in streams:
            text = _read_capped(path, pos)
            if text:
                found.append(
                    Event(
                        type=type_, run_id=req.run_id, step_key=req.step_key, attempt=req.attempt,
                        attempt_id=req.attempt_id, timestamp=timestamp, data={"text": text},
                    )
                )
        return found


def _read_events(path: str) -> list[Event]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            events.append(Event.from_json(line))
    return events


def _read_from(path: str, pos: int, limit: int = _TAIL_CHUNK) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            return f.read(limit)
    except OSError:
        return b""


def _read_capped(path: str, pos: int = 0) -> str:
    """The file from byte ``pos`` on (what was not reported while the step ran), capped."""
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            size = os.fstat(f.fileno()).st_size - pos
            if size <= _MAX_CAPTURE - pos:
                data = f.read()
            else:
                # Keep the beginning and the end (where errors usually are) of huge output.
                half = _MAX_CAPTURE // 2
                head = f.read(max(half - pos, 0))
                f.seek(pos + size - half)
                data = head + f"\n[... runyard: {pos + size - 2 * half} bytes not stored ...]\n".encode() + f.read()
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def _exit_failure(req: StepRequest, exit: dict[str, Any], stderr: str) -> FailureInfo:
    who = f"the process of step '{req.step_key}' (pid {exit.get('pid')})"
    code, sig = exit.get("code"), exit.get("signal")
    crash = stderr.rfind("Fatal Python error")
    if crash >= 0:
        # faulthandler's report lists the innermost frame (the step's code) first.
        said = f"; its stderr output:\n{stderr[crash:crash + TAIL_CHARS].strip()}"
    else:
        tail = stderr[-TAIL_CHARS:].strip()
        said = f"; its last stderr output:\n{tail}" if tail else ""
    if sig is not None:
        name = signal_name(sig)
        if exit.get("oom"):
            return FailureInfo(
                kind=FailureKind.OOM,
                signal=sig,
                message=f"{who} was killed by {name} while the kernel's OOM killer was active: "
                f"it probably ran out of memory{said}",
            )
        return FailureInfo(kind=FailureKind.SIGNAL, signal=sig, message=f"{who} was killed by {name} ({sig}){said}")
    return FailureInfo(
        kind=FailureKind.WORKER_LOST,
        exit_code=code,
        message=f"{who} exited with code {code} without reporting success or failure{said}",
    )


class MultiOrInProcessStepHandler(StepHandler):
    """``multiprocess``, or ``in_process`` when the config's mode says so: a thin delegate.

    Both modes enforce timeouts and can terminate steps. The spec declares shared outputs
    for both (in_process works with them too, and a job debugged in_process then fails the
    same way with an output that cannot be pickled); in_process mode runs one step at a
    time: its capabilities (the spec's ``capabilities_for``) lower ``max_concurrent`` to 1.
    """

    config: MultiOrInProcessConfig

    def __init__(self, config: MultiOrInProcessConfig, context: HandlerContext) -> None:
        super().__init__(config, context)
        impl: type[StepHandler] = (
            InProcessStepHandler if config.selected_mode() == "in_process" else MultiprocessStepHandler
        )
        self.delegate = impl(config.delegate_config(), context)

    def connect_reporter(self, reporter: Any) -> None:
        super().connect_reporter(reporter)
        self.delegate.connect_reporter(reporter)

    def setup(self) -> None:
        self.delegate.setup()

    def launch(self, request: StepRequest) -> Any:
        return self.delegate.launch(request)

    def poll(self, handle: Any) -> StepUpdate:
        return self.delegate.poll(handle)

    def terminate(self, handle: Any, kind: FailureKind) -> None:
        self.delegate.terminate(handle, kind)

    def wait(self, timeout: float) -> None:
        self.delegate.wait(timeout)

    def teardown(self) -> None:
        self.delegate.teardown()
