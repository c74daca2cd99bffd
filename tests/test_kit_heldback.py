"""Mutation test of the conformance kit with a held-back set of broken executors.

Issue 11: "The kit's own tests include a set of deliberately broken handlers, each of
which must fail the kit. A further set is held back and must fail it as well." This is
that further set, written apart from the kit and its own mutants: a correct reference
executor (a ``runyard api execute-step`` subprocess per step, `kit_heldback.reference`)
and variants of it with one subtle contract violation each (`kit_heldback.variants`,
listed with the clause they break in `kit_heldback.catalog`).

Each case runs the kit (`kit_heldback/kit_suite.py`, a plain `ExecutorConformance`
subclass) against one executor in a pytest subprocess, with the executor registered in
the kit's throwaway registry. The reference must pass the whole kit; every variant must
fail it. To keep the suite quick, a variant is run against the kit tests about the
clause it breaks (its ``focus``, a ``-k`` expression; the whole kit when that selects
nothing); with ``RUNYARD_HELDBACK_FULL=1`` the rest of the kit runs too when those pass,
so the verdict is the whole kit's. A red variant test means the kit MISSES that defect:
it stays red until the kit catches it.

The probes (`kit_heldback/probes.py`) show, without the kit, that each variant really
breaks its clause and that the reference keeps it: a kit that passes a variant misses
a real defect.

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tests.kit_heldback import plugin, probes
from tests.kit_heldback.catalog import REFERENCE, VARIANTS, Variant

ROOT = Path(__file__).resolve().parent.parent
SUITE = Path(__file__).resolve().parent / "kit_heldback" / "kit_suite.py"
KIT_TIMEOUT = float(os.environ.get("RUNYARD_HELDBACK_KIT_TIMEOUT", "300"))
FULL_KIT = os.environ.get("RUNYARD_HELDBACK_FULL") == "1"
TOKEN_VAR = "RUNYARD_HELDBACK_TOKEN"

pytestmark = pytest.mark.slow


class KitRun(NamedTuple):
    exit_code: int | None  # None: it did not finish within KIT_TIMEOUT
    failed: dict[str, str]  # kit test -> first line of its failure
    passed: list[str]
    skipped: list[str]
    output: str
    leftovers: int  # processes of the run still running after it, killed


def _processes_with(token: str) -> list[int]:
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


def _kill_leftovers(token: str) -> int:
    pids = _processes_with(token)
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
    leftovers = _kill_leftovers(token)
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
                failed[name] = (problem.get("message") or "").splitlines()[0][:300] if problem.get("message") else "?"
            elif case.find("skipped") is not None:
                skipped.append(name)
            else:
                passed.append(name)
    return KitRun(code, failed, passed, skipped, output, leftovers)


class Verdict(NamedTuple):
    caught: bool
    runs: list[KitRun]

    def describe(self) -> str:
        lines = []
        if len(self.runs) == 1:
            lines.append("(only the kit tests about this clause ran; RUNYARD_HELDBACK_FULL=1 runs the whole kit)")
        for run in self.runs:
            lines.append(f"kit exit {run.exit_code}; failed {sorted(run.failed)}; passed {len(run.passed)}, "
                         f"skipped {len(run.skipped)}; leftover processes killed: {run.leftovers}")
            lines += [f"  {name}: {msg}" for name, msg in run.failed.items()]
        return "\n".join(lines)


def kit_verdict(variant: Variant, tmp_path: Path, *, full: bool = FULL_KIT) -> Verdict:
    """Whether the kit fails ``variant``: its focus tests first, then (``full``, or when the
    focus selects no kit test) the others."""
    runs: list[KitRun] = []
    for select in (variant.focus, f"not ({variant.focus})"):
        if runs and not full and runs[-1].exit_code == 0:
            break
        run = run_kit(variant.name, tmp_path, select=select)
        runs.append(run)
        if run.exit_code is None:
            pytest.fail(f"the kit did not finish within {KIT_TIMEOUT:g}s against '{variant.name}' "
                        f"(a hang is not a verdict):\n{run.output[-3000:]}")
        if run.exit_code == 1:
            return Verdict(True, runs)
        # 0: all selected passed; 5: none selected. Anything else is the kit or this file broken.
        assert run.exit_code in (0, 5), f"the kit run itself broke (exit {run.exit_code}):\n{run.output[-3000:]}"
    return Verdict(False, runs)


def test_reference_passes_the_kit(tmp_path: Path) -> None:
    run = run_kit(REFERENCE, tmp_path, stop_at_first=False)
    assert run.exit_code == 0 and not run.failed, (
        f"the held-back reference executor fails the kit: {run.failed}\n{run.output[-4000:]}"
    )
    assert run.passed, run.output[-2000:]
    assert run.leftovers == 0, f"the reference left {run.leftovers} processes running after the kit"


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_kit_fails_heldback_variant(variant: Variant, tmp_path: Path) -> None:
    verdict = kit_verdict(variant, tmp_path)
    assert verdict.caught, (
        f"MISSED: the conformance kit passes held-back variant '{variant.name}': {variant.defect}. "
        f"It breaks: {variant.clause}.\n{verdict.describe()}"
    )


# -- the probes: each variant really is broken, the reference is not ---------------------------


@pytest.fixture
def runyard_registry(runyard_registry: Any) -> Any:
    runyard_registry.register(plugin, name="kit-heldback", distribution="runyard-kit-heldback")
    return runyard_registry


@pytest.fixture
def probe_env(runyard_instance: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Step workers import the probe jobs from this repository, and carry a token so that
    whatever a broken variant leaves running is killed after the probe."""
    token = uuid.uuid4().hex
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv(TOKEN_VAR, token)
    scratch = tmp_path / "probe-scratch"
    scratch.mkdir()
    yield lambda variant: probes.ProbeEnv(variant, runyard_instance, scratch)
    _kill_leftovers(token)


@pytest.mark.parametrize("probe", sorted(probes.PROBES))
def test_reference_keeps_the_contract(probe: str, probe_env: Any) -> None:
    probes.PROBES[probe](probe_env(REFERENCE))


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_variant_really_breaks_its_clause(variant: Variant, probe_env: Any) -> None:
    with pytest.raises(AssertionError) as broken:
        probes.PROBES[variant.probe](probe_env(variant.name))
    print(f"{variant.name}: {variant.probe}: {str(broken.value).splitlines()[0]}")
