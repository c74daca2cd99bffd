"""Deliberately broken copies of the reference handler: each breaks the contract one way,
and the conformance kit must fail every one (tests/test_kit_mutants.py).

``MUTANTS`` maps an executor name to (handler class, what is broken)."""

from __future__ import annotations

import os
import shutil
import signal
import time
from typing import Any

from runyard.plugin import EventType, FailureInfo, FailureKind, StepUpdate

from .reference import Attempt, ReferenceHandler


class NoopTerminate(ReferenceHandler):
    def terminate(self, att: Attempt, kind: FailureKind) -> None:
        pass


class IgnoresTimeout(ReferenceHandler):
    def terminate(self, att: Attempt, kind: FailureKind) -> None:
        if kind is not FailureKind.TIMEOUT:
            super().terminate(att, kind)


class IgnoresCancel(ReferenceHandler):
    def terminate(self, att: Attempt, kind: FailureKind) -> None:
        if kind is not FailureKind.CANCELED:
            super().terminate(att, kind)


class _Drops(ReferenceHandler):
    dropped: EventType

    def read_events(self, att: Attempt) -> list[Any]:
        return [e for e in super().read_events(att) if e.type is not self.dropped]


class DropsStdout(_Drops):
    dropped = EventType.STEP_STDOUT


class DropsStderr(_Drops):
    dropped = EventType.STEP_STDERR


class DropsLogRecords(_Drops):
    dropped = EventType.STEP_LOG


class OneAtATime(ReferenceHandler):
    """Claims max_concurrent but starts an attempt only when no other one runs."""

    def launch(self, request: Any) -> Attempt:
        att = Attempt(request, self._tmp / f"{request.attempt_id}.events")
        att.events.touch()
        with self._lock:
            self._attempts.append(att)
        return att

    def poll(self, att: Attempt) -> StepUpdate:
        if att.proc is None and not att.done:
            if any(a.proc is not None and a.proc.poll() is None for a in self._attempts):
                return StepUpdate.running()
            if att.stop_kind is not None:
                att.done = True
                return StepUpdate.crashed(FailureInfo(kind=att.stop_kind, message="stopped"))
            self.start(att)
        return super().poll(att)


class WrongCrashKind(ReferenceHandler):
    """Every crash is an ERROR."""

    def crash(self, att: Attempt, code: int) -> FailureInfo:
        return FailureInfo(kind=FailureKind.ERROR, message=super().crash(att, code).message)


class SigkillIsOom(ReferenceHandler):
    """Claims OOM for any SIGKILL, without asking the kernel."""

    def crash(self, att: Attempt, code: int) -> FailureInfo:
        info = super().crash(att, code)
        if code == -signal.SIGKILL:
            return FailureInfo(kind=FailureKind.OOM, signal=9, message="ran out of memory")
        return info


class LosesCrashDetails(ReferenceHandler):
    """Crashes are reported without exit code, signal or a message saying which."""

    def crash(self, att: Attempt, code: int) -> FailureInfo:
        info = super().crash(att, code)
        return FailureInfo(kind=info.kind, message="the step process ended")


class LosesErrorDetails(ReferenceHandler):
    """A step's exception reaches the events without its class and traceback."""

    def read_events(self, att: Attempt) -> list[Any]:
        events = super().read_events(att)
        for e in events:
            if e.type is EventType.STEP_FAILURE and "failure" in e.data:
                e.data["failure"] = {"kind": e.data["failure"]["kind"], "message": e.data["failure"]["message"]}
        return events


class TerminateRaisesTwice(ReferenceHandler):
    def terminate(self, att: Attempt, kind: FailureKind) -> None:
        if att.stop_kind is not None:
            raise RuntimeError("this attempt is already being stopped")
        super().terminate(att, kind)


class TerminateRaisesAfterCompletion(ReferenceHandler):
    def terminate(self, att: Attempt, kind: FailureKind) -> None:
        if att.done:
            raise ProcessLookupError(f"no process for attempt {att.request.attempt_id}")
        super().terminate(att, kind)


class PollRaisesAfterCompletion(ReferenceHandler):
    def poll(self, att: Attempt) -> StepUpdate:
        if att.done:
            raise KeyError(att.request.attempt_id)
        return super().poll(att)


class KillsOnlyTheChild(ReferenceHandler):
    """Signals the step's process, not its group: what the step started lives on."""

    def signal_step(self, att: Attempt, sig: int) -> None:
        if att.proc is not None and att.proc.poll() is None:
            os.kill(att.proc.pid, sig)


class NoSessionKillsOnlyTheChild(ReferenceHandler):
    """Starts step processes in the engine's own process group and signals just them."""

    def start(self, att: Attempt) -> None:
        import subprocess
        import sys

        from .reference import WORKER

        att.proc = subprocess.Popen([sys.executable, WORKER, str(att.events)], stdin=subprocess.PIPE,
                                    env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
        assert att.proc.stdin is not None
        att.proc.stdin.write(att.request.to_json().encode())
        att.proc.stdin.close()

    def signal_step(self, att: Attempt, sig: int) -> None:
        if att.proc is not None and att.proc.poll() is None:
            os.kill(att.proc.pid, sig)


class LeavesProcessesAfterTheStep(ReferenceHandler):
    """Does not clean up the step's process group when its process ends."""

    def after_exit(self, att: Attempt) -> None:
        pass

    def teardown(self) -> None:
        shutil.rmtree(getattr(self, "_tmp", "/nonexistent"), ignore_errors=True)


class NoSigkill(ReferenceHandler):
    """Sends SIGTERM and never escalates: a step ignoring SIGTERM runs on."""

    def signal_step(self, att: Attempt, sig: int) -> None:
        if sig != signal.SIGKILL:
            super().signal_step(att, sig)


class WaitIgnoresTimeout(ReferenceHandler):
    def wait(self, timeout: float) -> None:
        time.sleep(max(timeout, 2.0))


class TeardownAssumesSetup(ReferenceHandler):
    """Teardown breaks on a handler whose setup raised, hiding setup's error."""

    def teardown(self) -> None:
        for att in self._attempts:
            self.signal_step(att, signal.SIGKILL)
        shutil.rmtree(self._tmp, ignore_errors=True)


MUTANTS: dict[str, tuple[type[ReferenceHandler], str]] = {
    "kit_noop_terminate": (NoopTerminate, "terminate() does nothing"),
    "kit_ignores_timeout": (IgnoresTimeout, "a timeout's terminate is ignored"),
    "kit_ignores_cancel": (IgnoresCancel, "a cancel's terminate is ignored"),
    "kit_drops_stdout": (DropsStdout, "captured stdout dropped"),
    "kit_drops_stderr": (DropsStderr, "captured stderr dropped"),
    "kit_drops_logs": (DropsLogRecords, "context.log records dropped"),
    "kit_one_at_a_time": (OneAtATime, "steps run one at a time while claiming concurrency"),
    "kit_wrong_crash_kind": (WrongCrashKind, "crashes reported with the wrong failure kind"),
    "kit_sigkill_is_oom": (SigkillIsOom, "any SIGKILL reported as OOM"),
    "kit_loses_crash_details": (LosesCrashDetails, "exit code / signal of a crash lost"),
    "kit_loses_error_details": (LosesErrorDetails, "error class and traceback of a failure lost"),
    "kit_terminate_raises_twice": (TerminateRaisesTwice, "terminate() raises when called twice"),
    "kit_terminate_raises_after_completion": (TerminateRaisesAfterCompletion,
                                              "terminate() raises after the step ended"),
    "kit_poll_raises_after_completion": (PollRaisesAfterCompletion, "poll() raises after the step ended"),
    "kit_kills_only_the_child": (KillsOnlyTheChild, "kills only the direct child, leaving its children"),
    "kit_no_session_kills_only_the_child": (NoSessionKillsOnlyTheChild,
                                           "no process group of its own; kills the step's process only"),
    "kit_leaves_processes": (LeavesProcessesAfterTheStep, "step processes leaked after the run"),
    "kit_no_sigkill": (NoSigkill, "never escalates SIGTERM to SIGKILL"),
    "kit_wait_ignores_timeout": (WaitIgnoresTimeout, "wait() ignores its timeout"),
    "kit_teardown_assumes_setup": (TeardownAssumesSetup, "teardown after a failed setup hides its error"),
}
