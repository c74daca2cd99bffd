"""The ``supervised`` run launcher: each run worker under a supervisor process.

``launch`` starts the supervisor (`runyard_supervised.supervisor`) in a session of its
own and returns at once with what identifies it: pid and start time, host, and the state
file where the supervisor records the worker and, at the end, how it exited. Everything
else reads that data, so `terminate` and `check_health` work from any process on this
machine (``runyard run cancel`` in another shell, an hour later), and a worker killed
with SIGKILL is reported as such from there too.

Imports only `runyard` and `runyard.plugin` from runyard; Linux only (it reads /proc).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runyard import ConfigError
from runyard.plugin import RunLauncher, RunRecord, WorkerHealth, make_private_dirs, open_private

from ._proc import alive, kill_group, start_time
from .plugin import SupervisedConfig

_TAIL = 5  # lines of the run's log in the reason of a dead worker


class SupervisedRunLauncher(RunLauncher):
    config: SupervisedConfig

    # -- launch -------------------------------------------------------------------------------

    def launch(self, run: RunRecord) -> dict[str, Any]:
        if self.instance_home is None:
            raise ConfigError("run_launcher.supervised: the instance has no RUNYARD_HOME to keep run state in")
        # Owner-only, like everything in the instance: a run's output is its owner's business.
        folder = make_private_dirs(Path(self.instance_home) / "supervised")
        state, log = folder / f"{run.run_id}.json", folder / f"{run.run_id}.log"
        settings = {
            "nice": self.config.nice,
            "memory_mb": self.config.memory_mb,
            "max_runtime": self.config.max_runtime,
            "terminate_grace": self.config.terminate_grace,
        }
        with open(open_private(log), "ab") as out:
            proc = subprocess.Popen(
                # This interpreter, not a command on PATH: the venv's bin need not be on it.
                [sys.executable, "-m", "runyard_supervised.supervisor", run.run_id, str(state), json.dumps(settings)],
                env=self.worker_env(),  # RUNYARD_HOME: the worker uses this instance
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # not stopped by this terminal's Ctrl-C
                close_fds=True,
            )
        # This process may outlive the supervisor: collect its exit so it leaves no zombie.
        threading.Thread(target=proc.wait, name=f"reap-supervisor-{proc.pid}", daemon=True).start()
        return {
            "supervisor_pid": proc.pid,
            "supervisor_start": start_time(proc.pid),
            "host": os.uname().nodename,
            "state_file": str(state),
            "log": str(log),
        }

    # -- reading what the supervisor recorded ---------------------------------------------------

    @staticmethod
    def _state(worker: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return json.loads(Path(worker["state_file"]).read_text())
        except (OSError, ValueError):
            return {}  # not written yet, or gone with the instance

    @staticmethod
    def _supervisor_alive(worker: Mapping[str, Any]) -> bool:
        return alive(int(worker["supervisor_pid"]), worker.get("supervisor_start"))

    @staticmethod
    def _tail(worker: Mapping[str, Any]) -> str:
        try:
            lines = Path(worker["log"]).read_text(errors="replace").strip().splitlines()[-_TAIL:]
        except (OSError, KeyError):
            return ""
        return ("; last output:\n" + "\n".join(lines)) if lines else ""

    def _elsewhere(self, worker: Mapping[str, Any]) -> str | None:
        host = worker.get("host")
        return host if host not in (None, os.uname().nodename) else None

    # -- health ------------------------------------------------------------------------------------

    def check_health(self, run: RunRecord, worker: Mapping[str, Any]) -> WorkerHealth:
        if (host := self._elsewhere(worker)) is not None:
            return WorkerHealth.unknown(f"the run's supervisor runs on host {host}")
        state = self._state(worker)
        pid = state.get("worker")
        if state.get("state") == "exited":
            what = f"run worker (pid {pid}) {state['how']}"
            if state.get("reason"):
                what += f": {state['reason']}"
            # A negative code is a signal: the worker was killed. Otherwise it exited itself.
            if state["code"] < 0:
                return WorkerHealth.dead(what + self._tail(worker))
            return WorkerHealth.finished(what)
        if pid is not None and alive(pid, state.get("worker_start")):
            return WorkerHealth.running()
        if self._supervisor_alive(worker):
            return WorkerHealth.running()  # starting the worker, or recording its exit
        return WorkerHealth.dead(
            f"the supervisor (pid {worker['supervisor_pid']}) and the run worker are gone without a record of "
            f"how (both killed, or the machine restarted){self._tail(worker)}"
        )

    # -- terminate -------------------------------------------------------------------------------

    def terminate(self, run: RunRecord, worker: Mapping[str, Any], *, force: bool = False) -> None:
        if (host := self._elsewhere(worker)) is not None:
            raise RuntimeError(f"run {run.run_id} runs on host {host}; cancel it from there")
        if not force:
            # The supervisor passes SIGTERM on to the worker, which cancels the run.
            if self._supervisor_alive(worker):
                self._signal(int(worker["supervisor_pid"]), signal.SIGTERM)
            else:
                self._kill_worker(self._state(worker), signal.SIGTERM)
            return
        # Kill the worker's group first, so that the supervisor records how it ended; the
        # supervisor goes by itself once it has, or is killed if it does not.
        deadline = time.monotonic() + 3.0
        while True:
            self._kill_worker(self._state(worker), signal.SIGKILL)
            if not self._supervisor_alive(worker) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if self._supervisor_alive(worker):
            self._signal(int(worker["supervisor_pid"]), signal.SIGKILL)
            self._kill_worker(self._state(worker), signal.SIGKILL)  # started meanwhile

    @staticmethod
    def _kill_worker(state: Mapping[str, Any], sig: int) -> None:
        if state.get("worker") is not None and state.get("state") != "exited":
            kill_group(int(state["worker"]), sig, state.get("worker_start"))

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # it has just exited: nothing to stop
