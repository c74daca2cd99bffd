"""Mutation test of the conformance kit: it passes a correct subprocess handler and fails
every deliberately broken copy of it (tests/kit_mutants/mutants.py).

Each mutant runs the whole kit in a pytest of its own (stopping at the first failure),
a few at a time; a mutant the kit passes fails here, naming what it breaks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import pytest

from tests.kit_mutants.mutants import MUTANTS

ROOT = Path(__file__).resolve().parents[1]

KIT_MODULE = '''
import pytest
from runyard.registry import PluginRegistry
from runyard.testing.conformance import ExecutorConformance

from tests.kit_mutants import plugin as kit_plugin


@pytest.fixture
def runyard_registry():
    registry = PluginRegistry()
    registry.register(kit_plugin, name="kit-mutants")
    return registry


class TestKit(ExecutorConformance):
    executor = "{name}"
'''


@attrs.frozen
class KitRun:
    name: str
    returncode: int
    failed: list[str]
    seconds: float
    output: str


def run_kit(name: str, where: Path) -> KitRun:
    d = where / name
    d.mkdir()
    (d / "test_kit.py").write_text(KIT_MODULE.format(name=name))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "test_kit.py", "-x", "-q", "-p", "no:cacheprovider", "--rootdir", str(d),
         "-o", "addopts=", "--basetemp", str(d / "tmp")],
        cwd=d, env=env, capture_output=True, text=True, timeout=600,
    )
    _kill_leftovers(d)
    failed = re.findall(r"^FAILED test_kit\.py::TestKit::(\S+)", done.stdout, re.M)
    return KitRun(name, done.returncode, failed, time.monotonic() - started, done.stdout[-4000:] + done.stderr[-2000:])


def _kill_leftovers(where: Path) -> None:
    """Broken handlers leave step processes behind (that is what the kit caught): end them
    here, so the mutation test leaves nothing running. Only processes the kit's steps
    recorded, and only while they still run the kit's worker or its ``sleep`` child."""
    for info_file in where.glob("tmp/**/kit-scratch/*-1.json"):
        info = json.loads(info_file.read_text())
        for pid in (info.get("pid"), info.get("child")):
            if not pid or pid == os.getpid():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"worker.py" in cmdline or b"time.sleep(60)" in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def kit_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KitRun]:
    where = tmp_path_factory.mktemp("kit-mutants")
    names = ["kit_reference", *MUTANTS]
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = dict(zip(names, pool.map(lambda n: run_kit(n, where), names), strict=True))
    report = "\n".join(f"  {r.name}: {'passed' if r.returncode == 0 else 'failed ' + ','.join(r.failed)} "
                       f"({r.seconds:.1f}s)" for r in runs.values())
    print(f"\nkit runs:\n{report}")
    return runs


def test_kit_passes_the_reference_handler(kit_runs: dict[str, KitRun]) -> None:
    run = kit_runs["kit_reference"]
    assert run.returncode == 0, f"the kit fails the correct reference handler:\n{run.output}"


@pytest.mark.parametrize("name", list(MUTANTS))
def test_kit_fails_the_mutant(kit_runs: dict[str, KitRun], name: str) -> None:
    run = kit_runs[name]
    assert run.returncode == 1 and run.failed, (
        f"the kit does not fail mutant '{name}' ({MUTANTS[name][1]}):\n{run.output}"
    )
