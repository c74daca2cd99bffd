"""SQLite run storage: run records, status compare-and-set, events, and concurrent writers."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
from runyard import Event, EventType
from runyard.storage import RunRecord, RunStatus
from runyard.storage.sqlite import SqliteRunStorage


@pytest.fixture(params=["file", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> SqliteRunStorage:
    s = SqliteRunStorage(tmp_path / "runs.db" if request.param == "file" else ":memory:")
    yield s
    s.close()


def _full_run(**kw) -> RunRecord:  # type: ignore[no-untyped-def]
    base = dict(
        job_name="nightly",
        code_pointer={"file": "/srv/jobs/nightly.py", "attribute": "nightly"},
        run_config={"ops": {"threshold": 3, "names": ["a", "b"]}, "execution": {"in_process": {}}, "x": None},
        executor="in_process",
        tags={"team": "data", "ünï": "✓"},
        status=RunStatus.QUEUED,
        created_at=1700000000.25,
        started_at=1700000001.5,
        ended_at=1700000002.75,
        parent_run_id="p" * 32,
        step_selection=["transform", "load_*"],
    )
    base.update(kw)
    return RunRecord(**base)  # type: ignore[arg-type]


def test_run_record_round_trip(storage: SqliteRunStorage) -> None:
    run = _full_run()
    storage.add_run(run)
    assert storage.get_run(run.run_id) == run
    minimal = RunRecord(job_name="tiny")
    storage.add_run(minimal)
    back = storage.get_run(minimal.run_id)
    assert back == minimal
    assert back is not None and back.parent_run_id is None and back.step_selection is None
    assert back.code_pointer is None and back.tags == {} and back.run_config == {}
    assert storage.get_run("missing") is None


def test_run_record_survives_reopening(tmp_path: Path) -> None:
    run = _full_run()
    first = SqliteRunStorage(tmp_path / "runs.db")
    first.add_run(run)
    first.close()
    second = SqliteRunStorage(tmp_path / "runs.db")
    assert second.get_run(run.run_id) == run
    second.close()


def test_duplicate_run_id_is_rejected(storage: SqliteRunStorage) -> None:
    run = _full_run()
    storage.add_run(run)
    with pytest.raises(Exception):  # noqa: B017 - sqlite3.IntegrityError
        storage.add_run(run)
    assert storage.get_run(run.run_id) == run


def test_list_runs_newest_first_and_by_status(storage: SqliteRunStorage) -> None:
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


def test_set_run_status_stamps_times(storage: SqliteRunStorage) -> None:
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


def test_set_run_status_only_from_is_compare_and_set(storage: SqliteRunStorage) -> None:
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


def test_events_round_trip_in_order(storage: SqliteRunStorage) -> None:
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


def test_event_filters(storage: SqliteRunStorage) -> None:
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


def test_delete_run_removes_run_and_its_events(storage: SqliteRunStorage) -> None:
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


# -- several processes at once -------------------------------------------------------------

WRITERS = 8
EVENTS_PER_WRITER = 200
BATCH = 10


def _writer(path: str, run_id: str, worker: int, barrier: multiprocessing.synchronize.Barrier,
            open_first: bool, count: int) -> None:
    if open_first:
        storage = SqliteRunStorage(path)
        barrier.wait(timeout=60)
    else:
        barrier.wait(timeout=60)
        storage = SqliteRunStorage(path)  # every writer opens (and creates) the database at once
    for start in range(0, count, BATCH):
        storage.store_events([
            Event(type=EventType.STEP_LOG, run_id=run_id, step_key=f"w{worker}", message=str(i),
                  data={"worker": worker, "i": i})
            for i in range(start, min(start + BATCH, count))
        ])
    storage.close()


def _run_writers(path: Path, run_id: str, *, open_first: bool = True, count: int = EVENTS_PER_WRITER) -> None:
    # fork starts much faster than spawn; the parent holds no open connection meanwhile.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    barrier = ctx.Barrier(WRITERS)
    procs = [
        ctx.Process(target=_writer, args=(str(path), run_id, w, barrier, open_first, count))
        for w in range(WRITERS)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * WRITERS, "a writer process failed (see its traceback above)"


def _check_all_stored(storage: SqliteRunStorage, run_id: str, count: int = EVENTS_PER_WRITER) -> None:
    stored = storage.get_events(run_id)
    assert len(stored) == WRITERS * count
    seen = {(s.event.data["worker"], s.event.data["i"]) for s in stored}
    assert seen == {(w, i) for w in range(WRITERS) for i in range(count)}
    for w in range(WRITERS):
        mine = [s.event.data["i"] for s in stored if s.event.data["worker"] == w]
        assert mine == list(range(count))  # each writer's events keep their order


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    storage = SqliteRunStorage(path)
    run = RunRecord(job_name="concurrent")
    storage.add_run(run)
    storage.close()
    _run_writers(path, run.run_id)
    storage = SqliteRunStorage(path)
    _check_all_stored(storage, run.run_id)
    storage.close()


def test_processes_opening_a_fresh_database_at_once(tmp_path: Path) -> None:
    # Step workers of a new instance may all open (and so create) runyard.db at the same
    # moment. The race is short, so try it several times.
    for round_ in range(40):
        path = tmp_path / f"fresh{round_}" / "runyard.db"
        _run_writers(path, "fresh-run", open_first=False, count=BATCH)
        storage = SqliteRunStorage(path)
        _check_all_stored(storage, "fresh-run", count=BATCH)
        storage.close()
