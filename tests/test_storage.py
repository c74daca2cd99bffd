"""Run storage: run records, status compare-and-set, events, and concurrent writers.

Every contract test runs against each backend: SQLite (a file, and ``:memory:`` where a
test does not reopen the database) and PostgreSQL (the server at 127.0.0.1:5432, or
``$RUNYARD_TEST_POSTGRES_URL``; a fresh database for the session, a fresh schema per test).
A missing PostgreSQL server fails the postgres tests, it does not skip them:
``bash scripts/services.sh postgres`` starts one.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import yaml
from runyard import Event, EventType
from runyard.config import EnvVar
from runyard.errors import ConfigError, PluginError
from runyard.instance import Instance
from runyard.storage import RunRecord, RunStatus, RunStorage
from runyard.storage.sqlite import SqliteRunStorage

SERVER_URL = os.environ.get("RUNYARD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
START_HINT = "run `bash scripts/services.sh postgres` to start it"


# -- backends ------------------------------------------------------------------------------


def _open(kind: str, target: str, schema: str | None) -> RunStorage:
    """Open a storage; module level so that writer processes can call it."""
    if kind == "sqlite":
        return SqliteRunStorage(target)
    from runyard.storage.postgres import PostgresRunStorage

    return PostgresRunStorage(target, schema=schema)


@attrs.frozen
class Backend:
    """One database of one kind; `open` gives a new storage object on it."""

    kind: str  # "sqlite" | "postgres"
    target: str  # the SQLite file, or the PostgreSQL URL
    schema: str | None = None

    def open(self) -> RunStorage:
        return _open(self.kind, self.target, self.schema)

    def fresh(self, name: str) -> Backend:
        """Another, not yet created, database of the same kind."""
        if self.kind == "sqlite":
            return Backend("sqlite", str(Path(self.target).parent / name / "runyard.db"))
        return Backend("postgres", self.target, f"{self.schema}_{name}")


def _server_connection(url: str):  # type: ignore[no-untyped-def]
    import psycopg

    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        reason = " ".join(str(e).split())
    # Outside the except block, so the report is this message alone.
    pytest.fail(f"PostgreSQL is not reachable at {url} ({reason}); the storage tests need it: {START_HINT}",
                pytrace=False)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database of its own for this test session, dropped at the end."""
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    admin = _server_connection(SERVER_URL)
    name = f"runyard_test_{uuid.uuid4().hex[:12]}"
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(SERVER_URL, dbname=name)
    finally:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


@pytest.fixture
def pg_schema(pg_url: str) -> Iterator[str]:
    """A schema name of its own for this test; dropped (with every ``<name>_*``) afterwards."""
    import psycopg
    from psycopg import sql

    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname = %s OR nspname LIKE %s", (name, f"{name}\\_%")
        ).fetchall()
        for (schema,) in rows:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A database that can be opened again, from this process or others."""
    if request.param == "sqlite":
        return Backend("sqlite", str(tmp_path / "runs.db"))
    return Backend("postgres", request.getfixturevalue("pg_url"), request.getfixturevalue("pg_schema"))


@pytest.fixture(params=["sqlite-file", "sqlite-memory", "postgres"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunStorage]:
    if request.param == "sqlite-file":
        s: RunStorage = SqliteRunStorage(tmp_path / "runs.db")
    elif request.param == "sqlite-memory":
        s = SqliteRunStorage(":memory:")
    else:
        s = _open("postgres", request.getfixturevalue("pg_url"), request.getfixturevalue("pg_schema"))
    yield s
    s.close()


# -- run records ---------------------------------------------------------------------------


def _full_run(**kw) -> RunRecord:  # type: ignore[no-untyped-def]
    base = dict(
        job_name="nightly",
        code_pointer={"file": "/srv/jobs/nightly.py", "attribute": "nightly"},
        run_config={"ops": {"threshold": 3, "names": ["a", "b"]}, "execution": {"in_process": {}}, "x": None,
                    "f": 0.1 + 0.2, "big": 2**62, "tiny": 5e-324},
        executor="in_process",
        tags={"team": "data", "ünï": "✓"},
        status=RunStatus.QUEUED,
        created_at=1700000000.123456789,
        started_at=1700000001.5,
        ended_at=1700000002.75,
        parent_run_id="p" * 32,
        step_selection=["transform", "load_*"],
    )
    base.update(kw)
    return RunRecord(**base)  # type: ignore[arg-type]


def test_run_record_round_trip(storage: RunStorage) -> None:
    run = _full_run()
    storage.add_run(run)
    assert storage.get_run(run.run_id) == run
    back_full = storage.get_run(run.run_id)
    assert back_full is not None and back_full.created_at == 1700000000.123456789  # every bit of the float
    minimal = RunRecord(job_name="tiny")
    storage.add_run(minimal)
    back = storage.get_run(minimal.run_id)
    assert back == minimal
    assert back is not None and back.parent_run_id is None and back.step_selection is None
    assert back.code_pointer is None and back.tags == {} and back.run_config == {}
    assert storage.get_run("missing") is None


def test_run_record_survives_reopening(backend: Backend) -> None:
    run = _full_run()
    first = backend.open()
    first.add_run(run)
    first.close()
    second = backend.open()
    assert second.get_run(run.run_id) == run
    second.close()


def test_duplicate_run_id_is_rejected(storage: RunStorage) -> None:
    run = _full_run()
    storage.add_run(run)
    with pytest.raises(Exception):  # noqa: B017 - the driver's integrity error
        storage.add_run(run)
    assert storage.get_run(run.run_id) == run
    other = RunRecord(job_name="after")  # the storage still works after the failed insert
    storage.add_run(other)
    assert storage.get_run(other.run_id) == other


def test_list_runs_newest_first_and_by_status(storage: RunStorage) -> None:
    runs = [RunRecord(job_name=f"j{i}", created_at=1000.0 + i) for i in range(5)]
    for r in runs:
        storage.add_run(r)
    storage.set_run_status(runs[1].run_id, RunStatus.SUCCESS)
    storage.set_run_status(runs[3].run_id, RunStatus.FAILURE)
    assert [r.job_name for r in storage.list_runs()] == ["j4", "j3", "j2", "j1", "j0"]
    assert [r.job_name for r in storage.list_runs(limit=2)] == ["j4", "j3"]
    finished = storage.list_runs(statuses=[RunStatus.SUCCESS, RunStatus.FAILURE])
    assert [r.job_name for r in finished] == ["j3", "j1"]
    assert storage.list_runs(statuses=[]) == []


def test_set_run_status_stamps_times(storage: RunStorage) -> None:
    run = RunRecord(job_name="j")
    storage.add_run(run)
    before = time.time()
    assert storage.set_run_status(run.run_id, RunStatus.STARTED)
    started = storage.get_run(run.run_id)
    assert started is not None and started.status is RunStatus.STARTED
    assert started.started_at is not None and started.started_at >= before and started.ended_at is None
    assert storage.set_run_status(run.run_id, RunStatus.SUCCESS)
    ended = storage.get_run(run.run_id)
    assert ended is not None and ended.status is RunStatus.SUCCESS
    assert ended.ended_at is not None and ended.ended_at >= started.started_at
    assert ended.started_at == started.started_at
    assert not storage.set_run_status("missing", RunStatus.SUCCESS)


def test_set_run_status_only_from_is_compare_and_set(storage: RunStorage) -> None:
    run = RunRecord(job_name="j", status=RunStatus.STARTED)
    storage.add_run(run)
    # Two racers try to end the run: only the first wins.
    assert storage.set_run_status(run.run_id, RunStatus.CANCELED, only_from=[RunStatus.STARTED, RunStatus.CANCELING])
    assert not storage.set_run_status(run.run_id, RunStatus.SUCCESS, only_from=[RunStatus.STARTED])
    got = storage.get_run(run.run_id)
    assert got is not None and got.status is RunStatus.CANCELED
    assert not storage.set_run_status(run.run_id, RunStatus.STARTED, only_from=[])
    assert storage.get_run(run.run_id).status is RunStatus.CANCELED  # type: ignore[union-attr]
    assert storage.set_run_status(run.run_id, RunStatus.FAILURE, only_from=[RunStatus.CANCELED])


def _race_to_end(storage: RunStorage, run_id: str, targets: list[RunStatus]) -> list[RunStatus]:
    """Every target status from its own thread at once, only from STARTED; return the winners."""
    barrier = threading.Barrier(len(targets))
    wins: list[RunStatus] = []

    def race(status: RunStatus) -> None:
        barrier.wait(timeout=30)
        if storage.set_run_status(run_id, status, only_from=[RunStatus.STARTED]):
            wins.append(status)

    threads = [threading.Thread(target=race, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return wins


def test_compare_and_set_has_one_winner_among_threads(storage: RunStorage) -> None:
    for round_ in range(5):
        run = RunRecord(job_name=f"race{round_}", status=RunStatus.STARTED)
        storage.add_run(run)
        wins = _race_to_end(storage, run.run_id, [RunStatus.SUCCESS, RunStatus.FAILURE, RunStatus.CANCELED] * 4)
        assert len(wins) == 1, wins
        final = storage.get_run(run.run_id)
        assert final is not None and final.status is wins[0] and final.ended_at is not None


def test_transition_run_has_one_winner_and_only_its_events(storage: RunStorage) -> None:
    run = RunRecord(job_name="ends", status=RunStatus.STARTED)
    storage.add_run(run)
    barrier = threading.Barrier(6)
    wins: list[str] = []

    def race(i: int) -> None:
        barrier.wait(timeout=30)
        ev = Event(type=EventType.RUN_FAILURE, run_id=run.run_id, message=f"racer {i}")
        if storage.transition_run(run.run_id, RunStatus.FAILURE, [ev], only_from=[RunStatus.STARTED],
                                  ended_at=1000.0 + i):
            wins.append(f"racer {i}")

    threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(wins) == 1, wins
    assert [s.event.message for s in storage.get_events(run.run_id)] == wins
    final = storage.get_run(run.run_id)
    assert final is not None and final.status is RunStatus.FAILURE
    assert final.ended_at == 1000.0 + int(wins[0].split()[1])  # the given time, not now


def test_transition_run_is_one_change_a_failed_event_write_keeps_the_status(
    storage: RunStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stands in for a crash between the two writes: the event insert fails after the status
    update ran in the same transaction. Status then event as two writes would leave FAILURE
    with no reason."""
    run = RunRecord(job_name="torn", status=RunStatus.STARTED)
    storage.add_run(run)
    if isinstance(storage, SqliteRunStorage):
        monkeypatch.setattr("runyard.storage.sqlite._INSERT_EVENT", "INSERT INTO no_such_table VALUES (?, ?, ?, ?, ?)")
    else:
        from psycopg import sql

        monkeypatch.setattr(storage, "_insert_event", sql.SQL("INSERT INTO no_such_table VALUES (%s, %s, %s, %s, %s)"))
    ev = Event(type=EventType.RUN_FAILURE, run_id=run.run_id, message="worker lost")
    with pytest.raises(Exception, match="no_such_table"):
        storage.transition_run(run.run_id, RunStatus.FAILURE, [ev], only_from=[RunStatus.STARTED])
    got = storage.get_run(run.run_id)
    assert got is not None and got.status is RunStatus.STARTED and got.ended_at is None
    assert storage.get_events(run.run_id) == []
    monkeypatch.undo()
    assert storage.transition_run(run.run_id, RunStatus.FAILURE, [ev], only_from=[RunStatus.STARTED])
    assert [s.event.type for s in storage.get_events(run.run_id)] == [EventType.RUN_FAILURE]


def test_fail_run_writes_its_reason_with_the_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`runyard.runs.fail_run` (the daemon's and `run show`'s way to end a lost run): the
    FAILURE status, its RUN_FAILURE event and the time of death are one change."""
    from runyard.runs import fail_run

    inst = Instance(tmp_path)
    run = RunRecord(job_name="lost", status=RunStatus.STARTED)
    inst.storage.add_run(run)
    monkeypatch.setattr("runyard.storage.sqlite._INSERT_EVENT", "INSERT INTO no_such_table VALUES (?, ?, ?, ?, ?)")
    with pytest.raises(Exception, match="no_such_table"):
        fail_run(inst, run.run_id, "worker gone", died_at=1234.5)
    assert inst.storage.get_run(run.run_id).status is RunStatus.STARTED  # type: ignore[union-attr]
    monkeypatch.undo()
    assert fail_run(inst, run.run_id, "worker gone", died_at=1234.5)
    assert not fail_run(inst, run.run_id, "second opinion")
    got = inst.storage.get_run(run.run_id)
    assert got is not None and got.status is RunStatus.FAILURE and got.ended_at == 1234.5
    [stored] = inst.storage.get_events(run.run_id)
    assert stored.event.type is EventType.RUN_FAILURE and stored.event.message == "worker gone"
    assert stored.event.data["died_at"] == 1234.5 and stored.event.data["failure"]["message"] == "worker gone"


# -- events --------------------------------------------------------------------------------


def _events(run_id: str) -> list[Event]:
    return [
        Event(type=EventType.RUN_START, run_id=run_id, timestamp=1.0),
        Event(type=EventType.STEP_START, run_id=run_id, step_key="a", attempt=1, attempt_id="x1", timestamp=2.0),
        Event(type=EventType.STEP_STDOUT, run_id=run_id, step_key="a", attempt=1, data={"text": "hi\n"}, timestamp=3.0),
        Event(type=EventType.STEP_SUCCESS, run_id=run_id, step_key="a", attempt=1, timestamp=4.0),
        Event(type=EventType.STEP_START, run_id=run_id, step_key="b", attempt=1, timestamp=5.0),
        Event(type=EventType.STEP_FAILURE, run_id=run_id, step_key="b", attempt=1, message="boom",
              data={"failure": {"kind": "error", "message": "boom"}}, timestamp=6.0),
        Event(type=EventType.RUN_FAILURE, run_id=run_id, message="step(s) failed: b", timestamp=7.0),
    ]


def test_events_round_trip_in_order(storage: RunStorage) -> None:
    evs = _events("r1")
    storage.store_events(evs[:3])
    storage.store_events([])
    storage.store_events(evs[3:])
    storage.store_events(_events("r2"))
    stored = storage.get_events("r1")
    assert [s.event for s in stored] == evs
    ids = [s.id for s in stored]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert storage.get_events("nope") == []


def test_event_payloads_round_trip_exactly(storage: RunStorage) -> None:
    odd = Event(
        type=EventType.STEP_LOG,
        run_id="r-odd",
        step_key="ü/step",
        timestamp=1712345678.987654321,
        message="nul \x00 and 'quotes' \"and\" emoji 🚀",
        data={"f": 0.1 + 0.2, "neg": -0.0, "big": 10**30, "nested": {"l": [1, None, True]}, "s": "\x00\u2028"},
    )
    storage.store_events([odd])
    (back,) = storage.get_events("r-odd")
    assert back.event == odd
    assert back.event.timestamp == 1712345678.987654321


def test_event_filters(storage: RunStorage) -> None:
    evs = _events("r1")
    storage.store_events(evs)
    storage.store_events(_events("r2"))
    by_step = storage.get_events("r1", step_key="a")
    assert [s.event for s in by_step] == evs[1:4]
    by_type = storage.get_events("r1", types=[EventType.STEP_START, EventType.RUN_FAILURE])
    assert [s.event for s in by_type] == [evs[1], evs[4], evs[6]]
    both = storage.get_events("r1", step_key="b", types=[EventType.STEP_FAILURE])
    assert [s.event for s in both] == [evs[5]]
    assert storage.get_events("r1", types=[]) == []
    all_ = storage.get_events("r1")
    after = storage.get_events("r1", after_id=all_[3].id)
    assert [s.event for s in after] == evs[4:]
    assert storage.get_events("r1", after_id=all_[-1].id) == []
    tail = storage.get_events("r1", after_id=all_[1].id, step_key="a")
    assert [s.event for s in tail] == evs[2:4]


def test_delete_run_removes_run_and_its_events(storage: RunStorage) -> None:
    keep, drop = RunRecord(job_name="keep"), RunRecord(job_name="drop")
    storage.add_run(keep)
    storage.add_run(drop)
    storage.store_events(_events(keep.run_id))
    storage.store_events(_events(drop.run_id))
    storage.delete_run(drop.run_id)
    assert storage.get_run(drop.run_id) is None
    assert storage.get_events(drop.run_id) == []
    assert storage.get_run(keep.run_id) == keep
    assert len(storage.get_events(keep.run_id)) == 7
    storage.delete_run("missing")  # deleting nothing is fine


def test_threads_sharing_one_storage(storage: RunStorage) -> None:
    run = RunRecord(job_name="threads")
    storage.add_run(run)
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for i in range(0, 100, 5):
                storage.store_events([
                    Event(type=EventType.STEP_LOG, run_id=run.run_id, step_key=f"t{worker}",
                          data={"worker": worker, "i": j})
                    for j in range(i, i + 5)
                ])
                assert storage.get_run(run.run_id) is not None
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    stored = storage.get_events(run.run_id)
    assert len(stored) == 800
    for w in range(8):
        assert [s.event.data["i"] for s in stored if s.event.data["worker"] == w] == list(range(100))


# -- several processes at once -------------------------------------------------------------

WRITERS = 8
EVENTS_PER_WRITER = 200
BATCH = 10


def _writer(db: tuple[str, str, str | None], run_id: str, worker: int,
            barrier: multiprocessing.synchronize.Barrier, open_first: bool, count: int) -> None:
    if open_first:
        storage = _open(*db)
        barrier.wait(timeout=60)
    else:
        barrier.wait(timeout=60)
        storage = _open(*db)  # every writer opens (and creates) the database at once
    for start in range(0, count, BATCH):
        storage.store_events([
            Event(type=EventType.STEP_LOG, run_id=run_id, step_key=f"w{worker}", message=str(i),
                  data={"worker": worker, "i": i})
            for i in range(start, min(start + BATCH, count))
        ])
    storage.close()


def _start_writers(backend: Backend, run_id: str, *, open_first: bool = True,
                   count: int = EVENTS_PER_WRITER) -> list[multiprocessing.Process]:
    # fork starts much faster than spawn; the parent holds no open connection meanwhile.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    barrier = ctx.Barrier(WRITERS)
    db = (backend.kind, backend.target, backend.schema)
    procs = [
        ctx.Process(target=_writer, args=(db, run_id, w, barrier, open_first, count))
        for w in range(WRITERS)
    ]
    for p in procs:
        p.start()
    return procs  # type: ignore[return-value]


def _join(procs: list[multiprocessing.Process]) -> None:
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * WRITERS, "a writer process failed (see its traceback above)"


def _run_writers(backend: Backend, run_id: str, *, open_first: bool = True, count: int = EVENTS_PER_WRITER) -> None:
    _join(_start_writers(backend, run_id, open_first=open_first, count=count))


def _check_all_stored(storage: RunStorage, run_id: str, count: int = EVENTS_PER_WRITER) -> None:
    stored = storage.get_events(run_id)
    assert len(stored) == WRITERS * count
    seen = {(s.event.data["worker"], s.event.data["i"]) for s in stored}
    assert seen == {(w, i) for w in range(WRITERS) for i in range(count)}
    for w in range(WRITERS):
        mine = [s.event.data["i"] for s in stored if s.event.data["worker"] == w]
        assert mine == list(range(count))  # each writer's events keep their order


def test_concurrent_writers_lose_nothing(backend: Backend) -> None:
    storage = backend.open()
    run = RunRecord(job_name="concurrent")
    storage.add_run(run)
    storage.close()
    _run_writers(backend, run.run_id)
    storage = backend.open()
    _check_all_stored(storage, run.run_id)
    storage.close()


def test_tailing_with_after_id_misses_nothing_while_processes_write(backend: Backend) -> None:
    # A reader follows a run with after_id=<last id seen> while 8 processes append to it:
    # ids must grow in commit order, or an event committed late with a smaller id is lost.
    storage = backend.open()
    storage.close()  # the parent holds no connection across fork
    procs = _start_writers(backend, "tailed")
    storage = backend.open()
    seen: list[int] = []
    last = 0
    while any(p.is_alive() for p in procs):
        for s in storage.get_events("tailed", after_id=last):
            seen.append(s.id)
            last = s.id
    _join(procs)
    for s in storage.get_events("tailed", after_id=last):
        seen.append(s.id)
    assert seen == [s.id for s in storage.get_events("tailed")]
    assert len(seen) == WRITERS * EVENTS_PER_WRITER
    storage.close()


def test_processes_opening_a_fresh_database_at_once(backend: Backend) -> None:
    # Step workers of a new instance may all open (and so create) the database at the same
    # moment. The race is short, so try it several times.
    for round_ in range(40):
        fresh = backend.fresh(f"fresh{round_}")
        _run_writers(fresh, "fresh-run", open_first=False, count=BATCH)
        storage = fresh.open()
        _check_all_stored(storage, "fresh-run", count=BATCH)
        storage.close()


# -- PostgreSQL only -----------------------------------------------------------------------


def _fork_child_uses(storage: RunStorage, run_id: str) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            storage.store_events([Event(type=EventType.STEP_LOG, run_id=run_id, message="from the child")])
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_postgres_forked_child_leaves_the_parents_connections_alone(pg_url: str, pg_schema: str) -> None:
    storage = _open("postgres", pg_url, pg_schema)
    storage.store_events([Event(type=EventType.STEP_LOG, run_id="f", message="from the parent")])
    assert _fork_child_uses(storage, "f") == 0
    # The parent's pooled connection still works: the child neither used nor closed it.
    storage.store_events([Event(type=EventType.STEP_LOG, run_id="f", message="parent again")])
    assert [s.event.message for s in storage.get_events("f")] == ["from the parent", "from the child", "parent again"]
    storage.close()


def test_postgres_tables_live_in_the_configured_schema(pg_url: str, pg_schema: str) -> None:
    import psycopg

    storage = _open("postgres", pg_url, pg_schema)
    storage.add_run(RunRecord(job_name="j"))
    storage.close()
    with psycopg.connect(pg_url) as conn:
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", (pg_schema,)
        ).fetchall()
    assert tables == [("runyard_events",), ("runyard_runs",)]


def _terminate_runyard_connections(pg_url: str) -> int:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as admin:
        return len(admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'runyard' AND datname = current_database()"
        ).fetchall())


def test_postgres_reconnects_after_the_server_drops_its_connections(pg_url: str, pg_schema: str) -> None:
    # A restarted server, a failover or an admin drops the pooled idle connections: the
    # next calls, reads and writes alike, notice it and reconnect instead of failing.
    storage = _open("postgres", pg_url, pg_schema)
    storage.add_run(RunRecord(job_name="before"))
    assert _terminate_runyard_connections(pg_url) >= 1
    time.sleep(0.2)  # let the termination reach the client socket
    storage.add_run(RunRecord(job_name="after"))
    assert _terminate_runyard_connections(pg_url) >= 1
    time.sleep(0.2)
    assert sorted(r.job_name for r in storage.list_runs()) == ["after", "before"]
    storage.close()


def test_postgres_calls_retry_on_a_connection_found_dead(
    pg_url: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # When the drop is only found by using the connection, a read is repeated on a new
    # one; a write too, once the new connection shows it did not commit (never twice).
    # With reconnect_timeout 0 the write's error is raised as it was.
    import psycopg
    from runyard.storage import postgres

    monkeypatch.setattr(postgres, "_readable", lambda conn: False)
    storage = _open("postgres", pg_url, pg_schema)
    storage.add_run(run := RunRecord(job_name="kept"))
    _terminate_runyard_connections(pg_url)
    time.sleep(0.2)
    assert storage.get_run(run.run_id) == run
    _terminate_runyard_connections(pg_url)
    time.sleep(0.2)
    storage.store_events(_events(run.run_id))
    assert len(storage.get_events(run.run_id)) == 7
    _terminate_runyard_connections(pg_url)
    time.sleep(0.2)
    assert storage.set_run_status(run.run_id, RunStatus.STARTED, only_from=[RunStatus.QUEUED])
    assert storage.get_run(run.run_id).status is RunStatus.STARTED  # type: ignore[union-attr]
    storage.reconnect_timeout = 0  # type: ignore[attr-defined]
    _terminate_runyard_connections(pg_url)
    time.sleep(0.2)
    with pytest.raises(psycopg.OperationalError):
        storage.store_events(_events(run.run_id))
    storage.store_events(_events(run.run_id))
    assert len(storage.get_events(run.run_id)) == 14
    storage.close()


def test_postgres_unreachable_server_is_a_clear_error() -> None:
    from runyard.storage.postgres import PostgresRunStorage

    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        PostgresRunStorage("postgresql://runyard:s3cret-pw@127.0.0.1:1/runs", connect_timeout=3)
    message = str(info.value)
    assert time.monotonic() - start < 3
    assert "storage 'postgres'" in message and "127.0.0.1:1/runs" in message and "user 'runyard'" in message
    assert "s3cret-pw" not in message and "postgresql://" not in message
    assert "Check that the server is running" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no psycopg traceback


def test_postgres_silent_server_times_out() -> None:
    # A server that accepts the TCP connection and then says nothing (a wedged proxy, a
    # half-dead pod) must give an error after connect_timeout, not hang.
    from runyard.storage.postgres import PostgresRunStorage

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(ConfigError) as info:
            PostgresRunStorage(f"postgresql://u:pw-secret@127.0.0.1:{port}/db", connect_timeout=2)
        elapsed = time.monotonic() - start
    assert 1.5 < elapsed < 10, elapsed
    assert f"127.0.0.1:{port}/db" in str(info.value) and "pw-secret" not in str(info.value)
    assert "timeout" in str(info.value)


def _factory_config(**kw):  # type: ignore[no-untyped-def]
    from runyard.config import structure
    from runyard_local.postgres_plugin import PostgresConfig

    return structure(kw, PostgresConfig, source="test", path="storage.postgres")


def test_postgres_url_from_env(pg_url: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from runyard_local.storages import create_postgres_storage

    config = _factory_config(url={"env": "RY_PG_URL"}, schema=pg_schema)
    assert config.url == EnvVar("RY_PG_URL")
    monkeypatch.delenv("RY_PG_URL", raising=False)
    with pytest.raises(ConfigError, match=r"^test: storage.postgres.url: environment variable 'RY_PG_URL' is not set"):
        create_postgres_storage(config, Path("."))
    monkeypatch.setenv("RY_PG_URL", pg_url)
    storage = create_postgres_storage(config, Path("."))
    run = RunRecord(job_name="from-env")
    storage.add_run(run)
    assert storage.get_run(run.run_id) == run
    assert pg_url not in repr(storage)
    storage.close()


def test_postgres_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="storage.postgres.url: required key 'url' is missing"):
        _factory_config()
    with pytest.raises(ConfigError, match="connect_timeout"):
        _factory_config(url="postgresql://h/db", connect_timeout=0)
    with pytest.raises(ConfigError, match="unknown key 'password'"):
        _factory_config(url="postgresql://h/db", password="x")
    assert _factory_config(url="postgresql://h/db").connect_timeout == 10


def test_postgres_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from runyard_local.storages import create_postgres_storage

    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ImportError
    monkeypatch.delitem(sys.modules, "runyard.storage.postgres", raising=False)
    with pytest.raises(PluginError, match=r'pip install "runyard\[postgres\]"'):
        create_postgres_storage(_factory_config(url="postgresql://h/db"), Path("."))


def test_postgres_plugin_discovery_does_not_import_psycopg(tmp_path: Path) -> None:
    import subprocess

    (tmp_path / "runyard.yaml").write_text("storage:\n  postgres:\n    url: {env: RY_PG_URL}\n")
    code = (
        "import sys\n"
        "from runyard.instance import Instance\n"
        f"inst = Instance({str(tmp_path)!r})\n"
        "assert inst.validate() == [], inst.validate()\n"
        "spec = inst.registry.storage('postgres')\n"
        "assert spec.extra == 'postgres', spec\n"
        "assert 'psycopg' not in sys.modules, 'discovery imported psycopg'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_postgres_instance_runs_a_job_end_to_end(
    pg_url: str, pg_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import psycopg
    from psycopg.conninfo import make_conninfo
    from runyard.testing.jobs import chain_job

    # Trust auth ignores the password; it is there to prove it is never written anywhere.
    url = make_conninfo(pg_url, password="hunter2-not-stored")
    monkeypatch.setenv("RY_PG_URL", url)
    (tmp_path / "runyard.yaml").write_text(
        yaml.safe_dump({"storage": {"postgres": {"url": {"env": "RY_PG_URL"}, "schema": pg_schema}}})
    )
    caplog.set_level(logging.DEBUG)
    inst = Instance(tmp_path)
    assert type(inst.storage).__name__ == "PostgresRunStorage"
    result = chain_job.execute_in_process(instance=inst)
    assert result.success
    run_id = result.run_id
    inst.storage.close()

    with psycopg.connect(pg_url) as conn:
        (status, job_name) = conn.execute(
            f'SELECT status, job_name FROM "{pg_schema}".runyard_runs WHERE run_id = %s', (run_id,)
        ).fetchone()
        types = [t for (t,) in conn.execute(
            f'SELECT type FROM "{pg_schema}".runyard_events WHERE run_id = %s ORDER BY id', (run_id,)
        ).fetchall()]
        everything = conn.execute(
            f'SELECT string_agg(r::text, \'\') FROM (SELECT * FROM "{pg_schema}".runyard_runs) r'
        ).fetchone()[0] + conn.execute(
            f'SELECT string_agg(e::text, \'\') FROM (SELECT * FROM "{pg_schema}".runyard_events) e'
        ).fetchone()[0]
    assert (status, job_name) == ("SUCCESS", "chain_job")
    assert types[0] == "RUN_START" and types[-1] == "RUN_SUCCESS"
    assert types.count("STEP_SUCCESS") == 3
    assert "hunter2" not in everything and "hunter2" not in caplog.text

    # Another process of the deployment (a fresh Instance) sees the same run.
    again = Instance(tmp_path)
    stored = again.storage.get_run(run_id)
    assert stored is not None and stored.status is RunStatus.SUCCESS and stored.ended_at is not None
    assert [s.event.type.value for s in again.storage.get_events(run_id)] == types
    again.storage.close()


def test_postgres_instance_with_unreachable_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RY_PG_URL", "postgresql://ry:pw-secret@127.0.0.1:1/runs")
    (tmp_path / "runyard.yaml").write_text("storage:\n  postgres:\n    url: {env: RY_PG_URL}\n    connect_timeout: 2\n")
    with pytest.raises(ConfigError, match=r"storage 'postgres': cannot connect to PostgreSQL at 127\.0\.0\.1:1/runs"):
        Instance(tmp_path).storage  # noqa: B018




def test_page_runs_filters_pages_and_counts(storage: RunStorage) -> None:
    """What the runs page of `runyard ui` asks: by job, status, tag and parent, newest first,
    one page at a time with the total; the SQL of each storage agrees with the generic
    implementation third-party storages inherit."""
    from runyard.storage import RunFilter

    t = 1_000_000.0
    for i in range(30):
        storage.add_run(RunRecord(
            run_id=f"r{i:02d}", job_name="etl" if i % 3 else "report", created_at=t + i,
            status=RunStatus.SUCCESS if i % 2 else RunStatus.FAILURE,
            tags={"team": "data" if i < 10 else "web", "odd.key 'q'": str(i)},
            parent_run_id="r00" if i in (5, 7) else None,
        ))
    cases = [
        (RunFilter(), 30),
        (RunFilter(job_name="report"), 10),
        (RunFilter(statuses=(RunStatus.FAILURE,)), 15),
        (RunFilter(job_name="etl", statuses=(RunStatus.SUCCESS,), tag=("team", "data")), 3),
        (RunFilter(tag=("odd.key 'q'", "7")), 1),
        (RunFilter(parent_run_id="r00"), 2),
        (RunFilter(job_name="nope"), 0),
        # `run list --since/--until`: created at or after, and before.
        (RunFilter(created_after=t + 20), 10),
        (RunFilter(created_before=t + 5), 5),
        (RunFilter(created_after=t + 10, created_before=t + 20, job_name="report"), 3),
    ]
    for where, expected in cases:
        runs, total = storage.page_runs(where, limit=4, offset=1)
        generic = RunStorage.page_runs(storage, where, limit=4, offset=1)
        assert total == expected, where
        assert [r.run_id for r in runs] == [r.run_id for r in generic[0]], where
        assert generic[1] == expected
        assert all(where.matches(r) for r in runs)
        assert [r.created_at for r in runs] == sorted((r.created_at for r in runs), reverse=True)
    page2, _ = storage.page_runs(RunFilter(), limit=10, offset=10)
    assert [r.run_id for r in page2] == [f"r{i:02d}" for i in range(19, 9, -1)]


def test_get_events_json_is_get_events_as_stored_text(storage: RunStorage) -> None:
    import json

    storage.add_run(RunRecord(run_id="rj", job_name="j"))
    storage.store_events([
        Event(type=EventType.STEP_START, run_id="rj", step_key="a", attempt=1),
        Event(type=EventType.STEP_STDOUT, run_id="rj", step_key="a", data={"text": "hi\n"}),
        Event(type=EventType.STEP_SUCCESS, run_id="rj", step_key="a", attempt=1),
        Event(type=EventType.STEP_START, run_id="rj", step_key="b", attempt=1),
    ])
    for kwargs in ({}, {"step_key": "a"}, {"types": [EventType.STEP_START]}, {"after_id": 2}):
        full = storage.get_events("rj", **kwargs)  # type: ignore[arg-type]
        raw = storage.get_events_json("rj", **kwargs)  # type: ignore[arg-type]
        generic = RunStorage.get_events_json(storage, "rj", **kwargs)  # type: ignore[arg-type]
        assert [i for i, _ in raw] == [s.id for s in full] == [i for i, _ in generic]
        assert [json.loads(b) for _, b in raw] == [s.event.to_dict() for s in full]
    assert [i for i, _ in storage.get_events_json("rj", limit=2)] == [s.id for s in storage.get_events("rj")][:2]
