"""A correct executor written from ``docs/plugins.md`` alone: each step attempt is a
``runyard api execute-step --stream`` subprocess in a process group of its own.

The held-back variants (`tests.kit_heldback.variants`) subclass it and each break one
clause of the documented contract. The reference itself must pass the conformance kit,
so a kit failure on a variant is caused by its defect, not by the base it shares.

Imports only ``runyard.plugin`` (and the standard library), as a third-party plugin would.
The code is arranged around small methods (`_command`, `_spawn`, `_deliver`, `_outcome`,
`_crash_failure`, `_signal_stop`, `_escalate`, `_reap_group`) so that a variant changes
one decision and nothing else.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

from runyard.plugin import (
    SIGNING_KEY_ENV,
    STEP_WORKER_ENV,
    Event,
    EventType,
    FailureInfo,
    FailureKind,
    StepHandler,
    StepRequest,
    StepUpdate,
    grant_for_run,
    new_signing_key,
    sign_request,
)

ENDINGS = (EventType.STEP_SUCCESS, EventType.STEP_FAILURE)
GRACE = 2.0
"""Seconds between SIGTERM to the step's process group and SIGKILL. The step worker turns
SIGTERM into a clean CANCELED ending; a step that ignores it is killed after this."""
READER_JOIN = 5.0
"""Seconds to wait for the event reader once the process group is gone (it is at EOF then)."""


class Attempt:
    """One launched attempt: its worker process, what it reported, and how it was stopped."""

    def __init__(self, request: StepRequest) -> None:
        self.request = request
        self.proc: subprocess.Popen[bytes] | None = None
        self.events_lock = threading.Lock()  # the readers append, poll takes
        self.new: list[Event] = []
        self.garbled: list[str] = []  # stdout lines that were not events
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self.readers: list[threading.Thread] = []
        self.proc_lock = threading.Lock()  # terminate (any thread) against poll's reaping
        self.stop_kind: FailureKind | None = None
        self.stop_sent_at: float | None = None
        self.killed = False
        self.reaped = False
        self.returncode: int | None = None
        self.ended = False  # an ending (STEP_SUCCESS/STEP_FAILURE) was read
        self.done: StepUpdate | None = None  # the final update, once reported

    @property
    def key(self) -> str:
        return self.request.step_key


class ReferenceStepHandler(StepHandler):
    """Runs each attempt as ``python -m runyard api execute-step --stream REQUEST`` in a new
    session (so in a process group of its own), streams its event lines back, stops it with
    SIGTERM then SIGKILL to the whole group, and kills whatever the step left in its group
    once the worker has exited."""

    def setup(self) -> None:
        self._attempts: list[Attempt] = []
        self._changed = threading.Event()
        # Workers refuse unsigned requests (docs/security.md): a key for the workers this
        # handler starts itself, given to them in their environment with their allowance.
        self._key = new_signing_key()

    # -- launch ---------------------------------------------------------------------------

    def launch(self, request: StepRequest) -> Attempt:
        att = Attempt(request)
        self._attempts.append(att)
        self._spawn(att)
        return att

    def _command(self, request: StepRequest) -> list[str]:
        payload = json.dumps(sign_request(request, self._key.encode()), separators=(",", ":"))
        return [sys.executable, "-m", "runyard", "api", "execute-step", "--stream", payload]

    def _spawn(self, att: Attempt) -> None:
        proc = subprocess.Popen(
            self._command(att.request),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: a stop reaches what the step started
            env={**os.environ, SIGNING_KEY_ENV: self._key,
                 STEP_WORKER_ENV: json.dumps(grant_for_run(att.request))},
        )
        with att.proc_lock:
            att.proc = proc
        self._start_readers(att, proc)

    def _start_readers(self, att: Attempt, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        for target, stream in ((self._read_events, proc.stdout), (self._read_stderr, proc.stderr)):
            t = threading.Thread(target=target, args=(att, stream), name=f"heldback-{att.key}", daemon=True)
            t.start()
            att.readers.append(t)

    def _read_events(self, att: Attempt, stream: IO[bytes]) -> None:
        try:
            for raw in stream:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line:
                    continue
                try:
                    ev = Event.from_json(line)
                except Exception:
                    with att.events_lock:
                        att.garbled.append(line[:200])
                    continue
                with att.events_lock:
                    att.new.append(ev)
                self._changed.set()
        finally:
            stream.close()
            self._changed.set()  # EOF: the worker has exited (or closed its event stream)

    def _read_stderr(self, att: Attempt, stream: IO[bytes]) -> None:
        try:
            for raw in stream:
                att.stderr_tail.append(raw.decode("utf-8", errors="replace").rstrip())
        finally:
            stream.close()

    # -- poll -----------------------------------------------------------------------------

    def poll(self, att: Attempt) -> StepUpdate:
        if att.done is not None:
            return StepUpdate(events=(), done=True, failure=att.done.failure)
        exited = False
        with att.proc_lock:
            if att.proc is not None and not att.reaped:
                self._escalate(att)
                if self._has_exited(att.proc):
                    # The leader is a zombie until reaped, so its group id cannot be reused yet.
                    self._reap_group(att)
                    att.returncode = att.proc.wait()
                    att.reaped = True
                    exited = True
            elif att.reaped:
                exited = True
        if exited:
            # The group is gone, so the readers are at EOF: take every last event.
            for t in att.readers:
                t.join(READER_JOIN)
        events = self._take(att)
        if not exited:
            return StepUpdate.running(events)
        update = self._outcome(att, events)
        att.done = update
        return update

    @staticmethod
    def _has_exited(proc: subprocess.Popen[bytes]) -> bool:
        # WNOWAIT leaves the exit status for Popen.wait: the leader stays a zombie and keeps
        # its process group id reserved until `_reap_group` has killed the rest of the group.
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None and info.si_pid == proc.pid

    def _take(self, att: Attempt) -> list[Event]:
        with att.events_lock:
            events, att.new = att.new, []
        events = self._deliver(att, events)
        if any(ev.type in ENDINGS for ev in events):
            att.ended = True
        return events

    def _deliver(self, att: Attempt, events: list[Event]) -> list[Event]:
        """The worker's events as they go to the engine (each once, in order)."""
        return events

    def _outcome(self, att: Attempt, events: Sequence[Event]) -> StepUpdate:
        if att.ended:
            return StepUpdate.finished(events)
        return StepUpdate.crashed(self._crash_failure(att), events)

    def _crash_failure(self, att: Attempt) -> FailureInfo:
        rc = att.returncode if att.returncode is not None else -1
        tail = "; ".join(list(att.stderr_tail)[-5:] + att.garbled[-2:])
        detail = f" (worker stderr: {tail})" if tail else ""
        if att.stop_kind is not None:
            return FailureInfo(kind=att.stop_kind, message=f"step '{att.key}' was stopped ({att.stop_kind.value})")
        if rc < 0:
            name = _signal_name(-rc)
            return FailureInfo(
                kind=FailureKind.SIGNAL,
                message=f"the step worker of '{att.key}' was killed by signal {-rc} ({name}){detail}",
                signal=-rc,
            )
        return FailureInfo(
            kind=FailureKind.WORKER_LOST,
            message=f"the step worker of '{att.key}' exited with status {rc} without reporting an ending{detail}",
            exit_code=rc,
        )

    # -- stopping ---------------------------------------------------------------------------

    def terminate(self, att: Attempt, kind: FailureKind) -> None:
        with att.proc_lock:
            if att.reaped or att.proc is None:
                return  # over already: nothing to stop
            if att.stop_kind is None:
                att.stop_kind = kind
            if att.stop_sent_at is None:
                att.stop_sent_at = time.monotonic()
                self._signal_stop(att)

    def _signal_stop(self, att: Attempt) -> None:
        """First step of a stop: SIGTERM to the group (the worker ends the step cleanly)."""
        assert att.proc is not None
        _killpg(att.proc.pid, signal.SIGTERM)

    def _escalate(self, att: Attempt) -> None:
        """Called with ``proc_lock`` held on every poll: SIGKILL a stopped group past its grace."""
        if att.stop_sent_at is not None and not att.killed and time.monotonic() - att.stop_sent_at >= GRACE:
            att.killed = True
            assert att.proc is not None
            _killpg(att.proc.pid, signal.SIGKILL)

    def _reap_group(self, att: Attempt) -> None:
        """The worker has exited: nothing the step started may outlive it."""
        assert att.proc is not None
        _killpg(att.proc.pid, signal.SIGKILL)

    # -- waiting and clean-up -------------------------------------------------------------

    def wait(self, timeout: float) -> None:
        # Any event line or EOF sets the flag; the engine polls every attempt after this.
        self._changed.wait(timeout)
        self._changed.clear()

    def teardown(self) -> None:
        for att in getattr(self, "_attempts", []):
            with att.proc_lock:
                if att.proc is None or att.reaped:
                    continue
                _killpg(att.proc.pid, signal.SIGKILL)
                att.returncode = att.proc.wait()
                att.reaped = True
            for t in att.readers:
                t.join(READER_JOIN)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"
