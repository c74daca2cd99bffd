"""What every benchmark child shares: one interpreter, one bytecode state, a record of the load.

Stdlib only: imported by the benchmark scripts, which run under any Python 3.11+.

Why this exists: this machine sets ``PYTHONDONTWRITEBYTECODE=1`` and the project venv is
built by uv, whose editable installs (runyard's own sources) are never precompiled. A
child started with that environment recompiles every runyard module (tens of ms) while a
floor such as ``python -c pass`` compiles nothing, and a peer installed by pip reads
precompiled bytecode: comparisons made that way charge runyard for a cost no user pays
twice. Every child therefore runs with bytecode writing on, into one cache under
``benchmarks/.tmp/pycache`` (``PYTHONPYCACHEPREFIX``: nothing is written into the source
tree or a venv), warmed by an untimed run before anything is timed; and a floor runs the
venv's own interpreter, not whichever ``python3`` started the script.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYCACHE = HERE / ".tmp" / "pycache"


def bytecode_env(base: Mapping[str, str] | None = None, *, pycache: Path = PYCACHE) -> dict[str, str]:
    """``base`` (default: this process's environment) with bytecode caching on, into ``pycache``."""
    env = dict(os.environ if base is None else base)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def load_average() -> str:
    """``1 5 15``-minute load averages and the CPU count, for the header of every table."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} CPUs"


def interpreter(python: Path | str) -> str:
    """The interpreter a child runs: path, version and implementation (read by running it)."""
    code = "import platform, sys; print(platform.python_implementation(), platform.python_version(), sys.prefix)"
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60).stdout.split()
    except OSError as e:
        return f"{python} (cannot run: {e})"
    if len(out) < 3:
        return f"{python} (did not report its version)"
    impl, version, prefix = out[0], out[1], " ".join(out[2:])
    return f"{impl} {version}, venv {prefix}"


def this_interpreter() -> str:
    return f"{platform.python_implementation()} {platform.python_version()}, {sys.prefix}"
