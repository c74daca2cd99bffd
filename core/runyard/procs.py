"""Process groups, exit statuses and step threads: what every local fork path shares.

Standard library only and cheap to import (fork servers import it before anything else).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

_GONE = (ProcessLookupError, PermissionError)


def signal_name(sig: int) -> str:
    """``SIGKILL`` for 9; ``signal 77`` for a number that names no signal."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def describe_exit(code: int | None = None, *, sig: int | None = None) -> str:
    """How a process ended, for failure messages: ``exited with code 3`` or ``was killed by
    SIGKILL (9)``. A negative ``code`` is `subprocess`'s way of saying killed by ``-code``."""
    if sig is None and code is not None and code < 0:
        sig = -code
    if sig is not None:
        return f"was killed by {signal_name(sig)} ({sig})"
    if code is None:
        return "ended with an unknown status"
    return f"exited with code {code}"


def split_wait_status(status: int) -> tuple[int | None, int | None]:
    """A raw `os.waitpid` status as ``(exit_code, signal)``; one of the two is None."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return None, None


def signal_process_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False when the group is gone already."""
    try:
        os.killpg(pgid, sig)
    except _GONE:
        return False
    return True


class GroupStop:
    """Stopping one process group without blocking (for event loops such as a fork server):
    SIGTERM now, SIGKILL once ``grace`` seconds have passed and then every second until the
    owner reaps the group's leader. ``grace <= 0`` kills at once."""

    __slots__ = ("pgid", "kill_at")

    def __init__(self, pgid: int, grace: float) -> None:
        self.pgid = pgid
        if grace <= 0:
            signal_process_group(pgid, signal.SIGKILL)
            self.kill_at = time.monotonic() + 1.0
        else:
            signal_process_group(pgid, signal.SIGTERM)
            self.kill_at = time.monotonic() + grace

    def advance(self, now: float | None = None) -> float:
        """SIGKILL the group if its time has come; return seconds until the next call is due."""
        now = time.monotonic() if now is None else now
        if now >= self.kill_at:
            signal_process_group(self.pgid, signal.SIGKILL)
            self.kill_at = now + 1.0  # again later, should the group still be there
        return self.kill_at - now


def reap_group_leader(pid: int) -> tuple[int | None, int | None] | None:
    """If our child ``pid`` (a process group's leader) has exited: SIGKILL its group, so
    nothing it started outlives it, reap it and return ``(exit_code, signal)``; else None.

    The group is killed before the leader is reaped: until then its pid, which is the
    group's id, cannot be reused, so the kill cannot hit an unrelated process.
    """
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None, None  # reaped by someone else: how it ended is unknown
    if info is None:
        return None
    signal_process_group(pid, signal.SIGKILL)
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None, None
    return split_wait_status(status)


def stop_process_group(
    pgid: int,
    grace: float,
    *,
    leader: subprocess.Popen[bytes] | subprocess.Popen[str] | int | None = None,
    timeout: float = 5.0,
) -> int | None:
    """Stop process group ``pgid`` and wait for it (blocking): SIGTERM, then SIGKILL after
    ``grace`` seconds (at once when ``grace <= 0``, or as soon as the leader has exited),
    then wait up to ``timeout`` seconds for every process of the group to be gone.

    ``leader``: the group's leader, when this process is its parent (a `subprocess.Popen`
    or a pid): it is reaped here and its return code (`subprocess` style: negative for a
    signal) returned; without one, returns None. Safe to call again, or on a group that
    is gone already.
    """
    if grace > 0 and signal_process_group(pgid, signal.SIGTERM):
        _wait_until(lambda: _leader_exited(leader) if leader is not None else not has_live_members(pgid), grace)
    signal_process_group(pgid, signal.SIGKILL)  # the rest of the group dies with its leader
    if leader is not None:
        _wait_until(lambda: _leader_exited(leader), timeout)
    code = _returncode(leader)
    _wait_until(lambda: not has_live_members(pgid), timeout)
    return code


def has_live_members(pgid: int) -> bool:
    """Whether process group ``pgid`` has a process that is not a zombie (Linux /proc; where
    there is none, whether the group exists at all)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return signal_process_group(pgid, 0)
    wanted = str(pgid)
    for name in entries:
        if not name.isdigit():
            continue
        try:
            stat = open(f"/proc/{name}/stat").read()  # noqa: SIM115 - tiny, closed by refcount
        except OSError:
            continue
        # Fields after the command name (in parentheses, may hold spaces): state, ppid, pgrp.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == wanted and fields[0] not in ("Z", "X"):
            return True
    return False


def _wait_until(done: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    delay = 0.002
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def _leader_exited(leader: subprocess.Popen[bytes] | subprocess.Popen[str] | int) -> bool:
    if isinstance(leader, int):
        try:
            return os.waitid(os.P_PID, leader, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
    return leader.poll() is not None


def _returncode(leader: subprocess.Popen[bytes] | subprocess.Popen[str] | int | None) -> int | None:
    if leader is None:
        return None
    if isinstance(leader, int):
        with contextlib.suppress(ChildProcessError):
            pid, status = os.waitpid(leader, os.WNOHANG)
            if pid:
                code, sig = split_wait_status(status)
                return -sig if sig is not None else code
        return None
    return leader.poll()


def interrupt_thread(thread_id: int, error: type[BaseException]) -> bool:
    """Raise ``error`` in the Python thread ``thread_id`` at its next bytecode instruction
    (a step's timeout or cancel, for steps running in threads). Cannot interrupt a blocking
    C call (``time.sleep``, a socket read): it lands when the call returns. False when no
    such thread exists."""
    import ctypes

    return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(error)) == 1

def kill_processes(pids: Iterable[int]) -> list[int]:
    """SIGKILL ``pids`` and reap, within 2 s, those that are this process's children; return
    the pids that were still there to kill. For processes a step left behind outside any
    process group of the step's own (found by pid, not by group)."""
    killed = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 2
    pending = list(killed)
    while pending and time.monotonic() < deadline:
        # Only these pids: waiting on any child would steal exit statuses others wait for.
        for pid in list(pending):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            except ChildProcessError:
                pass  # not our child: its parent (or init) reaps it
            pending.remove(pid)
        if pending:
            time.sleep(0.01)
    return killed
