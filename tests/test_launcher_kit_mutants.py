"""The run-launcher kit fails broken launchers (a mutation test of the kit).

Each launcher of tests/launcher_mutants.py is the default launcher with one defect. It is
installed for real, as a distribution on PYTHONPATH with a ``runyard`` entry point, and
the kit runs against it in a pytest subprocess. Each must fail the kit test that covers
its defect, with a message that names the defect; the unbroken control must pass the
whole kit under the same harness, so the failures are the defects', not the harness's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

LAUNCH = "test_launch_returns_at_once_and_the_run_succeeds"
FINISHED = "test_health_and_terminate_of_a_finished_run"
CANCEL = "test_cancel_from_another_process_ends_the_run_canceled"
TERMINATE = "test_terminate_is_idempotent_and_force_leaves_nothing"
KILLED = "test_killed_worker_is_reported_dead_with_the_reason"
FORCE = "test_force_terminate_of_a_running_worker_leaves_nothing"

# mutant -> (the kit test that must fail, a fragment its failure message must contain)
MUTANTS = {
    "kit_noop_terminate": (CANCEL, "did not make the worker cancel its step"),
    "kit_force_only": (TERMINATE, "terminate without force must make the worker cancel the run"),
    "kit_pid_only": (FORCE, "the step's child process still running after terminate(force=True) of a running"),
    "kit_raises_when_gone": (FINISHED, "ProcessLookupError"),
    "kit_memory_only": (CANCEL, "did not make the worker cancel its step"),
    "kit_always_running": (FINISHED, "but check_health says running"),
    "kit_no_health": (LAUNCH, "check_health of a running worker said unknown"),
    "kit_dead_without_reason": (KILLED, "does not say the worker was killed by SIGKILL"),
    "kit_finished_when_killed": (KILLED, "check_health says finished"),
    "kit_blocking_launch": (LAUNCH, "launch() did not return within"),
    "kit_bare_command": (LAUNCH, "launching the run failed: FileNotFoundError"),
}


@pytest.fixture(scope="module")
def mutant_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory that, on PYTHONPATH, is an installed distribution providing the mutants."""
    site = tmp_path_factory.mktemp("mutant-site")
    shutil.copy(TESTS / "launcher_mutants.py", site / "runyard_launcher_mutants.py")
    dist = site / "runyard_launcher_mutants-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: runyard-launcher-mutants\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text("[runyard]\nmutants = runyard_launcher_mutants\n")
    return site


def run_kit(site: Path, where: Path, launcher: str, tests: list[str] | None) -> dict[str, str | None]:
    """Run the kit on ``launcher``; return each test's failure text (None when it passed)."""
    where.mkdir()
    (where / "test_kit.py").write_text(textwrap.dedent(f"""
        from runyard.testing.launchers import RunLauncherConformance


        class TestKit(RunLauncherConformance):
            launcher = {launcher!r}
            # Short waits: a broken launcher fails fast, a correct one has plenty.
            launch_timeout = 8.0
            health_timeout = 8.0
            stop_timeout = 15.0
            cancel_grace = 8.0
    """))
    report = where / "report.xml"
    cmd = [sys.executable, "-m", "pytest", "test_kit.py", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    if tests:
        cmd += ["-k", " or ".join(tests)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=600)
    assert report.exists(), f"the kit did not run:\n{done.stdout}{done.stderr}"
    results: dict[str, str | None] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        problem = case.find("failure")
        error = case.find("error")
        if error is not None:
            raise AssertionError(f"{case.get('name')} errored (not a kit failure):\n{error.text}")
        results[case.get("name", "")] = None if problem is None else f"{problem.get('message')}\n{problem.text}"
    return results


@pytest.mark.slow
def test_the_unbroken_control_passes_the_whole_kit(mutant_site: Path, tmp_path: Path) -> None:
    results = run_kit(mutant_site, tmp_path / "control", "kit_control", None)
    assert set(results) == {LAUNCH, FINISHED, CANCEL, TERMINATE, FORCE, KILLED}
    assert all(v is None for v in results.values()), results


@pytest.mark.slow
@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_the_kit_fails_a_broken_launcher(mutant: str, mutant_site: Path, tmp_path: Path) -> None:
    test, fragment = MUTANTS[mutant]
    results = run_kit(mutant_site, tmp_path / mutant, mutant, [test])
    assert test in results, results
    failure = results[test]
    assert failure is not None, f"the kit passed the broken launcher {mutant}"
    assert fragment in failure, f"{mutant} failed {test}, but not for its defect:\n{failure[-3000:]}"
