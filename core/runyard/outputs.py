"""Output stores: where step outputs live between steps.

Steps may run in other processes or machines, so the orchestrator never hands a value
from one step to the next: a step writes its output through the store and reports a
*reference*; downstream steps read their inputs by reference. References are strings of
plain path components relative to the store's URL, starting ``RUN_ID/STEP_KEY`` (the file
store adds where the record is in its pack: see `FileOutputStore` and docs/concepts.md).
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import os
import pickle
import struct
import threading
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ConfigError, OutputPathError, OutputSerializationError
from .private import FILE_MODE, make_private_dirs, modes_in


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


PACK_PREFIX = ".pack-"
PACK_MAGIC = b"RUNYARD-OUTPUTS1"  # the first 16 bytes of every pack file
_RECORD = struct.Struct("<4sIIQ")  # marker, crc32 of key + value, key length, value length
_RECORD_MARK = b"RYO1"


def _pack_location(ref: str, loc: str) -> tuple[str, int, int]:
    """``(token, offset, length)`` of a pack reference's third part ``TOKEN.OFFSET.LENGTH``."""
    token, _, rest = loc.partition(".")
    offset, _, length = rest.partition(".")
    if not (len(token) == 16 and all(c in "0123456789abcdef" for c in token)
            and offset.isdigit() and length.isdigit() and offset.isascii() and length.isascii()):
        raise OutputPathError(
            f"output store: reference {ref!r} is neither RUN_ID/STEP_KEY nor RUN_ID/STEP_KEY/TOKEN.OFFSET.LENGTH"
        )
    return token, int(offset), int(length)


OPEN_PACKS = 16
"""How many of the packs a store wrote keep a read fd open (the newest)."""


class _Pack:
    """The pack file this process appends a run's outputs to (see `FileOutputStore`)."""

    __slots__ = ("pid", "token", "path", "size")

    def __init__(self, pid: int, token: str, path: str, size: int) -> None:
        self.pid, self.token, self.path, self.size = pid, token, path, size


class FileOutputStore(OutputStore):
    """Pickled outputs in files under a directory: the default, under ``$RUNYARD_HOME/outputs``.

    Layout (issue 18): each process appends the outputs it writes for a run to its own *pack
    file* ``<root>/RUN_ID/.pack-TOKEN`` (TOKEN: 16 random hex digits, so containers that all
    run as pid 1 never share one), one record per output: a header (marker, CRC-32 of key and
    value, their lengths), the step key, the pickled value. The reference says where the record
    is: ``RUN_ID/STEP_KEY/TOKEN.OFFSET.LENGTH``, so a read is one ``pread`` with no index and
    no directory scan, in this process or any other, and re-execution reads a parent's outputs
    through the references its events kept. Creating a file and renaming it per output cost
    ~0.7 ms per step on this machine; appending costs a few microseconds.

    Durability and visibility are today's: no fsync (as before); the pack is opened, written
    and closed before ``put`` returns the reference, so a reader that opens it afterwards, on
    another host over NFS too (close-to-open), sees the whole record. A record is only ever
    appended past every earlier one and never rewritten, so a torn write (a crash, a full disk)
    cannot damage earlier outputs: a failed write is cut off again (``ftruncate``) and, if that
    fails too, the pack is abandoned for a new one. A reader checks the marker, the key and the
    CRC, so a torn or garbled record is reported as a missing output, never unpickled. A pack
    found gone (``run delete``) is started anew. References of the older one-file-per-output
    layout (``RUN_ID/STEP_KEY``) are still read.

    Each run's folder is checked once per store object (inside the root once symlinks are
    followed) and created owner-only; packs are created with ``O_EXCL`` and opened with
    ``O_NOFOLLOW``, so no output is read or written through a link.
    """

    def __init__(self, base: str | os.PathLike[str]) -> None:
        self.base = Path(base).resolve()
        self.url = self.base.as_uri()
        self._run_dirs: dict[str, tuple[str, int]] = {}  # run id -> (its folder, mode of files in it)
        self._packs: dict[str, _Pack] = {}  # run id -> this process's pack for it
        self._own: dict[str, int] = {}  # token -> read fd of a pack this store wrote
        self._lock = threading.Lock()  # appends
        self._fds_lock = threading.Lock()  # reads through, and closing of, the fds in `_own`
        self._lock_pid = os.getpid()

    def _check_inside(self, path: Path, ref: str) -> None:
        real = path.resolve()
        if not real.is_relative_to(self.base) or real == self.base:
            raise OutputPathError(
                f"output store {self.base}: reference {ref!r} resolves to {real}, outside the store "
                "(a symbolic link?); refused"
            )

    def _path(self, ref: str) -> Path:
        """Where ``ref`` lives; refused unless it is under the root once symlinks are followed."""
        path = self.base / check_ref(ref)
        self._check_inside(path, ref)
        return path

    def _run_dir(self, run_id: str, *, create: bool) -> str | None:
        """The checked folder of ``run_id``'s outputs (made if ``create``), or None if it does not exist."""
        known = self._run_dirs.get(run_id)
        if known is not None:
            return known[0]
        folder = self.base / _component(run_id, "run id")
        self._check_inside(folder, run_id)
        if create:
            make_private_dirs(folder)
        elif not folder.is_dir():
            return None  # not cached: it may be created later
        self._run_dirs[run_id] = (str(folder), modes_in(folder)[1])
        return str(folder)

    def put(self, run_id: str, step_key: str, value: Any) -> str:
        data = _dumps(step_key, value)
        make_ref(run_id, step_key)  # both checked before anything is written
        key = step_key.encode()
        head = _RECORD.pack(_RECORD_MARK, zlib.crc32(data, zlib.crc32(key)), len(key), len(data))
        if self._lock_pid != os.getpid():  # a forked child: another thread may have held the locks
            self._lock, self._fds_lock, self._lock_pid = threading.Lock(), threading.Lock(), os.getpid()
        with self._lock:
            for retry in (False, True):
                try:
                    pack = self._pack(run_id)
                except OSError as e:
                    raise _write_error(e, step_key, len(data), str(self.base / run_id)) from e
                try:
                    fd = os.open(pack.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except FileNotFoundError:
                    # The run's folder or the pack was removed (`run delete`): start again.
                    self._forget(run_id)
                    if retry:
                        raise
                    continue
                offset = pack.size
                try:
                    _pwrite_all(fd, head + key, offset)
                    _pwrite_all(fd, data, offset + len(head) + len(key))
                except OSError as e:
                    self._cut(run_id, pack, fd)
                    raise _write_error(e, step_key, len(data), pack.path) from e
                finally:
                    os.close(fd)
                pack.size = offset + len(head) + len(key) + len(data)
                return f"{run_id}/{step_key}/{pack.token}.{offset}.{pack.size - offset}"
        raise AssertionError("unreachable")

    def _pack(self, run_id: str) -> _Pack:
        """This process's pack for ``run_id``, created (with its magic) on first use.

        A forked child inherits the parent's store but not its pack: the pid is checked."""
        pack = self._packs.get(run_id)
        if pack is not None and pack.pid == os.getpid():
            return pack
        folder = self._run_dir(run_id, create=True)
        assert folder is not None
        token = os.urandom(8).hex()  # os, not secrets: secrets pulls hmac and hashlib into start-up
        for retry in (False, True):
            path = os.path.join(folder, PACK_PREFIX + token)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
                break
            except FileNotFoundError:
                if retry:
                    raise
                self._run_dirs.pop(run_id, None)  # the folder was removed: make it again
                folder = self._run_dir(run_id, create=True)
                assert folder is not None
        try:
            os.fchmod(fd, self._run_dirs[run_id][1])  # owner-only whatever the umask: unpickling runs code
            _pwrite_all(fd, PACK_MAGIC, 0)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        pack = _Pack(os.getpid(), token, path, len(PACK_MAGIC))
        with self._fds_lock:
            self._own[token] = fd
            if len(self._own) > OPEN_PACKS:
                # A long-lived worker writes for run after run: only the newest packs keep a
                # read fd (the others are read by opening them), so fds do not pile up.
                old = next(iter(self._own))
                os.close(self._own.pop(old))
                for rid in [r for r, p in self._packs.items() if p.token == old]:
                    del self._packs[rid]
        self._packs[run_id] = pack
        return pack

    def _forget(self, run_id: str) -> None:
        self._run_dirs.pop(run_id, None)
        pack = self._packs.pop(run_id, None)
        if pack is not None and pack.pid == os.getpid():
            with self._fds_lock:
                fd = self._own.pop(pack.token, None)
                if fd is not None:
                    os.close(fd)

    def _cut(self, run_id: str, pack: _Pack, fd: int) -> None:
        """Undo a failed append, so the disk space is back; abandon the pack if that fails too."""
        try:
            os.ftruncate(fd, pack.size)
        except OSError:
            # Earlier records are intact either way; later ones go to a new pack.
            self._packs.pop(run_id, None)

    def get(self, ref: str) -> Any:
        parts = ref.split("/") if isinstance(ref, str) else ()
        if len(parts) == 3:
            return pickle.loads(self._read_record(ref, *parts))
        if len(parts) != 2:
            return pickle.loads(self._read_any(ref))  # not a reference of ours: checked the long way
        run_id, step_key = parts
        if step_key.startswith(PACK_PREFIX):
            raise KeyError(ref)  # a pack is not an output
        folder = self._run_dir(_component(run_id, f"reference {ref!r}: part"), create=False)
        if folder is None:
            raise KeyError(ref)
        path = os.path.join(folder, _component(step_key, f"reference {ref!r}: part"))
        with self._open_nofollow(path, ref) as f:
            return pickle.loads(f.read())

    def _open_nofollow(self, path: str, ref: str) -> io.FileIO:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KeyError(ref) from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputPathError(
                    f"output store {self.base}: reference {ref!r} is a symbolic link; refused"
                ) from None
            raise
        return open(fd, "rb", buffering=0)

    def _read_record(self, ref: str, run_id: str, step_key: str, loc: str) -> memoryview:
        """The pickled value a pack reference names, checked against its header."""
        what = f"reference {ref!r}: part"
        _component(run_id, what)
        _component(step_key, what)
        token, offset, length = _pack_location(ref, loc)
        record = None
        if token in self._own:
            with self._fds_lock:  # not closed (and its number reused) while read
                fd = self._own.get(token)
                if fd is not None:
                    record = os.pread(fd, length, offset)
        if record is None:
            folder = self._run_dir(run_id, create=False)
            if folder is None:
                raise KeyError(ref)
            with self._open_nofollow(os.path.join(folder, PACK_PREFIX + token), ref) as f:
                record = os.pread(f.fileno(), length, offset)
        view = memoryview(record)
        key = step_key.encode()
        start = _RECORD.size + len(key)
        if len(record) >= start:
            mark, crc, klen, dlen = _RECORD.unpack_from(view)
            if (mark == _RECORD_MARK and klen == len(key) and start + dlen == length == len(record)
                    and view[_RECORD.size:start] == key and zlib.crc32(view[start:], zlib.crc32(key)) == crc):
                return view[start:]
        raise KeyError(
            f"{ref}: the output's record in its pack file is incomplete or damaged (a write torn by a crash "
            "or a full disk); run the step again"
        )

    def _read_any(self, ref: str) -> bytes:
        try:
            return self._path(ref).read_bytes()
        except FileNotFoundError:
            raise KeyError(ref) from None


def _write_error(e: OSError, step_key: str, size: int, where: str) -> OSError:
    """The OS error (ENOSPC, EDQUOT, EACCES) is what the user must see, with the step it hit."""
    return OSError(e.errno, f"could not write the output of step '{step_key}' ({size} bytes): {e.strerror}", where)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


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
