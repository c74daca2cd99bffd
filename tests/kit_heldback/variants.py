"""Held-back broken executors: the reference with one subtle defect each.

Every class here is a mistake a plugin author could plausibly ship, with the reasoning
that would lead there in its docstring, and breaks a clause of the documented contract
(``docs/plugins.md``, issue 11); `catalog.VARIANTS` names the clause. None of them is
merely slow. They import only ``runyard.plugin`` and the standard library.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

import attrs
from runyard.plugin import Event, EventType, FailureInfo, FailureKind, StepRequest, StepUpdate

from .reference import ENDINGS, Attempt, ReferenceStepHandler, _killpg

OUTPUT_EVENTS = (EventType.STEP_LOG, EventType.STEP_STDOUT, EventType.STEP_STDERR)


# -- concurrency -----------------------------------------------------------------------------


class PoolOfTwo(ReferenceStepHandler):
    """Starts at most two worker processes at a time "so as not to overload the machine";
    further launches wait in the handler's own queue and start as slots free up. The cap is
    declared nowhere (no ``max_concurrency`` capability), so at ``max_concurrent=3`` only
    two of three launched steps run at once."""

    SLOTS = 2

    def setup(self) -> None:
        super().setup()
        self._queued: list[Attempt] = []
        self._queue_lock = threading.Lock()

    def launch(self, request: StepRequest) -> Attempt:
        att = Attempt(request)
        self._attempts.append(att)
        with self._queue_lock:
            self._queued.append(att)
        self._start_queued()
        return att

    def _start_queued(self) -> None:
        with self._queue_lock:
            busy = sum(1 for a in self._attempts if a.proc is not None and not a.reaped)
            while self._queued and busy < self.SLOTS:
                att = self._queued.pop(0)
                if att.stop_kind is None:
                    self._spawn(att)
                    busy += 1

    def poll(self, att: Attempt) -> StepUpdate:
        self._start_queued()
        if att.proc is None:
            if att.stop_kind is not None:
                return StepUpdate.crashed(FailureInfo(kind=att.stop_kind, message=f"step '{att.key}' was stopped"))
            return StepUpdate.running()
        update = super().poll(att)
        if update.done:
            self._start_queued()
        return update

    def terminate(self, att: Attempt, kind: FailureKind) -> None:
        with att.proc_lock:
            if att.proc is None and att.stop_kind is None:
                att.stop_kind = kind  # still queued: never start it
                return
        super().terminate(att, kind)


# -- stopping --------------------------------------------------------------------------------


class TerminateByStepKey(ReferenceStepHandler):
    """Addresses its workers by a name made of the run and the step ("runyard-RUN-STEP"), as a
    backend that names its jobs would, and registers a name only once: `terminate` finds the
    worker by name, so stopping a retry (attempt 2 and later) signals the first attempt's
    long-dead worker and the retry runs on."""

    def setup(self) -> None:
        super().setup()
        self._by_name: dict[str, Attempt] = {}

    def launch(self, request: StepRequest) -> Attempt:
        att = super().launch(request)
        self._by_name.setdefault(f"runyard-{request.run_id}-{request.step_key}", att)
        return att

    def terminate(self, att: Attempt, kind: FailureKind) -> None:
        super().terminate(self._by_name[f"runyard-{att.request.run_id}-{att.key}"], kind)


class TerminateBeforeSpawnLost(ReferenceStepHandler):
    """Starts the worker process from a short-lived thread so that `launch` returns at once
    even when fork+exec is slow under load. `terminate` signals the process if there is one;
    called before the thread got to start it (a cancel right after a launch), it does
    nothing and remembers nothing, so the step then starts and runs to its end."""

    def launch(self, request: StepRequest) -> Attempt:
        att = Attempt(request)
        self._attempts.append(att)
        threading.Thread(target=self._spawn, args=(att,), daemon=True).start()
        return att

    def poll(self, att: Attempt) -> StepUpdate:
        with att.proc_lock:
            if att.proc is None:
                return StepUpdate.running()
        return super().poll(att)

    def terminate(self, att: Attempt, kind: FailureKind) -> None:
        with att.proc_lock:
            if att.proc is None:
                return  # nothing to signal yet
        super().terminate(att, kind)


class PoliteGroupStop(ReferenceStepHandler):
    """Stops "politely": SIGTERM to the process group, and after the grace period SIGKILL to
    the worker (the process it started) only; once the worker has exited it sends SIGTERM to
    the group so the step's children can clean up. A child that ignores SIGTERM (a daemon, a
    tool with its own signal handling) outlives the step, stopped or not, and the run."""

    def _escalate(self, att: Attempt) -> None:
        if att.stop_sent_at is not None and not att.killed and time.monotonic() - att.stop_sent_at >= 2.0:
            att.killed = True
            assert att.proc is not None
            att.proc.kill()

    def _reap_group(self, att: Attempt) -> None:
        assert att.proc is not None
        _killpg(att.proc.pid, signal.SIGTERM)

    def teardown(self) -> None:
        for att in getattr(self, "_attempts", []):
            with att.proc_lock:
                if att.proc is not None and not att.reaped:
                    att.proc.kill()
                    att.returncode = att.proc.wait()
                    att.reaped = True
                    _killpg(att.proc.pid, signal.SIGTERM)


class TimeoutOnlyReported(ReferenceStepHandler):
    """Declares ``enforces_timeouts`` but treats ``terminate(handle, TIMEOUT)`` as bookkeeping:
    the engine has already recorded the timeout, so the handler forgets the attempt (the
    next poll says it is over) without signalling it. A cancel still stops steps. A timed-out
    step runs on while the rest of the run goes ahead, and after the run."""

    def terminate(self, att: Attempt, kind: FailureKind) -> None:
        if kind is FailureKind.TIMEOUT:
            with att.proc_lock:
                if att.stop_kind is None:
                    att.stop_kind = kind
                att.reaped = True  # over, as far as the handler is concerned
            return
        super().terminate(att, kind)

    def poll(self, att: Attempt) -> StepUpdate:
        if att.stop_kind is FailureKind.TIMEOUT and att.done is None:
            att.done = StepUpdate.crashed(FailureInfo(kind=FailureKind.TIMEOUT, message=f"step '{att.key}' timed out"))
            return att.done
        return super().poll(att)


class ForgetsFinished(ReferenceStepHandler):
    """Hands out string ids as handles and deletes an attempt's state once a poll has said it
    is over, to keep memory flat on long runs. A poll or terminate after that (a cancel
    racing the step's end; the engine's end-of-run clean-up) raises KeyError."""

    def setup(self) -> None:
        super().setup()
        self._live: dict[str, Attempt] = {}

    def launch(self, request: StepRequest) -> Any:
        att = super().launch(request)
        self._live[request.attempt_id] = att
        return request.attempt_id

    def poll(self, handle: Any) -> StepUpdate:
        update = super().poll(self._live[handle])
        if update.done:
            del self._live[handle]
        return update

    def terminate(self, handle: Any, kind: FailureKind) -> None:
        super().terminate(self._live[handle], kind)


# -- crashes ---------------------------------------------------------------------------------


class SigkillIsOom(ReferenceStepHandler):
    """Reports a worker killed by SIGKILL as OOM, "since the kernel's OOM killer sends SIGKILL".
    Anything else sending SIGKILL (a user, a supervisor, the step itself) becomes an OOM,
    which retry policies and users treat as a memory problem."""

    def _crash_failure(self, att: Attempt) -> FailureInfo:
        info = super()._crash_failure(att)
        if info.kind is FailureKind.SIGNAL and info.signal == signal.SIGKILL:
            return attrs.evolve(info, kind=FailureKind.OOM, message=f"step '{att.key}' ran out of memory")
        return info


class ShellWrapperStatus(ReferenceStepHandler):
    """Runs the worker under ``sh -c`` (to raise the open-files limit first) without ``exec``,
    and reports the status the shell returns: a worker killed by signal N comes back as exit
    status 128+N, reported as WORKER_LOST with that exit code instead of SIGNAL."""

    def _command(self, request: StepRequest) -> list[str]:
        # "; exit $?" keeps the shell from exec'ing the worker (dash does for a last command).
        return ["sh", "-c", 'ulimit -n 4096 2>/dev/null; "$@"; exit $?', "sh", *super()._command(request)]


class ExitZeroIsSuccess(ReferenceStepHandler):
    """When the worker exits with status 0 but its events end without STEP_SUCCESS or
    STEP_FAILURE (the step called ``os._exit(0)``, a C library exited the process), the
    handler trusts the exit status and adds a STEP_SUCCESS itself. The step never returned,
    wrote no output, and is recorded as a success."""

    def _outcome(self, att: Attempt, events: Sequence[Event]) -> StepUpdate:
        if not att.ended and att.returncode == 0 and att.stop_kind is None:
            r = att.request
            ok = Event(type=EventType.STEP_SUCCESS, run_id=r.run_id, step_key=r.step_key, attempt=r.attempt,
                       attempt_id=r.attempt_id, data={"duration": 0.0})
            return StepUpdate.finished([*events, ok])
        return super()._outcome(att, events)


class CrashDropsEvents(ReferenceStepHandler):
    """Passes STEP_START on at once but holds the step's other events until its ending, to
    hand the engine an attempt's output in one piece. On a crash it reports the failure
    alone (``StepUpdate.crashed(failure)``): what the step printed and logged before dying,
    often the only clue why, is lost."""

    def setup(self) -> None:
        super().setup()
        self._held: dict[int, list[Event]] = {}

    def _deliver(self, att: Attempt, events: list[Event]) -> list[Event]:
        held = self._held.setdefault(id(att), [])
        now = [ev for ev in events if ev.type is EventType.STEP_START]
        held.extend(ev for ev in events if ev.type is not EventType.STEP_START)
        if any(ev.type in ENDINGS for ev in held):
            now.extend(held)
            held.clear()
        return now

    def _outcome(self, att: Attempt, events: Sequence[Event]) -> StepUpdate:
        if att.ended:
            return StepUpdate.finished(events)
        return StepUpdate.crashed(self._crash_failure(att))


# -- events ----------------------------------------------------------------------------------


class ReplaysOutputAtEnd(ReferenceStepHandler):
    """Keeps a transcript of each attempt's logs and output and, at the ending, flushes it in
    one piece "so the step's output is together" — forgetting that those events were already
    streamed as they came. Every log record and every line the step printed is reported twice."""

    def setup(self) -> None:
        super().setup()
        self._transcript: dict[int, list[Event]] = {}

    def _deliver(self, att: Attempt, events: list[Event]) -> list[Event]:
        transcript = self._transcript.setdefault(id(att), [])
        out: list[Event] = []
        for ev in events:
            if ev.type in ENDINGS:
                out.extend(transcript)
            elif ev.type in OUTPUT_EVENTS:
                transcript.append(ev)
            out.append(ev)
        return out


class EndingFirst(ReferenceStepHandler):
    """Holds STEP_OUTPUT back until the ending ("an output only counts with a success"), then
    puts the ending first in that poll's events so the engine frees the step's slot sooner.
    Everything after the ending is dropped by the engine (the first terminal state wins), so
    the output is lost and downstream steps cannot get their inputs."""

    def setup(self) -> None:
        super().setup()
        self._outputs: dict[int, list[Event]] = {}

    def _deliver(self, att: Attempt, events: list[Event]) -> list[Event]:
        held = self._outputs.setdefault(id(att), [])
        rest = []
        for ev in events:
            (held if ev.type is EventType.STEP_OUTPUT else rest).append(ev)
        endings = [ev for ev in rest if ev.type in ENDINGS]
        if not endings:
            return rest
        others = [ev for ev in rest if ev.type not in ENDINGS]
        return [*endings, *held, *others]


class NoStepStart(ReferenceStepHandler):
    """Says ``StepUpdate.running(started=True)`` itself once the worker runs and drops the
    worker's STEP_START as redundant. The run's events never say when (or where: pid, host)
    a step started."""

    def _deliver(self, att: Attempt, events: list[Event]) -> list[Event]:
        return [ev for ev in events if ev.type is not EventType.STEP_START]

    def poll(self, att: Attempt) -> StepUpdate:
        update = super().poll(att)
        if not update.done:
            return StepUpdate.running(update.events, started=True)
        return update


class StderrIntoStdout(ReferenceStepHandler):
    """Its log viewer has a single stream per step, so STEP_STDERR events are passed on as
    STEP_STDOUT. What the step wrote to stderr is no longer told apart from its stdout."""

    def _deliver(self, att: Attempt, events: list[Event]) -> list[Event]:
        return [attrs.evolve(ev, type=EventType.STEP_STDOUT) if ev.type is EventType.STEP_STDERR else ev
                for ev in events]


class WarningsToHandlerLogger(ReferenceStepHandler):
    """Sends the step's WARNING-and-above log records to the handler's own Python logger (so
    they show on the console of whoever runs the engine) instead of passing them on as
    events. Those records, the important ones, are missing from the run's events."""

    log = logging.getLogger("heldback.executor")

    def _deliver(self, att: Attempt, events: list[Event]) -> list[Event]:
        kept = []
        for ev in events:
            if ev.type is EventType.STEP_LOG and logging.getLevelName(str(ev.data.get("level"))) >= logging.WARNING:
                self.log.log(logging.WARNING, "[%s] %s", att.key, ev.message)
                continue
            kept.append(ev)
        return kept


class DropsInfoLogs(ReferenceStepHandler):
    """Drops STEP_LOG events below WARNING "to keep the event log small". A step that sets its
    logger to INFO (or DEBUG) to be heard loses those records; the contract is one STEP_LOG
    per record at the logger's effective level."""

    def _deliver(self, att: Attempt, events: list[Event]) -> list[Event]:
        return [ev for ev in events if not (
            ev.type is EventType.STEP_LOG and logging.getLevelName(str(ev.data.get("level"))) < logging.WARNING
        )]


class LogLevelFlattened(ReferenceStepHandler):
    """Rebuilds STEP_LOG events from "plain log lines" (as a backend that collects a
    container's logs would) and so writes every record as ``{"level": "INFO"}`` with no
    ``logger``: an ERROR record is reported as INFO."""

    def _deliver(self, att: Attempt, events: list[Event]) -> list[Event]:
        return [attrs.evolve(ev, data={"level": "INFO"}) if ev.type is EventType.STEP_LOG else ev for ev in events]


class UnterminatedTailDropped(ReferenceStepHandler):
    """Stores the step's output line by line and so splits STEP_STDOUT/STEP_STDERR text at
    newlines, keeping only whole lines: a last piece without a newline (a progress bar's
    final state, ``print(x, end="")``, a prompt) is silently dropped."""

    def _deliver(self, att: Attempt, events: list[Event]) -> list[Event]:
        out = []
        for ev in events:
            if ev.type in (EventType.STEP_STDOUT, EventType.STEP_STDERR):
                text = str(ev.data.get("text", ""))
                whole = text[: text.rfind("\n") + 1]
                if whole:
                    out.append(attrs.evolve(ev, data={**ev.data, "text": whole}))
                continue
            out.append(ev)
        return out


class TracebackDropped(ReferenceStepHandler):
    """Stores failures compactly (kind, message, error class) and rebuilds the STEP_FAILURE
    events from that, dropping the traceback: the user sees "ValueError: ..." and not where."""

    def _deliver(self, att: Attempt, events: list[Event]) -> list[Event]:
        out = []
        for ev in events:
            if ev.type is EventType.STEP_FAILURE:
                failure = dict(ev.data.get("failure", {}))
                failure.pop("traceback", None)
                ev = attrs.evolve(ev, data={**ev.data, "failure": failure})
            out.append(ev)
        return out


class AttemptIdPerStep(ReferenceStepHandler):
    """Names each backend job by a stable hash of the run and the step, and stamps the events
    it passes on with that id as their ``attempt_id`` (the "job id"). Every attempt of a step
    carries the same id, so a retry's events cannot be told from the first attempt's."""

    def _deliver(self, att: Attempt, events: list[Event]) -> list[Event]:
        job_id = hashlib.sha1(f"{att.request.run_id}/{att.key}".encode()).hexdigest()[:16]
        return [attrs.evolve(ev, attempt_id=job_id) for ev in events]


class AttemptNumberStuck(ReferenceStepHandler):
    """Keeps a per-step cache of the first request it saw (to reuse its serialized form) and
    stamps events with that request's attempt number: a retry's events all say
    ``attempt=1`` (its attempt_id is right)."""

    def setup(self) -> None:
        super().setup()
        self._first: dict[str, StepRequest] = {}

    def _deliver(self, att: Attempt, events: list[Event]) -> list[Event]:
        first = self._first.setdefault(att.key, att.request)
        return [attrs.evolve(ev, attempt=first.attempt) for ev in events]


# -- reading the worker ----------------------------------------------------------------------


class ReadsAfterExit(ReferenceStepHandler):
    """Needs no reader threads: once `poll` sees that the worker has exited, it reads the
    worker's event pipe all at once. A step that writes more than the pipe holds (64 KiB of
    prints or logs) blocks in the worker forever, so the attempt never ends (a hang)."""

    def _start_readers(self, att: Attempt, proc: subprocess.Popen[bytes]) -> None:
        return

    def _reap_group(self, att: Attempt) -> None:
        super()._reap_group(att)
        proc = att.proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        # The whole group is gone now, so both pipes are at EOF after what is in them.
        self._read_events(att, proc.stdout)
        self._read_stderr(att, proc.stderr)


class WaitZeroBlocks(ReferenceStepHandler):
    """Waits with ``event.wait(timeout or None)`` ("no timeout given: wait for a change"), so
    ``wait(0)`` blocks until a step reports something, however long that takes."""

    def wait(self, timeout: float) -> None:
        self._changed.wait(timeout or None)
        self._changed.clear()
