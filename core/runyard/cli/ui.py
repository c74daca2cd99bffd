"""``runyard ui``: serve the run viewer (needs the ``ui`` extra; imported only when it runs)."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import socket
import sys

import click

TOKEN_ENV = "RUNYARD_UI_TOKEN"
MIN_TOKEN = 16


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port; the address is printed).")
@click.option("--allow-remote", is_flag=True,
              help=f"Allow a --host beyond localhost; requires ${TOKEN_ENV} (at least {MIN_TOKEN} characters).")
def ui(host: str, port: int, allow_remote: bool) -> None:
    """Serve a run viewer in the browser over this instance's runs.

    Runs, their step timelines, live logs and failures; cancel and re-execute from the page.
    Listens on 127.0.0.1 only unless --allow-remote is given with a token in $RUNYARD_UI_TOKEN.

    \b
    Examples:
      runyard ui
      RUNYARD_UI_TOKEN=$(openssl rand -hex 16) runyard ui --host 0.0.0.0 --allow-remote
    """
    missing = [m for m in ("starlette", "uvicorn", "jinja2") if importlib.util.find_spec(m) is None]
    if missing:
        click.echo(f"error: runyard ui needs {', '.join(missing)}, from the 'ui' extra: "
                   "pip install 'runyard[ui]'", err=True)
        raise SystemExit(2)
    token = os.environ.get(TOKEN_ENV) or None
    remote = not _is_loopback(host)
    if remote and not allow_remote:
        raise click.UsageError(f"--host {host} listens beyond localhost: add --allow-remote and set ${TOKEN_ENV}")
    if remote and (token is None or len(token) < MIN_TOKEN):
        raise click.UsageError(f"--allow-remote needs ${TOKEN_ENV} set to a secret of at least {MIN_TOKEN} characters "
                               f"(e.g. {TOKEN_ENV}=$(openssl rand -hex 16))")
    import uvicorn

    from ..instance import Instance
    from ..ui.app import create_app

    instance = Instance.from_env(validate=True)
    app = create_app(instance, token=token, remote=remote)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise click.UsageError(f"cannot listen on {host}:{port}: {e}; choose another --port (0: any free one)") from e
    sock.listen(128)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    url = f"http://{shown}:{sock.getsockname()[1]}/"
    click.echo(f"runyard ui: serving {instance.home} at {url}" + ("?token=…" if token else ""))
    click.echo("press Ctrl+C to stop", err=True)
    sys.stdout.flush()  # whoever started us (a test, a script) reads the address from a pipe
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
