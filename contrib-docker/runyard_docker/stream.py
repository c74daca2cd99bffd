"""The ``docker`` executor's event stream reading: turning a step container's attached
output into the attempt's events. stdout carries the step worker's events, one JSON line
each (`runyard_docker.step_worker`); stderr is the step's stderr. Both are capped."""

from __future__ import annotations

import codecs
import threading
from typing import Any

from runyard.plugin import Event, EventType

from .attempt import Attempt

_TAIL = 1500  # characters of stderr quoted in the failure of a container that died
_MAX_STDERR = 8 << 20  # characters of stderr kept per attempt
_MAX_STDOUT = 8 << 20  # characters of stdout kept per attempt


def read_stream(att: Attempt, stream: Any, changed: threading.Event) -> None:
    """Read the container's (stdout, stderr) chunks until it ends; set ``changed`` when
    something arrives. The step's ending is held back (``att.ending``) for the container's exit."""
    partial = b""
    decoder_err = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for out, err in stream:
        new: list[Event] = []
        if out:
            partial += out
            *lines, partial = partial.split(b"\n")
            for line in lines:
                ev = parse_line(att, line)
                if ev is not None:
                    new.append(ev)
        text = decoder_err.decode(err) if err else ""
        with att.lock:
            for ev in new:
                if ev.type is EventType.STEP_STDOUT:
                    size = len(ev.data.get("text", ""))
                    att.stdout_total += size
                    if att.stdout_total > _MAX_STDOUT:
                        if att.stdout_total - size <= _MAX_STDOUT:
                            att.pending.append(attempt_event(att, EventType.STEP_STDOUT, {
                                "text": f"[runyard: stdout beyond {_MAX_STDOUT} characters is not kept]\n"}))
                        continue
                att.take(ev)  # an ending is held back until the container exits: stderr comes first
            if text:
                att.stderr_tail = (att.stderr_tail + text)[-_TAIL:]
                if att.stderr_total < _MAX_STDERR:
                    att.add_stderr(text)
                    att.stderr_total += len(text)
        if new or text:
            changed.set()
    if partial.strip():
        ev = parse_line(att, partial)
        if ev is not None:
            with att.lock:
                att.take(ev)


def parse_line(att: Attempt, line: bytes) -> Event | None:
    text = line.decode("utf-8", errors="replace")
    if not text.strip():
        return None
    try:
        ev = Event.from_json(text)
    except (ValueError, KeyError, TypeError):
        # Not an event (something wrote to the container's stdout before the worker
        # took it over): keep it as the step's stdout rather than lose it.
        return attempt_event(att, EventType.STEP_STDOUT, {"text": text + "\n"})
    if ev.attempt_id != att.request.attempt_id:
        return None
    return ev


def attempt_event(att: Attempt, type: EventType, data: dict[str, Any]) -> Event:
    r = att.request
    return Event(type=type, run_id=r.run_id, step_key=r.step_key, attempt=r.attempt, attempt_id=r.attempt_id,
                 data=data)

