"""The built-in storages' factories and locations (``sqlite``, ``postgres``), through the
public plugin API. psycopg is imported only when a PostgreSQL storage is opened."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from runyard.plugin import ConfigError, PluginError, RunStorage, StorageLocation, resolve

if TYPE_CHECKING:
    from .plugin import SqliteConfig
    from .postgres_plugin import PostgresConfig

_DEFAULT_SOCKET_DIR = "/var/run/postgresql"  # libpq's default when a URL names no host


def _sqlite_path(config: SqliteConfig, home: Path) -> Path:
    # A relative path is relative to the instance folder (where runyard.yaml is), not the cwd.
    return home / Path(resolve(config.path) or "runyard.db").expanduser()


def create_sqlite_storage(config: SqliteConfig, home: Path) -> RunStorage:
    from runyard.plugin import SqliteRunStorage

    return SqliteRunStorage(_sqlite_path(config, home))


def locate_sqlite_storage(config: SqliteConfig, home: Path) -> StorageLocation:
    return StorageLocation(name="sqlite", label="SQLite", path=_sqlite_path(config, home).resolve())


def create_postgres_storage(config: PostgresConfig, home: Path) -> RunStorage:
    try:
        from runyard.plugin import PostgresRunStorage
    except ImportError as e:
        if e.name and not e.name.startswith("psycopg"):
            raise  # a bug of ours, not a missing driver
        raise PluginError(
            "storage 'postgres' needs the PostgreSQL driver psycopg, which is not installed "
            f"or cannot load ({e}): pip install \"runyard[postgres]\""
        ) from None
    return PostgresRunStorage(
        config.url,
        connect_timeout=config.connect_timeout,
        schema=resolve(config.schema),
        name="postgres",
        reconnect_timeout=config.reconnect_timeout,
    )


def locate_postgres_storage(config: PostgresConfig, home: Path) -> StorageLocation:
    """The server's host (or unix-socket directory) and port, read from the URL alone."""
    try:
        url = str(resolve(config.url) or "")
    except ConfigError:
        # An unset {env: NAME}: whoever opens the storage says so.
        return StorageLocation(name="postgres", label="PostgreSQL")
    host, port = _pg_host_port(url)
    return StorageLocation(name="postgres", label="PostgreSQL", host=host, port=port)


def _pg_host_port(url: str) -> tuple[str, int | None]:
    if "://" in url:
        parts = urlsplit(url)
        host = parts.hostname or (parse_qs(parts.query).get("host") or [""])[0] or _DEFAULT_SOCKET_DIR
        try:
            port = parts.port
        except ValueError:
            port = None
        return host, port
    # key=value connection string
    values = dict(item.partition("=")[::2] for item in url.split())
    port_text = values.get("port", "")
    return values.get("host") or _DEFAULT_SOCKET_DIR, int(port_text) if port_text.isdigit() else None
