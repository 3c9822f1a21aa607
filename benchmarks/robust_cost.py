"""Time and peak memory of one robust rule's close: ``python benchmarks/robust_cost.py SPEC [N] [D]``.

``N`` seeded updates of ``D`` float32 values (20 and 1,000,000 by default), the first one far off (1e3 in every
coordinate), are added to ``parse_defense(SPEC)``; ``result()`` is timed three times (best kept) with one torch
thread, and the process's peak RSS and the rule's measurements are printed. Run each spec in its own process (the
peak RSS is the process's) and give the machine's load (``uptime``) with the figures (docs/aggregation.md,
*Geometric median (RFA) and centered clipping*).
"""

from __future__ import annotations

import resource
import sys
import time

import torch

import deltaplane as dp
from deltaplane.aggregation import parse_defense


def main() -> None:
    spec = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    d = int(sys.argv[3]) if len(sys.argv) > 3 else 1_000_000
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
    print(
        f"{spec}: n={n} d={d} result() {min(best) * 1e3:.0f} ms (best of 3), peak RSS {peak:.0f} MiB, {measured}"
    )


if __name__ == "__main__":
    main()
