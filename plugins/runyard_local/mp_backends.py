"""The multiprocess executor's backends: who forks its step processes, how they are
stopped, and how their ends are learnt. `_ForkServer` talks to the per-run fork server
(`runyard_local.mp_zygote`); `_DirectFork` forks the run worker itself (``start_method:
fork``). The handler (`runyard_local.multiprocess`) turns what they record on an attempt
into events and failures.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runyard.plugin import (
    FailureInfo,
    FailureKind,
    ForkedWorker,
    GroupStop,
    StepRequest,
    describe_exit,
    reap_group_leader,
    signal_process_group,
    single_threaded,
    stop_process_group,
)

from . import mp_os

if TYPE_CHECKING:
    from .multiprocess import _Attempt

TAIL_CHARS = 1500  # of stderr, quoted in the failure of a process that died
LOAD_HINT = (
    "The multiprocess executor runs each step in a process of its own, which loads the job "
    "from its code pointer. Define the job at module level in a file (-f) or an importable "
    "module (-m), or run it in the run worker's process: executor in_process, or "
    "multi_or_in_process with mode: in_process."
)


def _not_started(req: StepRequest, msg: dict[str, Any]) -> FailureInfo:
    return FailureInfo(
        kind=FailureKind.NOT_STARTED,
        message=f"step '{req.step_key}' was not started: could not load job '{req.job_name}' from "
        f"{req.code_pointer.describe()} in a step process: {msg['message']}. {LOAD_HINT}",
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


class _Forked(ForkedWorker):
    """What the fork server needs of a `subprocess.Popen`, for a child forked directly."""

    def __init__(self, pid: int) -> None:
        super().__init__(pid, what="fork server")


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
            if not self.spawn and single_threaded():
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
        how = describe_exit(code)
        try:
            log = Path(self.log).read_text(errors="replace").strip()[-TAIL_CHARS:]
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
                # What the step started dies with it: its group is killed, then it is reaped.
                ended = reap_group_leader(pid)
                if ended is None:
                    if att.group_stop is not None:
                        att.group_stop.advance(now)
                    continue
                self._forget(pid)
                if self.waiting.pop(att.id, None) is None:
                    continue  # it reported through the done pipe
                code, sig = ended
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
            if att.group_stop is None:
                att.group_stop = GroupStop(att.pid, grace)
            elif grace <= 0:
                signal_process_group(att.pid, signal.SIGKILL)

    def close(self) -> None:
        with self.lock:
            for pid in list(self.children):
                stop_process_group(pid, 0, leader=pid)
                self._forget(pid)
        super().close()
