"""Entry points of one group, read straight from the installed distributions' metadata.

`importlib.metadata` finds the same thing, but importing it pulls in ``email``, ``zipfile``,
``csv``, ``pathlib`` and more, and asking an entry point's distribution for its name parses
the whole ``METADATA`` file with the ``email`` package: about a fifth of ``runyard --help``
before this module existed. Discovery stays live, with nothing kept between processes: every
call lists the ``*.dist-info`` / ``*.egg-info`` folders of every ``sys.path`` directory and
reads their ``entry_points.txt``, so a plugin installed or removed a moment ago is seen, and
a broken one fails when it is loaded, as before.

The rules are importlib.metadata's: ``sys.path`` order; a distribution found twice counts
once, where it is found first (names compared normalised, PEP 503); the ``[group]`` section
of ``entry_points.txt`` gives ``name = module:attr [extras]``. Where a ``sys.path`` entry is
not a plain directory (a zip file, an egg), this module hands over to importlib.metadata,
which knows those layouts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

_INFO_SUFFIXES = (".dist-info", ".egg-info")


def _normalise(name: str) -> str:
    """PEP 503: runs of ``-``, ``_`` and ``.`` are one ``-``; case does not matter."""
    out: list[str] = []
    for ch in name.lower():
        if ch in "-_.":
            if out and out[-1] != "-":
                out.append("-")
        else:
            out.append(ch)
    return "".join(out).strip("-")


class Distribution:
    """The installed distribution an entry point comes from: its metadata folder, and its
    ``Name`` and ``Version`` read from the headers of ``METADATA`` (``PKG-INFO``) on first use."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._headers: dict[str, str] | None = None

    def _header(self, key: str) -> str:
        if self._headers is None:
            self._headers = {}
            for file in ("METADATA", "PKG-INFO"):
                try:
                    with open(os.path.join(self._path, file), encoding="utf-8", errors="replace") as f:
                        for line in f:
                            if not line.strip():
                                break  # the headers end at the first blank line
                            k, sep, v = line.partition(":")
                            if sep and k in ("Name", "Version") and k not in self._headers:
                                self._headers[k] = v.strip()
                    break
                except OSError:
                    continue
        return self._headers.get(key, "")

    @property
    def name(self) -> str:
        return self._header("Name") or _name_from_folder(os.path.basename(self._path))

    @property
    def version(self) -> str:
        return self._header("Version") or "?"


def _name_from_folder(folder: str) -> str:
    stem = folder.rsplit(".", 1)[0]
    return stem.split("-", 1)[0]


class EntryPoint:
    """``name = module:attr`` of a group; `load` imports it (like importlib.metadata's)."""

    def __init__(self, name: str, value: str, group: str, dist: Distribution | None) -> None:
        self.name = name
        self.value = value
        self.group = group
        self.dist = dist

    def load(self) -> Any:
        import importlib

        ref = self.value.split("[", 1)[0].strip()  # `[extras]` only matter to installers
        module_name, _, attr = ref.partition(":")
        obj: Any = importlib.import_module(module_name.strip())
        for part in attr.strip().split(".") if attr.strip() else ():
            obj = getattr(obj, part)
        return obj

    def __repr__(self) -> str:
        return f"EntryPoint(name={self.name!r}, value={self.value!r}, group={self.group!r})"


def _group_lines(text: str, group: str) -> Iterator[tuple[str, str]]:
    inside = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line[0] == "[" and line[-1] == "]":
            inside = line[1:-1].strip() == group
            continue
        if inside:
            name, sep, value = line.partition("=")
            if sep and name.strip():
                yield name.strip(), value.strip()


def entry_points(group: str, path: list[str] | None = None) -> list[Any]:
    """The entry points of ``group`` in every distribution on ``path`` (default ``sys.path``)."""
    entries = sys.path if path is None else path
    found: list[Any] = []
    seen: set[str] = set()
    for entry in entries:
        directory = entry or "."
        try:
            names = os.listdir(directory)
        except NotADirectoryError:
            return _from_importlib(group)  # a zip or an egg: importlib.metadata reads those
        except OSError:
            continue
        for folder in sorted(names):
            if not folder.endswith(_INFO_SUFFIXES):
                continue
            info = os.path.join(directory, folder)
            dist = Distribution(info)
            key = _normalise(_name_from_folder(folder))
            if key in seen:
                continue
            seen.add(key)
            try:
                with open(os.path.join(info, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            for name, value in _group_lines(text, group):
                found.append(EntryPoint(name, value, group, dist))
    return found


def _from_importlib(group: str) -> list[Any]:
    from importlib.metadata import entry_points as ep

    return list(ep(group=group))
