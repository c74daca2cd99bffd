"""The daemon's log: one line per action (launched, marked failed, retried, ...), as plain
text for a terminal or journald, or JSON for a log collector."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO


class ActionLog:
    def __init__(self, fmt: str = "plain", stream: TextIO | None = None) -> None:
        if fmt not in ("plain", "json"):
            raise ValueError(f"log format must be plain or json, not {fmt!r}")
        self.fmt = fmt
        self.stream = stream

    def __call__(self, action: str, message: str = "", **fields: Any) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        if self.fmt == "json":
            line = json.dumps({"ts": stamp, "action": action, **fields, "message": message}, default=str)
        else:
            # A message may hold a worker's last output lines: keep one action per line.
            text = " ".join(message.split())
            kv = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
            line = f"{stamp} {action} {kv}" + (f": {text}" if text else "")
        stream = self.stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()
