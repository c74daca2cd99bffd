"""A job file for the CLI: ``fan5000`` (``source``, 5,000 x ``inc(source)``, ``total``).

``runyard job execute -f benchmarks/workloads/fan_file.py --executor in_process`` runs the
same 5,002 steps, built by the same code, as ``python -m workloads.runyard_job fan 5000``
runs through ``execute_in_process()``, so the two paths can be timed side by side.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `runyard job execute -f` puts only this file's directory on sys.path; the workload
# package is imported as `workloads.*` (cwd benchmarks/ elsewhere), so add its parent.
if str(Path(__file__).resolve().parent.parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workloads.runyard_job import build  # noqa: E402

WIDTH = 5000
fan5000 = build("fan", WIDTH)
