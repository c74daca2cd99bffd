"""The console script's kept outputs (`runyard.console`) stay true as plugins come and go.

Each test installs real distributions (a module plus a ``.dist-info`` whose entry points
register it in the ``runyard`` group) into a directory on PYTHONPATH and runs the real
console script in a fresh interpreter with a cache directory of its own. Every plugin module
writes a marker file when imported, which shows whether an output was rendered (plugins
imported) or replayed (nothing imported).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from runyard.console import cacheable

RUNYARD = Path(sys.executable).parent / "runyard"

PLUGIN = (
    "import os, pathlib\n"
    "from runyard.plugin import API_VERSION, ExecutorSpec, hookimpl\n"
    "pathlib.Path(os.environ['RY_MARKERS'], {name!r}).write_text('imported')\n\n"
    "@hookimpl\n"
    "def runyard_executors():\n"
    "    return [ExecutorSpec(name={name!r}, api_version=API_VERSION, description={desc!r},\n"
    "                         handler='runyard_local.in_process:InProcessStepHandler')]\n\n"
    "@hookimpl\n"
    "def runyard_cli(cli):\n"
    "    import click\n\n"
    "    @cli.command({name!r}, help={desc!r})\n"
    "    def _cmd():\n"
    "        click.echo('ran ' + {name!r})\n"
)


def install(site: Path, name: str, desc: str = "first") -> Path:
    """Lay a distribution out as pip does; returns the plugin module's file."""
    module = site / f"ry_{name}_plugin.py"
    module.write_text(PLUGIN.format(name=name, desc=desc))
    info = site / f"ry_{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: ry-{name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[runyard]\n{name} = ry_{name}_plugin\n")
    return module


def uninstall(site: Path, name: str) -> None:
    info = site / f"ry_{name}-1.0.dist-info"
    for f in info.iterdir():
        f.unlink()
    info.rmdir()
    (site / f"ry_{name}_plugin.py").unlink()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    site, markers = tmp_path / "site", tmp_path / "markers"
    site.mkdir()
    markers.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNYARD_") and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), RUNYARD_HOME=str(tmp_path / "home"), RUNYARD_CACHE_DIR=str(tmp_path / "cache"),
               RY_MARKERS=str(markers))
    return env


def runyard(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    for marker in Path(env["RY_MARKERS"]).iterdir():
        marker.unlink()
    return subprocess.run([str(RUNYARD), *args], capture_output=True, text=True, env=env, timeout=120)


def listed(env: dict[str, str]) -> dict[str, dict[str, object]]:
    done = runyard(env, "plugin", "list", "--json")
    assert done.returncode == 0, done.stderr
    return {r["name"]: r for r in json.loads(done.stdout) if str(r["distribution"]).startswith("ry-")}


def imported(env: dict[str, str]) -> set[str]:
    return {p.name for p in Path(env["RY_MARKERS"]).iterdir()}


def test_a_repeated_listing_is_replayed_without_importing_any_plugin(env: dict[str, str]) -> None:
    site = Path(env["PYTHONPATH"])
    install(site, "alpha")
    first = runyard(env, "plugin", "list")
    assert first.returncode == 0, first.stderr
    assert "alpha" in first.stdout and imported(env) == {"alpha"}
    again = runyard(env, "plugin", "list")
    assert (again.returncode, again.stdout, again.stderr) == (0, first.stdout, first.stderr)
    assert imported(env) == set()  # replayed: the plugin was not imported
    # The same output as the real CLI renders with the cache off.
    off = runyard({**env, "RUNYARD_CLI_CACHE": "0"}, "plugin", "list")
    assert off.stdout == first.stdout and imported(env) == {"alpha"}
    cache = next(Path(env["RUNYARD_CACHE_DIR"]).iterdir())
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700


def test_an_install_and_an_uninstall_are_noticed(env: dict[str, str]) -> None:
    site = Path(env["PYTHONPATH"])
    install(site, "alpha")
    assert set(listed(env)) == {"alpha"}
    help_before = runyard(env, "--help").stdout
    assert "alpha" in help_before and "beta" not in help_before

    install(site, "beta")
    assert set(listed(env)) == {"alpha", "beta"}
    help_after = runyard(env, "--help")
    assert "beta" in help_after.stdout  # the new plugin's command is in the help
    assert runyard(env, "beta").stdout == "ran beta\n"

    uninstall(site, "alpha")
    assert set(listed(env)) == {"beta"}
    assert "alpha" not in runyard(env, "--help").stdout


def test_an_edited_plugin_renders_again_and_a_broken_one_is_reported_every_time(env: dict[str, str]) -> None:
    site = Path(env["PYTHONPATH"])
    module = install(site, "alpha")
    assert listed(env)["alpha"]["description"] == "first"
    listed(env)
    assert imported(env) == set()

    module.write_text(PLUGIN.format(name="alpha", desc="second, edited in place"))
    assert listed(env)["alpha"]["description"] == "second, edited in place"

    module.write_text("raise RuntimeError('broken on purpose')\n")
    for _ in range(2):  # never kept: each listing imports it again and says why it fails
        row = listed(env)["alpha"]
        assert row["loads"] is False and "broken on purpose" in str(row["description"])

    module.write_text(PLUGIN.format(name="alpha", desc="fixed"))
    assert listed(env)["alpha"] == {"name": "alpha", "kind": "executor", "distribution": "ry-alpha",
                                    "version": "1.0", "loads": True, "description": "fixed"}


def test_disabling_a_plugin_is_noticed(env: dict[str, str]) -> None:
    site = Path(env["PYTHONPATH"])
    install(site, "alpha")
    assert listed(env)["alpha"]["loads"] is True
    off = listed({**env, "RUNYARD_DISABLE_PLUGINS": "alpha"})["alpha"]
    assert off["loads"] is False and "RUNYARD_DISABLE_PLUGINS" in str(off["description"])
    assert listed(env)["alpha"]["loads"] is True


@pytest.mark.parametrize("damage", [b"", b"\x00garbage", b"\xe3" * 40])
def test_a_damaged_cache_is_ignored_and_rewritten(env: dict[str, str], damage: bytes) -> None:
    install(Path(env["PYTHONPATH"]), "alpha")
    first = runyard(env, "job", "execute", "--help")
    cache = next(Path(env["RUNYARD_CACHE_DIR"]).iterdir())
    cache.write_bytes(damage)
    again = runyard(env, "job", "execute", "--help")
    assert (again.returncode, again.stdout) == (0, first.stdout)
    assert cache.read_bytes() != damage


def test_a_cache_others_can_write_is_not_trusted(env: dict[str, str]) -> None:
    install(Path(env["PYTHONPATH"]), "alpha")
    runyard(env, "plugin", "list")
    cache = next(Path(env["RUNYARD_CACHE_DIR"]).iterdir())
    cache.chmod(0o666)
    runyard(env, "plugin", "list")
    assert imported(env) == {"alpha"}  # rendered again, not replayed


def test_only_invocations_that_read_nothing_but_installed_code_are_kept() -> None:
    for argv in (["--help"], ["-h"], ["plugin", "list"], ["plugin", "list", "--json"], ["--version"],
                 ["job", "execute", "--help"], ["run", "list", "-h"]):
        assert cacheable(argv), argv
    for argv in ([], ["plugin"], ["job", "list", "-f", "x.py"], ["job", "execute", "-f", "x.py", "--help"],
                 ["--debug", "--help"], ["run", "list"], ["config", "explain", "-c", "x.yaml", "--help"]):
        assert not cacheable(argv), argv


def test_errors_are_not_kept(env: dict[str, str]) -> None:
    first = runyard(env, "nosuchcommand", "--help")
    assert first.returncode == 2 and "nosuchcommand" in first.stderr
    assert not Path(env["RUNYARD_CACHE_DIR"]).exists() or not any(Path(env["RUNYARD_CACHE_DIR"]).iterdir())
