"""Time a registry read's first check of the signed state log in a new process (``deltaplane registry show``).

``build HOME`` makes a registry of 3,000 model versions, each tagged, carded, evaluated and given a promotion
verdict: 12,002 state log entries, as a registry a year of daily rounds leaves. ``time HOME`` copies it to a
scratch folder per try and times ``registry show m:production`` in a fresh interpreter, interleaving the sources
given with ``--src`` (e.g. main's and a branch's), so load drifts hit both alike. Prints figures; records no
section (the report of the change gives them with the load).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(home: Path, versions: int) -> None:
    """``versions`` versions of model ``m``, four signed state log entries each."""
    import torch

    from deltaplane.registry import Registry

    reg = Registry.create(home)
    for n in range(1, versions + 1):
        art = reg.register_model("m", {"w": torch.full((4,), float(n))}, parent=n - 1 or None)
        reg._move_tag("m", "production", n, action="promote")
        reg.attach_card(art, {"version": n})
        reg.record_evaluation(art, "holdout", {"accuracy": 0.5})
        reg.record_promotion_decision(
            "m",
            "production",
            n,
            previous=n - 1 or None,
            promoted=True,
            evaluator="holdout",
            metrics={"accuracy": 0.5},
            baseline=None,
            reasons=[],
        )


# the reads `registry show` makes, timed inside the new process after its imports (less noise on a busy machine)
_READS = (
    "import sys, time; from deltaplane.registry import Registry; t = time.perf_counter(); "
    "r = Registry(sys.argv[1]); a = r.resolve('m:production'); r.card_entry(a); r.evaluations(a); "
    "print(time.perf_counter() - t)"
)


def _show(src: str, home: Path, inproc: bool = False) -> float:
    """Seconds for one ``registry show`` in a new process running the library at ``src`` (with ``inproc``, the
    same reads timed inside the process, imports left out)."""
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    if inproc:
        out = subprocess.run(
            [sys.executable, "-c", _READS, str(home)], env=env, check=True, capture_output=True, text=True
        )
        return float(out.stdout.split()[-1])
    start = time.perf_counter()
    cli = "from deltaplane.cli import app; app()"
    subprocess.run(
        [sys.executable, "-c", cli, "registry", "show", "m:production", "--home", str(home)],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def timed(home: Path, sources: list[str], pairs: int, warm: bool, inproc: bool) -> None:
    """Interleaved tries; ``warm`` times a second read of the same copy (what later processes meet)."""
    times: dict[str, list[float]] = {s: [] for s in sources}
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(pairs):
            for src in sources:
                copy = Path(scratch) / f"h{i}-{len(times[src])}-{abs(hash(src))}"
                shutil.copytree(home, copy)
                first = _show(src, copy, inproc)
                times[src].append(_show(src, copy, inproc) if warm else first)
                print(
                    f"{src}: {'second' if warm else 'first'} read {times[src][-1]:.3f} s (first {first:.3f})"
                )
                shutil.rmtree(copy)
    for src, t in times.items():
        print(
            f"{src}: median {statistics.median(t):.3f} s, min {min(t):.3f}, max {max(t):.3f} ({len(t)} tries)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("home", type=Path)
    b.add_argument("--versions", type=int, default=3000)
    t = sub.add_parser("time")
    t.add_argument("home", type=Path)
    t.add_argument("--src", action="append", required=True)
    t.add_argument("--pairs", type=int, default=5)
    t.add_argument("--second", action="store_true", help="time the second fresh process on each copy")
    t.add_argument("--inproc", action="store_true", help="time the reads inside the process, not its imports")
    a = p.parse_args()
    if a.cmd == "build":
        build(a.home, a.versions)
    else:
        timed(a.home, a.src, a.pairs, a.second, a.inproc)


if __name__ == "__main__":
    main()
