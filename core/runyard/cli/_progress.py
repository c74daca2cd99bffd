"""Progress of a run for `job execute`, `run wait` and `job launch --wait`.

On a terminal: one live line (steps done, running, failed; elapsed) drawn with rich, with
failures printed above it. Otherwise plain lines, one per step finished, failed, retried
or skipped. Both end with the same summary line. rich is imported only for a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import click

from ..events import Event, EventType

_STATE = {
    EventType.STEP_START: "running",
    EventType.STEP_SUCCESS: "success",
    EventType.STEP_FAILURE: "failed",
    EventType.STEP_RETRY: "retrying",
    EventType.STEP_SKIPPED: "skipped",
}


def use_live(enabled: bool = True) -> bool:
    """Whether to draw live progress: stdout is a terminal that can redraw a line."""
    import os

    return enabled and sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


def summary_line(run_id: str, status: str, elapsed: float, states: Mapping[str, str]) -> str:
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s] = counts.get(s, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no step ran"
    return f"run {run_id} {status} in {elapsed:.2f}s ({summary})"


def failure_lines(ev: Event) -> list[str]:
    f = ev.failure
    lines = [f"step {ev.step_key} failed (attempt {ev.attempt}, {f.kind.value if f else '?'}): {ev.message}"]
    if f and f.traceback:
        lines.append(f.traceback.rstrip())
    return lines


class Progress:
    """Follows a run's events; ``feed`` each batch, then ``close``."""

    def __init__(self, *, live: bool, label: str = "", started: float | None = None) -> None:
        self.states: dict[str, str] = {}
        self.total: int | None = None
        self.label = label
        self.started = started if started is not None else time.monotonic()
        self._live: Any = None
        self._console: Any = None
        self._spinner: Any = None
        if live:
            self._start_live()

    # -- events -------------------------------------------------------------------------

    def feed(self, events: Sequence[Event]) -> None:
        plain: list[str] = []  # without the live display: one write per batch, not per step
        for ev in events:
            if ev.type is EventType.RUN_START:
                self.total = ev.data.get("steps", self.total)
            if ev.step_key is None or ev.type not in _STATE:
                continue
            self.states[ev.step_key] = _STATE[ev.type]
            line = self._line_for(ev)
            if line is not None:
                if self._live is None:
                    plain += line
                else:
                    self._print(line, failure=ev.type is EventType.STEP_FAILURE)
        if plain:
            self._print(["\n".join(plain)], failure=False)

    def _line_for(self, ev: Event) -> list[str] | None:
        if ev.type is EventType.STEP_FAILURE:
            return failure_lines(ev)
        if self._live is not None:
            return None  # the live line shows successes, retries and skips
        if ev.type is EventType.STEP_SUCCESS:
            duration = ev.data.get("duration")
            return [f"step {ev.step_key} succeeded" + (f" in {duration:.2f}s" if duration is not None else "")]
        if ev.type is EventType.STEP_RETRY:
            return [f"step {ev.step_key} {ev.message}"]
        if ev.type is EventType.STEP_SKIPPED:
            return [f"step {ev.step_key} {ev.message}"]
        return None

    def _print(self, lines: list[str], *, failure: bool) -> None:
        if self._live is not None:
            from rich.text import Text

            for line in lines:
                self._console.print(Text(line, style="red" if failure else ""), soft_wrap=True)
        else:
            for line in lines:
                click.echo(line)

    # -- live display ------------------------------------------------------------------

    def _start_live(self) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.spinner import Spinner

        # Bound to the terminal's stream now and no redirection of sys.stdout: the step
        # worker swaps sys.stdout for its capturing stream, and rich writing through that
        # (which writes back into rich) would recurse.
        self._console = Console(file=sys.stdout)
        self._spinner = Spinner("dots", text=self._status_text())
        self._live = Live(
            self, console=self._console, refresh_per_second=8, transient=True,
            redirect_stdout=False, redirect_stderr=False,
        )
        self._live.start()

    def _status_text(self) -> str:
        states = list(self.states.values())  # one C call: safe while another thread feeds events
        done = sum(1 for s in states if s in ("success", "skipped"))
        running = sum(1 for s in states if s in ("running", "retrying"))
        failed = sum(1 for s in states if s == "failed")
        total = "?" if self.total is None else str(self.total)
        elapsed = time.monotonic() - self.started
        minutes, seconds = divmod(elapsed, 60)
        parts = [
            f"{done}/{total} done", f"{running} running", f"{failed} failed", f"{int(minutes):02d}:{seconds:04.1f}"
        ]
        return (f"{self.label}  " if self.label else "") + " · ".join(parts)

    def __rich__(self) -> Any:
        self._spinner.update(text=self._status_text())
        return self._spinner

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
