"""The ``runyard`` console script: replays the output of pure invocations, else runs the CLI.

``runyard --help``, ``runyard plugin list [--json]``, ``runyard job execute --help``,
``runyard --version`` and the like print text that depends only on the installed code: which
distributions are installed, the files imported to render it (runyard, click, every plugin
module) and a few environment variables. Rendering it needs click, the entry points
(`runyard.entrypoints`), pluggy, attrs and every plugin module: several times the
interpreter's own start. So the
first run renders it with the real CLI and keeps what it printed; later runs print that
again while it is still true, importing nothing beyond this module.

A kept output is replayed only while, all alike:

* the interpreter (``sys.version``, ``sys.prefix``), ``sys.path``, the arguments, the terminal
  width (``COLUMNS``, the terminal's size) and every ``RUNYARD_*`` variable are the same;
* every ``sys.path`` directory has the same modification time and the same ``*.dist-info`` /
  ``*.egg-info`` entries: installing, upgrading or uninstalling a distribution adds or removes
  one, so new and removed plugins are noticed;
* every file imported while rendering it (outside the standard library) has the same size
  and modification time: an edited plugin, or an edited runyard, renders again.

Only clean outputs are kept: exit status 0, nothing on stderr, and no plugin that failed to
load, so a broken plugin is reported afresh every time (its failed module was never
imported, so its fix could not be noticed). Anything else (no cache, unreadable, not ours,
malformed, a mismatch) runs the real CLI. ``RUNYARD_CLI_CACHE=0`` turns the cache off.

The cache is one ``marshal`` file per interpreter environment in ``$RUNYARD_CACHE_DIR``
(default ``$XDG_CACHE_HOME/runyard`` or ``~/.cache/runyard``), created owner-only, and read
only when this user owns it and nobody else can write it or its directory: it holds text to
print, never anything imported or called. ``marshal`` rather than JSON because ``json``
imports ``re``, which alone costs a tenth of the interpreter's start.
"""

from __future__ import annotations

import marshal
import os
import sys
import zlib

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not imported at run time: it pulls in re
    from typing import Any

FORMAT = 1
MAX_ENTRIES = 16  # kept outputs per environment, newest first
CACHE_DIR_ENV = "RUNYARD_CACHE_DIR"
SWITCH_ENV = "RUNYARD_CLI_CACHE"
_STDLIB = os.path.dirname(os.__file__) + os.sep  # never edited in place; sys.version covers upgrades
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def cacheable(argv: list[str]) -> bool:
    """Invocations whose output depends only on installed code: help, version, plugin list."""
    if argv in (["--version"], ["plugin", "list"], ["plugin", "list", "--json"]):
        return True
    if not argv or argv[-1] not in ("--help", "-h") or len(argv) > 4:
        return False
    # Only subcommand names before the help flag: an option could read a file or the instance.
    return all(a and a[0] != "-" and set(a) <= _NAME_CHARS for a in argv[:-1])


def enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_path() -> str:
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "runyard"
    )
    # One file per interpreter environment: venvs share the user's cache directory, and
    # marshal's format belongs to one Python version.
    tag = zlib.crc32(f"{sys.prefix}\0{sys.executable}\0{sys.version}".encode()) & 0xFFFFFFFF
    return os.path.join(root, f"cli-{tag:08x}.marshal")


def _columns() -> tuple[str, int | None]:
    # What click's help formatter reads (through shutil.get_terminal_size), without importing shutil.
    try:
        size: int | None = os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else None
    except (OSError, ValueError):
        size = None
    return os.environ.get("COLUMNS", ""), size


def environment_key(argv: list[str]) -> tuple[object, ...]:
    """Everything besides imported files that decides the output; a listing per sys.path entry."""
    paths = []
    for entry in sys.path:
        try:
            mtime = os.stat(entry or ".").st_mtime_ns
            names = tuple(sorted(n for n in os.listdir(entry or ".") if n.endswith((".dist-info", ".egg-info"))))
        except OSError:  # a zip file or a missing directory: only its presence counts
            paths.append((entry, None, ()))
            continue
        paths.append((entry, mtime, names))
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("RUNYARD_")))
    return (FORMAT, sys.version, sys.prefix, tuple(argv), _columns(), env, tuple(paths))


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def imported_files() -> dict[str, tuple[int, int] | None]:
    """Size and mtime of every file outside the standard library this process imported."""
    files = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and not path.startswith(_STDLIB):
            files[path] = _stamp(path)
    return files


def _ours(path: str) -> bool:
    """Owned by this user, written by nobody else: the only files whose text is printed."""
    try:
        st, dir_st = os.stat(path), os.stat(os.path.dirname(path))
    except OSError:
        return False
    uid = os.getuid()
    return st.st_uid == dir_st.st_uid == uid and not (st.st_mode | dir_st.st_mode) & 0o022


def _entries() -> list[object]:
    path = cache_path()
    if not _ours(path):
        return []
    try:
        with open(path, "rb") as f:
            doc = marshal.load(f)
    except (OSError, EOFError, ValueError, TypeError):
        return []
    if not (isinstance(doc, tuple) and len(doc) == 2 and doc[0] == FORMAT and isinstance(doc[1], list)):
        return []
    return doc[1]


def lookup(key: tuple[object, ...]) -> tuple[str, str] | None:
    """The kept ``(stdout, stderr)`` for ``key``, if no file that rendered it changed."""
    for entry in _entries():
        if not (isinstance(entry, tuple) and len(entry) == 4) or entry[0] != key:
            continue
        _, files, out, err = entry
        if not (isinstance(files, dict) and isinstance(out, str) and isinstance(err, str)):
            return None
        for path, stamp in files.items():
            if not isinstance(path, str) or _stamp(path) != stamp:
                return None
        return out, err
    return None


def store(key: tuple[object, ...], out: str, err: str) -> None:
    """Keep an output; a cache that cannot be written is simply not used."""
    path = cache_path()
    entries = [e for e in _entries() if not (isinstance(e, tuple) and e and e[0] == key)][: MAX_ENTRIES - 1]
    doc = (FORMAT, [(key, imported_files(), out, err), *entries])
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            marshal.dump(doc, f)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except (OSError, ValueError):
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _plugins_all_loaded() -> bool:
    registry = sys.modules.get("runyard.registry")
    reg = getattr(registry, "_default", None)
    return reg is None or not reg.failures


def _render(argv: list[str]) -> tuple[int, str, str]:
    """Run the real CLI with its output captured: (exit status, stdout, stderr)."""
    import io

    from .cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    real = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    code: object = 0
    try:
        cli_main(argv)
    except SystemExit as e:
        code = e.code
    finally:
        sys.stdout, sys.stderr = real
    status = 0 if code is None else code if isinstance(code, int) else 1
    if isinstance(code, str):
        err.write(code + "\n")
    return status, out.getvalue(), err.getvalue()


_standalone = False


def standalone() -> bool:
    """Whether this process is the ``runyard`` command itself (started by `main`), not a
    program that calls the CLI inside itself (click's CliRunner)."""
    return _standalone


def main(argv: list[str] | None = None) -> Any:
    """The console script's entry point; returns what `runyard.cli.main` returns (the script
    passes it to ``sys.exit``)."""
    global _standalone
    args = sys.argv[1:] if argv is None else list(argv)
    if not (enabled() and cacheable(args)):
        from .cli import main as cli_main

        _standalone = argv is None

        return cli_main(args)
    key = environment_key(args)
    kept = lookup(key)
    if kept is None:
        status, out, err = _render(args)
        if status == 0 and not err and _plugins_all_loaded():
            store(key, out, err)
    else:
        status, (out, err) = 0, kept
    sys.stdout.write(out)
    sys.stderr.write(err)
    sys.stdout.flush()
    if status:
        sys.exit(status)
    return None
