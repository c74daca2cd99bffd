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
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import attrs
from runyard import ConfigError
from runyard.plugin import (
    Event,
    EventType,
    FailureInfo,
    FailureKind,
    HandlerContext,
    StepHandler,
    StepRequest,
    StepUpdate,
    resolve,
)

from . import mp_os
from .in_process import InProcessStepHandler
from .plugin import START_METHODS, MultiOrInProcessConfig, MultiprocessConfig

_MAX_CAPTURE = 8 << 20  # bytes of each of stdout and stderr stored per attempt
_TAIL_CHARS = 1500  # of stderr, quoted in the failure of a process that died
_HOST = socket.gethostname()
_ENDINGS = (EventType.STEP_SUCCESS, EventType.STEP_FAILURE)

_HINT = (
    "The multiprocess executor runs each step in a process of its own, which loads the job "
    "from its code pointer. Define the job at module level in a file (-f) or an importable "
    "module (-m), or run it in the run worker's process: executor in_process, or "
    "multi_or_in_process with mode: in_process."
)


class _Attempt:
    """The handle of one attempt: where its files are and what became of its process."""

    __slots__ = ("request", "id", "out", "err", "events", "noted", "exit", "failure",
                 "reported", "stopping", "pid", "kill_at", "oom0", "started")

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
        self.kill_at: float | None = None  # fork: when SIGKILL follows SIGTERM
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
                f"executor setting start_method: expected one of {', '.join(START_METHODS)}, got {method!r}"
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
                f"can load it. {_HINT}",
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
        events = _read_events(att.events)
        ends = [i for i, ev in enumerate(events) if ev.type in _ENDINGS or ev.type is EventType.STEP_OUTPUT]
        if ends and events[ends[-1]].type in _ENDINGS:
            end = ends[-1]
            failure = events[end].failure
            if failure is not None and failure.kind is FailureKind.NOT_STARTED:
                # The step process could not load the job (spawn loads it there): say why.
                failure = attrs.evolve(failure, message=f"{failure.message}. {_HINT}")
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
        said = f"; its stderr output:\n{stderr[crash:crash + _TAIL_CHARS].strip()}"
    else:
        tail = stderr[-_TAIL_CHARS:].strip()
        said = f"; its last stderr output:\n{tail}" if tail else ""
    if sig is not None:
        name = mp_os.signal_name(sig)
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


def _not_started(req: StepRequest, msg: dict[str, Any]) -> FailureInfo:
    return FailureInfo(
        kind=FailureKind.NOT_STARTED,
        message=f"step '{req.step_key}' was not started: could not load job '{req.job_name}' from "
        f"{req.code_pointer.describe()} in a step process: {msg['message']}. {_HINT}",
        error_class=msg.get("error_class"),
        traceback=msg.get("traceback"),
    )


# -- backends: who forks ---------------------------------------------------------------


class _Backend:
    """Starts and stops step processes, and learns what became of them.

    Step processes report on the *done pipe*, which this end reads: a process that wrote
    its events writes its attempt's id there before it exits, so a finished step is seen
    without waiting for its process to exit and be reaped. An attempt whose id never comes
    ended otherwise, and its exit status (or the fork server's failure) says how.
    """

    def __init__(self, directory: str) -> None:
        self.dir = directory
        # Non-blocking at both ends: a step process never waits on a full pipe (its line is
        # then lost and its exit status tells the rest), and collect() never blocks.
        self.done_r, self.done_w = os.pipe()  # close-on-exec, as every fd Python creates
        os.set_blocking(self.done_r, False)
        os.set_blocking(self.done_w, False)
        self.waiting: dict[str, _Attempt] = {}  # attempts whose outcome is not known yet
        self.poller = select.poll()
        self.poller.register(self.done_r, select.POLLIN)
        self.done_inbox = b""

    def open(self) -> None:
        """Acquire what the run needs; on failure, release it and raise."""

    def start(self, att: _Attempt) -> None:
        raise NotImplementedError

    def stop(self, att: _Attempt, grace: float) -> None:
        raise NotImplementedError

    def collect(self) -> None:
        """Record what became of attempts (on their handles); never blocks."""
        while True:
            try:
                data = os.read(self.done_r, 1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            self.done_inbox += data
        if b"\n" in self.done_inbox:
            *lines, self.done_inbox = self.done_inbox.split(b"\n")
            for line in lines:
                att = self.waiting.pop(line.decode(), None)
                if att is not None:
                    att.noted = True

    def wait(self, timeout: float) -> None:
        self.poller.poll(max(0.0, timeout) * 1000)

    def close(self) -> None:
        os.close(self.done_r)
        os.close(self.done_w)


def _single_threaded() -> bool:
    """True when this process has no other thread, Python's or native (Linux: /proc)."""
    if threading.active_count() != 1:
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False  # cannot tell: do not fork


class _Forked:
    """What the fork server needs of a `subprocess.Popen`, for a child forked directly."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -signal.SIGKILL  # reaped elsewhere: we cannot know how it ended
                return self.returncode
            if pid:
                code, sig = mp_os.split_status(status)
                self.returncode = -sig if sig is not None else code
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"fork server {self.pid}", timeout or 0)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class _ForkServer(_Backend):
    """Steps forked (or spawned) by the run's fork server; see `runyard_local.mp_zygote`."""

    def __init__(self, directory: str, *, spawn: bool) -> None:
        super().__init__(directory)
        self.spawn = spawn
        self.proc: subprocess.Popen[bytes] | _Forked | None = None
        self.sock: socket.socket | None = None
        self.inbox = b""
        self.ready = False
        self.send_lock = threading.Lock()  # terminate() sends from a cancelling thread
        self.log = os.path.join(directory, "forkserver.log")

    def open(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if not self.spawn and _single_threaded():
                self.proc = self._fork(ours, theirs)
            else:
                self.proc = self._exec(theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.inbox = b""
        self.ready = False
        self.poller.register(ours, select.POLLIN)
        self._send({"op": "init", "spawn": self.spawn, "sys_path": list(sys.path), "dir": self.dir})

    def _exec(self, theirs: socket.socket) -> subprocess.Popen[bytes]:
        """A fresh interpreter, which imports runyard and then the job: ~0.1 s."""
        with open(self.log, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "runyard_local.mp_zygote", str(theirs.fileno()), str(os.getpid()),
                 str(self.done_w)],
                pass_fds=[theirs.fileno(), self.done_w],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Its own session: a Ctrl-C or a kill of the run worker's process group
                # does not reach it, so it can outlive the run worker long enough to
                # kill every step (it learns of the death by end of file and PDEATHSIG).
                start_new_session=True,
            )

    def _fork(self, ours: socket.socket, theirs: socket.socket) -> _Forked:
        """The run worker itself, forked while it has no other thread (so no lock can be
        held by a thread that the child would not have): a fork server that has runyard
        and the job loaded already, in a millisecond rather than ~0.1 s."""
        from . import mp_child, mp_zygote  # noqa: F401  (imported before the fork, once)

        parent = os.getpid()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        mp_os.flush_c_stdio()
        pid = os.fork()
        if pid == 0:
            mp_zygote.forked_main(theirs, parent=parent, done_fd=self.done_w, log=self.log,
                                  close=[ours.fileno(), self.done_r])
        return _Forked(pid)

    def _send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        with self.send_lock:
            if self.sock is None:
                return
            with contextlib.suppress(OSError):  # it died: collect() reports the attempts lost
                self.sock.sendall(data)

    def start(self, att: _Attempt) -> None:
        if self.sock is None:  # the fork server died earlier in this run: start another
            self.open()
        self.waiting[att.id] = att
        self._send({"op": "start", **att.spec(self.done_w)})

    def collect(self) -> None:
        super().collect()
        sock = self.sock
        if sock is None:
            return
        while True:
            try:
                data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                # Lines its step processes wrote before it died are worth having first.
                super().collect()
                self._lost()
                return
            self.inbox += data
            *lines, self.inbox = self.inbox.split(b"\n")
            for line in lines:
                if line:
                    self._dispatch(json.loads(line))

    def _dispatch(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "ready":
            self.ready = True
            return
        att = self.waiting.pop(msg.get("id", ""), None)
        if att is None:
            return  # it wrote its id to the done pipe: its exit is no news
        if op == "exit":
            att.exit = msg
        elif op == "not_started":
            att.failure = _not_started(att.request, msg)

    def _lost(self) -> None:
        """The fork server is gone (it never should be before close): fail what it ran."""
        assert self.sock is not None and self.proc is not None
        with self.send_lock:
            self.poller.unregister(self.sock)
            self.sock.close()
            self.sock = None
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        how = f"was killed by {mp_os.signal_name(-code)}" if code < 0 else f"exited with code {code}"
        try:
            log = Path(self.log).read_text(errors="replace").strip()[-_TAIL_CHARS:]
        except OSError:
            log = ""
        said = f"; its output:\n{log}" if log else ""
        for att in self.waiting.values():
            if self.ready:
                att.failure = FailureInfo(
                    kind=FailureKind.WORKER_LOST,
                    message=f"the fork server running step '{att.request.step_key}' {how}{said}",
                )
            else:
                att.failure = FailureInfo(
                    kind=FailureKind.NOT_STARTED,
                    message=f"step '{att.request.step_key}' was not started: the fork server {how} "
                    f"before it was ready{said}",
                )
        self.waiting.clear()

    def stop(self, att: _Attempt, grace: float) -> None:
        self._send({"op": "stop", "id": att.id, "grace": grace})

    def close(self) -> None:
        self._send({"op": "shutdown"})
        try:
            with self.send_lock:
                if self.sock is not None:
                    self.poller.unregister(self.sock)
                    self.sock.close()  # end of file: the fork server kills what is left and exits
                    self.sock = None
            if self.proc is not None:
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            super().close()


class _DirectFork(_Backend):
    """Steps forked from the run worker itself (``start_method: fork``)."""

    def __init__(self, directory: str, lock: threading.Lock) -> None:
        super().__init__(directory)
        self.lock = lock  # shared with terminate(), which may run on another thread
        self.children: dict[int, _Attempt] = {}  # forked and not reaped yet
        self.pidfds: dict[int, int] = {}

    def start(self, att: _Attempt) -> None:
        from . import mp_child

        parent = os.getpid()
        spec = att.spec(self.done_w)
        oom0 = mp_os.oom_kills()
        mp_os.flush_c_stdio()  # or the child would print the run worker's pending C output again
        with self.lock:
            pid = os.fork()
            if pid == 0:
                mp_child.forked_main(spec, parent=parent, close=[self.done_r, *self.pidfds.values()])
            with contextlib.suppress(OSError):
                os.setpgid(pid, pid)
            att.pid = pid
            att.oom0 = oom0
            att.started = time.time()
            self.children[pid] = att
            self.waiting[att.id] = att
            if hasattr(os, "pidfd_open"):
                # Readable when the child exits: wait() wakes for a crash at once (Linux 5.3+).
                with contextlib.suppress(OSError):
                    fd = os.pidfd_open(pid)
                    self.pidfds[pid] = fd
                    self.poller.register(fd, select.POLLIN)

    def collect(self) -> None:
        with self.lock:
            super().collect()
            now = time.monotonic()
            for pid, att in list(self.children.items()):
                # Peek without reaping: until reaped, the pid (= the group id) is not reused,
                # so killing the group after the exit cannot hit an unrelated process.
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                if info is None:
                    if att.kill_at is not None and now >= att.kill_at:
                        mp_os.killpg(pid, signal.SIGKILL)
                        att.kill_at = now + 1.0
                    continue
                mp_os.killpg(pid, signal.SIGKILL)  # what the step started dies with it
                _, status = os.waitpid(pid, 0)
                self._forget(pid)
                if self.waiting.pop(att.id, None) is None:
                    continue  # it reported through the done pipe
                code, sig = mp_os.split_status(status)
                oom = False
                if sig == signal.SIGKILL and not att.stopping and att.oom0 is not None:
                    count = mp_os.oom_kills()
                    oom = count is not None and count > att.oom0
                att.exit = {"pid": pid, "code": code, "signal": sig, "oom": oom, "started": att.started}

    def _forget(self, pid: int) -> None:
        del self.children[pid]
        fd = self.pidfds.pop(pid, None)
        if fd is not None:
            self.poller.unregister(fd)
            os.close(fd)

    def stop(self, att: _Attempt, grace: float) -> None:
        with self.lock:
            if att.pid not in self.children:
                return
            if grace <= 0:
                mp_os.killpg(att.pid, signal.SIGKILL)
            else:
                mp_os.killpg(att.pid, signal.SIGTERM)
                att.kill_at = time.monotonic() + grace

    def close(self) -> None:
        with self.lock:
            for pid in list(self.children):
                mp_os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                self._forget(pid)
        super().close()


class MultiOrInProcessStepHandler(StepHandler):
    """``multiprocess``, or ``in_process`` when the config's mode says so: a thin delegate.

    Both modes enforce timeouts and can terminate steps. The spec declares shared outputs
    for both (in_process works with them too, and a job debugged in_process then fails the
    same way with an output that cannot be pickled); in_process mode runs one step at a
    time because its config pins ``max_concurrent`` to 1.
    """

    config: MultiOrInProcessConfig

    def __init__(self, config: MultiOrInProcessConfig, context: HandlerContext) -> None:
        super().__init__(config, context)
        impl: type[StepHandler] = InProcessStepHandler if config.mode == "in_process" else MultiprocessStepHandler
        self.delegate = impl(config, context)

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
