"""The process running ``runyard job execute`` as its run's worker.

A run executed in the CLI's own process has no launcher, yet it needs what a launched run
gets from one: whoever looks at it must notice when that process died (killed, or a step
that ended the process with ``os._exit`` or a crash), and ``runyard run cancel`` from
another shell must stop it. The CLI records itself in the run's RUN_LAUNCHED event under
the launcher name `LAUNCHER`; `runyard.runs` then checks and stops it through
`ExecutingProcess`, like any launched worker. Linux only for the process-tree parts
(``/proc``); elsewhere the worker is still checked and signaled by pid.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .plugin import RunLauncher, WorkerHealth, kill_processes
from .storage import RunRecord

LAUNCHER = "job_execute"
# Set in the CLI's environment once its run is recorded, so every process a step starts
# carries it: if the CLI itself dies (a step's os._exit or crash), its steps' orphans can
# still be found by the run id, and killed by whoever notices.
RUN_MARKER = "RUNYARD_EXECUTING_RUN"
_PR_SET_CHILD_SUBREAPER = 36


def _stat(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, to tell a reused pid apart; None
    if it is gone or a zombie."""
    fields = _stat(pid)
    return fields[19] if fields is not None and fields[0] != "Z" else None


def this_process() -> dict[str, Any]:
    """What the run's RUN_LAUNCHED event records about this process."""
    pid = os.getpid()
    return {"pid": pid, "start_time": start_time(pid), "host": os.uname().nodename, "command": "runyard job execute"}


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (children first), zombies included."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            out.append(child)
            stack.append(child)
    return out


def marked(run_id: str) -> list[int]:
    """Processes of this user whose environment says they belong to run ``run_id``."""
    needle = f"{RUN_MARKER}={run_id}".encode()
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry))
    return found


def become_subreaper() -> bool:
    """Make this process adopt its descendants' orphans (a step's daemonized grandchild),
    so they can be found and stopped at the end of the run. False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False




def run_worker(run_id: str) -> int:
    """The run worker's body (``runyard api execute-run RUN_ID``, or a worker forked by a
    launcher): execute the stored run here with the instance at ``$RUNYARD_HOME``; return
    the exit status, 0 if the run succeeded and 1 otherwise. Orphans of the steps'
    processes are adopted, and none outlives the run."""
    from .instance import Instance
    from .runs import execute_run

    become_subreaper()
    try:
        result = execute_run(Instance.from_env(), run_id)
    finally:
        kill_descendants()
    return 0 if result.status.value == "SUCCESS" else 1


def kill_descendants() -> list[int]:
    """Kill every process this one started (and what they started) that still runs."""
    try:
        return kill_processes(descendants(os.getpid()))
    except OSError:  # no /proc
        return []


class ExecutingProcess(RunLauncher):
    """Checks and stops a ``runyard job execute`` process; it launches nothing."""

    def launch(self, run: RunRecord) -> dict[str, Any]:
        raise RuntimeError(
            f"'{LAUNCHER}' only stands for a `runyard job execute` process; it cannot launch runs"
        )

    @staticmethod
    def _alive(worker: Mapping[str, Any]) -> bool:
        started = start_time(int(worker["pid"]))
        return started is not None and worker.get("start_time") in (None, started)

    def check_health(self, run: RunRecord, worker: Mapping[str, Any]) -> WorkerHealth:
        if worker.get("host") not in (None, os.uname().nodename):
            return WorkerHealth(status="unknown", message=f"the run executes on host {worker['host']}")
        if self._alive(worker):
            return WorkerHealth(status="running")
        # What the dead CLI's steps started must not run on unnoticed: stop it now.
        try:
            left = kill_processes(marked(run.run_id))
        except OSError:  # no /proc
            left = []
        killed = f"; {len(left)} process(es) its steps left running were killed" if left else ""
        return WorkerHealth(
            status="dead",
            message=f"the `runyard job execute` process (pid {worker['pid']}) is gone: it was killed, "
            f"or a step ended the process (os._exit, a crash) with the in_process executor{killed}",
        )

    def terminate(self, run: RunRecord, worker: Mapping[str, Any], *, force: bool = False) -> None:
        if worker.get("host") not in (None, os.uname().nodename):
            raise RuntimeError(f"run {run.run_id} executes on host {worker['host']}; cancel it from there")
        if not self._alive(worker):
            return
        pid = int(worker["pid"])
        if not force:
            # The CLI cancels its run on SIGTERM: steps stopped, the rest skipped, CANCELED.
            os.kill(pid, signal.SIGTERM)
            return
        # Freeze it first, so that it starts nothing new while its tree is collected.
        try:
            os.kill(pid, signal.SIGSTOP)
            tree = descendants(pid)
        except (ProcessLookupError, OSError):
            tree = []
        kill_processes([pid, *tree])
        kill_processes(marked(run.run_id))  # orphans that escaped the tree
        deadline = time.monotonic() + 5
        while self._alive(worker) and time.monotonic() < deadline:
            time.sleep(0.02)
