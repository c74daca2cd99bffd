"""The default run launcher: one OS process per run on this machine.

The worker runs in a new session (its own process group), so terminating the run
reaches every process the run started: steps' subprocesses included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runyard.plugin import (
    RunLauncher,
    RunRecord,
    WorkerHealth,
    make_private_dirs,
    open_private,
    signal_process_group,
    stop_process_group,
)

# Workers this process started: waiting on them is the only way to learn their exit
# status, and it keeps finished children from lingering as zombies.
_children: dict[int, subprocess.Popen[bytes]] = {}


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19] if fields[0] != "Z" else None  # a zombie has finished


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class DefaultRunLauncher(RunLauncher):
    def _log_path(self, run: RunRecord) -> Path | None:
        if self.instance_home is None:
            return None
        return Path(self.instance_home) / "logs" / f"{run.run_id}.log"

    def launch(self, run: RunRecord) -> dict[str, Any]:
        env = dict(os.environ)
        if self.instance_home is not None:
            env["RUNYARD_HOME"] = self.instance_home
        log = self._log_path(run)
        out: Any = subprocess.DEVNULL
        if log is not None:
            make_private_dirs(log.parent)  # owner-only: a run's output is its owner's business
            out = open(open_private(log), "ab")  # noqa: SIM115 - handed to the child, closed below
        cmd = [sys.executable, "-m", "runyard", "api", "execute-run", run.run_id]
        try:
            proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        _children[proc.pid] = proc
        return {
            "pid": proc.pid,
            "pgid": proc.pid,
            "start_time": _start_time(proc.pid),
            "host": os.uname().nodename,
            "log": str(log) if log else None,
        }

    def _alive(self, worker: Mapping[str, Any]) -> bool:
        pid = int(worker["pid"])
        child = _children.get(pid)
        if child is not None:
            return child.poll() is None
        started = _start_time(pid)
        return started is not None and (worker.get("start_time") is None or started == worker["start_time"])

    def terminate(self, run: RunRecord, worker: Mapping[str, Any], *, force: bool = False) -> None:
        if worker.get("host") not in (None, os.uname().nodename):
            raise RuntimeError(f"run {run.run_id} runs on host {worker['host']}; cancel it from there")
        pgid = int(worker["pgid"])
        if not force and not self._alive(worker):
            return
        child = _children.get(int(worker["pid"]))
        if force:  # killed with everything in its group, and reaped when it is our child
            stop_process_group(pgid, 0, leader=child)
        else:  # the worker cancels the run and exits by itself
            signal_process_group(pgid, signal.SIGTERM)

    def check_health(self, run: RunRecord, worker: Mapping[str, Any]) -> WorkerHealth:
        if worker.get("host") not in (None, os.uname().nodename):
            return WorkerHealth(status="unknown", message=f"the worker runs on host {worker['host']}")
        pid = int(worker["pid"])
        child = _children.get(pid)
        if child is not None:
            code = child.poll()
            if code is None:
                return WorkerHealth(status="running")
            return WorkerHealth(
                status="dead", message=f"run worker (pid {pid}) {_describe_exit(code)}{self._tail(worker)}"
            )
        if self._alive(worker):
            return WorkerHealth(status="running")
        return WorkerHealth(
            status="dead",
            message=f"run worker (pid {pid}) is gone (killed, or its machine restarted){self._tail(worker)}",
        )

    @staticmethod
    def _tail(worker: Mapping[str, Any], lines: int = 5) -> str:
        log = worker.get("log")
        if not log:
            return ""
        try:
            text = Path(log).read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return ("; last output:\n" + "\n".join(text)) if text else ""
