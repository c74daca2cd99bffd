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


def _failure_event(base: dict[str, Any], info: FailureInfo) -> Event:
    return Event(type=EventType.STEP_FAILURE, message=info.message, data={"failure": info.to_dict()}, **base)


class _Emitting(list):  # type: ignore[type-arg]
    """The attempt's event list, calling ``on_event`` with each event as it is added."""

    def __init__(self, on_event: Callable[[Event], None]) -> None:
        super().__init__()
        self._on_event = on_event

    def append(self, ev: Event) -> None:
        super().append(ev)
        self._on_event(ev)


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
    events: list[Event] = _Emitting(on_event) if on_event is not None else []
    events.append(Event(type=EventType.STEP_START, data={"pid": os.getpid(), "host": _HOST}, **base))
    started = time.perf_counter()
    out, err = io.StringIO(), io.StringIO()
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
            _capture.buffers = {"out": out, "err": err}
        root.addHandler(log_handler)
        try:
            value = node.step.fn(*args, **kwargs)
        finally:
            _capture.buffers = None
            root.removeHandler(log_handler)
        ref = store.put(request.run_id, request.step_key, value)
        _append_captured(events, base, out, err)
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
        _append_captured(events, base, out, err)
        events.append(_failure_event(base, FailureInfo(kind=e.kind, message=str(e))))
    except (Exception, SystemExit) as e:  # a step calling sys.exit() failed; it must not end the worker
        _append_captured(events, base, out, err)
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


def _append_captured(events: list[Event], base: dict[str, Any], out: io.StringIO, err: io.StringIO) -> None:
    for kind, buf in ((EventType.STEP_STDOUT, out), (EventType.STEP_STDERR, err)):
        text = buf.getvalue()
        if text:
            events.append(Event(type=kind, data={"text": text}, **base))
