"""The ``celery`` executor's worker control: revoking a task and telling the worker running
it to stop it, pinging the workers that run steps, and asking which queues they consume.
Each call uses a broker connection of its own and never blocks past its bound."""

from __future__ import annotations

import threading
from typing import Any

from .settings import STOP_COMMAND, CeleryConfig

INSPECT_TIMEOUT = 3.0  # seconds the workers have to say which queues they consume


class WorkerControl:
    """Remote control of the Celery workers through the handler's app."""

    def __init__(self, app: Any, config: CeleryConfig) -> None:
        self.app = app
        self.config = config

    def connection(self) -> Any:
        """A broker connection of our own for remote control, closed after use.

        Not one from the app's pool: waiting for replies leaves a Redis channel with a BRPOP
        outstanding, and kombu closes pooled connections again in every child this process
        forks later (a multiprocess run, say), where reading that BRPOP's reply blocks for ever.
        """
        return self.app.connection_for_write()

    def stop(self, task_id: str, worker: str | None) -> str | None:
        """Revoke a task and tell the worker running it to stop it; the error, if the broker
        cannot be reached in time, rather than raising or blocking (the engine calls
        terminate from the thread that cancels the run).

        Revoked ids are shared by all workers (and learnt by workers that start later), so a
        queued or reserved task is dropped instead of started. A running one is not touched
        by a revoke: the worker running it SIGTERMs its pool process, SIGKILL after the grace.
        """
        errors: list[str] = []

        def send() -> None:
            try:
                with self.connection() as conn:
                    conn.ensure_connection(max_retries=1, interval_start=0, timeout=self.config.connect_timeout)
                    self.app.control.revoke(task_id, connection=conn)
                    self.app.control.broadcast(
                        STOP_COMMAND,
                        arguments={"task_id": task_id, "grace": float(self.config.terminate_grace)},
                        destination=[worker] if worker else None,
                        connection=conn,
                    )
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")

        thread = threading.Thread(target=send, name="runyard-celery-stop", daemon=True)
        thread.start()
        thread.join(self.config.connect_timeout * 2 + 1)
        if thread.is_alive():
            return f"the broker did not answer within {self.config.connect_timeout * 2 + 1:g}s"
        return errors[0] if errors else None

    def ping(self, hosts: list[str]) -> list[dict[str, Any]]:
        with self.connection() as conn:
            return self.app.control.ping(destination=hosts, timeout=1.0, connection=conn)

    def active_queues(self) -> dict[str, Any]:
        """Worker name -> the queues it consumes, of the workers that answered."""
        with self.connection() as conn:
            return self.app.control.inspect(timeout=INSPECT_TIMEOUT, connection=conn).active_queues() or {}
