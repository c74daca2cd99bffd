"""The default run launcher: one OS process per run on this machine.

The worker (`RunLauncher.worker_command`: this interpreter, ``-m runyard api
execute-run``; forked from the launching process instead where `RunLauncher.fork_worker`
allows it: ``runyard job launch``) runs in a new session, its own process group, so terminating the run
reaches every process the run started, steps' subprocesses included. The worker's output
goes to ``$RUNYARD_HOME/logs/RUN_ID.log``; its last lines go into the reason of a dead
worker. The launch record holds the pid, its start time (a reused pid is not mistaken for
the worker) and the host (another machine's worker cannot be signalled from here).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runyard.plugin import (
    ForkedWorker,
    RunLauncher,
    RunRecord,
    WorkerHealth,
    make_private_dirs,
    open_private,
    signal_process_group,
    stop_process_group,
)

from .mp_os import read_proc_stat

# Workers this process started: waiting on them is the only way to learn their exit
# status, and it keeps finished children from lingering as zombies.
_children: dict[int, subprocess.Popen[bytes] | ForkedWorker] = {}


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    fields = read_proc_stat(pid)
    if fields is None:
        return None
    return fields[19].decode() if fields[0] != b"Z" else None  # a zombie has finished


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


_END_TAG = "default"  # file name prefix of the kept end records (RunLauncher.remember_end)


class DefaultRunLauncher(RunLauncher):
    def _log_path(self, run: RunRecord) -> Path | None:
        if self.instance_home is None:
            return None
        return Path(self.instance_home) / "logs" / f"{run.run_id}.log"

    def launch(self, run: RunRecord) -> dict[str, Any]:
        log = self._log_path(run)
        out: Any = subprocess.DEVNULL
        if log is not None:
            make_private_dirs(log.parent)  # owner-only: a run's output is its owner's business
            out = open(open_private(log), "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            # Forked from `runyard job launch`, which has imported runyard and the job
            # already; a new interpreter (`worker_command`) everywhere else.
            proc: Any = self.fork_worker(run, output=out.fileno()) if log is not None else None
            if proc is None:
                proc = subprocess.Popen(
                    self.worker_command(run),
                    env=self.worker_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                    close_fds=True,
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
            "forked": isinstance(proc, ForkedWorker),  # from the launching command, not a new interpreter
        }

    def _alive(self, worker: Mapping[str, Any]) -> bool:
        pid = int(worker["pid"])
        child = _children.get(pid)
        if child is not None:
            return child.poll() is None
        started = _start_time(pid)
        return started is not None and (worker.get("start_time") is None or started == worker["start_time"])

    @staticmethod
    def _group_is_ours(worker: Mapping[str, Any]) -> bool:
        """Whether signalling the group ``pgid`` reaches this run only. Linux does not hand
        out a pid still in use as a group id, so while anything of the run lives, the
        leader's pid is either the worker itself or free; a live process of another start
        time under that pid means the run's group is gone and the number is someone else's."""
        started = _start_time(int(worker["pgid"]))
        return started is None or worker.get("start_time") is None or started == worker["start_time"]

    def terminate(self, run: RunRecord, worker: Mapping[str, Any], *, force: bool = False) -> None:
        if worker.get("host") not in (None, os.uname().nodename):
            raise RuntimeError(f"run {run.run_id} runs on host {worker['host']}; cancel it from there")
        pgid = int(worker["pgid"])
        if not force and not self._alive(worker):
            return
        if not self._group_is_ours(worker):
            return
        child = _children.get(int(worker["pid"]))
        if force:  # killed with everything in its group, and reaped when it is our child
            stop_process_group(pgid, 0, leader=child)
        else:  # the worker cancels the run and exits by itself
            signal_process_group(pgid, signal.SIGTERM)

    def check_health(self, run: RunRecord, worker: Mapping[str, Any]) -> WorkerHealth:
        if worker.get("host") not in (None, os.uname().nodename):
            return WorkerHealth.unknown(f"the worker runs on host {worker['host']}")
        pid = int(worker["pid"])
        child = _children.get(pid)
        if child is not None:
            code = child.poll()
            if code is None:
                return WorkerHealth.running()
            # Reaped: a long-lived launching process (runyard daemon) keeps no record of it.
            # Later calls find the pid gone and answer from the run's status.
            _children.pop(pid, None)
            self._kill_leftovers(worker)
            what = f"run worker (pid {pid}) {_describe_exit(code)}{self._tail(worker)}"
            # A negative code is a signal: killed. Otherwise it exited by itself.
            health = WorkerHealth.dead(what) if code < 0 else WorkerHealth.finished(what)
            # Kept on disk: later checks (this process's, another's) give the same reason,
            # the signal included, rather than "gone" once the record above is dropped.
            self.remember_end(run, health, tag=_END_TAG)
            return health
        if self._alive(worker):
            return WorkerHealth.running()
        remembered = self.remembered_end(run, tag=_END_TAG)
        if remembered is not None:
            return remembered
        self._kill_leftovers(worker)
        if run.status.is_finished:
            return WorkerHealth.finished(f"run worker (pid {pid}) has exited; the run is {run.status.value}")
        return WorkerHealth.dead(
            f"run worker (pid {pid}) is gone (killed, or its machine restarted){self._tail(worker)}"
        )

    def _kill_leftovers(self, worker: Mapping[str, Any]) -> None:
        """The worker is gone: whatever it started (a step's subprocess) has nobody to stop
        it, so it goes now rather than running on as an orphan."""
        if self._group_is_ours(worker):
            try:
                os.killpg(int(worker["pgid"]), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

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
