"""Spec of the PostgreSQL storage. Imports nothing but the public plugin API: psycopg is
imported only when the storage is opened (``pip install "runyard[postgres]"``)."""

from __future__ import annotations

import attrs
from runyard.plugin import API_VERSION, StorageSpec, above, hookimpl

_positive = above(0, what="a number of seconds")


def _not_negative(_: object, attribute: attrs.Attribute, value: float) -> None:
    if value < 0:
        raise ValueError(f"'{attribute.name}' must be 0 seconds or more, got {value}")


@attrs.frozen(kw_only=True)
class PostgresConfig:
    """``url``: ``postgresql://user:password@host:5432/dbname`` (or ``{env: NAME}``; never
    logged or stored). ``connect_timeout``: seconds to wait for the server (whole seconds,
    at least 2). ``schema``: keep runyard's tables in this schema (created when missing)
    instead of the first schema of the server's ``search_path``. ``reconnect_timeout``:
    seconds to keep trying when the connection is lost while in use (a server restart, a
    failover) before the call fails, and with it the run; 0 fails at once."""

    url: str
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    schema: str | None = None
    reconnect_timeout: float = attrs.field(default=30.0, validator=_not_negative)


@hookimpl
def runyard_storages() -> list[StorageSpec]:
    return [
        StorageSpec(
            name="postgres",
            api_version=API_VERSION,
            storage="runyard_local.storages:create_postgres_storage",
            location="runyard_local.storages:locate_postgres_storage",
            config=PostgresConfig,
            extra="postgres",
            description="PostgreSQL database, shared by run workers in containers, pods or on other machines.",
        )
    ]
