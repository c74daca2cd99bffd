"""The distribution registers the executor and the launcher without importing docker."""

from __future__ import annotations

import json
import subprocess
import sys


def test_plugin_module_does_not_import_the_docker_sdk() -> None:
    code = (
        "import sys, runyard_docker.plugin; from runyard.registry import PluginRegistry; "
        "r = PluginRegistry(); r.executor('docker'); r.run_launcher('docker'); "
        "print(sorted(m for m in sys.modules if m == 'docker' or m.startswith('docker.') or m == 'requests'))"
    )
    assert subprocess.check_output([sys.executable, "-c", code], text=True).strip() == "[]"


def test_plugin_list_shows_both_from_runyard_docker() -> None:
    out = subprocess.check_output([sys.executable, "-m", "runyard", "plugin", "list", "--json"], text=True)
    rows = {(r["name"], r["kind"]): r for r in json.loads(out)}
    assert rows[("docker", "executor")]["distribution"] == "runyard-docker"
    assert rows[("docker", "run_launcher")]["distribution"] == "runyard-docker"


def test_docker_commands_are_listed_without_importing_the_sdk() -> None:
    code = (
        "import sys; from runyard.cli import main\n"
        "try:\n    main(['docker', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('SDK', 'docker.models' in sys.modules)"
    )
    out = subprocess.check_output([sys.executable, "-c", code], text=True)
    assert "build-image" in out and "cleanup" in out and "SDK False" in out
