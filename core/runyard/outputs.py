"""Output stores: where step outputs live between steps.

Steps may run in other processes or machines, so the orchestrator never hands a value
from one step to the next: a step writes its output through the store and reports a
*reference*; downstream steps read their inputs by reference. References are strings
relative to the store's URL (``RUN_ID/STEP_KEY``).
"""

from __future__ import annotations

import itertools
import os
import pickle
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ConfigError, OutputPathError, OutputSerializationError
from .private import make_private_dirs, write_private


class OutputStore(ABC):
    """Stores step outputs by run id and step key. Subclass to store them elsewhere."""

    url: str

    @abstractmethod
    def put(self, run_id: str, step_key: str, value: Any) -> str:
        """Store ``value`` and return its reference."""

    @abstractmethod
    def get(self, ref: str) -> Any:
        """Return the value stored under ``ref``; raise KeyError if there is none."""

    def has(self, ref: str) -> bool:
        try:
            self.get(ref)
        except KeyError:
            return False
        return True


def _component(value: str, what: str) -> str:
    """``value`` if it is one plain path component: the caller joins it under the store's root."""
    if (
        not isinstance(value, str)
        or value in ("", ".", "..")
        or "/" in value
        or "\\" in value
        or "\0" in value
        or len(value) > 255
    ):
        raise OutputPathError(
            f"output store: {what} {value!r} is not a plain name (no '/', '\\', '..', NUL, empty or over "
            "255 characters), so an output under it could land outside the store; the run or step is refused"
        )
    return value


def make_ref(run_id: str, step_key: str) -> str:
    """The reference of a step's output: ``RUN_ID/STEP_KEY``, each checked to be one component."""
    return f"{_component(run_id, 'run id')}/{_component(step_key, 'step key')}"


def check_ref(ref: str) -> str:
    """``ref`` if it is a relative path of plain components (what `make_ref` builds)."""
    if not isinstance(ref, str) or not ref:
        raise OutputPathError(f"output store: reference {ref!r} is empty or not a string")
    for part in ref.split("/"):
        _component(part, f"reference {ref!r}: part")
    return ref


def _dumps(step_key: str, value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # pickle raises several unrelated types
        raise OutputSerializationError(step_key, value, e) from e


class FileOutputStore(OutputStore):
    """Pickled files under a directory: the default, under ``$RUNYARD_HOME/outputs``."""

    def __init__(self, base: str | os.PathLike[str]) -> None:
        self.base = Path(base).resolve()
        self.url = self.base.as_uri()

    def _path(self, ref: str) -> Path:
        """Where ``ref`` lives; refused unless it is under the root once symlinks are followed."""
        path = self.base / check_ref(ref)
        real = path.resolve()
        if not real.is_relative_to(self.base) or real == self.base:
            raise OutputPathError(
                f"output store {self.base}: reference {ref!r} resolves to {real}, outside the store "
                "(a symbolic link?); refused"
            )
        return path

    def put(self, run_id: str, step_key: str, value: Any) -> str:
        data = _dumps(step_key, value)
        ref = make_ref(run_id, step_key)
        path = self._path(ref)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            make_private_dirs(path.parent)
            # Write then rename, so a reader in another process never sees half a file.
            write_private(tmp, data)  # owner-only whatever the umask: unpickling it runs code
            os.replace(tmp, path)
        except OSError as e:
            # A partial file left behind (a full disk) would keep the disk full for the
            # next run too; the OS error (ENOSPC, EDQUOT, EACCES) is what the user must see.
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise OSError(
                e.errno, f"could not write the output of step '{step_key}' ({len(data)} bytes): {e.strerror}", str(path)
            ) from e
        return ref

    def get(self, ref: str) -> Any:
        try:
            data = self._path(ref).read_bytes()
        except FileNotFoundError:
            raise KeyError(ref) from None
        return pickle.loads(data)


class MemoryOutputStore(OutputStore):
    """Values kept in this process, unpickled: for in-process runs on an ephemeral instance.

    Only handlers that run steps in the orchestrating process can use it.
    """

    _stores: dict[str, MemoryOutputStore] = {}
    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.url = f"memory://{os.getpid()}-{next(self._ids)}"
        self._values: dict[str, Any] = {}
        MemoryOutputStore._stores[self.url] = self

    def put(self, run_id: str, step_key: str, value: Any) -> str:
        ref = make_ref(run_id, step_key)
        self._values[ref] = value
        return ref

    def get(self, ref: str) -> Any:
        return self._values[ref]

    def close(self) -> None:
        MemoryOutputStore._stores.pop(self.url, None)


class FsspecOutputStore(OutputStore):
    """Any fsspec URL (``s3://bucket/prefix``, ``gcs://...``), for workers on other machines."""

    def __init__(self, url: str) -> None:
        try:
            import fsspec
        except ImportError:
            raise ConfigError(
                f"output store '{url}' needs fsspec: pip install fsspec (plus the filesystem's package)"
            ) from None
        self.url = url.rstrip("/")
        self._fs, self._root = fsspec.core.url_to_fs(self.url)

    def put(self, run_id: str, step_key: str, value: Any) -> str:
        data = _dumps(step_key, value)
        ref = make_ref(run_id, step_key)
        with self._fs.open(f"{self._root}/{ref}", "wb") as f:
            f.write(data)
        return ref

    def get(self, ref: str) -> Any:
        try:
            with self._fs.open(f"{self._root}/{check_ref(ref)}", "rb") as f:
                return pickle.loads(f.read())
        except FileNotFoundError:
            raise KeyError(ref) from None


_opened: dict[str, OutputStore] = {}


def open_output_store(url: str) -> OutputStore:
    """Open the store a URL names: a path or ``file://``, ``memory://``, or any fsspec URL."""
    store = _opened.get(url)
    if store is not None:
        return store
    parsed = urlparse(url)
    if parsed.scheme == "memory":
        try:
            return MemoryOutputStore._stores[url]
        except KeyError:
            raise ConfigError(
                f"output store '{url}' lives in another process; steps that run outside the "
                "orchestrating process need a file or fsspec output store"
            ) from None
    if parsed.scheme in ("", "file"):
        store = FileOutputStore(parsed.path if parsed.scheme else url)
    else:
        store = FsspecOutputStore(url)
    _opened[url] = store
    return store
