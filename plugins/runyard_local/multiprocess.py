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
_HOST = socket.gethostname()



class _Attempt:
    """The handle of one attempt: where its files are and what became of its process."""

    __slots__ = ("request", "id", "out", "err", "events", "noted", "exit", "failure",
                 "reported", "stopping", "pid", "group_stop", "oom0", "started")

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
                return StepUpdate.running()
        handle.reported = True
        try:
            return self._outcome(handle)
        finally:
            handle.remove_files()

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
        if not events:
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
        for type_, path in ((EventType.STEP_STDOUT, att.out), (EventType.STEP_STDERR, att.err)):
            text = _read_capped(path)
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


def _read_capped(path: str) -> str:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= _MAX_CAPTURE:
                data = f.read()
            else:
                # Keep the beginning and the end (where errors usually are) of huge output.
                half = _MAX_CAPTURE // 2
                head = f.read(half)
                f.seek(size - half)
                data = head + f"\n[... runyard: {size - 2 * half} bytes not stored ...]\n".encode() + f.read()
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
