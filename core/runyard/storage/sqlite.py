"""SQLite run storage: WAL, a busy timeout, one connection per thread."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..errors import StorageError
from ..events import Event, EventType
from ..private import create_private_file, make_private_dirs
from . import EventRowReads, Lease, RunFilter, RunRecord, RunStatus, RunStorage

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
    step_selection TEXT,
    resolution TEXT
);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created_at);
CREATE INDEX IF NOT EXISTS runs_job_created ON runs (job_name, created_at);
CREATE INDEX IF NOT EXISTS runs_parent ON runs (parent_run_id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    step_key TEXT,
    type TEXT NOT NULL,
    timestamp REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_run ON events (run_id, id);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    acquired_at REAL NOT NULL,
    renewed_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    info TEXT NOT NULL
);
"""

_RUN_COLUMNS = [a.name for a in attrs.fields(RunRecord)]
_JSON_COLUMNS = ("code_pointer", "run_config", "tags", "step_selection", "resolution")
# Columns added after the first release, for databases created before them (read as NULL).
_ADDED_COLUMNS = {"resolution": "TEXT"}


_INSERT_EVENT = "INSERT INTO events (run_id, step_key, type, timestamp, body) VALUES (?, ?, ?, ?, ?)"


def _event_row(e: Event) -> tuple[Any, ...]:
    return (e.run_id, e.step_key, e.type.value, e.timestamp, e.to_json())


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    have = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
    for column, kind in _ADDED_COLUMNS.items():
        if column not in have:
            try:
                conn.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
            except sqlite3.OperationalError as e:
                if "duplicate column" not in str(e):  # another process added it first
                    raise


class SqliteRunStorage(EventRowReads, RunStorage):
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
            self._create_or_check()
        self._init_schema()

    def _create_or_check(self) -> None:
        """Create a missing database whole, or refuse an existing file that is not one.

        A new database is built under a temporary name and linked into place, so the real
        path never exists empty: a zero-length file there is then damage (a full disk,
        a truncated copy), never a database being created, and is reported rather than
        silently taken for a new, empty history.
        """
        path = Path(self.path)
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new")
            try:
                create_private_file(tmp)  # the mode survives the link into place
                conn = sqlite3.connect(tmp, isolation_level=None)
                try:
                    conn.execute("PRAGMA journal_mode=WAL")  # recorded in the file's header
                    conn.executescript(_SCHEMA)
                finally:
                    conn.close()
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    pass  # another process created it first: use theirs
                except OSError:
                    # A filesystem without hard links: a rename is atomic too, though two
                    # processes creating the database at the same moment both "win".
                    if not path.exists():
                        os.replace(tmp, path)
            except (OSError, sqlite3.Error) as e:
                raise StorageError(f"cannot create the run database {self.path}: {e}") from e
            finally:
                for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
                    leftover.unlink(missing_ok=True)
            return
        try:
            size = path.stat().st_size
        except OSError as e:
            raise StorageError(f"cannot open the run database {self.path}: {e}") from e
        if size == 0 and not Path(f"{self.path}-wal").exists():
            raise StorageError(
                f"the run database {self.path} is an empty file (0 bytes), not a database: it was truncated "
                "or never written completely (a full disk?). Restore it from a backup, or move it away "
                f"(mv {self.path} {self.path}.broken) to start a new, empty run history"
            )

    def _damaged(self, e: sqlite3.Error) -> StorageError:
        return StorageError(
            f"the run database {self.path} cannot be read: {e}. Check the file's permissions and its disk; "
            "if it is damaged or not a database, restore it from a backup, or move it away "
            f"(mv {self.path} {self.path}.broken) to start a new, empty run history"
        )

    def _init_schema(self) -> None:
        # Several processes may open a new database at once; switching it to WAL and
        # creating tables can report "locked" without waiting on the busy timeout.
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = self._conn()
                with self._lock:
                    if getattr(self._local, "degraded", None):
                        conn.execute("SELECT count(*) FROM runs").fetchall()  # readable, at least
                    else:
                        conn.executescript(_SCHEMA)
                        _add_missing_columns(conn)
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise self._damaged(e) from e
                stale = getattr(self._local, "conn", None)
                if stale is not None and not self._memory:
                    stale.close()
                self._local.conn = None
                time.sleep(0.05)
            except sqlite3.DatabaseError as e:
                raise self._damaged(e) from e

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=30000")
        if not self._memory:
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable across process crashes in WAL mode; only power loss can drop
            # the last transactions, and that is not worth an fsync per event batch.
            conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _connect_read_only(self, why: sqlite3.Error) -> sqlite3.Connection:
        """A connection that only reads, for when the disk is too full to open the database
        normally (WAL needs its -shm and -wal files): the history stays readable."""
        uri = Path(self.path).resolve().as_uri()
        last: sqlite3.Error = why
        # "immutable" reads the file as it is, without the -shm file: right once every
        # writer is gone, which is the case when nothing can be written any more.
        for mode in ("mode=ro", "immutable=1"):
            try:
                conn = sqlite3.connect(f"{uri}?{mode}", uri=True, timeout=30, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
                return conn
            except sqlite3.Error as e:
                last = e
        raise self._damaged(last) from why

    def _space_hint(self) -> str:
        try:
            free = shutil.disk_usage(Path(self.path).parent).free
        except OSError:
            return ""
        return f" (the disk holding it is full: {free} bytes free)" if free < 1 << 20 else ""

    def _conn(self) -> sqlite3.Connection:
        if self._memory:
            return self._shared
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = self._connect()
                self._local.degraded = None
            except sqlite3.OperationalError as e:
                if "locked" in str(e):
                    raise
                conn = self._connect_read_only(e)
                self._local.degraded = f"{e}{self._space_hint()}"
            self._local.conn = conn
        return conn

    def _write(self, sql: str, params: Sequence[Any] | Iterable[Sequence[Any]], many: bool = False) -> int:
        def body(conn: sqlite3.Connection) -> int:
            cur = conn.executemany(sql, params) if many else conn.execute(sql, params)
            return cur.rowcount

        return self._transaction(body)

    def _transaction(self, body: Any) -> Any:
        conn = self._conn()
        degraded = None if self._memory else getattr(self._local, "degraded", None)
        if degraded:
            # Opened read-only (a full disk): try a normal connection again, space may be back.
            conn.close()
            self._local.conn = None
            try:
                conn = self._local.conn = self._connect()
                self._local.degraded = None
            except sqlite3.Error as e:
                raise StorageError(
                    f"cannot write to the run database {self.path}: {e}{self._space_hint()}; "
                    "free space on its disk, then try again"
                ) from e
        with self._lock:
            try:
                # BEGIN IMMEDIATE takes the write lock up front, so concurrent writers queue on
                # the busy timeout instead of failing with "database is locked" mid-transaction.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = body(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    # SQLite may have rolled back on its own (SQLITE_FULL, SQLITE_IOERR): a
                    # ROLLBACK then fails with "cannot rollback", which must not hide the
                    # error that matters.
                    if conn.in_transaction:
                        try:
                            conn.execute("ROLLBACK")
                        except sqlite3.Error:
                            pass
                    raise
            except sqlite3.IntegrityError:
                raise  # the caller's mistake (a duplicate run id), not the storage's
            except sqlite3.OperationalError as e:
                raise StorageError(
                    f"cannot write to the run database {self.path}: {e}{self._space_hint()}; "
                    "free space on its disk (or fix what the error says), then try again"
                ) from e
            except sqlite3.DatabaseError as e:
                raise self._damaged(e) from e
            return result

    def _query(self, sql: str, params: Sequence[Any]) -> list[Any]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                raise
            raise self._damaged(e) from e

    def add_run(self, run: RunRecord) -> None:
        d = attrs.asdict(run, recurse=False)
        for k in _JSON_COLUMNS:
            d[k] = json.dumps(d[k], default=str) if d[k] is not None else None
        d["status"] = run.status.value
        self._write(
            f"INSERT INTO runs ({', '.join(_RUN_COLUMNS)}) VALUES ({', '.join('?' * len(_RUN_COLUMNS))})",
            [d[c] for c in _RUN_COLUMNS],
        )

    def _row_to_run(self, row: Sequence[Any]) -> RunRecord:
        d = dict(zip(_RUN_COLUMNS, row, strict=True))
        for k in _JSON_COLUMNS:
            d[k] = json.loads(d[k]) if d[k] is not None else None
        d["status"] = RunStatus(d["status"])
        return RunRecord(**d)

    def get_run(self, run_id: str) -> RunRecord | None:
        rows = self._query(f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs WHERE run_id = ?", (run_id,))
        return self._row_to_run(rows[0]) if rows else None

    def list_runs(self, *, limit: int = 50, statuses: Iterable[RunStatus] | None = None) -> list[RunRecord]:
        sql = f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs"
        params: list[Any] = []
        if statuses is not None:
            st = [s.value for s in statuses]
            sql += f" WHERE status IN ({', '.join('?' * len(st))})"
            params += st
        sql += " ORDER BY created_at DESC LIMIT ?"
        params.append(limit)
        return [self._row_to_run(r) for r in self._query(sql, params)]

    def page_runs(self, where: RunFilter, *, limit: int = 50, offset: int = 0) -> tuple[list[RunRecord], int]:
        conds: list[str] = []
        params: list[Any] = []
        if where.job_name is not None:
            conds.append("job_name = ?")
            params.append(where.job_name)
        if where.statuses is not None:
            conds.append(f"status IN ({', '.join('?' * len(where.statuses))})")
            params += [s.value for s in where.statuses]
        if where.tag is not None:
            # A JSON path with the key quoted, so a key holding dots or quotes is one key.
            conds.append("json_extract(tags, ?) = ?")
            params += ["$." + json.dumps(where.tag[0]), where.tag[1]]
        if where.parent_run_id is not None:
            conds.append("parent_run_id = ?")
            params.append(where.parent_run_id)
        if where.created_after is not None:
            conds.append("created_at >= ?")
            params.append(where.created_after)
        if where.created_before is not None:
            conds.append("created_at < ?")
            params.append(where.created_before)
        clause = f" WHERE {' AND '.join(conds)}" if conds else ""
        total = self._query(f"SELECT count(*) FROM runs{clause}", params)[0][0]
        rows = self._query(
            f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs{clause} ORDER BY created_at DESC, run_id LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        return [self._row_to_run(r) for r in rows], total

    @staticmethod
    def _status_update(run_id: str, status: RunStatus, only_from: Iterable[RunStatus] | None,
                       ended_at: float | None = None) -> tuple[str, list[Any]]:
        now = time.time()
        sets = "status = ?"
        params: list[Any] = [status.value]
        if status is RunStatus.STARTED:
            sets += ", started_at = ?"
            params.append(now)
        if status.is_finished:
            sets += ", ended_at = ?"
            params.append(now if ended_at is None else ended_at)
        sql = f"UPDATE runs SET {sets} WHERE run_id = ?"
        params.append(run_id)
        if only_from is not None:
            st = [s.value for s in only_from]
            sql += f" AND status IN ({', '.join('?' * len(st))})"
            params += st
        return sql, params

    def set_run_status(
        self, run_id: str, status: RunStatus, *, only_from: Iterable[RunStatus] | None = None
    ) -> bool:
        return self._write(*self._status_update(run_id, status, only_from)) > 0

    def transition_run(
        self, run_id: str, status: RunStatus, events: Sequence[Event], *, only_from: Iterable[RunStatus],
        ended_at: float | None = None,
    ) -> bool:
        update, params = self._status_update(run_id, status, only_from, ended_at)

        def body(conn: sqlite3.Connection) -> bool:
            if conn.execute(update, params).rowcount == 0:
                return False
            conn.executemany(_INSERT_EVENT, [_event_row(e) for e in events])
            return True

        return bool(self._transaction(body))

    def store_events(self, events: Sequence[Event]) -> None:
        if not events:
            return
        self._write(_INSERT_EVENT, [_event_row(e) for e in events], many=True)

    def _event_rows(self, run_id: str, after_id: int, step_key: str | None, types: Iterable[EventType] | None,
                    limit: int | None) -> list[Any]:
        sql = "SELECT id, body FROM events WHERE run_id = ? AND id > ?"
        params: list[Any] = [run_id, after_id]
        if step_key is not None:
            sql += " AND step_key = ?"
            params.append(step_key)
        if types is not None:
            ts = [t.value for t in types]
            sql += f" AND type IN ({', '.join('?' * len(ts))})"
            params += ts
        sql += " ORDER BY id LIMIT ?"
        params.append(-1 if limit is None else limit)
        return self._query(sql, params)

    def delete_run(self, run_id: str) -> None:
        def body(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM events WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))

        self._transaction(body)

    # -- what the daemon needs ------------------------------------------------------------

    def run_states(self, statuses: Iterable[RunStatus]) -> list[tuple[str, RunStatus]]:
        st = [s.value for s in statuses]
        rows = self._query(
            f"SELECT run_id, status FROM runs WHERE status IN ({', '.join('?' * len(st))}) ORDER BY created_at", st
        )
        return [(r, RunStatus(s)) for r, s in rows]

    def record_end_time(self, run_id: str, ended_at: float) -> None:
        self._write("UPDATE runs SET ended_at = ? WHERE run_id = ? AND ended_at IS NOT NULL", (ended_at, run_id))

    @staticmethod
    def _row_to_lease(row: Sequence[Any], now: float) -> Lease:
        name, holder, epoch, acquired, renewed, expires, info = row
        return Lease(name=name, holder=holder, epoch=epoch, acquired_at=acquired, renewed_at=renewed,
                     expires_at=expires, info=json.loads(info), now=now)

    def claim_lease(self, name: str, holder: str, ttl: float, info: Any) -> Lease | None:
        def body(conn: sqlite3.Connection) -> Lease | None:
            # BEGIN IMMEDIATE (in _transaction) serialises claimers: read-then-write is atomic.
            now = time.time()
            row = conn.execute("SELECT holder, epoch, acquired_at, expires_at FROM leases WHERE name = ?",
                               (name,)).fetchone()
            text = json.dumps(dict(info), default=str)
            if row is None:
                conn.execute("INSERT INTO leases VALUES (?, ?, 1, ?, ?, ?, ?)",
                             (name, holder, now, now, now + ttl, text))
                return Lease(name=name, holder=holder, epoch=1, acquired_at=now, renewed_at=now,
                             expires_at=now + ttl, info=dict(info), now=now)
            current, epoch, acquired, expires = row
            if current != holder and expires > now:
                return None
            if current != holder:
                epoch, acquired = epoch + 1, now
            conn.execute(
                "UPDATE leases SET holder = ?, epoch = ?, acquired_at = ?, renewed_at = ?, expires_at = ?, info = ?"
                " WHERE name = ?", (holder, epoch, acquired, now, now + ttl, text, name))
            return Lease(name=name, holder=holder, epoch=epoch, acquired_at=acquired, renewed_at=now,
                         expires_at=now + ttl, info=dict(info), now=now)

        result: Lease | None = self._transaction(body)
        return result

    def get_lease(self, name: str) -> Lease | None:
        rows = self._query("SELECT name, holder, epoch, acquired_at, renewed_at, expires_at, info FROM leases"
                           " WHERE name = ?", (name,))
        return self._row_to_lease(rows[0], time.time()) if rows else None

    def release_lease(self, name: str, holder: str) -> None:
        # Expire it rather than delete it: `daemon status` still shows who held it last.
        now = time.time()
        self._write("UPDATE leases SET expires_at = ? WHERE name = ? AND holder = ?", (now, name, holder))

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

