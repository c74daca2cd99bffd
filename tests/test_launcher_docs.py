"""docs/launchers.md is true: the small launcher it shows, copied from the page into a
package and installed (a distribution on PYTHONPATH with the page's entry point), passes
the run-launcher conformance kit with the page's own test file, and the page's claims
about its configuration errors hold."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "launchers.md"


def page_files() -> dict[str, str]:
    """Code blocks of the page whose first line is a comment naming a file."""
    files = {}
    for _lang, body in re.findall(r"```(python|toml)\n(.*?)```", PAGE.read_text(), re.S):
        first, _, rest = body.partition("\n")
        if re.fullmatch(r"# [\w/]+\.(py|toml)", first):
            files[first[2:]] = rest
    return files


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The page's package installed into a fresh site directory; its tests next to it."""
    files = page_files()
    assert {"pyproject.toml", "runyard_niced/plugin.py", "runyard_niced/launcher.py",
            "tests/test_conformance.py"} <= set(files), sorted(files)
    site = tmp_path_factory.mktemp("niced-site")
    project = tmp_path_factory.mktemp("niced-project")
    for name, text in files.items():
        target = (site if name.startswith("runyard_niced/") else project) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    meta = tomllib.loads(files["pyproject.toml"])["project"]
    dist = site / f"runyard_niced-{meta['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    eps = "".join(f"{k} = {v}\n" for k, v in meta["entry-points"]["runyard"].items())
    (dist / "entry_points.txt").write_text(f"[runyard]\n{eps}")
    return site, project


def env_with(site: Path, **more: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **more}


def test_the_page_s_launcher_is_listed_and_its_config_errors_name_the_key(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    site, _ = installed
    listed = subprocess.run([sys.executable, "-m", "runyard", "plugin", "list"], capture_output=True, text=True,
                            env=env_with(site, RUNYARD_HOME=str(tmp_path)), timeout=60)
    assert re.search(r"^niced\s+run_launcher\s+runyard-niced\s+0\.1\.0\s+yes$", listed.stdout, re.M), listed.stdout
    (tmp_path / "runyard.yaml").write_text("run_launcher:\n  niced: {niceness: 40}\n")
    bad = subprocess.run([sys.executable, "-m", "runyard", "instance", "validate"], capture_output=True, text=True,
                         env=env_with(site, RUNYARD_HOME=str(tmp_path)), timeout=60)
    assert bad.returncode == 2
    claimed = re.search(r"for\s+example\s+`(runyard\.yaml: run_launcher\.niced: [^`]*)`", PAGE.read_text()).group(1)
    assert claimed.replace("runyard.yaml", str(tmp_path / "runyard.yaml")) in bad.stderr, bad.stderr


@pytest.mark.slow
def test_the_page_s_launcher_passes_the_kit(installed: tuple[Path, Path]) -> None:
    site, project = installed
    done = subprocess.run([sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider"], cwd=project,
                          capture_output=True, text=True, env=env_with(site), timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert "6 passed" in done.stdout, done.stdout
