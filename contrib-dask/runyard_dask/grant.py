"""The worker plugin that gives a cluster's workers one run's key and allowance.

Registered by the engine on clusters it starts itself (no ``address``): their workers have no
runyard configuration of their own, and run only that run's requests, signed with its key,
from its job's code location and its output store. Imports distributed: only on that path.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from . import remote


class TrustGrant(WorkerPlugin):
    def __init__(self, run_id: str, key: str, grant: dict[str, Any]) -> None:
        self.run_id = run_id
        self.key = key
        self.grant = grant

    def setup(self, worker: Any) -> None:
        remote.install_grant(self.run_id, self.key, self.grant)

    def teardown(self, worker: Any) -> None:
        remote.drop_grant(self.run_id)
