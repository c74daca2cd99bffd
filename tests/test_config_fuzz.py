"""No configuration file, however made, crashes or hangs runyard.

Two halves. Hypothesis throws bytes, YAML-like text and structured settings at the loaders
(`load_yaml_file`, `Instance`, `runyard config explain` in this process): every outcome is
a result or a `ConfigError`-driven exit 2, never another exception, and each example stays
under a time bound. Then the cases from issue 12 go through the real console script as
subprocesses (an alias bomb in free-form settings and as a run config, invalid UTF-8,
20,000-deep nesting, a directory, /dev/zero, a fifo, duplicate keys): each exits 2 naming
the file, within a second of the CLI's own start-up.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runyard.cli import main
from runyard.errors import ConfigError
from runyard.instance import CONFIG_FILE, Instance
from runyard.yamlfile import MAX_BYTES, load_yaml_file

RUNYARD = Path(sys.executable).parent / "runyard"

JOB = textwrap.dedent(
    """
    from runyard import job, step

    @step
    def one() -> int:
        return 1

    @job
    def tiny():
        one()
    """
)

FUZZ = settings(
    max_examples=100,
    deadline=timedelta(seconds=1),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# YAML's syntax characters, so that generated text exercises anchors, flows, tags, blocks.
YAMLISH = st.text(alphabet=st.sampled_from(list("ab01 :-,[]{}&*!|>'\"#?%@`\n\t<.~") + ["\xff", "\u2028", "é"]),
                  max_size=300)


def _bounded_load(data: bytes, tmp: Path) -> None:
    f = tmp / "fuzz.yaml"
    f.write_bytes(data)
    started = time.monotonic()
    try:
        load_yaml_file(f, what="run config")
    except ConfigError as e:
        assert str(f) in str(e), f"the error does not name the file: {e}"
    assert time.monotonic() - started < 1.0


@FUZZ
@given(data=st.binary(max_size=400))
def test_any_bytes_load_or_fail_with_a_config_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _bounded_load(data, Path(tmp))


@FUZZ
@given(text=YAMLISH)
def test_yaml_like_text_loads_or_fails_with_a_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _bounded_load(text.encode("utf-8", "surrogatepass"), Path(tmp))


# Settings shaped like the real ones, with values of every type, so that the layers past
# the parser (sections, plugin config classes, `config explain`) are exercised too.
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**20), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["in_process", "multiprocess", "celery", "dask", "sqlite"]))
KEYS = st.sampled_from(["executor", "storage", "run_launcher", "outputs", "execution", "in_process", "multiprocess",
                        "multi_or_in_process", "celery", "dask", "sqlite", "default", "max_concurrent", "broker",
                        "config_source", "cluster_kwargs", "tag_concurrency_limits", "key", "limit", "mode",
                        "start_method", "env", "x"])
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=4)), max_leaves=25)
CONFIGS = st.dictionaries(KEYS, VALUES, max_size=5)


def _cli(args: list[str], home: Path) -> int:
    """``runyard ARGS`` in this process, as the console script runs it; returns the exit code.
    Any exception but the CLI's own exit is a failure of the property."""
    os.environ["RUNYARD_HOME"] = str(home)
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        assert code in (0, 2), err.getvalue()
        return code
    return 0


@pytest.fixture
def job_file(tmp_path: Path) -> Path:
    f = tmp_path / "tiny.py"
    f.write_text(JOB)
    return f


@settings(FUZZ, deadline=None)  # a whole CLI command: bounded below, with room for a loaded machine
@given(config=CONFIGS, run_config=CONFIGS)
def test_structured_settings_never_crash_config_explain(
    config: dict[str, Any], run_config: dict[str, Any], job_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNYARD_HOME", "unset")  # restored after the test; _cli sets it per example
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        (home / CONFIG_FILE).write_text(yaml.safe_dump(config))
        rc = home / "run.yaml"
        rc.write_text(yaml.safe_dump(run_config))
        started = time.monotonic()
        _cli(["config", "explain", "-f", str(job_file), "-c", str(rc), "--json"], home)
        with contextlib.suppress(ConfigError):
            Instance(home).validate()
        assert time.monotonic() - started < 3.0


# --- the cases of issue 12, through the real console script --------------------------

def _bomb(indent: str) -> str:
    """A 'billion laughs': nine levels of nine aliases, 9**9 (387 million) strings."""
    lines = [f'{indent}a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{indent}{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


BOMB_CELERY = "executor:\n  celery:\n    broker: redis://127.0.0.1:6379/0\n    config_source:\n" + _bomb("      ")
BOMB_DASK = "executor:\n  dask:\n    cluster_kwargs:\n" + _bomb("      ")
BOMB_RUN_CONFIG = _bomb("")


def test_the_bombs_are_small() -> None:
    assert len(BOMB_CELERY) < 800 and len(BOMB_DASK) < 800 and len(BOMB_RUN_CONFIG) < 700


def _make(kind: str, path: Path) -> None:
    """Put the bad input ``kind`` at ``path``."""
    if kind == "bomb-celery":
        path.write_text(BOMB_CELERY)
    elif kind == "bomb-dask":
        path.write_text(BOMB_DASK)
    elif kind == "bomb":
        path.write_text(BOMB_RUN_CONFIG)
    elif kind == "invalid-utf8":
        path.write_bytes(b"executor:\n  in_process: {}\nname: caf\xe9\n")
    elif kind == "deep-20000":
        path.write_text("[" * 20000 + "]" * 20000 + "\n")
    elif kind == "deep-block-300":
        path.write_text("".join(f"{' ' * i}k:\n" for i in range(300)))  # block style, 300 deep
    elif kind == "directory":
        path.mkdir()
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "duplicate-top-level":
        path.write_text("executor: in_process\nrun_launcher: default\nexecutor: multiprocess\n")
    elif kind == "too-large":
        path.write_text("# " + "x" * MAX_BYTES + "\n")
    else:
        raise AssertionError(kind)


EXPECTED = {
    "bomb-celery": "values (counting what each alias repeats",
    "bomb-dask": "values (counting what each alias repeats",
    "bomb": "values (counting what each alias repeats",
    "invalid-utf8": "is not valid UTF-8",
    "deep-20000": "more than 64 levels deep",
    "deep-block-300": "more than 64 levels deep",
    "directory": "but this is a directory",
    "dev-zero": "but this is a character device",
    "fifo": "but this is a fifo",
    "duplicate-top-level": "duplicate key 'executor' (first at line 1)",
    "too-large": "KiB, the limit for a configuration file",
}
INSTANCE_CASES = ["bomb-celery", "bomb-dask", "invalid-utf8", "deep-20000", "deep-block-300", "directory",
                  "dev-zero", "fifo", "duplicate-top-level", "too-large"]
RUN_CONFIG_CASES = ["bomb", "invalid-utf8", "deep-20000", "dev-zero", "fifo", "duplicate-top-level", "too-large"]


def _timed(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    # The timeout turns a hang into a failure with a message instead of a stuck suite.
    proc = subprocess.run([str(RUNYARD), *args], env=env, capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - started


def _startup(env: dict[str, str]) -> float:
    """The CLI's own start-up on this machine right now (the floor of any command's time)."""
    return min(_timed(["--version"], env)[1] for _ in range(2))


@pytest.mark.parametrize("command", ["explain", "launch"])
@pytest.mark.parametrize("kind", INSTANCE_CASES)
def test_bad_runyard_yaml_exits_2_quickly_naming_the_file(tmp_path: Path, job_file: Path, kind: str,
                                                          command: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    _make(kind, home / CONFIG_FILE)
    env = {**os.environ, "RUNYARD_HOME": str(home)}
    head = ["config", "explain"] if command == "explain" else ["job", "launch"]
    args = [*head, "-f", str(job_file)]
    floor = _startup(env)
    proc, took = _timed(args, env)
    print(f"{kind} runyard.yaml, {command}: exit {proc.returncode} in {took:.2f}s (CLI start-up {floor:.2f}s)")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(home / CONFIG_FILE) in proc.stderr and EXPECTED[kind] in proc.stderr, proc.stderr
    assert took < floor + 1.0, f"took {took:.2f}s, start-up is {floor:.2f}s"


@pytest.mark.parametrize("command", ["explain", "launch"])
@pytest.mark.parametrize("kind", RUN_CONFIG_CASES)
def test_bad_run_config_exits_2_quickly_naming_the_file(tmp_path: Path, job_file: Path, kind: str,
                                                        command: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    bad = tmp_path / "run.yaml"
    _make(kind, bad)
    env = {**os.environ, "RUNYARD_HOME": str(home)}
    head = ["config", "explain"] if command == "explain" else ["job", "launch"]
    floor = _startup(env)
    proc, took = _timed([*head, "-f", str(job_file), "-c", str(bad)], env)
    print(f"{kind} run config, {command}: exit {proc.returncode} in {took:.2f}s (CLI start-up {floor:.2f}s)")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr and EXPECTED[kind] in proc.stderr, proc.stderr
    assert took < floor + 1.0, f"took {took:.2f}s, start-up is {floor:.2f}s"
    assert not list((home / "logs").glob("*")) if (home / "logs").exists() else True  # nothing launched


def test_a_directory_as_run_config_exits_2(tmp_path: Path, job_file: Path) -> None:
    """`-c` refuses a directory before runyard reads it (click's own check)."""
    (tmp_path / "conf").mkdir()
    proc, _ = _timed(["config", "explain", "-f", str(job_file), "-c", str(tmp_path / "conf")],
                     {**os.environ, "RUNYARD_HOME": str(tmp_path / "home")})
    assert proc.returncode == 2 and str(tmp_path / "conf") in proc.stderr and "is a directory" in proc.stderr


def test_limits_still_admit_ordinary_files(tmp_path: Path) -> None:
    f = tmp_path / "ok.yaml"
    f.write_text("defaults: &d {retries: 2, queue: etl}\njobs:\n  a: {<<: *d, queue: fast}\n  b: *d\n"
                 + "".join(f"k{i}: {i}\n" for i in range(2000)))
    data = load_yaml_file(f, what="run config")
    assert data["jobs"] == {"a": {"retries": 2, "queue": "fast"}, "b": {"retries": 2, "queue": "etl"}}
    assert data["k1999"] == 1999
