"""``runyard docker build-image``: an image holding runyard, runyard-docker and the user's
code, built by the local Docker engine without any registry.

What goes in:

* a Python environment at /opt/runyard (a venv of the base image's ``python3``) with
  runyard and runyard-docker installed from a wheelhouse built on this machine: from the
  source checkout runyard runs from (an editable or workspace install), else the same
  versions from the package index;
* ``--with SPEC``: more packages for the steps (a project directory, a wheel, or a
  requirement such as ``pandas==2.2``), built into the same wheelhouse;
* ``--code DIR``: a directory of job code copied to the *same absolute path* in the
  image and put on ``PYTHONPATH``, so file code pointers resolve identically and
  ``mount_code: false`` can skip the bind mount.

The base image needs ``python3`` with ``venv`` (Debian's python3 + python3-venv, or the
official ``python:3.11-slim``); its Python must match the wheels' (the host's minor version).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

from runyard import ConfigError

SOURCE_HASH_LABEL = "runyard.source-hash"
_SKIP_DIRS = {"__pycache__", ".git", ".venv", "node_modules", ".pytest_cache", ".ruff_cache", "tests", ".tools"}


def source_checkout() -> Path | None:
    """The runyard source tree this process runs from, when it runs from one."""
    import runyard

    root = Path(runyard.__file__).resolve().parents[2]
    py = root / "pyproject.toml"
    if py.is_file() and (root / "contrib-docker" / "pyproject.toml").is_file() and 'name = "runyard"' in py.read_text():
        return root
    return None


def _files(path: Path) -> Iterable[Path]:
    if path.is_file():
        yield path
        return
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(n for n in dirnames if n not in _SKIP_DIRS and not n.endswith(".egg-info"))
        for name in sorted(filenames):
            if not name.endswith((".pyc", ".pyo")):
                yield Path(dirpath) / name


def _hash(paths: Sequence[Path], extra: Sequence[str]) -> str:
    h = hashlib.sha256()
    for item in extra:
        h.update(item.encode() + b"\0")
    for base in paths:
        for f in _files(base):
            h.update(str(f).encode() + b"\0")
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _pip() -> tuple[list[str], str | None]:
    """A pip command; when this interpreter has none (uv-made venvs), a throwaway venv's."""
    try:
        import pip  # noqa: F401

        return [sys.executable, "-m", "pip"], None
    except ImportError:
        pass
    tmp = tempfile.mkdtemp(prefix="runyard-pip-")
    subprocess.run([sys.executable, "-m", "venv", tmp], check=True, stdout=subprocess.DEVNULL)
    return [os.path.join(tmp, "bin", "python"), "-m", "pip"], tmp


def _wheel_cache(key: str) -> Path | None:
    """Where wheels built from the same sources are kept between builds (None: no cache),
    so that rebuilding an image for new job code (``--code``) skips building wheels."""
    base = os.environ.get("RUNYARD_WHEEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "runyard", "wheelhouse"
    )
    if base in ("", "0", "off"):
        return None
    return Path(base) / key


def _store_wheels(wheels: Path, cached: Path, keep: int = 3) -> None:
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
        shutil.copytree(wheels, tmp)
        os.replace(tmp, cached)
        # Keep the few most recent sets: each source change makes a new one.
        sets = sorted((p for p in cached.parent.iterdir() if not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime, reverse=True)
        for old in sets[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    except OSError:
        pass  # a cache that cannot be written only costs time


def build_image(
    *,
    tag: str,
    base: str,
    with_: Sequence[str] = (),
    code: Sequence[str] = (),
    labels: dict[str, str] | None = None,
    if_changed: bool = False,
    docker_host: str | None = None,
    echo: object = print,
) -> str:
    """Build the image and return its id. Raises ConfigError with the fix when it cannot."""
    from . import _docker as d

    say = echo if callable(echo) else print
    client = d.connect(docker_host, "docker")
    try:
        base_id = client.images.get(base).id
    except Exception:
        raise ConfigError(
            f"--base: image {base!r} is not in the Docker engine; pull it, or build one with python3 and venv "
            "(this project's scripts/build-test-image.sh builds runyard-test/py311-base:bookworm with mmdebstrap)"
        ) from None
    root = source_checkout()
    code_dirs = [Path(c).resolve() for c in code]
    for c in code_dirs:
        if not c.is_dir():
            raise ConfigError(f"--code: {c} is not a directory")
    sources: list[str]
    if root is not None:
        sources = [str(root), str(root / "contrib-docker")]
        hashed = [root / "core", root / "plugins", root / "contrib-docker" / "runyard_docker",
                  root / "pyproject.toml", root / "contrib-docker" / "pyproject.toml"]
    else:
        sources = [f"runyard=={metadata.version('runyard')}", f"runyard-docker=={metadata.version('runyard-docker')}"]
        hashed = []
    hashed += [Path(w) for w in with_ if os.path.exists(w)]
    hashed_sources = list(hashed)  # what the wheels are built from: they are reused while it is unchanged
    hashed += code_dirs
    digest = _hash(hashed, [base_id, *sources, *with_, *map(str, code_dirs)])
    previous = None
    try:
        previous = client.images.get(tag)
    except Exception:
        pass
    if if_changed and previous is not None and (previous.labels or {}).get(SOURCE_HASH_LABEL) == digest:
        say(f"image {tag} is up to date ({SOURCE_HASH_LABEL}={digest})")
        return previous.id
    ctx = Path(tempfile.mkdtemp(prefix="runyard-image-"))
    pip_venv = None
    try:
        wheels = ctx / "wheelhouse"
        cached = _wheel_cache(_hash(hashed_sources, [*sources, *with_]))
        if cached is not None and cached.is_dir():
            say(f"using the wheels built before ({cached})")
            shutil.copytree(cached, wheels)
        else:
            wheels.mkdir()
            pip, pip_venv = _pip()
            say(f"building wheels of {', '.join(sources + list(with_))}")
            done = subprocess.run(
                [*pip, "wheel", "--quiet", "--disable-pip-version-check", "--wheel-dir", str(wheels), *sources,
                 *with_],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            if done.returncode != 0:
                raise ConfigError(f"building the wheelhouse failed (pip wheel):\n{done.stdout[-3000:]}")
            if cached is not None:
                _store_wheels(wheels, cached)
        lines = [
            f"FROM {base}",
            "COPY wheelhouse /tmp/wheelhouse",
            "RUN python3 -m venv /opt/runyard"
            " && /opt/runyard/bin/pip install --quiet --no-index --no-cache-dir --disable-pip-version-check"
            " /tmp/wheelhouse/*.whl && rm -rf /tmp/wheelhouse",
            "ENV PATH=/opt/runyard/bin:$PATH PYTHONDONTWRITEBYTECODE=1",
        ]
        for i, c in enumerate(code_dirs):
            shutil.copytree(c, ctx / f"code{i}", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".git"))
            lines.append(f"COPY code{i} {c}")
        if code_dirs:
            lines.append(f"ENV PYTHONPATH={':'.join(map(str, code_dirs))}")
        (ctx / "Dockerfile").write_text("\n".join(lines) + "\n")
        say(f"building image {tag} from {base}")
        all_labels = {**(labels or {}), SOURCE_HASH_LABEL: digest}
        try:
            image, _ = client.images.build(path=str(ctx), tag=tag, labels=all_labels, rm=True, forcerm=True)
        except Exception as e:
            log = "".join(str(chunk.get("stream", chunk.get("error", ""))) for chunk in getattr(e, "build_log", []))
            raise ConfigError(f"docker build of {tag} failed: {e}\n{log[-3000:]}") from None
        say(f"built {tag} ({image.short_id})")
        if previous is not None and previous.id != image.id:
            # The image this tag named before is now untagged: remove it unless something uses it.
            try:
                if not client.images.get(previous.id).tags:
                    client.images.remove(previous.id, noprune=False)
            except Exception:
                pass
        return image.id
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
        if pip_venv:
            shutil.rmtree(pip_venv, ignore_errors=True)
