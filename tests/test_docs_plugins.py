"""docs/plugins.md checks itself: its code blocks run, and what it says happens, happens.

Every fenced code block of the guide is one of:

* ``<!-- file: PATH -->`` before it: part of the walkthrough's example distribution. The
  blocks of one file, in order, must be the file in ``examples/runyard-threadpool``; the
  test builds a package from the blocks (renamed, so it does not clash with the installed
  example), installs it through a ``.dist-info`` entry point on ``PYTHONPATH``, and runs
  ``runyard`` and the conformance kit with it in subprocesses.
* ``<!-- signature: DOTTED.NAME -->``: a declaration checked against the real object by
  tests/test_plugin_api_docs.py.
* ``<!-- fragment ... -->``: an excerpt that cannot run alone (it says so in the marker).
* unmarked ``python``: a complete example, run here as a module of its own (its ``test_*``
  functions are called; a ``runyard_cli`` hook is registered and its commands invoked).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, ClassVar

import attrs
import click
import pytest
import yaml
from click.testing import CliRunner
from runyard import EventType, Instance, RunStatus, execute_job, job, step
from runyard.errors import ConfigError, PluginError
from runyard.plugin import (
    ExecutorConfig,
    ExecutorSpec,
    StepHandler,
    StepRequest,
    StepUpdate,
    hookimpl,
    resolve,
)
from runyard.registry import PluginRegistry

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "plugins.md"
EXAMPLE = ROOT / "examples" / "runyard-threadpool"
RUNYARD = str(Path(sys.executable).parent / "runyard")


@attrs.frozen
class Block:
    lang: str
    code: str
    marker: str | None  # the HTML comment on the line before the fence, without <!-- -->
    line: int

    @property
    def kind(self) -> str:
        if self.marker is None:
            return "run"
        return self.marker.split(":", 1)[0].strip()

    @property
    def target(self) -> str:
        return self.marker.split(":", 1)[1].strip() if self.marker and ":" in self.marker else ""


def blocks(text: str | None = None) -> list[Block]:
    """The fenced blocks of the guide, dedented (fences in list items are indented)."""
    lines = (text if text is not None else GUIDE.read_text()).splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        prev = lines[i - 1].strip() if i else ""
        marker = prev[4:-3].strip() if prev.startswith("<!--") and prev.endswith("-->") else None
        body: list[str] = []
        j = i + 1
        while not re.match(rf"^{re.escape(indent)}```\s*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        found.append(Block(lang, "\n".join(body) + "\n", marker, i + 1))
        i = j + 1
    return found


def test_every_marker_is_known_and_python_blocks_are_accounted_for() -> None:
    all_blocks = blocks()
    kinds = {b.kind for b in all_blocks}
    assert kinds <= {"run", "file", "signature", "fragment"}, kinds
    python = [b for b in all_blocks if b.lang == "python"]
    runnable = [b for b in python if b.kind == "run"]
    # The standalone examples: the runyard_cli plugin and the import-weight test.
    assert len(runnable) >= 2, [b.line for b in runnable]
    # Fragments are the exception: most python code in the guide runs.
    fragments = [b for b in python if b.kind == "fragment"]
    assert len(fragments) < len(python) / 2, [b.line for b in fragments]
    # A fragment marker says why the block cannot run: `<!-- fragment: why -->`.
    for b in fragments:
        assert b.target, f"docs/plugins.md line {b.line}: say why this block is a fragment"


def test_the_marker_parser_sees_indented_fences_and_markers() -> None:
    text = "x\n\n<!-- fragment: why -->\n   ```python\n   a = 1\n   ```\n```toml\nk = 1\n```\n"
    assert blocks(text) == [Block("python", "a = 1\n", "fragment: why", 4), Block("toml", "k = 1\n", None, 7)]


# -- the standalone examples ----------------------------------------------------------


def _load(code: str, name: str, tmp_path: Path) -> Any:
    path = tmp_path / f"{name}.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_standalone_python_blocks_run(tmp_path: Path) -> None:
    ran_tests = ran_cli = 0
    for n, b in enumerate(x for x in blocks() if x.lang == "python" and x.kind == "run"):
        module = _load(b.code, f"guide_block_{n}", tmp_path)
        for name, fn in vars(module).items():
            if name.startswith("test_") and callable(fn):
                fn()
                ran_tests += 1
        if hasattr(module, "runyard_cli"):
            registry = PluginRegistry(use_entry_points=False)
            registry.register(module, name=f"guide-cli-{n}")
            group = click.Group("runyard")
            registry.add_cli_commands(group)
            # The block says: `runyard threadpool check` then runs it.
            result = CliRunner().invoke(group, ["threadpool", "check"])
            assert result.exit_code == 0, result.output
            assert result.output.strip() == "ok: a pool thread ran"
            ran_cli += 1
    assert ran_tests >= 1 and ran_cli == 1, (ran_tests, ran_cli)


def test_the_step_request_example_is_a_valid_request() -> None:
    (example,) = [b for b in blocks() if b.lang == "json" and '"step_key"' in b.code]
    request = StepRequest.from_json(example.code)
    assert request.to_dict() == json.loads(example.code)


# -- the walkthrough's distribution ---------------------------------------------------


def documented_files() -> dict[str, str]:
    files: dict[str, list[str]] = {}
    for b in blocks():
        if b.kind == "file":
            files.setdefault(b.target, []).append(b.code.strip("\n"))
    return {path: "\n\n".join(parts) + "\n" for path, parts in files.items()}


def _same_code(text: str) -> str:
    # The blocks are the file cut at blank lines: compare all but the runs of blank lines.
    return re.sub(r"\n(\s*\n)+", "\n\n", text).strip()


def test_walkthrough_blocks_are_the_example_distribution() -> None:
    files = documented_files()
    assert set(files) == {"pyproject.toml", "runyard_threadpool/plugin.py", "runyard_threadpool/handler.py",
                          "tests/test_conformance.py"}
    for path, text in files.items():
        real = (EXAMPLE / path).read_text()
        assert _same_code(text) == _same_code(real), f"docs/plugins.md's {path} differs from {EXAMPLE / path}"


RENAMES = [
    (r"\brunyard_threadpool\b", "guide_threadpool"),
    (r"\brunyard-threadpool\b", "guide-threadpool"),
    (r'"threadpool"', '"guide_threadpool"'),
    (r"(?m)^threadpool = ", "guide_threadpool = "),
]


def _renamed(text: str) -> str:
    for pattern, replacement in RENAMES:
        text = re.sub(pattern, replacement, text)
    return text


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site directory holding the guide's package, renamed ``guide_threadpool``, and a
    ``.dist-info`` with its entry points: put on PYTHONPATH, runyard finds the plugin
    through its entry point as it would find a pip-installed distribution."""
    site = tmp_path_factory.mktemp("site")
    files = {path: _renamed(text) for path, text in documented_files().items()}
    project = tomllib.loads(files.pop("pyproject.toml"))["project"]
    package = site / "guide_threadpool"
    package.mkdir()
    (package / "__init__.py").write_text('"""The guide\'s threadpool executor, built from docs/plugins.md."""\n')
    tests = site / "guide_tests"
    tests.mkdir()
    for path, text in files.items():
        target = tests / Path(path).name if path.startswith("tests/") else site / path.replace(
            "runyard_threadpool", "guide_threadpool")
        target.write_text(text)
    dist = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
        + "".join(f"Requires-Dist: {d}\n" for d in project["dependencies"])
    )
    groups = project["entry-points"]
    (dist / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for group, eps in groups.items()
    ))
    return site


def _runyard(site: Path, home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "GUIDE_PREFIX"}
    environ.update({"PYTHONPATH": str(site), "RUNYARD_HOME": str(home), **(env or {})})
    return subprocess.run([RUNYARD, *args], env=environ, cwd=home, capture_output=True, text=True, timeout=120)


BARRIER_JOB = '''
import threading
from runyard import job, step

_all_running = threading.Barrier(3, timeout=20)

@step
def part(i: int) -> str:
    _all_running.wait()  # the run succeeds only if the three parts run at once
    return threading.current_thread().name

@step
def combine(names: list) -> list:
    return sorted(names)

@job
def fan():
    combine([part(i) for i in range(3)])
'''


def test_the_documented_distribution_installs_and_runs_a_job(installed: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "fan_job.py").write_text(BARRIER_JOB)

    listed = _runyard(installed, home, "plugin", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = [r for r in json.loads(listed.stdout) if r["name"] == "guide_threadpool"]
    assert (row["kind"], row["distribution"], row["loads"]) == ("executor", "guide-threadpool", True)

    config = {"executor": {"guide_threadpool": {"max_concurrent": 3, "thread_name_prefix": {"env": "GUIDE_PREFIX"}}}}
    (home / "runyard.yaml").write_text(yaml.safe_dump(config))
    ran = _runyard(installed, home, "job", "execute", "-f", "fan_job.py", "--json", env={"GUIDE_PREFIX": "guide"})
    assert ran.returncode == 0, ran.stdout + ran.stderr
    inst = Instance(home)
    try:
        (run,) = inst.storage.list_runs()
        assert run.executor == "guide_threadpool" and run.status is RunStatus.SUCCESS
        events = [s.event for s in inst.storage.get_events(run.run_id)]
        ref = next(e.data["ref"] for e in events if e.type is EventType.STEP_OUTPUT and e.step_key == "combine")
        threads = inst.output_store(shared=True).get(ref)
    finally:
        inst.storage.close()
    assert len(set(threads)) == 3 and all(t.startswith("guide") for t in threads), threads

    # What the guide says about a setup() that raises: exit 2, one line, the real error.
    failed = _runyard(installed, home, "job", "execute", "-f", "fan_job.py")
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert failed.stderr.strip().splitlines() == [
        f"error: {(home / 'runyard.yaml').resolve()}: executor.guide_threadpool.thread_name_prefix: environment "
        "variable 'GUIDE_PREFIX' is not set (referenced as {env: GUIDE_PREFIX}); set it in the environment of the "
        "process that reads this setting"
    ]


def test_the_documented_distribution_passes_the_conformance_kit(installed: Path, tmp_path: Path) -> None:
    environ = {**os.environ, "PYTHONPATH": str(installed)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(installed / "guide_tests" / "test_conformance.py"), "-q", "-rs",
         "-p", "no:cacheprovider"],
        env=environ, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"\d+ passed", proc.stdout), proc.stdout
    assert "lacks capability 'enforces_timeouts'" in proc.stdout
    assert "lacks capability 'can_terminate'" in proc.stdout


# -- what the guide quotes --------------------------------------------------------------


def test_the_quoted_api_version_messages_are_the_real_ones() -> None:
    guide = " ".join(GUIDE.read_text().split())  # quotes may wrap across lines

    class Fast:
        @hookimpl
        def runyard_executors(self) -> list[ExecutorSpec]:
            return [ExecutorSpec(name="fast", handler="nowhere:Handler", api_version=2)]

    registry = PluginRegistry(use_entry_points=False)
    registry.register(Fast(), name="fast", distribution="runyard-fast", version="0.3.0")
    (failure,) = registry.failures
    assert f"no: {failure.error}" in guide
    with pytest.raises(PluginError) as e:
        registry.executor("fast")
    assert str(e.value) in guide

    with pytest.raises(TypeError) as missing:
        ExecutorSpec(name="fast", handler="nowhere:Handler")  # type: ignore[call-arg]
    assert str(missing.value) in guide


@attrs.frozen(kw_only=True)
class _EnvConfig(ExecutorConfig):
    prefix: str = "x"


class _SetupFails(StepHandler):
    """Acquires its resource only after reading an unset variable, like the threadpool
    example; its teardown is the unsafe kind that assumes setup finished."""

    calls: ClassVar[list[str]] = []
    config: _EnvConfig

    def setup(self) -> None:
        _SetupFails.calls.append("setup")
        resolve(self.config.prefix)
        self._pool = object()

    def launch(self, request: StepRequest) -> Any:
        raise AssertionError("no step may launch when setup failed")

    def poll(self, handle: Any) -> StepUpdate:
        raise AssertionError("unreachable")

    def teardown(self) -> None:
        _SetupFails.calls.append("teardown")
        del self._pool  # AttributeError: setup never got there


@step
def _only() -> int:
    return 1


@job
def _one_step() -> None:
    _only()


def test_setup_raising_calls_teardown_once_and_reports_the_original_error(
    runyard_registry: PluginRegistry, runyard_make_instance: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Plugin:
        @hookimpl
        def runyard_executors(self) -> list[ExecutorSpec]:
            return [ExecutorSpec(name="setup_fails", handler=f"{__name__}:_SetupFails", config=_EnvConfig,
                                 api_version=1)]

    runyard_registry.register(Plugin(), name="setup_fails")
    monkeypatch.delenv("GUIDE_UNSET", raising=False)
    instance = runyard_make_instance({"executor": {"setup_fails": {"prefix": {"env": "GUIDE_UNSET"}}}})
    _SetupFails.calls.clear()
    with pytest.raises(ConfigError, match="environment variable 'GUIDE_UNSET' is not set"):
        execute_job(_one_step, instance=instance)
    assert _SetupFails.calls == ["setup", "teardown"]
    (run,) = instance.storage.list_runs()
    assert run.status is RunStatus.FAILURE
    events = [s.event for s in instance.storage.get_events(run.run_id)]
    engine = [e.message for e in events if e.type is EventType.ENGINE]
    assert any(m.startswith("teardown failed: AttributeError") for m in engine), engine
    assert "GUIDE_UNSET" in next(e.message for e in events if e.type is EventType.RUN_FAILURE)
    assert not [e for e in events if e.type is EventType.STEP_START]
