from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from runyard.plugin import resolve
from runyard.storage.sqlite import SqliteRunStorage

from .plugin import SqliteConfig

if TYPE_CHECKING:
    from runyard.storage.postgres import PostgresRunStorage

    from .postgres_plugin import PostgresConfig


def create_sqlite_storage(config: SqliteConfig, home: Path) -> SqliteRunStorage:
    # A relative path is relative to the instance folder (where runyard.yaml is), not the cwd.
    return SqliteRunStorage(home / Path(resolve(config.path) or "runyard.db").expanduser())


def create_postgres_storage(config: PostgresConfig, home: Path) -> PostgresRunStorage:
    from runyard.errors import PluginError

    try:
        from runyard.storage.postgres import PostgresRunStorage
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
