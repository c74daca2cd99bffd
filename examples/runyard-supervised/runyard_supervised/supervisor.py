"""The supervisor: ``python -m runyard_supervised.supervisor RUN_ID STATE_FILE SETTINGS``.

One per run, started by the launcher in a session of its own. It starts the run worker
(`runyard_supervised.worker`) in a session (process group) of the worker's own, records
it in STATE_FILE, and waits. SIGTERM is passed on to the worker, which cancels the run.
Past ``max_runtime`` it asks the worker to stop, and kills it ``terminate_grace``
seconds later. When the worker has exited, for whatever reason, the supervisor kills what
is left of its process group (a step's subprocess), records how the worker ended (exit
code or signal) in STATE_FILE, and exits. The launcher's health check reads that record,
so any process can say why a worker died, not only the one that started it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runyard.plugin import open_private

from ._proc import describe_exit, kill_group, start_time


def write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(open_private(tmp, os.O_WRONLY | os.O_TRUNC), "w") as f:  # owner-only, like the instance
        f.write(json.dumps(state))
    tmp.replace(path)  # readers never see half a record


def main(argv: list[str]) -> int:
    run_id, state_path, settings = argv[0], Path(argv[1]), json.loads(argv[2])
    stop_requested: list[int] = []
    worker: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, frame: Any) -> None:
        stop_requested.append(signum)
        if worker is not None and worker.returncode is None:
            os.kill(worker.pid, signal.SIGTERM)  # the worker cancels the run cleanly

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    limits = {"nice": settings.get("nice"), "memory_mb": settings.get("memory_mb")}
    worker = subprocess.Popen(
        [sys.executable, "-m", "runyard_supervised.worker", run_id, json.dumps(limits)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own group: what it starts can be killed without killing us
    )
    worker_start = start_time(worker.pid)
    state: dict[str, Any] = {"supervisor": os.getpid(), "worker": worker.pid, "worker_start": worker_start,
                             "state": "running"}
    write_state(state_path, state)
    if stop_requested:  # a terminate that came before the worker existed
        os.kill(worker.pid, signal.SIGTERM)

    max_runtime = settings.get("max_runtime")
    grace = float(settings.get("terminate_grace") or 10.0)
    deadline = time.monotonic() + max_runtime if max_runtime else None
    kill_at: float | None = None
    reason = ""
    while True:
        try:
            code = worker.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if deadline is not None and now > deadline and kill_at is None:
            reason = f"the run took longer than max_runtime ({max_runtime:g}s) and was stopped"
            print(f"runyard-supervised: {reason}", flush=True)
            os.kill(worker.pid, signal.SIGTERM)
            kill_at = now + grace
        if kill_at is not None and now > kill_at:
            kill_group(worker.pid, signal.SIGKILL, worker_start)
    # Whatever the worker started and left behind has nobody to stop it now.
    kill_group(worker.pid, signal.SIGKILL, worker_start)
    state.update(state="exited", code=code, how=describe_exit(code), reason=reason)
    write_state(state_path, state)
    print(f"runyard-supervised: run worker (pid {worker.pid}) {describe_exit(code)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
