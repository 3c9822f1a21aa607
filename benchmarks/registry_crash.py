"""Crash safety of the registry: SIGKILL a writer (register model + delta, promote) at random points.

After every kill the registry is reopened and must pass its integrity check (SQLite integrity_check, every
blob hashes to its name, every row's blob exists, every signature verifies), keep every version the writer
saw committed, and have no gaps in version numbers.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import record, table
from deltaplane.registry.torture import torture

KILLS = 200


def main() -> None:
    rep = torture(
        Path(tempfile.mkdtemp(prefix="crash-bench-")) / "h",
        kills=KILLS,
        seed=7,
        size=50_000,
        max_delay_s=0.5,
    )
    rows = [[rep.kills, rep.committed, rep.versions, rep.orphans, len(rep.problems), f"{rep.seconds:.0f}"]]
    body = (
        table(
            [
                "SIGKILLs",
                "committed versions seen by the writer",
                "artifacts after the run",
                "orphan blobs / temp files (harmless, gc removes)",
                "integrity problems or lost commits",
                "seconds",
            ],
            rows,
        )
        + "\n\nEach model is 50k fp32 values (200 kB); kill times uniform in [0, 0.5] s after the writer starts (every other kill: after its first commit of that life)."
    )
    print(body)
    for p in rep.problems[:10]:
        print("PROBLEM", p)
    record("registry-crash", "Registry crash safety under random SIGKILL", body)


if __name__ == "__main__":
    main()
