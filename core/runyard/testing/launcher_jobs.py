"""Jobs the run-launcher conformance kit runs (`runyard.testing.launchers`).

Importable as ``runyard.testing.launcher_jobs`` (it does not import pytest), so a run
worker anywhere runyard is installed (another process, a container, a pod) loads them the
way it loads user jobs. Every step talks to the kit through small files in a scratch
directory, ``run_config["kit"]["scratch"]``, which must be the same path for the kit and
the worker:

- ``started``: JSON written once the step runs (its pid, its child's pid, the host).
- ``go``: the kit's signal that the gated step may finish.
- ``kill``: the kit's signal that the step must kill its own process (the run worker,
  with the ``in_process`` executor the kit uses).
- ``stop``: the kit's signal, at the end of a test, that every step and heartbeat must
  end, whatever the launcher left running.
- ``step-beat``, ``child-beat``: counters that the step and a child process it started
  rewrite every 0.1 s; when both stop changing, nothing of the run is running.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from runyard import job, step

BEAT = 0.1  # seconds between heartbeats
LIFETIME = 300.0  # a step or heartbeat left running by a broken launcher ends by itself after this

# A process the step starts, standing for whatever a step spawns: it must not outlive the run.
_CHILD = """
import sys, time
from pathlib import Path
beat, stop, lifetime, every = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
n, end = 0, time.monotonic() + lifetime
while time.monotonic() < end and not stop.exists():
    n += 1
    beat.write_text(str(n))
    time.sleep(every)
"""


def _scratch(context) -> Path:  # type: ignore[no-untyped-def]
    return Path(context.run_config["kit"]["scratch"])


def _start_child(scratch: Path) -> subprocess.Popen[bytes]:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(scratch / "child-beat"), str(scratch / "stop"), str(LIFETIME), str(BEAT)],
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not (scratch / "child-beat").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return child


def _announce(scratch: Path, child: subprocess.Popen[bytes] | None) -> None:
    info = {"pid": os.getpid(), "child": child.pid if child else None, "host": socket.gethostname()}
    tmp = scratch / "started.tmp"
    tmp.write_text(json.dumps(info))
    tmp.rename(scratch / "started")  # the kit never reads a half-written file


def _beat_until(scratch: Path, flag: str) -> bool:
    """Rewrite step-beat until ``flag`` (or ``stop``) appears; True if ``flag`` did."""
    n, end = 0, time.monotonic() + LIFETIME
    while time.monotonic() < end:
        if (scratch / flag).exists():
            return True
        if (scratch / "stop").exists():
            return False
        n += 1
        (scratch / "step-beat").write_text(str(n))
        time.sleep(BEAT)
    return False


@step
def kit_emit() -> int:
    return 40


@step
def kit_gate(context, x: int) -> int:  # type: ignore[no-untyped-def]
    scratch = _scratch(context)
    _announce(scratch, None)
    if not _beat_until(scratch, "go"):
        raise RuntimeError("the kit never opened the gate")
    return x + 1


@step
def kit_plus_one(x: int) -> int:
    return x + 1


@step
def kit_beat(context) -> int:  # type: ignore[no-untyped-def]
    scratch = _scratch(context)
    _announce(scratch, _start_child(scratch))
    _beat_until(scratch, "never")
    return 0


@step
def kit_die(context) -> int:  # type: ignore[no-untyped-def]
    scratch = _scratch(context)
    _announce(scratch, _start_child(scratch))
    if _beat_until(scratch, "kill"):
        # In the run worker's own process (in_process executor): the worker dies as if the
        # OOM killer or an operator had killed it, with no chance to record anything.
        os.kill(os.getpid(), signal.SIGKILL)
    return 0


@job
def kit_gated_job():  # type: ignore[no-untyped-def]
    """Succeeds with 42 once the kit writes ``go``."""
    kit_plus_one(kit_gate(kit_emit()))


@job
def kit_heartbeat_job():  # type: ignore[no-untyped-def]
    """One step that beats, with a child process that beats, until stopped."""
    kit_beat()


@job
def kit_killed_job():  # type: ignore[no-untyped-def]
    """Like the heartbeat job, but the step kills its own process when the kit writes ``kill``."""
    kit_die()
