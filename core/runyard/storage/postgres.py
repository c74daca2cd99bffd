"""PostgreSQL run storage, for run workers spread over containers, pods or machines.

The same contract as the SQLite storage (`runyard.storage.sqlite`), kept to the letter:

* run records round-trip exactly: JSON fields are stored as the same JSON text, times
  as DOUBLE PRECISION (float8 keeps every bit of a Python float);
* ``set_run_status(only_from=...)`` is one ``UPDATE ... WHERE status = ANY(...)``, an
  atomic compare-and-set under concurrent writers;
* event ids increase in the order events are committed *for each run*: writers of a
  run's events take a per-run advisory lock for their transaction, so a reader tailing
  with ``after_id`` never skips an event that commits late with a smaller id (a plain
  identity column alone would allow that).

This module imports psycopg; it is imported only when a postgres storage is opened.
"""

from __future__ import annotations

import json
import math
import os
import select
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import attrs
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from ..config import EnvVar, resolve
from ..errors import ConfigError, StorageError
from ..events import Event, EventType
from . import EventRowReads, Lease, RunFilter, RunRecord, RunStatus, RunStorage

RUNS_TABLE = "runyard_runs"
EVENTS_TABLE = "runyard_events"
LEASES_TABLE = "runyard_leases"  # created on first use by `runyard daemon`, not before

# Advisory lock keys (two int4s: a namespace and an object). Arbitrary, fixed forever.
_LOCK_SCHEMA = 0x52590001  # creating the tables
_LOCK_RUN_EVENTS = 0x52590002  # appending events of one run (object: hashtext(run_id))

_LEASES_SCHEMA = """
CREATE TABLE IF NOT EXISTS {leases} (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    acquired_at DOUBLE PRECISION NOT NULL,
    renewed_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    info TEXT NOT NULL
);
"""
_NOW = "extract(epoch from clock_timestamp())::float8"  # the server's clock: daemons on skewed hosts agree

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {runs} (
    run_id TEXT PRIMARY KEY,
    job_name TEXT NOT NULL,
    code_pointer TEXT,
    run_config TEXT NOT NULL,
    executor TEXT,
    tags TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    ended_at DOUBLE PRECISION,
    parent_run_id TEXT,
    step_selection TEXT,
    resolution TEXT
);
CREATE INDEX IF NOT EXISTS {runs_created} ON {runs} (created_at);
CREATE INDEX IF NOT EXISTS {runs_job_created} ON {runs} (job_name, created_at);
CREATE INDEX IF NOT EXISTS {runs_parent} ON {runs} (parent_run_id);
CREATE TABLE IF NOT EXISTS {events} (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id TEXT NOT NULL,
    step_key TEXT,
    type TEXT NOT NULL,
    "timestamp" DOUBLE PRECISION NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS {events_run} ON {events} (run_id, id);
"""

_RUN_COLUMNS = [a.name for a in attrs.fields(RunRecord)]
_JSON_COLUMNS = ("code_pointer", "run_config", "tags", "step_selection", "resolution")
# Columns added after the tables were first created, for older databases (read as NULL).
_ADDED_COLUMNS = {"resolution": "TEXT"}
_MAX_IDLE = 8  # idle connections kept per storage object (and process)
_CHECK_IDLE_AFTER = 30.0  # seconds; a connection idle longer is checked before use


def describe_target(url: str) -> str:
    """``host:port/dbname as user`` for messages: never the password or other options."""
    try:
        params = conninfo_to_dict(url)
    except Exception:
        return "the configured server (the url could not be parsed)"
    host = str(params.get("host") or params.get("hostaddr") or "")
    port = params.get("port") or "5432"
    if not host:
        where = f"the local socket (port {port})"
    elif host.startswith("/"):
        where = f"the socket in {host} (port {port})"
    else:
        where = f"{host}:{port}"
    db, user = params.get("dbname"), params.get("user")
    return where + (f"/{db}" if db else "") + (f" as user '{user}'" if user else "")


def _readable(conn: psycopg.Connection) -> bool:
    try:
        return bool(select.select([conn.fileno()], [], [], 0)[0])
    except (OSError, ValueError, psycopg.Error):
        return True


def _secrets(url: str) -> list[str]:
    """What must never appear in a message: the url itself and its password."""
    out = [url]
    try:
        password = conninfo_to_dict(url).get("password")
    except Exception:
        password = None
        try:
            password = urlsplit(url).password
        except ValueError:
            pass
    if password:
        out.append(str(password))
    return sorted(out, key=len, reverse=True)


def _redact(text: str, url: str) -> str:
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


class _ConnectFailed(ConfigError):
    """The server could not be reached (down, restarting, refusing connections)."""


class _ConnectionLost(Exception):
    """A connection broke while in use (the server restarted, or terminated it)."""

    def __init__(self, cause: psycopg.OperationalError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class PostgresRunStorage(EventRowReads, RunStorage):
    """Runs and events in PostgreSQL; safe for many threads and processes at once.

    ``url``: a libpq URL or ``key=value`` string, or an `EnvVar` read at each connect (it
    is never logged, stored or shown in errors; messages name host, port, database, user).
    ``schema``: keep the tables in this schema (created when missing) instead of the
    first schema of the server's ``search_path``.

    Connections are pooled per process: a thread takes an idle one or opens a new one,
    and gives it back after each call. A process forked from one that used the storage
    opens its own connections and leaves the parent's alone.

    Once connected, a lost connection (a server restart, a failover, an administrator
    terminating it) is retried for ``reconnect_timeout`` seconds before a call fails, so a
    run outlives a short outage. A write whose connection broke after it may have reached
    the server is checked on the new connection before it is repeated: nothing is written
    twice.
    """

    def __init__(
        self,
        url: str | EnvVar,
        *,
        connect_timeout: float = 10,
        schema: str | None = None,
        name: str = "postgres",
        reconnect_timeout: float = 30.0,
    ) -> None:
        self._url = url
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self._connected_once = False  # the first connection is not retried: a bad url fails fast
        self.schema = schema
        self.name = name  # the storage's name in runyard.yaml, for messages
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._idle: list[tuple[psycopg.Connection, float]] = []  # (connection, idle since)

        def table(t: str) -> sql.Identifier:
            return sql.Identifier(schema, t) if schema else sql.Identifier(t)

        self._runs = table(RUNS_TABLE)
        self._events = table(EVENTS_TABLE)
        self._leases = table(LEASES_TABLE)
        self._leases_ready = False
        cols = sql.SQL(", ").join(map(sql.Identifier, _RUN_COLUMNS))
        self._select_runs = sql.SQL("SELECT {cols} FROM {runs}").format(cols=cols, runs=self._runs)
        self._insert_run = sql.SQL("INSERT INTO {runs} ({cols}) VALUES ({ph})").format(
            runs=self._runs, cols=cols, ph=sql.SQL(", ").join(sql.Placeholder() * len(_RUN_COLUMNS))
        )
        self._insert_event = sql.SQL(
            'INSERT INTO {events} (run_id, step_key, type, "timestamp", body) VALUES (%s, %s, %s, %s, %s)'
        ).format(events=self._events)
        with self._connection() as conn:
            self._init_schema(conn)
        self._connected_once = True

    def __repr__(self) -> str:
        return f"<PostgresRunStorage {self.target}{f' schema {self.schema}' if self.schema else ''}>"

    @property
    def target(self) -> str:
        """Where the storage is, for messages (no password)."""
        try:
            return describe_target(self._resolve_url())
        except ConfigError:
            return f"the server named by {self._url}"

    # -- connections ---------------------------------------------------------------------

    def _resolve_url(self) -> str:
        try:
            url = resolve(self._url)
        except ConfigError as e:
            if isinstance(self._url, EnvVar) and self._url.where:
                raise  # it names the file and key path already
            raise ConfigError(f"storage '{self.name}': url: {e}") from None
        if not url:
            raise ConfigError(f"storage '{self.name}': url is empty; set it to postgresql://user@host:5432/dbname")
        return url

    def _connect(self) -> psycopg.Connection:
        url = self._resolve_url()
        try:
            return psycopg.connect(
                url,
                autocommit=True,
                # libpq counts whole seconds and waits at least 2.
                connect_timeout=max(1, math.ceil(self.connect_timeout)),
                application_name="runyard",
                # No server-side prepared statements: they break behind PgBouncer in
                # transaction mode, and these statements are cheap to plan.
                prepare_threshold=None,
                # Notice a server that vanished (a pod rescheduled) within a minute or so
                # instead of the kernel's default of two hours.
                keepalives=1,
                keepalives_idle=30,
                keepalives_interval=10,
                keepalives_count=3,
                tcp_user_timeout=60_000,  # ms: give up on a request the server never acknowledges
            )
        except psycopg.Error as e:
            reason = " ".join(_redact(str(e), url).split()) or type(e).__name__
            if not reason.endswith((".", "?", "!")):
                reason += "."
            raise _ConnectFailed(
                f"storage '{self.name}': cannot connect to PostgreSQL at {describe_target(url)} "
                f"(connect_timeout {self.connect_timeout:g}s): {reason} Check that the server is running "
                f"and reachable from this machine or container, and the url under storage.{self.name} "
                "in runyard.yaml (host, port, database, user, password)"
            ) from None

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A connection for one call, from this process's idle ones or a new one."""
        if os.getpid() != self._pid:
            # Forked: the parent's connections share its sockets. Drop them unclosed
            # (psycopg does not close a connection in a process that did not open it).
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._idle = []
        conn = self._take_idle()
        if conn is None:
            conn = self._connect()
        try:
            yield conn
        finally:
            if conn.broken:
                self._drop_idle()  # the server went away: its other connections are dead too
            elif conn.closed:
                pass
            elif conn.info.transaction_status != TransactionStatus.IDLE:
                conn.close()  # interrupted mid-statement: do not hand this one out again
            else:
                with self._lock:
                    if len(self._idle) < _MAX_IDLE:
                        self._idle.append((conn, time.monotonic()))
                        conn = None
                if conn is not None:
                    conn.close()

    def _take_idle(self) -> psycopg.Connection | None:
        while True:
            with self._lock:
                if not self._idle:
                    return None
                conn, since = self._idle.pop()
            if conn.closed or conn.broken:
                continue
            # Something to read on an idle connection is the server's goodbye (it was
            # restarted, or the connection terminated); a long idle one may have been
            # dropped by a proxy or a failover without a word. Check those before use.
            if time.monotonic() - since > _CHECK_IDLE_AFTER or _readable(conn):
                try:
                    conn.execute("SELECT 1")
                except psycopg.Error:
                    conn.close()
                    self._drop_idle()
                    continue
            return conn

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()

    def _call(self, fn: Any, *, verify: Any = None) -> Any:
        """``fn(conn)`` on a pooled connection, retried while the server is out of reach.

        Connection losses are retried for ``reconnect_timeout`` seconds (once the storage has
        connected at all). Reads and idempotent writes are simply repeated. A write that is
        not idempotent passes ``verify(conn) -> (done, value)``: after a loss, it says on the
        new connection whether the write took effect, so that it is not made twice.
        """
        deadline: float | None = None
        delay = 0.05
        unsure = False  # a write may have reached the server before its connection broke
        while True:
            try:
                with self._connection() as conn:
                    try:
                        if unsure:
                            done, value = verify(conn)
                            if done:
                                return value
                            unsure = False
                        return fn(conn)
                    except psycopg.OperationalError as e:
                        if not conn.broken:
                            raise
                        unsure = unsure or verify is not None
                        raise _ConnectionLost(e) from e
            except (_ConnectionLost, _ConnectFailed) as e:
                if not self._connected_once or self.reconnect_timeout <= 0:
                    if isinstance(e, _ConnectionLost):
                        raise e.cause from None
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.reconnect_timeout
                if now >= deadline:
                    reason = " ".join(str(e).split())
                    raise StorageError(
                        f"storage '{self.name}': lost the connection to PostgreSQL at {self.target} and could "
                        f"not get it back within {self.reconnect_timeout:g}s ({reason}). Check the server; "
                        f"storage.{self.name}.reconnect_timeout in runyard.yaml sets how long to keep trying"
                    ) from None
                time.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 1.0)

    def _read(self, query: sql.Composable, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Run a query and fetch its rows (reads are safe to repeat after a lost connection)."""
        return self._call(lambda conn: conn.execute(query, params).fetchall())

    def _init_schema(self, conn: psycopg.Connection) -> None:
        # Check first: a role that may only read and write existing tables must not need
        # CREATE rights (CREATE SCHEMA IF NOT EXISTS checks them even when it exists).
        if self._tables_exist(conn):
            self._add_missing_columns(conn)
            return
        stmts = sql.SQL(_SCHEMA).format(
            runs=self._runs,
            events=self._events,
            runs_created=sql.Identifier(f"{RUNS_TABLE}_created"),
            runs_job_created=sql.Identifier(f"{RUNS_TABLE}_job_created"),
            runs_parent=sql.Identifier(f"{RUNS_TABLE}_parent"),
            events_run=sql.Identifier(f"{EVENTS_TABLE}_run"),
        )
        try:
            with conn.transaction():
                # Concurrent CREATE ... IF NOT EXISTS can still fail on the catalog's unique
                # indexes; the advisory lock makes concurrent creators take turns.
                conn.execute(
                    "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_SCHEMA, self.schema or "")
                )
                if self.schema:
                    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
                conn.execute(stmts)
        except (psycopg.errors.InsufficientPrivilege, psycopg.errors.InvalidSchemaName) as e:
            where = f"schema '{self.schema}'" if self.schema else "the first schema of its search_path"
            raise ConfigError(
                f"storage '{self.name}': cannot create runyard's tables ({RUNS_TABLE}, {EVENTS_TABLE}) in "
                f"{where} at {self.target}: {' '.join(str(e).split())}. Grant the user CREATE there, create "
                f"the tables once as a user who may, or set storage.{self.name}.schema to a schema it may create"
            ) from None

    def _add_missing_columns(self, conn: psycopg.Connection) -> None:
        have = {
            row[0]
            for row in conn.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = coalesce(%s, current_schema()) AND table_name = %s",
                (self.schema, RUNS_TABLE),
            ).fetchall()
        }
        missing = [c for c in _ADDED_COLUMNS if c not in have]
        if not missing:
            return
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_SCHEMA, self.schema or ""))
                for column in missing:
                    conn.execute(
                        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} " + _ADDED_COLUMNS[column]).format(
                            self._runs, sql.Identifier(column)
                        )
                    )
        except psycopg.errors.InsufficientPrivilege as e:
            raise ConfigError(
                f"storage '{self.name}': table {RUNS_TABLE} at {self.target} lacks column(s) {', '.join(missing)} "
                f"that this runyard stores, and this user may not add them ({' '.join(str(e).split())}); run "
                "runyard once as the tables' owner, or have it run: "
                + "; ".join(f"ALTER TABLE {RUNS_TABLE} ADD COLUMN {c} {_ADDED_COLUMNS[c]}" for c in missing)
            ) from None

    def _tables_exist(self, conn: psycopg.Connection) -> bool:
        row = conn.execute(
            "SELECT count(*) FROM pg_catalog.pg_tables"
            " WHERE schemaname = coalesce(%s, current_schema()) AND tablename = ANY(%s::text[])",
            (self.schema, [RUNS_TABLE, EVENTS_TABLE]),
        ).fetchone()
        return row is not None and row[0] == 2

    # -- runs ----------------------------------------------------------------------------

    def add_run(self, run: RunRecord) -> None:
        d = attrs.asdict(run, recurse=False)
        for k in _JSON_COLUMNS:
            d[k] = json.dumps(d[k], default=str) if d[k] is not None else None
        d["status"] = run.status.value

        def inserted(conn: psycopg.Connection) -> tuple[bool, None]:
            found = conn.execute(sql.SQL("SELECT 1 FROM {} WHERE run_id = %s").format(self._runs), (run.run_id,))
            return found.fetchone() is not None, None

        self._call(lambda conn: conn.execute(self._insert_run, [d[c] for c in _RUN_COLUMNS]), verify=inserted)

    @staticmethod
    def _row_to_run(row: Sequence[Any]) -> RunRecord:
        d = dict(zip(_RUN_COLUMNS, row, strict=True))
        for k in _JSON_COLUMNS:
            d[k] = json.loads(d[k]) if d[k] is not None else None
        d["status"] = RunStatus(d["status"])
        return RunRecord(**d)

    def get_run(self, run_id: str) -> RunRecord | None:
        rows = self._read(self._select_runs + sql.SQL(" WHERE run_id = %s"), (run_id,))
        return self._row_to_run(rows[0]) if rows else None

    def list_runs(self, *, limit: int = 50, statuses: Iterable[RunStatus] | None = None) -> list[RunRecord]:
        query = self._select_runs
        params: list[Any] = []
        if statuses is not None:
            query += sql.SQL(" WHERE status = ANY(%s::text[])")
            params.append([s.value for s in statuses])
        query += sql.SQL(" ORDER BY created_at DESC LIMIT %s")
        params.append(limit if limit >= 0 else None)  # SQLite reads a negative limit as none
        return [self._row_to_run(r) for r in self._read(query, params)]

    def page_runs(self, where: RunFilter, *, limit: int = 50, offset: int = 0) -> tuple[list[RunRecord], int]:
        conds: list[sql.Composable] = []
        params: list[Any] = []
        if where.job_name is not None:
            conds.append(sql.SQL("job_name = %s"))
            params.append(where.job_name)
        if where.statuses is not None:
            conds.append(sql.SQL("status = ANY(%s::text[])"))
            params.append([s.value for s in where.statuses])
        if where.tag is not None:
            conds.append(sql.SQL("(tags::jsonb ->> %s) = %s"))
            params += list(where.tag)
        if where.parent_run_id is not None:
            conds.append(sql.SQL("parent_run_id = %s"))
            params.append(where.parent_run_id)
        if where.created_after is not None:
            conds.append(sql.SQL("created_at >= %s"))
            params.append(where.created_after)
        if where.created_before is not None:
            conds.append(sql.SQL("created_at < %s"))
            params.append(where.created_before)
        clause = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds) if conds else sql.SQL("")
        total = self._read(sql.SQL("SELECT count(*) FROM {runs}").format(runs=self._runs) + clause, params)[0][0]
        rows = self._read(
            self._select_runs + clause + sql.SQL(" ORDER BY created_at DESC, run_id LIMIT %s OFFSET %s"),
            [*params, limit, offset],
        )
        return [self._row_to_run(r) for r in rows], int(total)

    def _status_update(self, run_id: str, status: RunStatus, only_from: Iterable[RunStatus] | None,
                       ended_at: float | None = None) -> tuple[sql.Composed, list[Any]]:
        now = time.time()
        sets = [sql.SQL("status = %s")]
        params: list[Any] = [status.value]
        if status is RunStatus.STARTED:
            sets.append(sql.SQL("started_at = %s"))
            params.append(now)
        if status.is_finished:
            sets.append(sql.SQL("ended_at = %s"))
            params.append(now if ended_at is None else ended_at)
        query = sql.SQL("UPDATE {runs} SET {sets} WHERE run_id = %s").format(
            runs=self._runs, sets=sql.SQL(", ").join(sets)
        )
        params.append(run_id)
        if only_from is not None:
            # One statement: a concurrent UPDATE of the row makes this one wait and then
            # re-check the condition against the new status, so only one racer wins.
            query += sql.SQL(" AND status = ANY(%s::text[])")
            params.append([s.value for s in only_from])
        return query, params

    def _has_status(self, conn: psycopg.Connection, run_id: str, status: RunStatus) -> tuple[bool, bool]:
        # The update may have committed before the connection broke: if the run now has
        # the status asked for, it did (a racer setting the very same status is rare,
        # and would end the run the same way).
        row = conn.execute(sql.SQL("SELECT status FROM {} WHERE run_id = %s").format(self._runs),
                           (run_id,)).fetchone()
        return row is not None and row[0] == status.value, True

    def set_run_status(
        self, run_id: str, status: RunStatus, *, only_from: Iterable[RunStatus] | None = None
    ) -> bool:
        query, params = self._status_update(run_id, status, only_from)
        return bool(self._call(lambda conn: conn.execute(query, params).rowcount > 0,
                               verify=lambda conn: self._has_status(conn, run_id, status)))

    def transition_run(
        self, run_id: str, status: RunStatus, events: Sequence[Event], *, only_from: Iterable[RunStatus],
        ended_at: float | None = None,
    ) -> bool:
        query, params = self._status_update(run_id, status, only_from, ended_at)
        rows = [(e.run_id, e.step_key, e.type.value, e.timestamp, e.to_json()) for e in events]

        def write(conn: psycopg.Connection) -> bool:
            with conn.transaction():
                # The run's event lock first, as store_events takes it (ids in commit order),
                # then the run's row: every writer takes them in this order.
                conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_RUN_EVENTS, run_id))
                if conn.execute(query, params).rowcount == 0:
                    return False
                if rows:
                    with conn.cursor() as cur:
                        cur.executemany(self._insert_event, rows)
                return True

        def committed(conn: psycopg.Connection) -> tuple[bool, bool]:
            if not rows:
                return self._has_status(conn, run_id, status)
            # One transaction: its last event (exact body) is there only if all of it committed.
            found = conn.execute(
                sql.SQL("SELECT 1 FROM {} WHERE run_id = %s AND body = %s LIMIT 1").format(self._events),
                (rows[-1][0], rows[-1][4]),
            )
            return found.fetchone() is not None, True

        return bool(self._call(write, verify=committed))

    def delete_run(self, run_id: str) -> None:
        def delete(conn: psycopg.Connection) -> None:
            with conn.transaction():
                conn.execute(sql.SQL("DELETE FROM {} WHERE run_id = %s").format(self._events), (run_id,))
                conn.execute(sql.SQL("DELETE FROM {} WHERE run_id = %s").format(self._runs), (run_id,))

        self._call(delete)  # deleting twice is harmless

    # -- events --------------------------------------------------------------------------

    def store_events(self, events: Sequence[Event]) -> None:
        if not events:
            return
        rows = [(e.run_id, e.step_key, e.type.value, e.timestamp, e.to_json()) for e in events]

        def insert(conn: psycopg.Connection) -> None:
            with conn.transaction():
                # Ids come from a sequence when rows are inserted, but transactions commit in
                # any order. Taking the run's lock until commit makes its ids increase in
                # commit order, as in SQLite, so tailing with after_id misses nothing.
                # Sorted, so that writers of several runs at once cannot deadlock.
                for run_id in sorted({e.run_id for e in events}):
                    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_RUN_EVENTS, run_id))
                with conn.cursor() as cur:
                    cur.executemany(self._insert_event, rows)

        def committed(conn: psycopg.Connection) -> tuple[bool, None]:
            # The batch is one transaction: its last event (exact body, timestamp included)
            # is there only if the whole batch committed.
            last = rows[-1]
            found = conn.execute(
                sql.SQL("SELECT 1 FROM {} WHERE run_id = %s AND body = %s LIMIT 1").format(self._events),
                (last[0], last[4]),
            )
            return found.fetchone() is not None, None

        self._call(insert, verify=committed)

    def _event_rows(self, run_id: str, after_id: int, step_key: str | None, types: Iterable[EventType] | None,
                    limit: int | None) -> list[tuple[Any, ...]]:
        query = sql.SQL("SELECT id, body FROM {} WHERE run_id = %s AND id > %s").format(self._events)
        params: list[Any] = [run_id, after_id]
        if step_key is not None:
            query += sql.SQL(" AND step_key = %s")
            params.append(step_key)
        if types is not None:
            query += sql.SQL(" AND type = ANY(%s::text[])")
            params.append([t.value for t in types])
        query += sql.SQL(" ORDER BY id LIMIT %s")
        params.append(limit)  # NULL: no limit
        return self._read(query, params)

    # -- what the daemon needs ------------------------------------------------------------

    def run_states(self, statuses: Iterable[RunStatus]) -> list[tuple[str, RunStatus]]:
        query = sql.SQL("SELECT run_id, status FROM {} WHERE status = ANY(%s::text[]) ORDER BY created_at").format(
            self._runs)
        return [(r, RunStatus(st)) for r, st in self._read(query, ([s.value for s in statuses],))]

    def record_end_time(self, run_id: str, ended_at: float) -> None:
        query = sql.SQL("UPDATE {} SET ended_at = %s WHERE run_id = %s AND ended_at IS NOT NULL").format(self._runs)
        self._call(lambda conn: conn.execute(query, (ended_at, run_id)))  # idempotent: safe to repeat

    def _ensure_leases(self) -> None:
        """Create the lease table on first use (a schema migration of its own: instances that
        never run a daemon, and users without CREATE rights, never need it)."""
        if self._leases_ready:
            return

        def create(conn: psycopg.Connection) -> None:
            exists = conn.execute(
                "SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = coalesce(%s, current_schema())"
                " AND tablename = %s", (self.schema, LEASES_TABLE)).fetchone()
            if exists:
                return
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_SCHEMA, self.schema or ""))
                    conn.execute(sql.SQL(_LEASES_SCHEMA).format(leases=self._leases))
            except psycopg.errors.InsufficientPrivilege as e:
                raise ConfigError(
                    f"storage '{self.name}': cannot create table {LEASES_TABLE} for runyard daemon at {self.target}: "
                    f"{' '.join(str(e).split())}. Grant the user CREATE, or create it once as the tables' owner "
                    "(start `runyard daemon run --once` as that user)"
                ) from None

        self._call(create)
        self._leases_ready = True

    @staticmethod
    def _row_to_lease(row: Sequence[Any]) -> Lease:
        name, holder, epoch, acquired, renewed, expires, info, now = row
        return Lease(name=name, holder=holder, epoch=epoch, acquired_at=acquired, renewed_at=renewed,
                     expires_at=expires, info=json.loads(info), now=now)

    def claim_lease(self, name: str, holder: str, ttl: float, info: Any) -> Lease | None:
        self._ensure_leases()
        text = json.dumps(dict(info), default=str)
        # One statement: the row lock of INSERT ... ON CONFLICT DO UPDATE makes concurrent
        # claimers take turns, and the WHERE re-checks holder and expiry under that lock.
        query = sql.SQL(
            "INSERT INTO {t} AS l (name, holder, epoch, acquired_at, renewed_at, expires_at, info)"
            " VALUES (%(name)s, %(holder)s, 1, " + _NOW + ", " + _NOW + ", " + _NOW + " + %(ttl)s, %(info)s)"
            " ON CONFLICT (name) DO UPDATE SET"
            " holder = excluded.holder,"
            " epoch = CASE WHEN l.holder = excluded.holder THEN l.epoch ELSE l.epoch + 1 END,"
            " acquired_at = CASE WHEN l.holder = excluded.holder THEN l.acquired_at ELSE excluded.acquired_at END,"
            " renewed_at = excluded.renewed_at, expires_at = excluded.expires_at, info = excluded.info"
            " WHERE l.holder = excluded.holder OR l.expires_at <= " + _NOW +
            " RETURNING name, holder, epoch, acquired_at, renewed_at, expires_at, info, " + _NOW
        ).format(t=self._leases)
        params = {"name": name, "holder": holder, "ttl": float(ttl), "info": text}
        # Repeating a claim is harmless (the same holder renews), so no verify step is needed.
        rows = self._call(lambda conn: conn.execute(query, params).fetchall())
        return self._row_to_lease(rows[0]) if rows else None

    def get_lease(self, name: str) -> Lease | None:
        self._ensure_leases()
        query = sql.SQL("SELECT name, holder, epoch, acquired_at, renewed_at, expires_at, info, " + _NOW +
                        " FROM {} WHERE name = %s").format(self._leases)
        rows = self._read(query, (name,))
        return self._row_to_lease(rows[0]) if rows else None

    def release_lease(self, name: str, holder: str) -> None:
        self._ensure_leases()
        query = sql.SQL("UPDATE {} SET expires_at = " + _NOW + " WHERE name = %s AND holder = %s").format(self._leases)
        self._call(lambda conn: conn.execute(query, (name, holder)))

    def close(self) -> None:
        """Close this process's idle connections; the storage reconnects if used again."""
        if os.getpid() != self._pid:
            self._idle = []  # the parent's: not ours to close
            return
        self._drop_idle()
