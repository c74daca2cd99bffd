"""SQLite run storage: WAL, a busy timeout, one connection per thread."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..events import Event, EventType
from ..private import create_private_file, make_private_dirs
from . import RunRecord, RunStatus, RunStorage, StoredEvent

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    job_name TEXT NOT NULL,
    code_pointer TEXT,
    run_config TEXT NOT NULL,
    executor TEXT,
    tags TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    parent_run_id TEXT,
    step_selection TEXT
);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created_at);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    step_key TEXT,
    type TEXT NOT NULL,
    timestamp REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_run ON events (run_id, id);
"""

_RUN_COLUMNS = [a.name for a in attrs.fields(RunRecord)]


class SqliteRunStorage(RunStorage):
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._memory = self.path == ":memory:"
        self._local = threading.local()
        self._lock = threading.Lock()
        if self._memory:
            # One shared connection: every thread must see the same in-memory database.
            self._shared = self._connect()
        else:
            # Owner-only whatever the umask; SQLite gives the -wal and -shm files the same mode.
            make_private_dirs(Path(self.path).parent)
            create_private_file(self.path)
        self._init_schema()

    def _init_schema(self) -> None:
        # Several processes may open a new database at once; switching it to WAL and
        # creating tables can report "locked" without waiting on the busy timeout.
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = self._conn()
                with self._lock:
                    conn.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                stale = getattr(self._local, "conn", None)
                if stale is not None and not self._memory:
                    stale.close()
                self._local.conn = None
                time.sleep(0.05)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=30000")
        if not self._memory:
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable across process crashes in WAL mode; only power loss can drop
            # the last transactions, and that is not worth an fsync per event batch.
            conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        if self._memory:
            return self._shared
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def _write(self, sql: str, params: Sequence[Any] | Iterable[Sequence[Any]], many: bool = False) -> int:
        conn = self._conn()
        with self._lock:
            # BEGIN IMMEDIATE takes the write lock up front, so concurrent writers queue on
            # the busy timeout instead of failing with "database is locked" mid-transaction.
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.executemany(sql, params) if many else conn.execute(sql, params)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return cur.rowcount

    def add_run(self, run: RunRecord) -> None:
        d = attrs.asdict(run, recurse=False)
        for k in ("code_pointer", "run_config", "tags", "step_selection"):
            d[k] = json.dumps(d[k], default=str) if d[k] is not None else None
        d["status"] = run.status.value
        self._write(
            f"INSERT INTO runs ({', '.join(_RUN_COLUMNS)}) VALUES ({', '.join('?' * len(_RUN_COLUMNS))})",
            [d[c] for c in _RUN_COLUMNS],
        )

    def _row_to_run(self, row: Sequence[Any]) -> RunRecord:
        d = dict(zip(_RUN_COLUMNS, row, strict=True))
        for k in ("code_pointer", "run_config", "tags", "step_selection"):
            d[k] = json.loads(d[k]) if d[k] is not None else None
        d["status"] = RunStatus(d["status"])
        return RunRecord(**d)

    def get_run(self, run_id: str) -> RunRecord | None:
        row = self._conn().execute(
            f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        return self._row_to_run(row) if row else None

    def list_runs(self, *, limit: int = 50, statuses: Iterable[RunStatus] | None = None) -> list[RunRecord]:
        sql = f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs"
        params: list[Any] = []
        if statuses is not None:
            st = [s.value for s in statuses]
            sql += f" WHERE status IN ({', '.join('?' * len(st))})"
            params += st
        sql += " ORDER BY created_at DESC LIMIT ?"
        params.append(limit)
        return [self._row_to_run(r) for r in self._conn().execute(sql, params).fetchall()]

    def set_run_status(
        self, run_id: str, status: RunStatus, *, only_from: Iterable[RunStatus] | None = None
    ) -> bool:
        now = time.time()
        sets = "status = ?"
        params: list[Any] = [status.value]
        if status is RunStatus.STARTED:
            sets += ", started_at = ?"
            params.append(now)
        if status.is_finished:
            sets += ", ended_at = ?"
            params.append(now)
        sql = f"UPDATE runs SET {sets} WHERE run_id = ?"
        params.append(run_id)
        if only_from is not None:
            st = [s.value for s in only_from]
            sql += f" AND status IN ({', '.join('?' * len(st))})"
            params += st
        return self._write(sql, params) > 0

    def store_events(self, events: Sequence[Event]) -> None:
        if not events:
            return
        self._write(
            "INSERT INTO events (run_id, step_key, type, timestamp, body) VALUES (?, ?, ?, ?, ?)",
            [(e.run_id, e.step_key, e.type.value, e.timestamp, e.to_json()) for e in events],
            many=True,
        )

    def get_events(
        self,
        run_id: str,
        *,
        after_id: int = 0,
        step_key: str | None = None,
        types: Iterable[EventType] | None = None,
    ) -> list[StoredEvent]:
        sql = "SELECT id, body FROM events WHERE run_id = ? AND id > ?"
        params: list[Any] = [run_id, after_id]
        if step_key is not None:
            sql += " AND step_key = ?"
            params.append(step_key)
        if types is not None:
            ts = [t.value for t in types]
            sql += f" AND type IN ({', '.join('?' * len(ts))})"
            params += ts
        sql += " ORDER BY id"
        rows = self._conn().execute(sql, params).fetchall()
        return [StoredEvent(i, Event.from_json(body)) for i, body in rows]

    def delete_run(self, run_id: str) -> None:
        conn = self._conn()
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM events WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
            conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

