"""Loading jobs from code pointers: ``-f path/to/file.py`` or ``-m package.module``."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import threading
from pathlib import Path

import attrs

from .definitions import CodePointer, Definitions, JobDefinition
from .errors import JobLoadError


@attrs.frozen
class CodeLocation:
    pointer: CodePointer
    jobs: dict[str, JobDefinition]
    definitions: Definitions | None


def _module_name_for(path: Path) -> str:
    # Stable across processes so that pickled objects of classes defined in the file
    # load again in a step worker that imported the file under the same name.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return f"runyard_file_{path.stem}_{digest}"


# A module is in sys.modules before its code has run: without this lock, a second thread
# loading the same file (steps of one job on a threaded worker) would get it half-built.
_import_lock = threading.RLock()


def _import_file(path: Path) -> object:
    with _import_lock:
        return _import_file_locked(path)


def _import_file_locked(path: Path) -> object:
    if not path.exists():
        raise JobLoadError(f"job file '{path}' not found; check the path given to -f")
    if path.suffix != ".py":
        raise JobLoadError(f"job file '{path}' is not a Python file (.py)")
    name = _module_name_for(path)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise JobLoadError(f"cannot import '{path}'")
    module = importlib.util.module_from_spec(spec)
    module.__runyard_file__ = str(path)  # type: ignore[attr-defined]
    # Sibling modules of the job file import as they would when run as a script.
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        raise JobLoadError(f"error while importing '{path}': {type(e).__name__}: {e}") from e
    return module


def _import_module(name: str) -> object:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            raise JobLoadError(f"module '{name}' not found; is it installed or on PYTHONPATH?") from e
        raise JobLoadError(f"error while importing '{name}': {type(e).__name__}: {e}") from e
    except Exception as e:
        raise JobLoadError(f"error while importing '{name}': {type(e).__name__}: {e}") from e


def load_code_location(pointer: CodePointer) -> CodeLocation:
    if pointer.file is not None:
        module = _import_file(Path(pointer.file).resolve())
    else:
        assert pointer.module is not None
        module = _import_module(pointer.module)
    values = list(vars(module).values())
    defs = [v for v in values if isinstance(v, Definitions)]
    if len(defs) > 1:
        raise JobLoadError(f"{pointer.describe()}: defines {len(defs)} Definitions objects; keep one per code location")
    if defs:
        return CodeLocation(pointer, dict(defs[0].jobs), defs[0])
    jobs: dict[str, JobDefinition] = {}
    for v in values:
        if isinstance(v, JobDefinition):
            jobs.setdefault(v.name, v)
    return CodeLocation(pointer, jobs, None)


def load_job(pointer: CodePointer, job_name: str | None = None) -> tuple[JobDefinition, CodeLocation]:
    """Load one job; the name may be left out when the code location has exactly one."""
    loc = load_code_location(pointer)
    if not loc.jobs:
        raise JobLoadError(f"{pointer.describe()}: defines no job (decorate a function with @job)")
    if job_name is None:
        if len(loc.jobs) > 1:
            raise JobLoadError(
                f"{pointer.describe()}: defines several jobs ({', '.join(sorted(loc.jobs))}); choose one with -j JOB"
            )
        (job,) = loc.jobs.values()
        return job, loc
    try:
        return loc.jobs[job_name], loc
    except KeyError:
        raise JobLoadError(
            f"{pointer.describe()}: no job named '{job_name}'; jobs defined there: {', '.join(sorted(loc.jobs))}"
        ) from None
