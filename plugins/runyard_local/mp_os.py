"""Operating-system helpers of the multiprocess executor: Linux process control through
``prctl``, the children of a process, and the kernel's OOM-kill counter. (Process groups
and exit statuses: `runyard.plugin.signal_process_group`, `GroupStop`,
`reap_group_leader`, `split_wait_status`, shared with every local fork path.)

Standard library only, and cheap to import: the fork server imports it before anything
else. Everything Linux-specific degrades to a no-op elsewhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

_LINUX = os.uname().sysname == "Linux"
_libc: ctypes.CDLL | None = None


def _prctl(option: int, arg: int) -> bool:
    if not _LINUX:
        return False
    return _libc_handle().prctl(option, arg, 0, 0, 0) == 0


def _libc_handle() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        # dlopen(NULL): the running interpreter's symbols, libc's included. (find_library
        # would run `ldconfig` in a subprocess: too slow for a fork server's start.)
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def flush_c_stdio() -> None:
    """``fflush(NULL)``: C code's buffered ``printf`` output, which ``os._exit`` would drop
    (and a fork would otherwise duplicate into the child)."""
    with contextlib.suppress(Exception):
        _libc_handle().fflush(None)


def die_with_parent(sig: int, expected_parent: int) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux).

    The parent may already have died before the request took effect, in which case this
    process has been re-parented: then act as if the signal came (``os.kill`` ourselves).
    """
    _prctl(_PR_SET_PDEATHSIG, sig)
    if os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process instead of init (Linux), so
    that it can reap them and kill the ones that escaped their process group."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def read_proc_stat(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None.

    Raw os calls, not pathlib: `runyard daemon` asks this for every unfinished run every
    second, and the file is one short line."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        return None
    # After the command name, which is in parentheses and may contain spaces.
    return raw[raw.rindex(b")") + 2 :].split()


def children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc; empty elsewhere)."""
    with contextlib.suppress(OSError, ValueError):
        # Exact for a single-threaded process (its one thread is the parent of them all);
        # needs CONFIG_PROC_CHILDREN, hence the scan of /proc below otherwise.
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        fields = read_proc_stat(name)
        if fields is not None and len(fields) > 1 and fields[1] == str(pid).encode():
            found.append(int(name))
    return found


def _oom_counter_file() -> tuple[Path, str] | None:
    """Where the kernel counts OOM kills for this process's memory cgroup, or machine-wide."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2
            candidate = Path("/sys/fs/cgroup", path.lstrip("/"), "memory.events")
            if candidate.exists():
                return candidate, "oom_kill"
        elif "memory" in controllers.split(","):  # cgroup v1
            candidate = Path("/sys/fs/cgroup/memory", path.lstrip("/"), "memory.oom_control")
            if candidate.exists():
                return candidate, "oom_kill"
    if Path("/proc/vmstat").exists():
        return Path("/proc/vmstat"), "oom_kill"
    return None


_OOM_SOURCE: tuple[Path, str] | None | bool = False  # False: not looked up yet


def oom_kills() -> int | None:
    """The kernel's count of OOM kills (this cgroup's when known, else the machine's).

    A step killed by SIGKILL that we did not send, while this number went up, was almost
    certainly chosen by the OOM killer; nothing else tells a process why it got SIGKILL.
    """
    global _OOM_SOURCE
    if _OOM_SOURCE is False:
        _OOM_SOURCE = _oom_counter_file()
    if not _OOM_SOURCE:
        return None
    path, key = _OOM_SOURCE  # type: ignore[misc]
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return None
    return None
