"""The step worker inside a step container: ``python -m runyard_docker.step_worker REQUEST``.

REQUEST is a JSON `StepRequest`, or ``@PATH`` of a file holding one. Like ``runyard api
execute-step --stream``, it prints the attempt's events as JSON lines on the container's
stdout *as they are emitted*. The difference is where the step's own output goes:
``execute_step(capture_output=False)`` leaves the file descriptors alone, and this worker

* points fd 1 at a pipe and forwards what arrives there (Python prints, C extensions,
  subprocesses) as STEP_STDOUT events, so the event stream stays one JSON event per line;
* leaves fd 2 alone: the step's stderr is the container's stderr, which the executor
  reads separately (the engine demultiplexes the two streams) and reports as STEP_STDERR.

A step container must not outlive the run worker that started it (its events would go
nowhere). When ``RUNYARD_DOCKER_HEARTBEAT`` names a file and
``RUNYARD_DOCKER_HEARTBEAT_TIMEOUT`` a number of seconds, the executor rewrites that file
in the container regularly; once it has been seen, a watchdog thread ends the worker (and
so the container, whose init then stops every process in it) when its content has not
changed for that long: the run worker died, or lost the engine.

The request runs only if it is signed with the key in ``RUNYARD_SIGNING_KEY`` and inside
the allowance in ``RUNYARD_STEP_WORKER`` (or the image's runyard.yaml ``step_worker``
section): the executor sets both for each container it starts, with a key made for the run
and the run's code location and output store. Otherwise nothing is imported or unpickled,
and the one event printed is a STEP_FAILURE saying why (see docs/security.md).

Exit status: 0 when the step ran or was refused (the events say how it went), 2 for a
malformed request, 3 when the heartbeat stopped.
"""

from __future__ import annotations

import codecs
import json
import os
import select
import sys
import threading
import time
from typing import Any

from runyard.plugin import (
    STEP_TERMINAL,
    Event,
    EventType,
    admit_or_refuse,
    execute_step,
    load_worker_policy,
    refusal_event,
)

# The output event, then the terminal one: where the step's own captured output goes before.
_ENDINGS = frozenset({EventType.STEP_OUTPUT, *STEP_TERMINAL})


class _Channel:
    """The event stream on the container's stdout, plus the forwarder of the step's fd 1."""

    def __init__(self, base: dict[str, Any]) -> None:
        self.base = base
        self.out = os.dup(1)  # the container's stdout, from now on for events only
        read, write = os.pipe()
        os.dup2(write, 1)
        os.close(write)
        os.set_blocking(read, False)
        self.read = read
        self.pending = ""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.write_lock = threading.Lock()
        self.read_lock = threading.Lock()
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        # End any partial line written to stdout before the worker took it over (interpreter
        # start-up, a sitecustomize): the first event then starts a line of its own. The
        # executor skips blank lines.
        self._write("\n")
        threading.Thread(target=self._forward, name="runyard-stdout", daemon=True).start()

    def emit(self, ev: Event) -> None:
        if ev.type in _ENDINGS:
            # Everything the step printed belongs before its output and its ending.
            try:
                sys.stdout.flush()
            except Exception:
                pass
            self._drain()
        self._write(ev.to_json() + "\n")

    def _write(self, line: str) -> None:
        data = line.encode()
        with self.write_lock:
            while data:
                data = data[os.write(self.out, data):]

    def _drain(self, *, final: bool = True) -> None:
        """Forward what the step wrote to fd 1: whole lines, or everything when ``final``
        (an ending is next) or when a partial line has waited (a prompt, a progress bar)."""
        with self.read_lock:
            chunks = []
            while True:
                try:
                    chunk = os.read(self.read, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            self.pending += self.decoder.decode(b"".join(chunks))
            if not self.pending:
                return
            cut = len(self.pending) if final or not chunks else self.pending.rfind("\n") + 1
            text, self.pending = self.pending[:cut], self.pending[cut:]
        if text:
            self._write(Event(type=EventType.STEP_STDOUT, data={"text": text}, **self.base).to_json() + "\n")

    def _forward(self) -> None:
        while True:
            try:
                select.select([self.read], [], [], 0.2)
            except (OSError, ValueError):
                return
            # Nothing new for 0.2 s: a partial line waiting goes out too.
            self._drain(final=False)


HEARTBEAT_LOST = 3


def _watch_heartbeat(path: str, timeout: float) -> None:
    """Exit when ``path`` has not changed for ``timeout`` seconds (see the module docstring).
    Content, not mtime, and this container's monotonic clock: no clock skew matters."""
    seen: bytes | None = None
    changed = time.monotonic()
    while True:
        time.sleep(min(0.5, timeout / 4))
        try:
            with open(path, "rb") as f:
                content = f.read()
        except OSError:
            content = None
        now = time.monotonic()
        if content is not None and content != seen:
            seen, changed = content, now
        elif seen is not None and now - changed > timeout:
            os.write(2, (f"runyard: no heartbeat from the run worker for {timeout:g}s (it died or lost the Docker "
                         "engine); stopping this step so that its container does not outlive the run\n").encode())
            os._exit(HEARTBEAT_LOST)


def _start_watchdog() -> None:
    path = os.environ.get("RUNYARD_DOCKER_HEARTBEAT")
    try:
        timeout = float(os.environ.get("RUNYARD_DOCKER_HEARTBEAT_TIMEOUT", "0"))
    except ValueError:
        timeout = 0.0
    if path and timeout > 0:
        threading.Thread(target=_watch_heartbeat, args=(path, timeout), name="runyard-heartbeat",
                         daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m runyard_docker.step_worker REQUEST_JSON|@FILE", file=sys.stderr)
        return 2
    raw = args[0]
    try:
        if raw.startswith("@"):
            with open(raw[1:]) as f:
                raw = f.read()
        payload = json.loads(raw)
    except Exception as e:
        print(f"malformed step request: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    try:
        policy = load_worker_policy()
    except Exception as e:
        admitted: Any = refusal_event(payload, f"this container's step-worker settings are invalid: {e}")
    else:
        admitted = admit_or_refuse(policy, payload)
    if isinstance(admitted, Event):  # refused: the reason is the attempt's ending
        sys.stdout.write(admitted.to_json() + "\n")
        return 0
    request = admitted
    base = {
        "run_id": request.run_id,
        "step_key": request.step_key,
        "attempt": request.attempt,
        "attempt_id": request.attempt_id,
    }
    _start_watchdog()
    channel = _Channel(base)
    execute_step(request, capture_output=False, on_event=channel.emit)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Threads the step left behind must not keep the container (and its slot) alive.
    os._exit(code)
