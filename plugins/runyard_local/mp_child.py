"""The multiprocess executor's step process: what runs between fork (or exec) and exit.

A step process has its own process group (so that stopping it stops whatever it started),
dies with its parent (Linux), writes its stdout and stderr at the file-descriptor level to
per-attempt files (so output of C code and subprocesses is captured too), runs the
step-worker protocol, writes the attempt's events as JSON lines to a file and then writes
the attempt's id to the executor's *done pipe*, so the executor can read the events
without waiting for the process to exit.

A step process is created before its attempt is known (the fork server keeps one ready),
so it starts in two halves: `enter_step_process` right after the fork, and `run_spec`
once the attempt's *spec* arrives: ``{"id", "request" (StepRequest.to_dict()), "out",
"err", "events", "done_fd", "sys_path" (spawn only)}``.

``python -m runyard_local.mp_child FD`` is the ``spawn`` start method's step process: a
fresh interpreter (exec'd after `enter_step_process`) that reads its spec from FD.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import os
import signal
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

from runyard.plugin import StepInterrupted, StepRequest, execute_step

from . import mp_os

EXIT_INTERNAL = 70  # the step process itself failed (not the step): EX_SOFTWARE


def enter_step_process(*, parent: int, close: Iterable[int]) -> None:
    """First thing in a freshly forked step process, before any user code runs."""
    # The parent calls setpgid for the child as well, so that a stop arriving right after
    # the fork finds the group whichever of the two runs first.
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    for fd in close:
        with contextlib.suppress(OSError):
            os.close(fd)
    # Forked from a process with handlers of its own (the fork server's, or the run
    # worker's SIGTERM-cancels-the-run): none of them means anything here.
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGALRM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    mp_os.die_with_parent(signal.SIGKILL, parent)
    _redirect(0, os.devnull, os.O_RDONLY)


def _redirect(target: int, path: str, flags: int) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    os.dup2(fd, target)  # dup2 clears close-on-exec on the target: subprocesses inherit it
    os.close(fd)


def read_spec(fd: int) -> dict[str, Any]:
    """The attempt's spec, written to ``fd`` by the fork server, which then closes it."""
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return dict(json.loads(b"".join(chunks)))


def _stdio_to_fds() -> None:
    """``sys.stdout``/``sys.stderr`` write to fds 1 and 2, line-buffered like a terminal,
    so that print() and os.write()/C/subprocess output reach the files in the order they
    were written, at least line by line."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        try:
            reuse = isinstance(stream, io.TextIOWrapper) and stream.fileno() == fd
        except (OSError, ValueError):
            reuse = False
        if reuse:
            # The interpreter's own stream on that fd (the fork server's, or a spawned
            # interpreter's): adjusting it is cheaper than a new one in every step process.
            stream.reconfigure(line_buffering=True, errors="backslashreplace")
        else:  # the run worker's, with start_method fork: whatever it was (a capture...)
            raw = io.FileIO(fd, "w", closefd=False)
            setattr(sys, name, io.TextIOWrapper(
                io.BufferedWriter(raw), encoding="utf-8", errors="backslashreplace", line_buffering=True
            ))


def _on_sigterm(signum: int, frame: Any) -> None:
    # A graceful stop: the step's `finally` blocks and context managers run; the executor
    # sends SIGKILL after the grace period if the step does not end by then.
    raise StepInterrupted(message="step stopped by SIGTERM")


def run_spec(spec: dict[str, Any]) -> int:
    """Run the attempt in this process, write its events, tell the executor; the exit code.

    The exit code is 0 whenever the step ran, failed or not (the events say which).
    """
    _redirect(1, spec["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    _redirect(2, spec["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    _stdio_to_fds()
    # A crash in C code (SIGSEGV, SIGABRT, ...) leaves the Python traceback in stderr,
    # which the executor stores as the step's STEP_STDERR and quotes in the failure.
    faulthandler.enable(file=sys.stderr)
    if "sys_path" in spec:
        # Import the job the way the run worker would: with its module search path.
        sys.path[:] = spec["sys_path"]
    signal.signal(signal.SIGTERM, _on_sigterm)
    path = spec["events"]
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:

        def write(ev: Any) -> None:
            # Each event as it comes: a step whose process then dies (os._exit, a signal)
            # keeps what it logged before, which the executor reads from this file.
            f.write(ev.to_json() + "\n")
            f.flush()

        execute_step(StepRequest.from_dict(spec["request"]), capture_output=False, on_event=write)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the step is over: a stop may just end us
    _flush()
    mp_os.flush_c_stdio()
    # Renamed into place: the executor reads the whole file as the attempt's events.
    os.replace(f"{path}.tmp", path)
    # One short write to a pipe is atomic, so lines of steps ending at once never mix.
    with contextlib.suppress(OSError):  # the executor is gone; the events are all there is
        os.write(spec["done_fd"], f"{spec['id']}\n".encode())
    return 0


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def finish(code: int) -> NoReturn:
    """End a step process without running the parent's atexit handlers or finalizers
    (it shares them through fork), like multiprocessing does."""
    _flush()
    mp_os.flush_c_stdio()
    os._exit(code)


def _report_crash() -> None:
    with contextlib.suppress(BaseException):
        import traceback

        traceback.print_exc()


def child_main(spec_fd: int) -> NoReturn:
    """A forked step process, once entered: wait for its spec, run it. Never returns."""
    code = EXIT_INTERNAL
    try:
        code = run_spec(read_spec(spec_fd))
    except BaseException:
        _report_crash()
    finally:
        finish(code)


def forked_main(spec: dict[str, Any], **enter: Any) -> NoReturn:
    """A step process forked by the run worker itself (``fork``): never returns."""
    code = EXIT_INTERNAL
    try:
        enter_step_process(**enter)
        code = run_spec(spec)
    except BaseException:
        _report_crash()
    finally:
        finish(code)


if __name__ == "__main__":
    child_main(int(sys.argv[1]))
