"""Storage faults on a real, small filesystem: a full disk while writing outputs and the
run database, and damaged database files.

The full disk is a 256 KiB tmpfs mounted for each test (root is needed: the test fails,
never skips, when it cannot mount one).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from runyard.errors import StorageError
from runyard.events import Event, EventType
from runyard.instance import Instance
from runyard.outputs import FileOutputStore
from runyard.storage import RunRecord, RunStatus
from runyard.storage.sqlite import SqliteRunStorage

RUNYARD = Path(sys.executable).parent / "runyard"

JOBS = """
import os
from pathlib import Path
from runyard import job, step

@step
def small() -> int:
    return 1

@step
def big(x: int) -> bytes:
    return b"x" * 1_000_000

@step
def fill_the_disk(x: int) -> int:
    # Fill the disk the run database is on, as another program might, then finish.
    with open(os.environ["RY_FILLER"], "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\\0" * 4096)
        except OSError:
            pass
    return x

@job
def smalljob():
    small()

@job
def bigjob():
    big(small())

@job
def filling():
    fill_the_disk(small())
"""


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB filesystem (tmpfs), unmounted after the test."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs at {mnt} (these tests need root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the filesystem is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def ry(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RUNYARD), *args], env={**os.environ, "RUNYARD_HOME": str(home), **(env or {})},
                          capture_output=True, text=True, timeout=120)


def jobs_file(tmp_path: Path) -> Path:
    f = tmp_path / "jobs.py"
    f.write_text(textwrap.dedent(JOBS))
    return f


def partial_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# -- outputs ------------------------------------------------------------------------------------


def test_a_failed_output_write_removes_its_partial_file_and_reports_enospc(small_fs: Path) -> None:
    store = FileOutputStore(small_fs / "outputs")
    with pytest.raises(OSError) as info:
        store.put("run1", "big", b"x" * 1_000_000)
    assert info.value.errno == errno.ENOSPC
    assert "No space left on device" in str(info.value) and "'big'" in str(info.value)
    assert partial_files(small_fs) == []
    # The space the partial file took is back: the next (small) output fits.
    assert store.get(store.put("run2", "small", b"y" * 1000)) == b"y" * 1000


def test_a_step_whose_output_fills_the_disk_fails_with_the_os_error(small_fs: Path, tmp_path: Path) -> None:
    home = small_fs / "home"
    f = jobs_file(tmp_path)
    proc = ry(home, "job", "execute", "-f", str(f), "-j", "bigjob")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "step big failed" in proc.stdout and "No space left on device" in proc.stdout
    assert partial_files(home) == []
    # Nothing was left to fill the disk: the next run succeeds.
    again = ry(home, "job", "execute", "-f", str(f), "-j", "smalljob")
    assert again.returncode == 0, again.stdout + again.stderr


# -- the run database on a full disk --------------------------------------------------------------


def test_the_sqlite_writer_reports_the_full_disk_not_a_failed_rollback(small_fs: Path) -> None:
    storage = SqliteRunStorage(small_fs / "runyard.db")
    run = RunRecord(job_name="x")
    storage.add_run(run)
    fill(small_fs / "filler")
    with pytest.raises(StorageError) as info:
        storage.store_events([Event(type=EventType.ENGINE, run_id=run.run_id, message="m" * 200_000)])
    message = str(info.value)
    assert "database or disk is full" in message and str(small_fs / "runyard.db") in message
    assert "cannot rollback" not in message
    assert storage.get_run(run.run_id) == run  # still readable, and unharmed
    (small_fs / "filler").unlink()
    storage.store_events([Event(type=EventType.ENGINE, run_id=run.run_id, message="after")])
    assert [s.event.message for s in storage.get_events(run.run_id)] == ["after"]


def test_run_list_and_show_work_when_the_disk_is_full(small_fs: Path, tmp_path: Path) -> None:
    home = small_fs / "home"
    f = jobs_file(tmp_path)
    assert ry(home, "job", "execute", "-f", str(f), "-j", "smalljob").returncode == 0
    (run,) = Instance(home).storage.list_runs()
    fill(small_fs / "filler")
    proc = ry(home, "job", "execute", "-f", str(f), "-j", "smalljob")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "cannot rollback" not in proc.stderr
    assert f"cannot write to the run database {home / 'runyard.db'}" in proc.stderr
    assert "full" in proc.stderr
    listed = ry(home, "run", "list")
    assert listed.returncode == 0, listed.stderr
    assert run.run_id[:12] in listed.stdout and "SUCCESS" in listed.stdout
    shown = ry(home, "run", "show", run.run_id[:8])
    assert shown.returncode == 0, shown.stderr
    assert "small  success" in shown.stdout


def test_a_run_whose_worker_died_of_a_full_disk(small_fs: Path, tmp_path: Path) -> None:
    home = small_fs / "home"
    f = jobs_file(tmp_path)
    filler = small_fs / "filler"
    launched = ry(home, "job", "launch", "-f", str(f), "-j", "filling", env={"RY_FILLER": str(filler)})
    assert launched.returncode == 0, launched.stderr
    run_id = launched.stdout.strip()
    # The worker cannot write its step's events any more: it dies. Whether its failure can
    # still be recorded depends on room left in the database's journal; either way,
    # looking at the runs keeps working, without a traceback.
    deadline = time.monotonic() + 60
    while True:
        listed = ry(home, "run", "list")
        assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
        assert run_id[:12] in listed.stdout
        if "could not be checked" in listed.stderr:
            assert "cannot write to the run database" in listed.stderr
            break
        if "FAILURE" in listed.stdout:
            break
        assert time.monotonic() < deadline, listed.stdout + listed.stderr
        time.sleep(0.2)
    shown = ry(home, "run", "show", run_id)
    assert shown.returncode == 0, shown.stderr
    # Once there is room again (at the latest), the dead worker's run is failed with the reason.
    filler.unlink()
    shown = ry(home, "run", "show", run_id)
    assert shown.returncode == 0, shown.stderr
    run = Instance(home).storage.get_run(run_id)
    assert run is not None and run.status is RunStatus.FAILURE
    assert "run worker died before the run finished" in shown.stdout


# -- damaged database files -----------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"this is not a database, just some text\n" * 200])
def test_an_empty_or_corrupt_database_is_an_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    home = tmp_path / "home"
    home.mkdir()
    db = home / "runyard.db"
    db.write_bytes(content)
    for args in (["run", "list"], ["job", "execute", "-f", str(jobs_file(tmp_path)), "-j", "smalljob"]):
        proc = ry(home, *args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        assert f"the run database {db}" in proc.stderr
        assert f"mv {db} {db}.broken" in proc.stderr
    assert db.read_bytes() == content  # never silently replaced by a new history


def test_a_new_instance_still_creates_its_database(tmp_path: Path) -> None:
    home = tmp_path / "fresh"
    proc = ry(home, "run", "list")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no runs"
    assert (home / "runyard.db").stat().st_size > 0
    assert [p.name for p in home.iterdir() if p.name.endswith(".new")] == []
