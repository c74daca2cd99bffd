"""The multiprocess executor's fork server ("zygote"): one per run, the parent of every
step process of that run.

Started by the executor as ``python -m runyard_local.mp_zygote SOCK PARENT DONE`` in a
session of its own: SOCK is one end of a Unix socket pair to the executor, PARENT the run
worker's pid, DONE the write end of the executor's *done pipe*. It imports runyard once
and, with the ``forkserver`` start method, each job once (from its code pointer, as any
other process would), so that a step process is one ``fork()`` away. It even forks the
next step process ahead of time (the *spare*, waiting on a pipe for its attempt), so that
a step starts without waiting for a fork at all. With ``spawn`` it never imports user
code, and the spare execs a fresh interpreter, which imports the job itself.

Protocol on SOCK: JSON objects, one per line, both ways.

executor -> fork server

- ``{"op": "init", "spawn": bool, "sys_path": [...], "dir": PATH}``: first.
- ``{"op": "start", "id": ID, "request": StepRequest.to_dict(), "out": P, "err": P,
  "events": P}``: run one attempt in a step process (see `runyard_local.mp_child`).
- ``{"op": "stop", "id": ID, "grace": SECONDS}``: SIGTERM the attempt's process group,
  SIGKILL it ``grace`` seconds later if the process has not exited. Unknown ids (already
  exited) are ignored.
- ``{"op": "shutdown"}``, or end of file without it (the run worker died): SIGKILL every
  step's group and every remaining descendant, reap them, exit. Without the message, also
  remove the run's temporary directory, which nobody else will.

fork server -> executor

- ``{"op": "ready", "pid": PID}``: imports done.
- ``{"op": "exit", "id": ID, "pid": PID, "code": N|null, "signal": N|null, "oom": bool,
  "stopped": bool, "started": UNIX_TIME}``: the step process ended and was reaped (after
  its group was killed, so nothing it started outlives it). ``oom``: the kernel's OOM-kill
  count went up while it ran. ``stopped``: the executor had asked to stop it.
  ``started``: when it was given its attempt.
- ``{"op": "not_started", "id": ID, "message": STR, "error_class": STR, "traceback": STR}``:
  the job could not be loaded here (or fork failed), so no process was started.

A step process that finished its attempt writes ``ID\n`` to the done pipe right after its
events file is complete, before it exits: the executor reads the events at once, and the
``exit`` message that follows only matters when that line never came (a crash).

The fork server is single-threaded (fork is only safe from a process without other
threads), detects the death of the run worker both by end of file and by
``PR_SET_PDEATHSIG`` (SIGTERM), and is a child subreaper, so step processes' orphans are
re-parented to it and killed with the rest.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import selectors
import shutil
import signal
import socket
import sys
import time
import traceback
from typing import Any, NoReturn

from runyard.plugin import GroupStop, error_class_name, reap_group_leader, signal_process_group

from . import mp_os


class _Step:
    __slots__ = ("id", "pid", "started", "stopping", "oom0", "stopped")

    def __init__(self, id: str, pid: int, oom0: int | None) -> None:
        self.id = id
        self.pid = pid
        self.started = time.time()
        self.stopping: GroupStop | None = None  # SIGTERM sent; SIGKILL follows the grace period
        self.oom0 = oom0
        self.stopped = False


class ForkServer:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox = b""
        self.steps: dict[int, _Step] = {}  # by pid
        self.by_id: dict[str, _Step] = {}
        self.parent = 0
        self.spawn = False
        self.dir: str | None = None
        self.terminating = False
        self.orderly = False  # told to shut down, rather than finding the executor gone
        self.loaded: set[tuple[str, str]] = set()
        self.me = os.getpid()
        self.forked = False  # forked from the run worker rather than exec'd
        self.done_fd = -1  # the executor's done pipe: step processes write their ids to it
        # A step process forked ahead of time, waiting for its spec: (pid, spec pipe,
        # len(self.loaded) when it was forked).
        self.spare: tuple[int, int, int] | None = None
        self.want_spare = False

    # -- messages -------------------------------------------------------------------

    def send(self, msg: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the executor is gone: shutdown follows
            self.sock.sendall(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    def receive(self) -> list[dict[str, Any]] | None:
        """Messages that arrived; None at end of file."""
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not data:
            return None
        self.inbox += data
        *lines, self.inbox = self.inbox.split(b"\n")
        return [json.loads(line) for line in lines if line]

    def handle(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "start":
            self.start(msg)
        elif op == "stop":
            self.stop(msg["id"], float(msg.get("grace", 0)))
        elif op == "shutdown":
            self.orderly = True
            self.terminating = True
        elif op == "init":
            self.spawn = bool(msg["spawn"])
            self.dir = msg.get("dir")
            # Jobs import the way they would in the run worker: with its module search path.
            sys.path[:] = msg["sys_path"]
            # A fresh interpreter needs no job to be ready: start the first one now.
            self.want_spare = self.spawn

    # -- starting and stopping steps ---------------------------------------------------

    def load(self, id: str, request: dict[str, Any]) -> bool:
        """Import the job once, here, so that every step process forked afterwards has it."""
        from runyard.plugin import CodePointer, preload_job

        key = (json.dumps(request["code_pointer"], sort_keys=True), request["job_name"])
        if key in self.loaded:
            return True
        try:
            # Forked from the run worker, we have its jobs; look them up through the code
            # pointer all the same (its module is imported already), so that a job other
            # processes cannot load fails here as it would in a fork server that was exec'd.
            preload_job(CodePointer.from_dict(request["code_pointer"]), request["job_name"], reload=self.forked)
        except BaseException as e:
            self.not_started(id, e)
            return False
        self.loaded.add(key)
        # Objects that exist now live as long as the fork server: keep the collector away
        # from them, so that step processes do not copy the pages it would touch.
        gc.freeze()
        return True

    def not_started(self, id: str, e: BaseException) -> None:
        self.send(
            {
                "op": "not_started",
                "id": id,
                "message": f"{type(e).__name__}: {e}",
                "error_class": error_class_name(e),
                "traceback": traceback.format_exc(),
            }
        )

    def fork_step_process(self) -> tuple[int, int]:
        """Fork a step process that waits for its spec on a pipe: ``(pid, pipe)``."""
        from . import mp_child

        r, w = os.pipe()  # close-on-exec, as every fd Python creates
        for stream in (sys.stdout, sys.stderr):  # nothing of ours may end up in a step's output
            stream.flush()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(w)
                mp_child.enter_step_process(parent=self.me, close=[self.sock.fileno(), *_WAKEUP])
                if not self.spawn:
                    mp_child.child_main(r)  # never returns
                os.set_inheritable(r, True)
                os.set_inheritable(self.done_fd, True)
                os.execv(sys.executable, [sys.executable, "-m", "runyard_local.mp_child", str(r)])
            except BaseException:
                with contextlib.suppress(BaseException):
                    traceback.print_exc()
            os._exit(mp_child.EXIT_INTERNAL)
        os.close(r)
        with contextlib.suppress(OSError):  # the child may have exec'd or exited already
            os.setpgid(pid, pid)
        return pid, w

    def start(self, msg: dict[str, Any]) -> None:
        if not self.spawn and not self.load(msg["id"], msg["request"]):
            return
        spec = {k: msg[k] for k in ("id", "request", "out", "err", "events")}
        spec["done_fd"] = self.done_fd
        if self.spawn:
            spec["sys_path"] = sys.path
        data = json.dumps(spec, separators=(",", ":")).encode()
        for _ in range(2):
            spare, self.spare = self.spare, None
            if spare is not None and spare[2] != len(self.loaded):
                # Forked before a job it would need was imported here: not worth keeping.
                signal_process_group(spare[0], signal.SIGKILL)
                os.close(spare[1])
                spare = None
            try:
                pid, pipe = spare[:2] if spare is not None else self.fork_step_process()
            except OSError as e:  # out of processes or memory: this attempt fails, we go on
                self.not_started(msg["id"], e)
                return
            try:
                with os.fdopen(pipe, "wb") as f:  # closing it is the end of the spec
                    f.write(data)
            except OSError:
                signal_process_group(pid, signal.SIGKILL)  # it died waiting: use a fresh one
                continue
            step = _Step(msg["id"], pid, mp_os.oom_kills())
            self.steps[pid] = step
            self.by_id[step.id] = step
            self.want_spare = True
            return

    def make_spare(self) -> None:
        """Fork the next step process ahead of time, so that a step starting later does
        not wait for the fork (nor, with spawn, for an interpreter to start)."""
        self.want_spare = False
        if self.spare is None and not self.terminating:
            with contextlib.suppress(OSError):  # no spare then; start() forks on demand
                pid, pipe = self.fork_step_process()
                self.spare = (pid, pipe, len(self.loaded))

    def stop(self, id: str, grace: float) -> None:
        step = self.by_id.get(id)
        if step is None:
            return  # exited already (its exit message is on the way) or never started
        step.stopped = True
        if step.stopping is None:
            step.stopping = GroupStop(step.pid, grace)
        elif grace <= 0:
            signal_process_group(step.pid, signal.SIGKILL)  # a second stop that wants it gone now

    def kill_overdue(self) -> float | None:
        """SIGKILL groups past their grace period; return seconds until the next is due."""
        now = time.monotonic()
        nearest: float | None = None
        for step in self.steps.values():
            if step.stopping is not None:
                left = step.stopping.advance(now)
                nearest = left if nearest is None else min(nearest, left)
        return nearest

    # -- reaping -----------------------------------------------------------------------

    def reap(self) -> None:
        while True:
            try:
                # Look without reaping first: while the exited process is a zombie its pid,
                # and so its process group id, cannot be reused, so killing the group
                # cannot hit an unrelated process.
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            if self.spare is not None and self.spare[0] == pid:
                os.close(self.spare[1])  # the spare died waiting (killed from outside)
                self.spare = None
            step = self.steps.pop(pid, None)
            if step is None:
                # An orphan re-parented to us (we are a subreaper), or the spare: just reap it.
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                continue
            del self.by_id[step.id]
            # Whatever the step started and left behind dies with it, then it is reaped.
            code, sig = reap_group_leader(pid) or (None, None)
            oom = False
            if sig == signal.SIGKILL and not step.stopped and step.oom0 is not None:
                now = mp_os.oom_kills()
                oom = now is not None and now > step.oom0
            self.send(
                {"op": "exit", "id": step.id, "pid": pid, "code": code, "signal": sig, "oom": oom,
                 "stopped": step.stopped, "started": step.started}
            )

    def shutdown(self) -> None:
        """Kill every step's group, then every process still re-parented to us, and reap."""
        for step in list(self.steps.values()):
            signal_process_group(step.pid, signal.SIGKILL)
        if self.spare is not None:
            signal_process_group(self.spare[0], signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            self.reap_all()
            left = mp_os.children_of(self.me)
            if not left:
                break
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            # Until a SIGCHLD (through the wakeup pipe) says one more can be reaped.
            select.select([_WAKEUP[0]], [], [], 0.05)
            with contextlib.suppress(BlockingIOError):
                while os.read(_WAKEUP[0], 512):
                    pass
        self.reap_all()

    def reap_all(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.steps.pop(pid, None)

    # -- main loop -----------------------------------------------------------------------

    def serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "sock")
        sel.register(_WAKEUP[0], selectors.EVENT_READ, "wakeup")
        self.send({"op": "ready", "pid": os.getpid()})
        while not self.terminating:
            timeout = self.kill_overdue()
            for key, _ in sel.select(timeout):
                if key.data == "wakeup":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(_WAKEUP[0], 512):
                            pass
                    continue
                messages = self.receive()
                if messages is None:
                    self.terminating = True  # the executor closed its end, or died
                    break
                for msg in messages:
                    self.handle(msg)
            # A SIGCHLD may have arrived; reaping is cheap when it has not.
            self.reap()
            if self.want_spare:
                self.make_spare()
        self.shutdown()
        if not self.orderly and self.dir:
            # The run worker died (end of file, or PR_SET_PDEATHSIG, without a shutdown
            # message): nobody else will remove the run's temporary files.
            shutil.rmtree(self.dir, ignore_errors=True)


_WAKEUP: tuple[int, ...] = ()


def _serve(sock: socket.socket, parent: int, done_fd: int, *, forked: bool = False) -> NoReturn:
    global _WAKEUP
    server = ForkServer(sock)
    server.forked = forked
    server.parent = parent
    server.done_fd = done_fd

    def on_sigterm(signum: int, frame: Any) -> None:
        server.terminating = True  # the run worker died (PR_SET_PDEATHSIG) or we are told to go

    r, w = os.pipe()  # (not pipe2: macOS has none)
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    _WAKEUP = (r, w)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)  # a full pipe still wakes select
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes select via the pipe
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run worker decides what Ctrl-C means
    mp_os.become_subreaper()
    mp_os.die_with_parent(signal.SIGTERM, parent)
    # Everything a step process needs from runyard, imported once before any fork.
    from runyard.plugin import preload_step_worker

    preload_step_worker()

    from . import mp_child  # noqa: F401

    server.serve()
    # Nothing left to clean up: skip the interpreter's teardown (tens of milliseconds), which
    # the run waits for.
    os._exit(0)


def main(argv: list[str]) -> NoReturn:
    """``python -m runyard_local.mp_zygote SOCK PARENT DONE``: a fresh interpreter."""
    _serve(socket.socket(fileno=int(argv[1])), int(argv[2]), int(argv[3]))


def forked_main(sock: socket.socket, *, parent: int, done_fd: int, log: str, close: list[int]) -> NoReturn:
    """The fork server forked straight from a single-threaded run worker: no interpreter to
    start and nothing to import (runyard and the job are loaded already). Never returns."""
    try:
        os.setsid()  # as start_new_session does for the exec'd one: out of the run's signals
        for fd in close:
            with contextlib.suppress(OSError):
                os.close(fd)
        # The run worker's handlers (SIGTERM cancels the run) and wake-up fd mean nothing here.
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        for sig in (signal.SIGHUP, signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        # Our own text streams on fds 1 and 2 (the run worker's may be a capture proxy or a
        # terminal's): what the fork server prints goes to its log, and step processes
        # reuse these streams (mp_child._stdio_to_fds).
        sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        _serve(sock, parent, done_fd, forked=True)
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    os._exit(70)


if __name__ == "__main__":
    main(sys.argv)
