"""``runyard daemon``: run the daemon (run monitoring, the run queue, retries, timeouts)
and ask whether one is running."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from datetime import datetime
from typing import Any

import click

from ._common import echo_json


@click.group()
def daemon() -> None:
    """The instance's daemon: monitors runs, launches queued runs, retries and times them out.

    Run one (or several: one acts, the others stand by) for each instance.

    \b
    Examples:
      runyard daemon run
      runyard daemon run --once
      runyard daemon status --json
    """


@daemon.command("run")
@click.option("--once", is_flag=True, help="One pass of every loop, then exit (for cron or tests).")
@click.option("--log-format", type=click.Choice(["plain", "json"]), default=None,
              help="One line per action as text or JSON (default: daemon.log_format, else plain).")
def run_daemon(once: bool, log_format: str | None) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT.

    Only the daemon holding the instance's lease acts; another one waits and takes over
    within daemon.lease_ttl seconds if the first dies. SIGTERM/SIGINT stop it cleanly and
    hand the lease over at once. Exit status 0 after a clean stop; with --once, 1 if
    another daemon holds the lease (nothing was done).

    \b
    Examples:
      runyard daemon run --log-format json
      runyard daemon run --once
    """
    from ..daemon.log import ActionLog
    from ..daemon.service import Daemon
    from ..daemon.settings import settings
    from ..instance import Instance

    instance = Instance.from_env(validate=True)
    config = settings(instance)
    d = Daemon(instance, log=ActionLog(log_format or config.options.log_format), config=config)
    if once:
        held = d.run_once()
        if held:
            d.release()
        else:
            click.echo("another daemon holds the lease: nothing done (`runyard daemon status` shows it)", err=True)
        sys.exit(0 if held else 1)
    stop = threading.Event()
    # The handler only writes to a pipe; a thread sets `stop`. Event.set takes the Event's
    # lock, which the main thread may hold inside stop.wait when the signal lands (or a
    # second signal inside the first one's set): taken again there, the daemon would hang.
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)

    def on_signal(signum: int, frame: Any) -> None:
        with contextlib.suppress(OSError):  # a full pipe has said enough
            os.write(wake_write, b"s")

    def relay() -> None:
        with contextlib.suppress(OSError):
            os.read(wake_read, 1)
        stop.set()

    threading.Thread(target=relay, name="runyard-daemon-signals", daemon=True).start()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    d.run_forever(stop)


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


@daemon.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(as_json: bool) -> None:
    """Who holds the lease and when each loop last ran; exit 0 if a daemon is healthy.

    Healthy: a daemon holds a current lease and each of its loops ran recently. Exit 1
    otherwise, so the command is a liveness probe for a daemon's container.

    \b
    Example:
      runyard daemon status --json
    """
    from ..daemon.service import read_status
    from ..instance import Instance

    instance = Instance.from_env(validate=True)
    st = read_status(instance)
    if as_json:
        echo_json(st)
        sys.exit(0 if st["healthy"] else 1)
    lease = st["lease"]
    if lease is None:
        click.echo(st["problem"])
        sys.exit(1)
    now = st["now"]
    click.echo(f"{'healthy' if st['healthy'] else 'NOT healthy: ' + st['problem']}")
    click.echo(f"holder    {lease['holder']} (pid {lease['pid']} on {lease['host']}, lease epoch {lease['epoch']})")
    click.echo(f"since     {_when(lease['acquired_at'])}")
    click.echo(f"renewed   {now - lease['renewed_at']:.1f}s ago; "
               + (f"expired {now - lease['expires_at']:.1f}s ago" if lease["expired"]
                  else f"expires in {lease['expires_at'] - now:.1f}s"))
    click.echo(f"queue     {'on (run_coordinator)' if lease['queue'] else 'off'}")
    for loop, info in st["loops"].items():
        age = "never" if info["age"] is None else f"{info['age']:.1f}s ago"
        click.echo(f"{loop:<9} last ran {age} (every {info['interval']:g}s)")
    sys.exit(0 if st["healthy"] else 1)
