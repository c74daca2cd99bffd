"""The README's commands work as written: the example command from a fresh copy, and
the test command is what .ci/run calls."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert m, f"README.md has no command under <!-- {marker} -->"
    return m.group(1).strip()


def test_ci_runs_the_readme_test_command() -> None:
    assert readme_command("test-command") in (ROOT / ".ci" / "run").read_text()


def test_readme_example_command_runs_from_a_fresh_copy(tmp_path: Path) -> None:
    """Copies the tracked sources (no .venv) and runs the command exactly as written."""
    src = tmp_path / "clone"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    for rel in files:
        if not (ROOT / rel).is_file():
            continue
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest)
    env = {**os.environ, "RUNYARD_HOME": str(tmp_path / "home")}
    env.pop("VIRTUAL_ENV", None)
    # The command says python3: make it the interpreter running this suite (3.11+).
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(sys.executable if sys.base_prefix == sys.prefix
                                    else Path(sys.base_prefix) / "bin" / "python3")
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(
        ["bash", "-c", readme_command("example-command")], cwd=src, env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"run [0-9a-f]{32} SUCCESS in [\d.]+s \(6 success\)", proc.stdout), proc.stdout
    assert (tmp_path / "home" / "runyard.db").exists()
