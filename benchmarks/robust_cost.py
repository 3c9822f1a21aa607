"""Time and peak memory of one robust rule's close: ``python benchmarks/robust_cost.py SPEC [N] [D]``.

``N`` seeded updates of ``D`` float32 values (20 and 1,000,000 by default), the first one far off (1e3 in every
coordinate), are added to ``parse_defense(SPEC)``; ``result()`` is timed three times (best kept) with one torch
thread, and the process's peak RSS and the rule's measurements are printed. The script holds the updates twice:
its own list, and the rule's rows.

``python benchmarks/robust_cost.py --record SPEC... [--updates N] [--values D]`` measures each spec in a fresh
process of its own (the peak RSS is the process's), one after the other, with glibc's
``MALLOC_MMAP_THRESHOLD_=131072`` (freed tensors return to the OS, so RSS tracks live memory, as
``aggregation_memory.py`` measures) and ``OMP_NUM_THREADS=1``, and records the table into docs/benchmarks.md
(section ``robust-cost``) with the command, machine, load and date; docs/aggregation.md's cost table quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import deltaplane as dp
from deltaplane.aggregation import parse_defense

#: what the recorded child processes run under: one thread, and freed tensors handed back to the OS
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}


def measure(spec: str, n: int, d: int) -> dict:
    """``result()``'s best time of 3 (seconds), the process's peak RSS (MiB) and the rule's last measurements."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = [dp.Delta({"w": torch.randn(d, generator=g) * 0.01}) for _ in range(n)]
    rows[0] = dp.Delta({"w": torch.full((d,), 1e3)})
    agg = parse_defense(spec)
    best = []
    for _ in range(3):
        for r in rows:
            agg.add(r, 1.0)
        t = time.perf_counter()
        agg.result()
        best.append(time.perf_counter() - t)
        measured = dict(agg.measurements)
        agg.reset()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": min(best), "peak_mib": peak, "measurements": measured}


def _in_child(spec: str, n: int, d: int) -> dict:
    """:func:`measure` in a fresh process (its peak RSS is the spec's alone)."""
    out = subprocess.run(
        [sys.executable, __file__, spec, str(n), str(d), "--json"],
        capture_output=True,
        text=True,
        env=os.environ | CHILD_ENV,
    )
    if out.returncode:
        raise SystemExit(
            f"{spec}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def record_costs(specs: list[str], n: int, d: int) -> str:
    """Measure each spec in its own process and record the table; return its body."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _record import record, table

    rows = []
    for spec in specs:
        r = _in_child(spec, n, d)
        rows.append([f"`{spec}`", f"{r['seconds']:.2f} s", f"{r['peak_mib']:.0f} MiB"])
        print(spec, r, flush=True)
    body = (
        f"{n} updates of {d:,} float32 values ({n * d * 4 / 2**20:.0f} MiB of updates), the first far off (10³ in "
        "every coordinate), added to `parse_defense(SPEC)`; `result()` timed three times, best kept, one torch "
        "thread. Each spec runs in a fresh process, one after the other, with glibc "
        "`MALLOC_MMAP_THRESHOLD_=131072` (freed tensors return to the OS, so RSS tracks live memory); peak RSS is "
        "the whole process's (interpreter and torch included), which holds the updates twice: the script's own "
        "list and the rule's rows. `none` is FedAvg, the streaming baseline.\n\n"
        + table(["rule", "`result()` (best of 3)", "peak RSS"], rows)
    )
    record("robust-cost", "Robust rules: the cost of one close (`result()`) at 1M values", body)
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="+", help="SPEC [N] [D]; with --record, the specs to measure")
    ap.add_argument("--record", action="store_true", help="measure each spec in its own process and record")
    ap.add_argument("--updates", type=int, default=20, help="--record: the number of updates N")
    ap.add_argument("--values", type=int, default=1_000_000, help="--record: the values D of an update")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # a --record child's output
    args = ap.parse_args()
    if args.record:
        print(record_costs(args.spec, args.updates, args.values))
        return
    if len(args.spec) > 3:
        ap.error("SPEC [N] [D]: one spec at a time without --record (quote a spec with commas or spaces)")
    spec = args.spec[0]
    n = int(args.spec[1]) if len(args.spec) > 1 else 20
    d = int(args.spec[2]) if len(args.spec) > 2 else 1_000_000
    r = measure(spec, n, d)
    if args.json:
        print(json.dumps(r, default=str))
        return
    print(
        f"{spec}: n={n} d={d} result() {r['seconds'] * 1e3:.0f} ms (best of 3), peak RSS {r['peak_mib']:.0f} MiB, "
        f"{r['measurements']}"
    )


if __name__ == "__main__":
    main()
