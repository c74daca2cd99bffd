from __future__ import annotations

from pathlib import Path

from runyard.plugin import resolve
from runyard.storage.sqlite import SqliteRunStorage

from .plugin import SqliteConfig


def create_sqlite_storage(config: SqliteConfig, home: Path) -> SqliteRunStorage:
    return SqliteRunStorage(resolve(config.path) or home / "runyard.db")
