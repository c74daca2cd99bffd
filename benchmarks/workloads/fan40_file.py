"""A job file for ``compare.py``'s multiprocess group: ``fan40`` (``source``, 40 x
``inc(source)``, ``total``), run with ``runyard job execute -f ... --executor multiprocess``:
a process per step, each writing its output through the instance's file output store, and
``total`` reading 40 of them."""

from __future__ import annotations

import sys
from pathlib import Path

# As in fan_file.py: the workload package is imported as `workloads.*`.
if str(Path(__file__).resolve().parent.parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runyard import job  # noqa: E402

from workloads.runyard_job import inc, source, total  # noqa: E402


@job
def fan40() -> None:
    # Defined at module level (not by `build`): each step's process loads the job from
    # this file, by its name.
    s = source()
    total([inc(s) for _ in range(40)])
