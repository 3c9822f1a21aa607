"""How long the CLI takes before it does anything: `deltaplane --help` and `registry list` (issue 18).

Targets: `deltaplane --help` < 1 s and `deltaplane registry list` < 1.5 s wall time on this machine. Each command
is timed end to end as a user runs it (a fresh process), best and median of N runs, next to `python -c pass`
measured in the same run (the floor: interpreter start-up).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _record import record, table

RUNS = int(os.environ.get("CLI_STARTUP_RUNS", "7"))
BIN = Path(sys.executable).parent


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, env=env)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{argv} failed: {proc.stderr.decode()[-400:]}")
    return min(times), statistics.median(times)


def main() -> None:
    deltaplane = shutil.which("deltaplane", path=str(BIN)) or "deltaplane"
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, DELTAPLANE_HOME=home)
        setup = (
            f"import torch; from deltaplane.registry import Registry; r = Registry.create({home!r})\n"
            "for i in range(20): r.register_model('m', {'w': torch.full((64,), float(i))})"
        )
        subprocess.run([sys.executable, "-c", setup], check=True)
        cases = [
            ("python -c pass (floor)", [sys.executable, "-c", "pass"], None),
            ("deltaplane --version", [deltaplane, "--version"], None),
            ("deltaplane --help", [deltaplane, "--help"], 1.0),
            ("deltaplane registry list (20 versions)", [deltaplane, "registry", "list"], 1.5),
        ]
        rows, floor = [], None
        for name, argv, target in cases:
            best, median = timed(argv, env)
            floor = floor or median
            verdict = "" if target is None else ("met" if median < target else "MISSED")
            rows.append(
                [
                    name,
                    f"{best:.3f}",
                    f"{median:.3f}",
                    f"{median / floor:.1f}×",
                    "" if target is None else f"< {target} s",
                    verdict,
                ]
            )
            print(
                f"{name:<42} best {best:.3f} s  median {median:.3f} s  ({median / floor:.1f}× python -c pass)"
            )
    body = (
        f"Wall time of a fresh process, best and median of {RUNS} runs, ratio to `python -c pass` in the same run. "
        "Before the lazy imports of this change both commands imported torch first: `--help` took 5.9 s and "
        "`registry list` 3.1 s on the same machine (loaded).\n\n"
        + table(["command", "best (s)", "median (s)", "vs python", "target", ""], rows)
    )
    record("cli-startup", "CLI start-up: --help and registry list", body)


if __name__ == "__main__":
    main()
