"""The helpers `runyard.plugin` gives plugin authors: the resources-tag grammar, failure
info from exceptions, exit descriptions, process-group stopping (with real processes),
thread interrupts, config validators and storage locations."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import attrs
import pytest
import yaml
from runyard import ConfigError, FailureKind, Instance
from runyard.plugin import (
    RESOURCES_TAG,
    STEP_TERMINAL,
    EventType,
    GroupStop,
    StepInterrupted,
    StepTimedOut,
    above,
    at_least,
    describe_exit,
    error_class_name,
    failure_from_exception,
    interrupt_thread,
    locate_storage,
    one_of,
    parse_resources_tag,
    reap_group_leader,
    signal_name,
    signal_process_group,
    stop_process_group,
)

# -- the resources tag ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        {"GPU": 1, "memory": "64m"},
        str({"GPU": 1, "memory": "64m"}),  # what @step(tags={...: {...}}) stores
        '{"GPU": 1, "memory": "64m"}',
        "GPU=1, memory=64m",
    ],
)
def test_one_grammar_for_the_resources_tag(value: object) -> None:
    assert parse_resources_tag(value, step_key="s") == {"GPU": 1, "memory": "64m"}  # type: ignore[arg-type]


def test_resources_tag_numbers_and_empty() -> None:
    assert parse_resources_tag("cpus=0.5,MEM=4e9", step_key="s") == {"cpus": 0.5, "MEM": 4e9}
    assert parse_resources_tag("  ", step_key="s") == {}
    assert RESOURCES_TAG == "runyard/resources"


@pytest.mark.parametrize("bad", ["GPU", "=1", "GPU=", "{'GPU': [1]}", "{not python", "[1, 2]", "{'GPU': True}"])
def test_a_malformed_resources_tag_names_the_step_the_tag_and_the_forms(bad: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_resources_tag(bad, step_key="train")
    msg = str(e.value)
    assert msg.startswith(f"step 'train': tag 'runyard/resources' = {bad!r} is not a resource mapping"), msg
    assert "NAME=VALUE" in msg and "JSON" in msg


# -- failures and exits -------------------------------------------------------------------


class _Custom(Exception):
    class Inner(Exception):
        pass


def test_error_class_name_and_failure_from_exception() -> None:
    assert error_class_name(ValueError("x")) == "builtins.ValueError"
    assert error_class_name(_Custom.Inner) == f"{__name__}._Custom.Inner"
    try:
        raise _Custom("disk full")
    except _Custom as e:
        info = failure_from_exception(e)
    assert info.kind is FailureKind.ERROR and info.message == "_Custom: disk full"
    assert info.error_class == f"{__name__}._Custom"
    assert info.traceback is not None and "raise _Custom" in info.traceback
    lost = failure_from_exception(OSError("gone"), kind=FailureKind.WORKER_LOST, message="lost", with_traceback=False)
    assert (lost.kind, lost.message, lost.traceback) == (FailureKind.WORKER_LOST, "lost", None)


def test_exit_descriptions() -> None:
    assert signal_name(9) == "SIGKILL" and signal_name(200) == "signal 200"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-15) == "was killed by SIGTERM (15)"
    assert describe_exit(sig=9) == "was killed by SIGKILL (9)"
    assert STEP_TERMINAL == {EventType.STEP_SUCCESS, EventType.STEP_FAILURE}


# -- process groups (real processes) --------------------------------------------------------

# A group leader that ignores SIGTERM and starts a grandchild in its group; both print their pid.
_STUBBORN = (
    "import os, signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "child = subprocess.Popen([sys.executable, '-c', "
    "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(60)\n"
)
_POLITE = "import time\nprint(0, flush=True)\ntime.sleep(60)\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _group_gone(pgid: int, within: float = 5.0) -> bool:
    """The group has no member left (its killed orphans may stay zombies until init reaps them)."""
    deadline = time.monotonic() + within
    while signal_process_group(pgid, 0):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _start(code: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    return proc, grandchild


def test_stop_process_group_escalates_after_the_grace_and_leaves_no_process() -> None:
    proc, grandchild = _start(_STUBBORN)
    started = time.monotonic()
    code = stop_process_group(proc.pid, 0.5, leader=proc)
    took = time.monotonic() - started
    assert code == -signal.SIGKILL  # it ignored SIGTERM: killed after the grace period
    assert 0.5 <= took < 3, took
    assert not _alive(grandchild), "the grandchild in the group outlived the stop"
    assert _group_gone(proc.pid)


def test_stop_process_group_returns_as_soon_as_a_polite_leader_exits() -> None:
    proc, _ = _start(_POLITE)
    started = time.monotonic()
    assert stop_process_group(proc.pid, 10, leader=proc) == -signal.SIGTERM
    assert time.monotonic() - started < 2


def test_stop_process_group_of_a_group_that_is_gone_is_harmless() -> None:
    proc, _ = _start(_POLITE)
    stop_process_group(proc.pid, 0, leader=proc)
    assert stop_process_group(proc.pid, 0, leader=proc) == -signal.SIGKILL  # again: nothing happens
    assert stop_process_group(proc.pid, 0) is None


def test_group_stop_and_reap_group_leader_without_blocking() -> None:
    """The event-loop form the fork server uses: SIGTERM now, SIGKILL when advanced past the
    grace period, and the leader reaped with its group killed."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a leader of its own group that ignores SIGTERM, with a grandchild
        os.setpgid(0, 0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        os.write(ready_w, b"x")
        time.sleep(60)
        os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"x"
    os.close(ready_r)
    try:
        stop = GroupStop(pid, 0.3)
        assert reap_group_leader(pid) is None  # SIGTERM ignored: still running
        assert 0 < stop.advance() <= 0.3
        time.sleep(0.35)
        stop.advance()  # past the grace period: SIGKILL
        deadline = time.monotonic() + 5
        ended = None
        while ended is None and time.monotonic() < deadline:
            ended = reap_group_leader(pid)
            time.sleep(0.01)
        assert ended == (None, signal.SIGKILL)
        assert _group_gone(pid)  # the grandchild died with the group
    finally:
        signal_process_group(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


# -- interrupting a step thread -----------------------------------------------------------------


def test_interrupt_thread_raises_in_that_thread() -> None:
    caught: list[BaseException] = []
    running = threading.Event()

    def step() -> None:
        try:
            running.set()
            while True:
                sum(range(100))
        except StepInterrupted as e:
            caught.append(e)

    t = threading.Thread(target=step)
    t.start()
    running.wait(5)
    assert interrupt_thread(t.ident or 0, StepInterrupted)
    t.join(5)
    assert not t.is_alive() and len(caught) == 1
    assert not interrupt_thread(t.ident or 0, StepInterrupted)  # gone: nothing to interrupt


# -- config validators ----------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class _Config:
    mode: str | None = attrs.field(default=None, validator=one_of("fast", "safe"))
    timeout: float = attrs.field(default=1.0, validator=above(0, what="a number of seconds"))
    workers: int | None = attrs.field(default=None, validator=at_least(1))


def test_validators_say_what_was_expected_and_what_was_found() -> None:
    assert _Config(mode="fast", timeout=2, workers=1).mode == "fast"
    with pytest.raises(ValueError, match=r"^mode: expected one of fast, safe, got 'quick'$"):
        _Config(mode="quick")
    with pytest.raises(ValueError, match=r"^timeout: expected a number of seconds above 0, got 0$"):
        _Config(timeout=0)
    with pytest.raises(ValueError, match=r"^workers: expected a number of at least 1, got 0$"):
        _Config(workers=0)


# -- where a storage lives --------------------------------------------------------------------


def test_locate_storage_reads_the_instance_without_opening_it(tmp_path: Path) -> None:
    assert locate_storage(Instance(tmp_path)).path == (tmp_path / "runyard.db").resolve()
    (tmp_path / "runyard.yaml").write_text(yaml.safe_dump({"storage": {"sqlite": {"path": str(tmp_path / "r.db")}}}))
    where = locate_storage(Instance(tmp_path))
    assert (where.name, where.label, where.path, where.host) == ("sqlite", "SQLite", tmp_path / "r.db", None)
    # Nothing listens there: locating must not connect.
    (tmp_path / "runyard.yaml").write_text(
        yaml.safe_dump({"storage": {"postgres": {"url": "postgresql://u:secret@db.internal:6543/x"}}})
    )
    where = locate_storage(Instance(tmp_path))
    assert (where.label, where.host, where.port, where.path, where.is_local_socket) == (
        "PostgreSQL", "db.internal", 6543, None, False
    )
    (tmp_path / "runyard.yaml").write_text(yaml.safe_dump({"storage": {"postgres": {"url": "dbname=x"}}}))
    assert locate_storage(Instance(tmp_path)).is_local_socket
    assert locate_storage(Instance.ephemeral()).path is None


@pytest.mark.parametrize("exc", [StepInterrupted(FailureKind.TIMEOUT, "too slow"), StepInterrupted(),
                                 StepTimedOut()], ids=["kind-and-message", "default", "timed-out"])
def test_step_interrupted_survives_pickling(exc: StepInterrupted) -> None:
    """Process pools (Celery's, multiprocessing's) pickle an exception that escaped a task to
    the parent: unpickling must give the same exception, not raise in the parent."""
    import pickle

    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert back.kind is exc.kind and str(back) == str(exc)
