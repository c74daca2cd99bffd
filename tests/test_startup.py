"""Startup stays light: importing runyard, its CLI and discovering plugins imports no backend library.

Each check runs a fresh interpreter with ``-X importtime`` and reads the modules it imported
from stderr. ``-X importtime`` does not report modules loaded through
``importlib.import_module`` (as entry points and handler strings are), so the child also
prints ``sys.modules`` at exit. Stub packages named like the backends sit on PYTHONPATH, so an
import of one would succeed (and show up) even where the real library is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BACKENDS = ("dask", "distributed", "celery", "docker", "kubernetes", "boto3", "botocore")
RUNYARD = Path(sys.executable).parent / "runyard"
_MARK = "RUNYARD-TEST-MODULES "
_PRELUDE = (
    "import atexit, sys\n"
    f"atexit.register(lambda: sys.stderr.write({_MARK!r} + __import__('json').dumps(sorted(sys.modules)) + '\\n'))\n"
)

JOB_FILE = "from runyard import job, step\n\n@step\ndef s():\n    return 1\n\n@job\ndef j():\n    s()\n"


@pytest.fixture(scope="module")
def stub_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("backend-stubs")
    for name in BACKENDS:
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(f'"""Stub {name}: importing it at startup is a bug."""\n')
    return root


def imported_modules(stderr: str) -> set[str]:
    """Module names from ``-X importtime`` lines (``import time: self | cumulative | name``)
    and from the ``sys.modules`` dump of the prelude."""
    names: set[str] = set()
    for line in stderr.splitlines():
        if line.startswith(_MARK):
            names.update(json.loads(line[len(_MARK):]))
        elif line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.add(name)
    return names


def _env(stub_path: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(stub_path)
    env["RUNYARD_HOME"] = str(home)
    return env


def _check(modules: set[str], must_have: set[str]) -> None:
    assert must_have <= modules, f"found no {must_have - modules}: the import list is not being read"
    heavy = sorted(m for m in modules if m.split(".")[0] in BACKENDS)
    assert heavy == [], f"backend libraries imported at startup: {heavy}"


def _python(code: str, stub_path: Path, home: Path) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", _PRELUDE + code],
        env=_env(stub_path, home), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return imported_modules(proc.stderr)


def test_an_import_of_a_backend_would_be_seen(stub_path: Path, tmp_path: Path) -> None:
    assert "dask" in _python("import dask", stub_path, tmp_path)
    assert "celery" in _python("import importlib; importlib.import_module('celery')", stub_path, tmp_path)


def test_import_runyard(stub_path: Path, tmp_path: Path) -> None:
    _check(_python("import runyard", stub_path, tmp_path), {"runyard"})


def test_whole_public_api(stub_path: Path, tmp_path: Path) -> None:
    # The public names load lazily: touch every one so the whole API's imports are checked.
    code = "import runyard\nfor name in runyard.__all__:\n    getattr(runyard, name)\n"
    _check(_python(code, stub_path, tmp_path), {"runyard.definitions", "runyard.execution", "runyard.instance"})


def test_import_cli_and_discover_plugins(stub_path: Path, tmp_path: Path) -> None:
    code = (
        "import runyard.cli\n"
        "from runyard.registry import default_registry\n"
        "reg = default_registry()\n"
        "assert 'in_process' in reg.names('executor'), reg.names('executor')\n"
        "reg.all()\n"
        "reg.add_cli_commands(runyard.cli.cli)\n"
    )
    _check(_python(code, stub_path, tmp_path), {"runyard.cli", "runyard.registry", "pluggy", "runyard_local.plugin"})


@pytest.mark.parametrize(
    "args",
    [["plugin", "list"], ["plugin", "list", "--json"], ["--help"], ["instance", "validate"],
     ["job", "list", "-f", "JOBFILE"]],
)
def test_cli_commands(args: list[str], stub_path: Path, tmp_path: Path) -> None:
    jobfile = tmp_path / "jobs.py"
    jobfile.write_text(JOB_FILE)
    argv = [str(jobfile) if a == "JOBFILE" else a for a in args]
    code = f"from runyard.cli import main\nmain({argv!r})\n"
    _check(_python(code, stub_path, tmp_path), {"runyard.cli"})


def test_console_script_plugin_list(stub_path: Path, tmp_path: Path) -> None:
    env = {**_env(stub_path, tmp_path), "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run([str(RUNYARD), "plugin", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "in_process" in proc.stdout
    _check(imported_modules(proc.stderr), {"runyard.cli", "runyard.registry", "pluggy"})


@pytest.mark.parametrize("args", [["--help"], ["ui", "--help"], ["run", "list"]])
def test_cli_imports_no_web_stack(args: list[str], stub_path: Path, tmp_path: Path) -> None:
    """The ``ui`` command's web stack (the ui extra) loads only when ``runyard ui`` serves."""
    code = f"from runyard.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
    modules = _python(code, stub_path, tmp_path)
    assert "runyard.cli" in modules
    web = sorted(m for m in modules if m.split(".")[0] in ("starlette", "uvicorn", "jinja2", "runyard.ui")
                 or m.startswith("runyard.ui"))
    assert web == [], f"web stack imported by `runyard {' '.join(args)}`: {web}"


# What the pure commands must not import even when nothing is replayed (RUNYARD_CLI_CACHE=0):
# importlib.metadata (entry points are read by runyard.entrypoints), the step worker and
# request signing (loaded by runyard.plugin on first use), and error-only helpers.
NOT_AT_STARTUP = ("importlib.metadata", "email", "zipfile", "runyard.worker", "runyard.trust",
                  "difflib", "traceback", "hmac", "secrets")


@pytest.mark.parametrize("args", [["--help"], ["plugin", "list"], ["job", "execute", "--help"],
                                  ["instance", "validate"]])
def test_uncached_commands_import_only_what_they_use(args: list[str], stub_path: Path, tmp_path: Path) -> None:
    """With every contrib installed and a runyard.yaml naming backends (config parsed and
    checked against each plugin's settings), no backend library and none of the modules
    above are imported, and every plugin is still found."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "runyard.yaml").write_text(
        "executor:\n  dask:\n    max_concurrent: 4\n"
        "run_launcher:\n  k8s:\n    namespace: jobs\n    image: example/worker:1\n"
    )
    env = {**_env(stub_path, home), "RUNYARD_CLI_CACHE": "0", "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run([str(RUNYARD), *args], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = imported_modules(proc.stderr)
    _check(modules, {"runyard.cli", "click"})
    assert "runyard.registry" in modules or args[-1] == "--help" and len(args) > 1
    found = sorted(m for m in modules if m.split(".")[0] in NOT_AT_STARTUP or m in NOT_AT_STARTUP)
    assert found == [], f"`runyard {' '.join(args)}` imported {found}"
    if args == ["plugin", "list"]:
        for name in ("dask", "k8s", "ecs", "docker", "celery", "in_process", "sqlite"):
            assert f"\n{name} " in "\n" + proc.stdout, proc.stdout
