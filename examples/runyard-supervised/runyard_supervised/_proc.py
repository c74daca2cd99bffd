"""Small helpers about local processes (Linux: they read /proc)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, None if it is gone (or a zombie).

    A pid alone is not an identity: the kernel reuses them. A pid with its start time is.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]


def alive(pid: int | None, started: str | None) -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs."""
    if pid is None:
        return False
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def kill_group(pgid: int, sig: int, started: str | None) -> None:
    """Signal the process group ``pgid`` unless its number now belongs to someone else.

    While any process of the group lives, Linux does not reuse its number as a pid; so if
    a live process with that pid started at another time than the leader did, the group
    is gone and the number is another program's.
    """
    now = start_time(pgid)
    if now is not None and started is not None and now != started:
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def describe_exit(code: int) -> str:
    """``Popen.returncode`` in words: negative codes are signals."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
