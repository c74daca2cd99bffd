"""Peer-side helper (runs in the peer venv): wait for Dagster runs and print their end time.

Reads run ids on stdin, one per line, and for each prints the run's end timestamp once it
has finished, so that the timing process does not pay Dagster's import per run.
"""

import sys
import time

from dagster import DagsterInstance

instance = DagsterInstance.get()
print("ready", flush=True)
for line in sys.stdin:
    run_id = line.strip()
    deadline = time.time() + 120
    while time.time() < deadline:
        record = instance.get_run_record_by_id(run_id)
        if record is not None and record.dagster_run.is_finished:
            print(f"{record.end_time} {record.dagster_run.status.value}", flush=True)
            break
        time.sleep(0.01)
    else:
        print("timeout", flush=True)
