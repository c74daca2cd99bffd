"""Runs the conformance kit against one held-back executor in a pytest subprocess, and
cleans up after it. Used by `tests/test_kit_heldback.py` and `report`.

Every process a run starts carries a token in its environment; whatever a broken variant
leaves running is killed after its run (found by the token, never by name).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

from .catalog import Variant

ROOT = Path(__file__).resolve().parent.parent.parent
SUITE = Path(__file__).resolve().parent / "kit_suite.py"
KIT_TIMEOUT = float(os.environ.get("RUNYARD_HELDBACK_KIT_TIMEOUT", "300"))
FULL_KIT = os.environ.get("RUNYARD_HELDBACK_FULL") == "1"
TOKEN_VAR = "RUNYARD_HELDBACK_TOKEN"


class KitRun(NamedTuple):
    select: str | None
    exit_code: int | None  # None: it did not finish within KIT_TIMEOUT
    failed: dict[str, str]  # kit test -> first line of its failure
    passed: list[str]
    skipped: list[str]
    output: str
    leftovers: int  # processes of the run still running after it, killed


def processes_with(token: str) -> list[int]:
    """Processes whose environment carries ``TOKEN_VAR=token`` (Linux /proc)."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            environ = Path("/proc", name, "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(name))
    return found


def kill_leftovers(token: str) -> int:
    pids = processes_with(token)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def run_kit(variant: str, tmp_path: Path, *, select: str | None = None, stop_at_first: bool = True) -> KitRun:
    """Run the conformance kit against held-back executor ``variant`` in a subprocess."""
    token = uuid.uuid4().hex
    report = tmp_path / f"kit-{uuid.uuid4().hex[:8]}.xml"
    cmd = [sys.executable, "-m", "pytest", str(SUITE), "-p", "no:cacheprovider", "-q", "-rfE",
           f"--junitxml={report}", "--basetemp", str(tmp_path / f"base-{uuid.uuid4().hex[:8]}")]
    if stop_at_first:
        cmd.append("-x")
    if select:
        cmd += ["-k", select]
    env = {**os.environ, "RUNYARD_HELDBACK_VARIANT": variant, TOKEN_VAR: token,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=KIT_TIMEOUT)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        code = None
    time.sleep(0.2)  # a process the run left may still be forking
    leftovers = kill_leftovers(token)
    failed: dict[str, str] = {}
    passed: list[str] = []
    skipped: list[str] = []
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            name = case.get("name", "?")
            problem = case.find("failure")
            if problem is None:
                problem = case.find("error")
            if problem is not None:
                message = (problem.get("message") or "?").strip() or "?"
                failed[name] = message.splitlines()[0][:300]
            elif case.find("skipped") is not None:
                skipped.append(name)
            else:
                passed.append(name)
    return KitRun(select, code, failed, passed, skipped, output, leftovers)


class Verdict(NamedTuple):
    caught: bool | None  # None: a kit run did not finish or broke (no verdict)
    runs: list[KitRun]

    @property
    def whole_kit(self) -> bool:
        return self.caught is True or len(self.runs) == 2 or self.runs[0].select is None

    def describe(self) -> str:
        lines = []
        if not self.whole_kit:
            lines.append("(only the kit tests about this clause ran; RUNYARD_HELDBACK_FULL=1 runs the whole kit)")
        for run in self.runs:
            lines.append(f"kit -k {run.select!r}: exit {run.exit_code}; failed {sorted(run.failed)}; "
                         f"passed {len(run.passed)}, skipped {len(run.skipped)}; leftover processes killed: "
                         f"{run.leftovers}")
            lines += [f"  {name}: {msg}" for name, msg in run.failed.items()]
            if run.exit_code not in (0, 1, 5):
                lines.append(run.output[-3000:])
        return "\n".join(lines)


def kit_verdict(variant: Variant, tmp_path: Path, *, full: bool = FULL_KIT, stop_at_first: bool = True) -> Verdict:
    """Whether the kit fails ``variant``: its focus tests first, then (``full``, or when the
    focus selects no kit test) the others."""
    runs: list[KitRun] = []
    for select in (variant.focus, f"not ({variant.focus})"):
        if runs and not full and runs[-1].exit_code == 0:
            break
        run = run_kit(variant.name, tmp_path, select=select, stop_at_first=stop_at_first)
        runs.append(run)
        if run.exit_code == 1:
            return Verdict(True, runs)
        # 0: all selected passed; 5: none selected. Anything else (a hang, a crash, a usage
        # error) is the kit or this harness broken, and no verdict.
        if run.exit_code not in (0, 5):
            return Verdict(None, runs)
    return Verdict(False, runs)
