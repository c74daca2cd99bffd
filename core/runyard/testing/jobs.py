"""Jobs the conformance kit runs. Importable as ``runyard.testing.jobs`` so that step
workers in other processes, containers or machines load them the way they load user jobs."""

from __future__ import annotations

import time
from pathlib import Path

from runyard import FailureKind, RetryPolicy, job, step


@step
def emit(value: int) -> int:
    return value


@step
def double(x: int) -> int:
    return x * 2


@step
def total(xs: list[int]) -> int:
    return sum(xs)


@step
def boom(x: int) -> int:
    raise ValueError(f"kit boom {x}")


@step(retry=RetryPolicy(max_retries=3))
def flaky(context) -> int:  # type: ignore[no-untyped-def]
    if context.attempt < 3:
        raise RuntimeError(f"failing on purpose, attempt {context.attempt}")
    return context.attempt


@step(timeout=1.0)
def sleepy() -> int:
    time.sleep(30)
    return 0


@step
def nap(i: int) -> int:
    time.sleep(0.4)
    return i


@step(tags={"kit/db": "primary"})
def db_nap(i: int) -> int:
    time.sleep(0.3)
    return i


@step
def block(context) -> int:  # type: ignore[no-untyped-def]
    Path(context.run_config["kit"]["scratch"], "started").write_text(str(time.time()))
    time.sleep(60)
    return 0


@job
def chain_job():  # type: ignore[no-untyped-def]
    double(double(emit(3)))


@job
def fan_job():  # type: ignore[no-untyped-def]
    s = emit(2)
    total([double(s) for _ in range(5)])


@job
def failing_job():  # type: ignore[no-untyped-def]
    e = emit(1)
    double(boom(e))
    double.alias("independent")(e)


@job
def retry_job():  # type: ignore[no-untyped-def]
    flaky()


@job
def timeout_job():  # type: ignore[no-untyped-def]
    double(sleepy())


@job
def wide_job():  # type: ignore[no-untyped-def]
    for i in range(6):
        nap(i)


@job
def tagged_job():  # type: ignore[no-untyped-def]
    for i in range(4):
        db_nap(i)
    for i in range(2):
        nap(i)


@job
def cancel_job():  # type: ignore[no-untyped-def]
    double(block())


# -- steps that report on themselves through a scratch directory ------------------------------
#
# The kit passes ``run_config["kit"] = {"scratch": DIR, "test_pid": PID}``. A step writes
# who runs it (pid, process group, thread, pid namespace) to DIR/<step>-<attempt>.json and
# then acts, so the kit can check from outside what a handler did to it: that its side
# effects stopped, that its process (group) is gone, that it ran at the same time as others.

BEAT_EVERY = 0.05  # seconds between heartbeat lines
BIG_OUTPUT = 200_000  # characters one step prints: several times what a pipe holds

_STUBBORN_CHILD = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "open(sys.argv[1], 'w').close()\n"
    "time.sleep(60)\n"
)


def _scratch(context) -> Path:  # type: ignore[no-untyped-def]
    return Path(context.run_config["kit"]["scratch"])


def _owns_process(context) -> bool:  # type: ignore[no-untyped-def]
    """Whether this step runs in a process of its own: not the kit's process, and on its
    main thread (a thread of a long-lived worker process is a guest there)."""
    import os
    import threading

    same_ns = _pid_namespace() == context.run_config["kit"].get("pid_namespace")
    in_kit = same_ns and os.getpid() == context.run_config["kit"]["test_pid"]
    return not in_kit and threading.current_thread() is threading.main_thread()


def _pid_namespace() -> str | None:
    import os

    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _write_json(path: Path, data: dict) -> None:  # type: ignore[type-arg]
    import json
    import os

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # the kit never reads half a file


def _identify(context, *, child: bool) -> dict:  # type: ignore[no-untyped-def, type-arg]
    """Record who runs this step; with ``child``, start a process of its own (a ``sleep``
    in its process group) when it owns its process, as steps that run tools do."""
    import os
    import subprocess
    import sys
    import threading

    owns = _owns_process(context)
    info = {
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "main_thread": threading.current_thread() is threading.main_thread(),
        "owns_process": owns,
        "pid_namespace": _pid_namespace(),
        "child": None,
        "started": time.time(),
    }
    kit = context.run_config["kit"]
    in_kit_group = info["pid_namespace"] == kit.get("pid_namespace") and info["pgid"] == kit.get("test_pgid")
    if child and owns and (info["pgid"] == info["pid"] or in_kit_group):
        # Only where the kit holds the handler to it: in a process group of its own (the
        # group must go), or in the kit's own group (the step's process and this one must go).
        # The child ignores SIGTERM (a daemon, a tool with its own signal handling): only a
        # SIGKILL to the group ends it. It says when it is ready, so a stop cannot beat it.
        ready = _scratch(context) / f"{context.step_key}-{context.attempt}.child-ready"
        proc = subprocess.Popen(
            [sys.executable, "-c", _STUBBORN_CHILD, str(ready)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        info["child"] = proc.pid
    _write_json(_scratch(context) / f"{context.step_key}-{context.attempt}.json", info)
    return info


def _beat_forever(context, seconds: float = 60) -> int:  # type: ignore[no-untyped-def]
    beat = _scratch(context) / f"{context.step_key}.beat"
    end = time.monotonic() + seconds
    with beat.open("a") as f:
        while time.monotonic() < end:
            f.write(f"{time.time()}\n")
            f.flush()
            time.sleep(BEAT_EVERY)
    return 0


@step(timeout=3.0,  # short, yet long enough for a step process or container to start under load
      retry=RetryPolicy(max_retries=1, retry_on=[FailureKind.ERROR]))
def beat_timed(context) -> int:  # type: ignore[no-untyped-def]
    """Fails at once on its first attempt; the retry beats until its timeout stops it (a
    timeout stops the attempt that runs, not the step's first one)."""
    if context.attempt == 1:
        raise RuntimeError("kit: the first attempt fails at once")
    _identify(context, child=True)
    return _beat_forever(context)


@step
def beat_until_canceled(context) -> int:  # type: ignore[no-untyped-def]
    import signal

    info = _identify(context, child=True)
    if info["owns_process"]:
        # A stop must not depend on the step's goodwill: SIGTERM alone does not end it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return _beat_forever(context)


@step
def leave_child_behind(context) -> int:  # type: ignore[no-untyped-def]
    """Starts a process in its group and returns: what the step started must not outlive it."""
    _identify(context, child=True)
    return 1


LOG_LEVELS = ("INFO", "WARNING", "ERROR")


def _talk(context, what: str) -> None:  # type: ignore[no-untyped-def]
    """A log record at each of `LOG_LEVELS` (the step sets its logger to INFO, to be heard),
    a line on stdout and on stderr, and a last piece of stdout without a newline."""
    import logging
    import sys

    context.log.setLevel(logging.INFO)
    for level in LOG_LEVELS:
        context.log.log(logging.getLevelName(level), f"kit {level.lower()} log {what}")
    print(f"kit stdout {what}")
    print(f"kit stderr {what}", file=sys.stderr)
    sys.stdout.write(f"kit unterminated stdout {what}")  # a prompt, a progress bar's last state
    sys.stdout.flush()


@step
def chatty(context) -> int:  # type: ignore[no-untyped-def]
    _talk(context, "line")
    return 1


@step
def chatty_failing(context) -> int:  # type: ignore[no-untyped-def]
    _talk(context, "before failing")
    raise ValueError("kit chatty failure")


@step
def live_talker(context, x: int) -> int:  # type: ignore[no-untyped-def]
    """Prints a line and logs a record, notes when (and in which run), then waits (bounded)
    until the kit says it saw them in storage: they must get there while the step runs."""
    import logging

    scratch = _scratch(context)
    context.log.setLevel(logging.INFO)
    print("kit live line", flush=True)
    context.log.info("kit live log")
    _write_json(scratch / "live-said", {"t": time.time(), "run_id": context.run_id})
    deadline = time.monotonic() + float(context.run_config["kit"].get("live_wait", 60))
    while time.monotonic() < deadline and not (scratch / "live-seen").exists():
        time.sleep(0.02)
    return x


@step
def loud() -> int:
    import sys

    sys.stdout.write("x" * BIG_OUTPUT + "\n")
    sys.stdout.flush()
    return 1


@step
def rendezvous(context, i: int) -> int:  # type: ignore[no-untyped-def]
    """Arrives, then waits (bounded) until ``kit.overlap`` steps have arrived: it succeeds
    only if that many ran at the same time. One that gives up tells the others, so a
    handler running steps one at a time fails in one wait, not one per step."""
    kit = context.run_config["kit"]
    want = int(kit["overlap"])
    scratch = _scratch(context)
    _write_json(scratch / f"arrived-{i}", {"t": time.time()})
    deadline = time.monotonic() + float(kit.get("overlap_wait", 10))

    def arrived() -> int:
        return sum(1 for p in scratch.glob("arrived-*") if ".tmp" not in p.name)

    while time.monotonic() < deadline and not (scratch / "gave-up").exists():
        if arrived() >= want:
            return i
        time.sleep(0.02)
    (scratch / "gave-up").touch()
    raise RuntimeError(f"only {arrived()} of {want} steps were running at the same time")


def _last_words(context) -> None:  # type: ignore[no-untyped-def]
    context.log.warning(f"kit last words of {context.step_key}")
    time.sleep(0.5)  # what a streaming handler reads while the step runs is read by now


@step
def exit_3(context) -> int:  # type: ignore[no-untyped-def]
    import os

    if not _identify(context, child=False)["owns_process"]:
        return -1  # a process that is not the step's own is not the step's to end
    _last_words(context)
    os._exit(3)


@step
def exit_0(context) -> int:  # type: ignore[no-untyped-def]
    """Ends its process with status 0 without returning (a library calling exit)."""
    import os

    if not _identify(context, child=False)["owns_process"]:
        return -1
    _last_words(context)
    os._exit(0)


@step
def kill_self(context) -> int:  # type: ignore[no-untyped-def]
    import os
    import signal

    if not _identify(context, child=False)["owns_process"]:
        return -1
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)
    return 0


@step
def quick_step(context) -> int:  # type: ignore[no-untyped-def]
    return 5


@job
def beat_timeout_job():  # type: ignore[no-untyped-def]
    double(beat_timed())


@job
def beat_cancel_job():  # type: ignore[no-untyped-def]
    double(beat_until_canceled())


@job
def leave_child_job():  # type: ignore[no-untyped-def]
    leave_child_behind()


@job
def chatty_job():  # type: ignore[no-untyped-def]
    chatty()
    chatty_failing()


@job
def live_job():  # type: ignore[no-untyped-def]
    live_talker(emit(1))


@job
def loud_job():  # type: ignore[no-untyped-def]
    loud()


@job
def rendezvous_job():  # type: ignore[no-untyped-def]
    for i in range(3):
        rendezvous.alias(f"meet_{i}")(i)


@job
def crash_job():  # type: ignore[no-untyped-def]
    double(exit_3())
    exit_0()
    kill_self()


@job
def quick_job():  # type: ignore[no-untyped-def]
    quick_step()
