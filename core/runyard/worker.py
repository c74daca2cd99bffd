"""The step worker: runs one step attempt wherever a handler put it, returning events."""

from __future__ import annotations

import io
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from .definitions import CodePointer, Constant, FromStep, FromSteps, JobDefinition
from .events import Event, EventType, FailureInfo, FailureKind
from .failures import error_class_name
from .outputs import open_output_store

if TYPE_CHECKING:
    from .plugin import StepRequest

_HOST = socket.gethostname()


class StepInterrupted(BaseException):
    """Raised inside a running step to stop it (a timeout or a cancel).

    A BaseException so that a step's own ``except Exception`` does not swallow it.
    """

    default_kind = FailureKind.CANCELED

    def __init__(self, kind: FailureKind | None = None, message: str | None = None) -> None:
        self.kind = kind or self.default_kind
        super().__init__(message or f"step stopped ({self.kind.value})")

    def __reduce__(self) -> tuple[type[StepInterrupted], tuple[FailureKind, str]]:
        # Pickle calls cls(*args), and args holds the message only: the kind must travel
        # too. A Celery pool process pickles an exception that escaped its task to the
        # worker's main process, which died unpickling this one ('str' has no 'value').
        return type(self), (self.kind, str(self))


class StepTimedOut(StepInterrupted):
    """Raised asynchronously (it must be constructible without arguments) on a timeout."""

    default_kind = FailureKind.TIMEOUT


# Jobs already in memory, by (code pointer, job name): the orchestrating process registers
# the job it runs, so in-process and forked workers need not import it again.
_jobs: dict[tuple[tuple[tuple[str, str], ...], str], JobDefinition] = {}


def _pointer_key(pointer: CodePointer) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(pointer.to_dict().items()))


def register_job(pointer: CodePointer, job: JobDefinition) -> None:
    _jobs[(_pointer_key(pointer), job.name)] = job


def load_job_cached(pointer: CodePointer, job_name: str, *, reload: bool = False) -> JobDefinition:
    key = (_pointer_key(pointer), job_name)
    job = None if reload else _jobs.get(key)
    if job is None:
        from .loader import load_job

        job, _ = load_job(pointer, job_name)
        _jobs[key] = job
    return job


@attrs.frozen(kw_only=True)
class StepContext:
    """Passed to a step whose first parameter is named ``context``."""

    run_id: str
    step_key: str
    attempt: int
    run_config: Mapping[str, Any]
    log: logging.Logger


class _ThreadRoutedStream(io.TextIOBase):
    """Stands in for sys.stdout/sys.stderr: writes from a thread running a step go to that
    step's buffer, everything else to the real stream. Installed once per process, so
    steps running at once on several threads never see (or steal) each other's output."""

    def __init__(self, real: Any, slot: str) -> None:
        self._real = real
        self._slot = slot

    def _target(self) -> Any:
        bufs = getattr(_capture, "buffers", None)
        return bufs[self._slot] if bufs is not None else self._real

    def write(self, s: str) -> int:
        return self._target().write(s)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return self._real.isatty()

    def fileno(self) -> int:
        return self._real.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._real, "encoding", "utf-8")


_capture = threading.local()
_install_lock = threading.Lock()


def _install_streams() -> None:
    with _install_lock:
        if not isinstance(sys.stdout, _ThreadRoutedStream):
            sys.stdout = _ThreadRoutedStream(sys.stdout, "out")
        if not isinstance(sys.stderr, _ThreadRoutedStream):
            sys.stderr = _ThreadRoutedStream(sys.stderr, "err")


# Records from `context.log` reach the capture handler whatever the root level is.
logging.getLogger("runyard.step").setLevel(logging.DEBUG)


class _EventLogHandler(logging.Handler):
    """Turns log records emitted on one step's thread into STEP_LOG events of that step."""

    def __init__(self, sink: list[Event], base: dict[str, Any]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink
        self.base = base
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string must not fail the step
            msg = str(record.msg)
        self.sink.append(
            Event(
                type=EventType.STEP_LOG,
                message=msg,
                data={"level": record.levelname, "logger": record.name},
                timestamp=record.created,
                **self.base,
            )
        )


class _LiveText:
    """A step's captured stdout or stderr that is also reported as it is written: whole
    lines as STEP_STDOUT/STEP_STDERR events through ``emit``, at most one event per
    `LIVE_EVERY` seconds (a timer sends what a burst left), the rest by `finish` at the
    step's end. Text already reported is not reported again. Made at the stream's first
    write (`_LiveStreams`); it has no lock of its own."""

    __slots__ = ("_kind", "_base", "_emit", "_parts", "_last", "_timer")

    def __init__(self, kind: EventType, base: dict[str, Any], emit: Callable[[Event], None]) -> None:
        self._kind = kind
        self._base = base
        self._emit = emit
        self._parts: list[str] = []  # written, not reported yet
        self._last = 0.0
        self._timer: threading.Timer | None = None

    def write(self, s: str) -> int:
        with _live_lock:
            self._parts.append(s)
        if "\n" in s:
            if time.monotonic() - self._last >= LIVE_EVERY:
                self._send(whole_lines=True)
            elif self._timer is None:
                self._timer = threading.Timer(LIVE_EVERY, self._send, kwargs={"whole_lines": True, "timer": True})
                self._timer.daemon = True
                self._timer.start()
        return len(s)

    def flush(self) -> None:
        pass

    def _send(self, *, whole_lines: bool, timer: bool = False) -> None:
        with _live_lock:
            if timer:
                self._timer = None
            text = "".join(self._parts)
            if whole_lines:
                cut = text.rfind("\n") + 1
                text, rest = text[:cut], text[cut:]
            else:
                rest = ""
            self._parts = [rest] if rest else []
            if not text:
                return
            self._last = time.monotonic()
            # Under the lock: two sends of one stream never overtake each other.
            self._emit(Event(type=self._kind, data={"text": text}, **self._base))

    def finish(self) -> None:
        """Report what is left (a last piece without a newline included)."""
        timer = self._timer
        if timer is not None:
            timer.cancel()
        if self._parts:
            self._send(whole_lines=False)


_live_lock = threading.RLock()  # shared by every step's live streams: held only for a moment


LIVE_EVERY = 0.1
"""Seconds between two live output events of one stream of an in-process step: a step
printing in a tight loop makes a few events a second, not one per line."""


def _failure_event(base: dict[str, Any], info: FailureInfo) -> Event:
    return Event(type=EventType.STEP_FAILURE, message=info.message, data={"failure": info.to_dict()}, **base)


class _Emitting(list):  # type: ignore[type-arg]
    """The attempt's event list, calling ``on_event`` with each event as it is added.

    Made as ``_Emitting()`` with ``_on_event`` set after, and appending through
    ``list.append``: no ``__init__`` or ``super()`` of its own, which a run of thousands of
    in-process steps pays for on every step and event (issue 14's benchmark)."""

    __slots__ = ("_on_event",)
    _on_event: Callable[[Event], None]

    def append(self, ev: Event) -> None:
        list.append(self, ev)
        self._on_event(ev)


class _LiveStreams(dict):  # type: ignore[type-arg]
    """The ``out``/``err`` capture of a step reporting live, each `_LiveText` made at its
    stream's first write: most steps print nothing, and then none is made or finished."""

    __slots__ = ("base", "emit")
    base: dict[str, Any]
    emit: Callable[[Event], None]

    def __missing__(self, slot: str) -> _LiveText:
        kind = EventType.STEP_STDOUT if slot == "out" else EventType.STEP_STDERR
        text = self[slot] = _LiveText(kind, self.base, self.emit)
        return text


def execute_step(
    request: StepRequest, *, capture_output: bool = True, on_event: Callable[[Event], None] | None = None
) -> list[Event]:
    """Run one attempt here and return its events (see `runyard.plugin.execute_step`).

    ``capture_output=False`` leaves ``sys.stdout``/``sys.stderr`` alone, for callers that
    capture the process's file descriptors themselves (a step in a process of its own):
    Python-level and C-level output then reach the same place in the order written, and
    no text is reported twice.
    """
    base = {
        "run_id": request.run_id,
        "step_key": request.step_key,
        "attempt": request.attempt,
        "attempt_id": request.attempt_id,
    }
    try:
        job = load_job_cached(request.code_pointer, request.job_name)
        node = job.nodes[request.step_key]
    except BaseException as e:
        failed = _failure_event(
                base,
                FailureInfo(
                    kind=FailureKind.NOT_STARTED,
                    message=f"could not load step '{request.step_key}' of job '{request.job_name}' "
                    f"from {request.code_pointer.describe()}: {e}",
                    error_class=error_class_name(e),
                    traceback=traceback.format_exc(),
                ),
            )
        if on_event is not None:
            on_event(failed)
        return [failed]
    events: list[Event]
    if on_event is not None:
        events = _Emitting()
        events._on_event = on_event
    else:
        events = []
    events.append(Event(type=EventType.STEP_START, data={"pid": os.getpid(), "host": _HOST}, **base))
    started = time.perf_counter()
    streams: dict[str, Any]
    if on_event is not None and capture_output:
        # Reported as it is written (the caller streams events while the step runs).
        streams = _LiveStreams()
        streams.base, streams.emit = base, events.append
    else:
        streams = {"out": io.StringIO(), "err": io.StringIO()}
    log_handler = _EventLogHandler(events, base)
    root = logging.getLogger()
    try:
        store = open_output_store(request.output_store)
        kwargs: dict[str, Any] = {}
        for param, src in node.inputs.items():
            if isinstance(src, Constant):
                kwargs[param] = src.value
            elif isinstance(src, FromStep):
                kwargs[param] = store.get(request.inputs[param])  # type: ignore[arg-type]
            elif isinstance(src, FromSteps):
                kwargs[param] = [store.get(r) for r in request.inputs[param]]
        args: tuple[Any, ...] = ()
        if node.step.takes_context:
            logger = logging.getLogger(f"runyard.step.{request.step_key}")
            args = (
                StepContext(
                    run_id=request.run_id,
                    step_key=request.step_key,
                    attempt=request.attempt,
                    run_config=request.run_config,
                    log=logger,
                ),
            )
        if capture_output:
            _install_streams()
            _capture.buffers = streams
        root.addHandler(log_handler)
        try:
            value = node.step.fn(*args, **kwargs)
        finally:
            _capture.buffers = None
            root.removeHandler(log_handler)
        ref = store.put(request.run_id, request.step_key, value)
        _append_captured(events, base, streams)
        events.append(
            Event(
                type=EventType.STEP_OUTPUT,
                data={"ref": ref, "type": type(value).__qualname__},
                **base,
            )
        )
        events.append(
            Event(type=EventType.STEP_SUCCESS, data={"duration": time.perf_counter() - started}, **base)
        )
    except StepInterrupted as e:
        _append_captured(events, base, streams)
        events.append(_failure_event(base, FailureInfo(kind=e.kind, message=str(e))))
    except (Exception, SystemExit) as e:  # a step calling sys.exit() failed; it must not end the worker
        _append_captured(events, base, streams)
        events.append(
            _failure_event(
                base,
                FailureInfo(
                    # Running out of memory is not a bug in the step: retry policies and
                    # users treat it like an OOM-killed process on any other backend.
                    kind=FailureKind.OOM if isinstance(e, MemoryError) else FailureKind.ERROR,
                    message=f"{type(e).__name__}: {e}",
                    error_class=error_class_name(e),
                    traceback=traceback.format_exc(),
                ),
            )
        )
    return events


def _append_captured(events: list[Event], base: dict[str, Any], streams: dict[str, Any]) -> None:
    if type(streams) is _LiveStreams:
        for slot in ("out", "err"):
            live = streams.get(slot)  # not [slot]: that would make one now
            if live is not None:
                live.finish()
        return
    for kind, buf in ((EventType.STEP_STDOUT, streams["out"]), (EventType.STEP_STDERR, streams["err"])):
        text = buf.getvalue()
        if text:
            events.append(Event(type=kind, data={"text": text}, **base))


# -- the command-line step worker's event stream ---------------------------------------

_ENDINGS = (EventType.STEP_OUTPUT, EventType.STEP_SUCCESS, EventType.STEP_FAILURE)


class FdEventStream:
    """Keeps the events of ``runyard api execute-step`` apart from the step's own output.

    On `open`, the process's stdout (fd 1) becomes the *event* stream, reached only
    through a private duplicate of it, and fds 1 and 2 are pointed at pipes. Whatever
    the step writes there (Python prints, C extensions, subprocesses it starts) is read
    back and reported as STEP_STDOUT/STEP_STDERR events, so a line on the event stream is
    always one whole JSON event: a step printing ``no newline`` or half a JSON object
    cannot run into the next event line. Call `execute_step` with ``capture_output=False``
    and ``on_event=stream.emit``.

    ``live``: write each event line as it is emitted; otherwise all at `close`.
    """

    def __init__(self, base: dict[str, Any], *, live: bool) -> None:
        self.base = base
        self.live = live
        self.lock = threading.Lock()
        self.ended = False
        self.started = False
        self._held: list[str] = []
        # Output written while the job loads (prints at import, warnings), kept until the
        # STEP_START goes out, so every executor reads a step's events starting with its start.
        self._early: list[str] = []
        self._pending = {EventType.STEP_STDOUT: "", EventType.STEP_STDERR: ""}
        self._decoders = {t: _utf8_decoder() for t in self._pending}
        self._fds: dict[EventType, int] = {}
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed or odd stream must not stop the step
                pass
        self.events_fd = os.dup(1)
        self.stderr_fd = os.dup(2)  # the worker's own stderr, for what comes after the ending
        for fd, kind in ((1, EventType.STEP_STDOUT), (2, EventType.STEP_STDERR)):
            read, write = os.pipe()
            os.dup2(write, fd)
            os.close(write)
            os.set_blocking(read, False)
            self._fds[kind] = read
        try:
            sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        except Exception:
            pass
        # Wakes the forwarder at `close`, so it is gone before its descriptors are closed
        # (without waiting out a select timeout on every step).
        self._wake_read, self._wake_write = os.pipe()
        self._thread = threading.Thread(target=self._forward, name="runyard-output", daemon=True)
        self._thread.start()

    def emit(self, ev: Event) -> None:
        """Write one event (``on_event`` of `execute_step`). Output the step wrote before
        its output and ending is reported first, so the events keep the order it happened in."""
        if ev.type in _ENDINGS:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            self._drain(final=True)
        with self.lock:
            if self.ended:
                return  # an ending was written already (see `end`): nothing may follow it
            if ev.type in (EventType.STEP_SUCCESS, EventType.STEP_FAILURE):
                self.ended = True
            if ev.type is EventType.STEP_START:
                self.started = True
                self._put(ev.to_json() + "\n")
                self._put_early()
                return
            self._put_early()  # an ending with no start (the job did not load): its output first
            self._put(ev.to_json() + "\n")

    def end(self, failure: FailureInfo) -> bool:
        """Write a STEP_FAILURE unless an ending was written; True if this one was."""
        self._drain(final=True)
        with self.lock:
            if self.ended:
                return False
            self.ended = True
            self._put_early()
            self._put(_failure_event(self.base, failure).to_json() + "\n")
            return True

    def close(self) -> None:
        """Stop forwarding, write held events, and point fd 1 at the worker's stderr (so a
        thread the step left behind cannot write into the event stream) and fd 2 back."""
        self._closing.set()
        os.write(self._wake_write, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        late = self._drain(final=True, report=False)
        with self.lock:
            self._put_early()
            if self._held:
                self._write("".join(self._held))
                self._held = []
        os.dup2(self.stderr_fd, 1)
        os.dup2(self.stderr_fd, 2)
        if late:
            self._write_fd(self.stderr_fd, late)
        for fd in (*self._fds.values(), self._wake_read, self._wake_write, self.events_fd):
            os.close(fd)

    # -- internals --

    def _put_early(self) -> None:  # called with the lock held
        early, self._early = self._early, []
        for line in early:
            self._put(line)

    def _put(self, line: str) -> None:  # called with the lock held
        if self.live:
            self._write(line)
        else:
            self._held.append(line)

    def _write(self, text: str) -> None:
        self._write_fd(self.events_fd, text)

    @staticmethod
    def _write_fd(fd: int, text: str) -> None:
        data = text.encode()
        while data:
            data = data[os.write(fd, data):]

    def _drain(self, *, final: bool, report: bool = True) -> str:
        """Report what the step wrote: whole lines, or everything when ``final`` or when
        nothing new came (a prompt or progress bar without a newline is not held back)."""
        leftover = ""
        for kind, fd in self._fds.items():
            chunks = []
            with self.lock:
                while True:
                    try:
                        chunk = os.read(fd, 65536)
                    except (BlockingIOError, OSError):
                        break
                    if not chunk:
                        break
                    chunks.append(chunk)
                text = self._pending[kind] + self._decoders[kind].decode(b"".join(chunks), final=final)
                cut = len(text) if final or not chunks else text.rfind("\n") + 1
                out, self._pending[kind] = text[:cut], text[cut:]
                if not out:
                    continue
                if not report or self.ended:
                    leftover += out
                    continue
                line = Event(type=kind, data={"text": out}, **self.base).to_json() + "\n"
                if self.started:
                    self._put(line)
                else:
                    self._early.append(line)
        return leftover

    def _forward(self) -> None:
        import select

        while not self._closing.is_set():
            try:
                select.select([*self._fds.values(), self._wake_read], [], [], 0.2)
            except (OSError, ValueError):
                return
            if self._closing.is_set():
                return
            late = self._drain(final=False)
            if late:  # written after the ending: kept, on the worker's stderr
                self._write_fd(self.stderr_fd, late)


def _utf8_decoder() -> Any:
    import codecs

    return codecs.getincrementaldecoder("utf-8")(errors="replace")
