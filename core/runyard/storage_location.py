"""Where an instance's run storage keeps its data, for launchers that start run workers
elsewhere (a container, a pod) and must check that the worker can reach it."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from .instance import Instance


@attrs.frozen(kw_only=True)
class StorageLocation:
    """Where a run storage lives.

    ``name``: the storage's name in ``runyard.yaml`` (``sqlite``, ``postgres``);
    ``label`` what messages call it (``SQLite``; default: ``name``).
    ``path``: a file on this machine (SQLite): a run worker elsewhere needs that path.
    ``host``: a database server's host name or address, or a unix-socket directory
    (starting with ``/``); ``port`` its port when known.
    Neither ``path`` nor ``host``: the storage did not say (its spec has no ``location``).
    """

    name: str
    label: str = attrs.field(default=attrs.Factory(lambda self: self.name, takes_self=True))
    path: Path | None = None
    host: str | None = None
    port: int | None = None

    @property
    def is_file(self) -> bool:
        return self.path is not None

    @property
    def is_local_socket(self) -> bool:
        """The server is reached through a unix socket, only from this machine."""
        return self.host is not None and self.host.startswith("/")


def locate_storage(instance: Instance) -> StorageLocation:
    """Where ``instance``'s run storage lives, as its plugin reports it through the
    ``location`` of its `StorageSpec` (a callable ``(config, instance_home) -> StorageLocation``).

    Reads the instance's ``storage`` section (default ``sqlite``) and never opens the storage.
    An ephemeral instance's storage is in memory: a location with neither path nor host.
    """
    sel = instance.sections["storage"]
    name = sel.name if sel is not None else "sqlite"
    if instance.home is None:
        return StorageLocation(name=name)
    spec = instance.registry.storage(name)
    ref = getattr(spec, "location", None)
    if not ref:
        return StorageLocation(name=name)
    if sel is None:
        config = spec.config()
    else:
        config = instance.plugin_config("storage", sel)
    module, _, attr = ref.partition(":")
    locate: Any = importlib.import_module(module)
    for part in attr.split("."):
        locate = getattr(locate, part)
    found = locate(config, instance.home)
    return found if isinstance(found, StorageLocation) else StorageLocation(name=name)
