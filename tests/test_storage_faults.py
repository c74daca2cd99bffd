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
from runyard.outputs import _RECORD, PACK_MAGIC, PACK_PREFIX, FileOutputStore
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
    """Leftovers of a failed output write: a temporary file (the older one-file-per-output
    layout), or a pack file holding more than its magic and complete records (a partial
    record that was not cut off again)."""
    found = [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    for pack in root.rglob(".pack-*"):
        store = FileOutputStore(pack.parent.parent)
        data = pack.read_bytes()
        offset = len(PACK_MAGIC)
        while offset < len(data):  # walk the records by their headers
            if offset + _RECORD.size > len(data):
                found.append(pack)
                break
            _, _, klen, dlen = _RECORD.unpack_from(data, offset)
            key = data[offset + _RECORD.size:offset + _RECORD.size + klen].decode()
            ref = f"{pack.parent.name}/{key}/{pack.name[len(PACK_PREFIX):]}.{offset}.{_RECORD.size + klen + dlen}"
            try:
                store.get(ref)
            except KeyError:
                found.append(pack)
                break
            offset += _RECORD.size + klen + dlen
    return found


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


def test_a_full_disk_mid_pack_keeps_the_run_s_earlier_outputs_and_gives_the_space_back(small_fs: Path) -> None:
    # Outputs share one pack file per process and run (issue 18): a failed append is cut off
    # again, and the records before it are never rewritten.
    store = FileOutputStore(small_fs / "outputs")
    early = [store.put("run1", f"early{i}", bytes([i]) * 20_000) for i in range(3)]
    with pytest.raises(OSError) as info:
        store.put("run1", "big", b"x" * 1_000_000)
    assert info.value.errno == errno.ENOSPC
    assert [store.get(r) for r in early] == [bytes([i]) * 20_000 for i in range(3)]
    assert [FileOutputStore(small_fs / "outputs").get(r) for r in early] == [bytes([i]) * 20_000 for i in range(3)]
    (pack,) = (small_fs / "outputs" / "run1").iterdir()
    assert pack.stat().st_size < 70_000  # the partial record is gone
    after = store.put("run1", "after", b"y" * 50_000)
    assert store.get(after) == b"y" * 50_000 and store.get(early[0]) == bytes([0]) * 20_000


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


# -- PostgreSQL: connection loss during a run ----------------------------------------------------

PG_SERVER = os.environ.get("RUNYARD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def pg_db() -> Iterator[str]:
    """A database of its own, so an outage of it (below) disturbs nobody else's."""
    import uuid

    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    try:
        admin = psycopg.connect(PG_SERVER, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.fail(f"PostgreSQL is not reachable at {PG_SERVER}: {e}; "
                    "run `bash scripts/services.sh postgres` to start it")
    name = f"runyard_faults_{uuid.uuid4().hex[:10]}"
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(PG_SERVER, dbname=name)
    finally:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


def outage(db_url: str, seconds: float | None) -> None:
    """Make the database unreachable, as a server restart does: its connections are
    terminated and new ones refused, for ``seconds`` (None: until `end_outage`)."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict

    name = conninfo_to_dict(db_url)["dbname"]
    with psycopg.connect(PG_SERVER, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        ).fetchall()
        assert killed, "no connection of the run to terminate"
    if seconds is not None:
        time.sleep(seconds)
        end_outage(db_url)


def end_outage(db_url: str) -> None:
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict

    name = conninfo_to_dict(db_url)["dbname"]
    with psycopg.connect(PG_SERVER, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))


def test_postgres_writes_wait_out_a_short_outage_and_write_once(pg_db: str) -> None:
    import threading

    from runyard.storage.postgres import PostgresRunStorage

    storage = PostgresRunStorage(pg_db, reconnect_timeout=20)
    run = RunRecord(job_name="x")
    storage.add_run(run)
    t = threading.Thread(target=outage, args=(pg_db, 3.0))
    t.start()
    time.sleep(0.5)  # the outage has begun
    began = time.monotonic()
    storage.store_events([Event(type=EventType.ENGINE, run_id=run.run_id, message=f"e{i}") for i in range(5)])
    assert storage.set_run_status(run.run_id, RunStatus.STARTED, only_from=[RunStatus.QUEUED])
    took = time.monotonic() - began
    t.join()
    assert took > 1.5, f"the writes did not meet the outage (took {took:.1f}s)"
    assert [s.event.message for s in storage.get_events(run.run_id)] == [f"e{i}" for i in range(5)]
    assert storage.get_run(run.run_id).status is RunStatus.STARTED  # type: ignore[union-attr]
    storage.close()


def test_postgres_gives_up_after_reconnect_timeout(pg_db: str) -> None:
    from runyard.storage.postgres import PostgresRunStorage

    storage = PostgresRunStorage(pg_db, reconnect_timeout=1.5, connect_timeout=2)
    run = RunRecord(job_name="x")
    storage.add_run(run)
    outage(pg_db, None)
    try:
        began = time.monotonic()
        with pytest.raises(StorageError) as info:
            storage.store_events([Event(type=EventType.ENGINE, run_id=run.run_id, message="lost")])
        took = time.monotonic() - began
    finally:
        end_outage(pg_db)
    assert 1.4 < took < 10, took
    assert "lost the connection to PostgreSQL" in str(info.value)
    assert "within 1.5s" in str(info.value) and "storage.postgres.reconnect_timeout" in str(info.value)
    storage.close()


PG_JOB = """
import os
import time
from pathlib import Path
from runyard import job, step

@step
def first() -> int:
    Path(os.environ["RY_MARK"]).write_text("x")
    time.sleep(1)
    return 1

@step
def second(x: int) -> int:
    time.sleep(1)
    return x + 1

@step
def third(x: int) -> int:
    time.sleep(1)
    return x + 1

@job
def chain():
    third(second(first()))
"""


@pytest.mark.parametrize("command", [["job", "execute"], ["job", "launch", "--wait"]])
def test_a_run_outlives_a_postgres_outage(pg_db: str, tmp_path: Path, command: list[str]) -> None:
    import yaml

    home = tmp_path / "home"
    home.mkdir()
    (home / "runyard.yaml").write_text(
        yaml.safe_dump({"storage": {"postgres": {"url": pg_db, "reconnect_timeout": 30}}})
    )
    f = tmp_path / "chain.py"
    f.write_text(textwrap.dedent(PG_JOB))
    mark = tmp_path / "mark"
    p = subprocess.Popen([str(RUNYARD), *command, "-f", str(f)], env={
        **os.environ, "RUNYARD_HOME": str(home), "RY_MARK": str(mark)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not mark.exists():
            assert time.monotonic() < deadline and p.poll() is None, p.communicate()
            time.sleep(0.02)
        outage(pg_db, 4.0)  # longer than a step: the run's writes meet it
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out + err
    storage = Instance(home).storage
    (run,) = storage.list_runs()
    assert run.status is RunStatus.SUCCESS
    types = [s.event.type for s in storage.get_events(run.run_id)]
    assert types.count(EventType.STEP_SUCCESS) == 3 and types.count(EventType.RUN_SUCCESS) == 1
    storage.close()
