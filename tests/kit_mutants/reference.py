"""A correct subprocess step handler: one process (and process group) per attempt.

The reference the mutants in `mutants` break one way each. The kit must pass it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from runyard.plugin import (
    Event,
    EventType,
    FailureInfo,
    FailureKind,
    StepHandler,
    StepRequest,
    StepUpdate,
)

WORKER = str(Path(__file__).with_name("worker.py"))
GRACE = 1.0  # seconds between SIGTERM and SIGKILL


class Attempt:
    def __init__(self, request: StepRequest, events: Path) -> None:
        self.request = request
        self.events = events
        self.offset = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.stop_kind: FailureKind | None = None
        self.stop_at: float | None = None
        self.reported = False  # the worker reported STEP_SUCCESS or STEP_FAILURE
        self.done = False


class ReferenceHandler(StepHandler):
    def setup(self) -> None:
        self._lock = threading.Lock()
        self._attempts: list[Attempt] = []
        self._tmp = Path(tempfile.mkdtemp(prefix="kitref-"))

    # -- processes ---------------------------------------------------------------------------

    def start(self, att: Attempt) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        att.proc = subprocess.Popen(
            [sys.executable, WORKER, str(att.events)], stdin=subprocess.PIPE, env=env,
            start_new_session=True, close_fds=True,
        )
        assert att.proc.stdin is not None
        att.proc.stdin.write(att.request.to_json().encode())
        att.proc.stdin.close()

    def signal_step(self, att: Attempt, sig: int) -> None:
        if att.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(att.proc.pid, sig)

    def read_events(self, att: Attempt) -> list[Event]:
        with att.events.open("rb") as f:
            f.seek(att.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        att.offset += end
        events = [Event.from_json(line) for line in data[:end].decode().splitlines() if line]
        if any(e.type in (EventType.STEP_SUCCESS, EventType.STEP_FAILURE) for e in events):
            att.reported = True
        return events

    def crash(self, att: Attempt, code: int) -> FailureInfo:
        key = att.request.step_key
        if code < 0:
            sig = -code
            return FailureInfo(kind=FailureKind.SIGNAL, signal=sig,
                               message=f"step '{key}': its process was killed by {signal.Signals(sig).name} ({sig})")
        return FailureInfo(kind=FailureKind.WORKER_LOST, exit_code=code,
                           message=f"step '{key}': its process exited with code {code} without reporting an ending")

    def after_exit(self, att: Attempt) -> None:
        self.signal_step(att, signal.SIGKILL)  # what the step started dies with it

    # -- the contract ------------------------------------------------------------------------

    def launch(self, request: StepRequest) -> Attempt:
        att = Attempt(request, self._tmp / f"{request.attempt_id}.events")
        att.events.touch()
        with self._lock:
            self._attempts.append(att)
        self.start(att)
        return att

    def poll(self, att: Attempt) -> StepUpdate:
        if att.done:
            return StepUpdate.finished()
        if att.proc is None:
            return StepUpdate.running()
        code = att.proc.poll()
        events = self.read_events(att)
        if code is None:
            if att.stop_at is not None and time.monotonic() - att.stop_at > GRACE:
                self.signal_step(att, signal.SIGKILL)
            return StepUpdate.running(events)
        events += self.read_events(att)
        self.after_exit(att)
        att.done = True
        if att.stop_kind is not None:
            return StepUpdate.crashed(FailureInfo(kind=att.stop_kind, message="stopped"), events)
        if att.reported:
            return StepUpdate.finished(events)
        return StepUpdate.crashed(self.crash(att, code), events)

    def terminate(self, att: Attempt, kind: FailureKind) -> None:
        with self._lock:
            if att.done or att.stop_kind is not None:
                return
            att.stop_kind, att.stop_at = kind, time.monotonic()
        self.signal_step(att, signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        time.sleep(min(timeout, 0.05))

    def teardown(self) -> None:
        for att in getattr(self, "_attempts", []):
            self.signal_step(att, signal.SIGKILL)
            if att.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    att.proc.wait(5)
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
