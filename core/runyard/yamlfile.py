"""Read a YAML configuration file (``runyard.yaml``, a run config) within fixed bounds.

A configuration file is input from whoever could write it, so reading one must end
quickly with a `ConfigError` naming the file, whatever it holds: not a regular file (a
directory, ``/dev/zero``, a fifo), too large, not UTF-8, nested too deeply, aliases that
expand to millions of values (a "billion laughs" bomb), duplicate or non-string keys.

The checks run before the document is built: the file is read up to `MAX_BYTES`, then
its event stream is scanned, stopping at the first limit crossed, so a 20,000-deep or
alias-bomb file costs no more than its first few hundred events.
"""

from __future__ import annotations

import functools
import os
import stat
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError

MAX_BYTES = 512 * 1024
"""Largest configuration file read, in bytes."""

MAX_DEPTH = 64
"""Deepest nesting of mappings and lists."""

MAX_VALUES = 50_000
"""Most values (scalars, mappings, lists) a file may stand for, counting every value an
alias repeats as often as it is repeated: what the program would have to walk."""

_warned: set[str] = set()


def load_yaml_file(path: str | os.PathLike[str], *, what: str) -> Any:
    """Parse the YAML file at ``path`` into plain data (dicts, lists, scalars).

    ``what`` says what the file is for (``"runyard.yaml"``, ``"run config"``) and appears
    in error messages. Raises `ConfigError` naming the file and what is wrong; never
    anything else for bad content.
    """
    p = Path(path)
    text = _read_text(p, what)
    return parse_yaml(text, source=str(p), what=what)


def parse_yaml(text: str, *, source: str, what: str = "YAML") -> Any:
    """Parse YAML text within the bounds above; errors name ``source``."""
    import yaml

    _scan(text, source, what)
    loader = _loader_class()(text)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        raise ConfigError(_marked(source, e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: malformed YAML: {e}") from None
    except (ValueError, TypeError, OverflowError) as e:
        # A scalar the safe constructor cannot build, e.g. an integer over Python's
        # 4300-digit limit, or an unhashable key in a set.
        # The first sentence only: Python's advice (set_int_max_str_digits) is not the user's fix.
        raise ConfigError(f"{source}: the {what} holds a value that cannot be read: {str(e).split(';')[0]}") from None
    finally:
        loader.dispose()


def _read_text(path: Path, what: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (the {what})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what}: {e.strerror}") from None
    # Checked before opening: opening a fifo waits for a writer, and a device may act on open.
    _check_regular(path, st, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        _check_regular(path, st, what)  # it may have been replaced since the stat above
        _warn_if_writable_by_others(path, st, what)
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_BYTES:
            chunk = os.read(fd, MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what}: {e.strerror}") from None
    finally:
        os.close(fd)
    if size > MAX_BYTES:
        raise ConfigError(
            f"{path}: the {what} is larger than {MAX_BYTES // 1024} KiB, the limit for a configuration "
            "file; keep large data in files your steps read, and their paths in the config"
        )
    data = b"".join(chunks)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"{path}:{line}: the {what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "save it as UTF-8"
        ) from None


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a fifo (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_regular(path: Path, st: os.stat_result, what: str) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
    raise ConfigError(f"{path}: the {what} must be a regular YAML file, but this is {kind}")


def _warn_if_writable_by_others(path: Path, st: os.stat_result, what: str) -> None:
    """Say so (once per file) when any local user could change what this file configures."""
    key = str(path)
    if key in _warned or not st.st_mode & stat.S_IWOTH:
        return
    _warned.add(key)
    print(
        f"warning: {path}: the {what} is writable by every user on this machine "
        f"(mode {stat.S_IMODE(st.st_mode):04o}), so any of them can change what runyard runs; "
        f"fix: chmod o-w {path}",
        file=sys.stderr,
    )


@functools.cache
def _loader_class() -> type:
    import yaml

    # libyaml's parser when installed: several times faster than PyYAML's own.
    base: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class StrictLoader(base):  # type: ignore[misc, valid-type]
        """The safe loader, refusing duplicate and non-string mapping keys."""

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: dict[str, Any] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # `<<: *base`: explicit keys may override merged ones
                    key = self.construct_object(key_node, deep=True)
                    if not isinstance(key, str):
                        raise yaml.constructor.ConstructorError(
                            None, None,
                            f"key {key!r} is a {type(key).__name__}, but keys must be strings; quote it",
                            key_node.start_mark,
                        )
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None,
                            f"duplicate key '{key}' (first at line {seen[key].line + 1}); "
                            "a key may appear once in a mapping: merge the two or delete one",
                            key_node.start_mark,
                        )
                    seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def _scan(text: str, source: str, what: str) -> None:
    """Walk the event stream once, enforcing depth and expanded size, before any building.

    Each open collection keeps the number of values it stands for; an anchor records its
    node's count when the node closes, and an alias adds that count where it appears. So
    the expanded size is known without expanding anything.
    """
    import yaml

    loader = _loader_class()(text)
    # Per open collection: [values so far, anchor name or None]
    stack: list[list[Any]] = []
    anchors: dict[str, int] = {}
    open_anchors: set[str] = set()
    total = 0
    try:
        while loader.check_event():
            ev = loader.get_event()
            if isinstance(ev, yaml.CollectionStartEvent):
                if len(stack) >= MAX_DEPTH:
                    raise ConfigError(
                        f"{_where(source, ev)}: the {what} nests mappings and lists more than {MAX_DEPTH} "
                        "levels deep; flatten it"
                    )
                stack.append([1, ev.anchor])
                if ev.anchor:
                    open_anchors.add(ev.anchor)
                continue
            if isinstance(ev, yaml.CollectionEndEvent):
                count, anchor = stack.pop()
                if anchor:
                    anchors[anchor] = count
                    open_anchors.discard(anchor)
            elif isinstance(ev, yaml.ScalarEvent):
                count = 1
                if ev.anchor:
                    anchors[ev.anchor] = 1
            elif isinstance(ev, yaml.AliasEvent):
                if ev.anchor in open_anchors:
                    raise ConfigError(
                        f"{_where(source, ev)}: alias *{ev.anchor} refers to a mapping or list that "
                        "contains it; a configuration cannot be recursive"
                    )
                count = anchors.get(ev.anchor, 1)  # an undefined alias is the composer's to report
            else:
                continue  # stream and document events
            if stack:
                stack[-1][0] += count
            else:
                total += count
            if total + sum(frame[0] for frame in stack) > MAX_VALUES:
                raise ConfigError(
                    f"{_where(source, ev)}: the {what} stands for more than {MAX_VALUES:,} values "
                    "(counting what each alias repeats; an alias bomb?); keep large data in files "
                    "your steps read"
                )
    except yaml.MarkedYAMLError as e:
        raise ConfigError(_marked(source, e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: malformed YAML: {e}") from None
    finally:
        loader.dispose()


def _where(source: str, ev: Any) -> str:
    mark = getattr(ev, "start_mark", None)
    return f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source


def _marked(source: str, e: Any) -> str:
    import yaml

    mark = e.problem_mark or e.context_mark
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
    problem = e.problem or e.context
    if e.context and e.problem and e.context not in problem:
        problem = f"{problem} ({e.context})"
    if isinstance(e, yaml.constructor.ConstructorError):
        return f"{where}: {problem}"  # well-formed YAML holding a value runyard refuses
    return f"{where}: malformed YAML: {problem}"


def beside(folder: Path | None, value: str | None) -> str | None:
    """A path from a config file in ``folder``: relative means relative to that folder (not to
    the shell's working directory), ``~`` is the user's home; URLs are returned unchanged."""
    from urllib.parse import urlparse

    if folder is None or not value or urlparse(value).scheme:
        return value
    return str(folder / Path(value).expanduser())
