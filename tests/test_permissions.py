"""Private by default: what runyard creates in an instance is owner-only whatever the umask,
a world-writable runyard.yaml is flagged, and a setgid folder shares with its group on purpose.

Runs are launched through the real CLI (a run worker process of the default launcher, steps
in processes of the multiprocess executor), with the umask a careless shell might have.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from runyard.private import make_private_dirs, open_private
from runyard.storage import RunRecord, RunStatus
from runyard.storage.sqlite import SqliteRunStorage

RUNYARD = Path(sys.executable).parent / "runyard"

JOB = """
from runyard import job, step

@step
def fetch() -> list[int]:
    print("a secret line of stdout")
    return [1, 2, 3]

@step
def total(xs: list[int]) -> int:
    return sum(xs)

@job(executor="multiprocess")
def private_job():
    total(fetch())
"""


def _ry(env: dict[str, str], umask: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RUNYARD), *args], env=env, capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: os.umask(umask),
    )


def _modes(root: Path) -> dict[str, str]:
    found = {".": oct(stat.S_IMODE(root.stat().st_mode))}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            found[str(p.relative_to(root))] = oct(stat.S_IMODE(p.lstat().st_mode))
    return found


@pytest.mark.parametrize("umask", [0o000, 0o022], ids=["umask-000", "umask-022"])
def test_a_launched_run_leaves_only_owner_only_files(tmp_path: Path, umask: int) -> None:
    home = tmp_path / "not-yet" / "home"  # runyard creates it, and its missing parent
    f = tmp_path / "job.py"
    f.write_text(JOB)
    env = {**os.environ, "RUNYARD_HOME": str(home)}
    launched = _ry(env, umask, "job", "launch", "-f", str(f), "--wait")
    assert launched.returncode == 0, launched.stderr
    run_id = next(line for line in launched.stdout.split() if len(line) >= 12)
    modes = _modes(home)
    assert "runyard.db" in modes and f"logs/{run_id}.log" in modes, modes
    assert any(k.startswith(f"outputs/{run_id}/") for k in modes), modes
    wrong = {k: m for k, m in modes.items() if m != ("0o700" if (home / k).is_dir() else "0o600")}
    assert not wrong, f"not owner-only under umask {umask:03o}: {wrong}"
    assert oct(stat.S_IMODE((tmp_path / "not-yet").stat().st_mode)) == "0o700"


def test_sqlite_wal_and_shm_files_are_owner_only(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        storage = SqliteRunStorage(tmp_path / "db" / "runyard.db")
        storage.add_run(RunRecord(run_id="r1", job_name="j", code_pointer=None, run_config={}, executor=None,
                                  tags={}, status=RunStatus.QUEUED, created_at=0.0))
        names = sorted(p.name for p in (tmp_path / "db").iterdir())
        modes = {n: oct(stat.S_IMODE((tmp_path / "db" / n).stat().st_mode)) for n in names}
        storage.close()
    finally:
        os.umask(old)
    assert names == ["runyard.db", "runyard.db-shm", "runyard.db-wal"]
    assert set(modes.values()) == {"0o600"}, modes
    assert oct(stat.S_IMODE((tmp_path / "db").stat().st_mode)) == "0o700"


def test_existing_folders_and_files_keep_their_mode(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    (shared / "old.log").write_text("")
    os.chmod(shared / "old.log", 0o644)
    make_private_dirs(shared)
    os.close(open_private(shared / "old.log"))
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert stat.S_IMODE((shared / "old.log").stat().st_mode) == 0o644


def test_a_setgid_folder_shares_new_files_with_its_group(tmp_path: Path) -> None:
    home = tmp_path / "team-home"
    home.mkdir()
    os.chmod(home, 0o2770)  # the deliberate act that docs/configuration.md describes
    old = os.umask(0o077)  # even a strict umask does not undo a deliberate share
    try:
        make_private_dirs(home / "outputs" / "run1")
        os.close(open_private(home / "outputs" / "run1" / "step"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((home / "outputs").stat().st_mode) == 0o2770
    assert stat.S_IMODE((home / "outputs" / "run1").stat().st_mode) == 0o2770
    assert stat.S_IMODE((home / "outputs" / "run1" / "step").stat().st_mode) == 0o660


def test_world_writable_runyard_yaml_gets_a_warning(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    cfg = home / "runyard.yaml"
    cfg.write_text("executor: in_process\n")
    env = {**os.environ, "RUNYARD_HOME": str(home)}
    quiet = _ry(env, 0o022, "instance", "validate")
    assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr
    os.chmod(cfg, 0o666)
    loud = _ry(env, 0o022, "instance", "validate")
    assert loud.returncode == 0, loud.stderr
    assert f"warning: {cfg}: the instance config is writable by every user" in loud.stderr
    assert f"fix: chmod o-w {cfg}" in loud.stderr
