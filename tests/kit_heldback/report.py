"""Print which held-back variants the current kit catches, and with which kit tests.

    .venv/bin/python -m tests.kit_heldback.report [VARIANT ...]

Runs the whole kit for each variant (the tests about its clause first, without stopping
at the first failure, then the others when those all pass) and prints a Markdown table.
Slow (half a minute per missed variant): for the lead and the kit's author, not the suite.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from .catalog import VARIANTS
from .runner import kit_verdict


def main(names: list[str]) -> int:
    chosen = [v for v in VARIANTS if not names or v.name in names]
    print("| variant | defect | kit verdict | failing kit tests |")
    print("| --- | --- | --- | --- |")
    missed = 0
    with tempfile.TemporaryDirectory(prefix="kit-heldback-") as tmp:
        for v in chosen:
            verdict = kit_verdict(v, Path(tmp), full=True, stop_at_first=False)
            failing = sorted({name for run in verdict.runs for name in run.failed})
            if verdict.caught is None:
                label = "NO VERDICT (kit hung or broke)"
            elif verdict.caught:
                label = "caught"
            else:
                label = "**MISSED**"
                missed += 1
            print(f"| `{v.name}` | {v.defect} | {label} | {', '.join(f'`{t}`' for t in failing) or '-'} |",
                  flush=True)
    print(f"\n{missed} of {len(chosen)} missed")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
