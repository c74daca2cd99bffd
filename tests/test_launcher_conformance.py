"""The default run launcher passes the run-launcher conformance kit: runs in their own
process groups on this machine, canceled from another process, a worker killed with
SIGKILL, orphans of a dead worker removed."""

from __future__ import annotations

import os
from pathlib import Path

from runyard.testing.launchers import Launched, RunLauncherConformance


def _group_members(pgid: int) -> list[str]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(f"pid {entry.name}: {stat[: stat.rindex(')') + 1]}")
    return members


class TestDefaultLauncherConformance(RunLauncherConformance):
    launcher = "default"

    def leftovers(self, launched: Launched) -> list[str]:
        # Beyond the kit's heartbeats: no live process is left in the run's process group.
        assert launched.worker["host"] == os.uname().nodename
        return _group_members(int(launched.worker["pgid"]))
