"""Owner-only files and folders, whatever the umask.

The instance holds pickled step outputs (unpickling one runs code), captured stdout and
log lines: another local user must not read them, nor plant files among them. So every
folder runyard creates is 0700 and every file 0600, set explicitly rather than left to
the process umask (the usual 022 would give 0755/0644).

Sharing is a deliberate act: a folder with the set-group-ID bit (``chmod 2770``, see
docs/configuration.md) makes what runyard creates inside it readable (and writable, if the
folder is) by that folder's group. Never by others.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def modes_in(parent: str | os.PathLike[str]) -> tuple[int, int]:
    """The (folder, file) modes for something new created directly in ``parent``."""
    try:
        mode = os.stat(parent).st_mode
    except OSError:
        return DIR_MODE, FILE_MODE
    if not mode & stat.S_ISGID:
        return DIR_MODE, FILE_MODE
    group = mode & 0o070
    return stat.S_ISGID | DIR_MODE | group, FILE_MODE | (group & 0o060)


def make_private_dirs(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and its missing parents, each owner-only; existing folders are left as
    they are (an administrator may have shared them on purpose). Returns the path."""
    path = Path(path)
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for p in reversed(missing):
        dir_mode, _ = modes_in(p.parent)
        try:
            os.mkdir(p, DIR_MODE)
        except FileExistsError:
            continue  # another process made it first: its mode is its creator's business
        os.chmod(p, dir_mode)  # the umask may have taken bits we need, or setgid sharing adds some
    if not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder")
    return path


def open_private(path: str | os.PathLike[str], flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    """Open ``path`` for writing with ``flags``, creating it owner-only if it does not exist.

    An existing file keeps its mode. Pass ``os.O_EXCL`` in ``flags`` to insist on a new file.
    Returns the file descriptor.
    """
    _, file_mode = modes_in(Path(path).parent)
    flags |= getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        if flags & os.O_EXCL:
            raise
        return os.open(path, flags)
    try:
        os.fchmod(fd, file_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_private_file(path: str | os.PathLike[str]) -> None:
    """Create ``path`` empty and owner-only unless it exists (then leave it alone, even
    unopened: a reader of a shared instance may not have write access to it)."""
    try:
        fd = open_private(path, os.O_WRONLY | os.O_EXCL)
    except FileExistsError:
        return
    os.close(fd)


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a new owner-only file at ``path``, a temporary name of the caller's.

    A file already there is a leftover of a crashed writer with the same name: it is
    replaced, never written through (it could be a link to somewhere else).
    """
    flags = os.O_WRONLY | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = open_private(path, flags)
    except FileExistsError:
        os.unlink(path)
        fd = open_private(path, flags)
    with open(fd, "wb") as f:
        f.write(data)
