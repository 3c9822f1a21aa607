"""Acceptance 1: aggregation memory stays flat from 10 to 1,000 client updates of a 1M-parameter model.

Each (aggregator, number of updates) runs in a fresh subprocess that generates the updates one at a time from a
seeded generator (so only the aggregator can make memory grow) and reports its peak resident set size
(``ru_maxrss``). The same subprocess with zero updates gives the baseline (interpreter + torch + one model-sized
buffer); we report peak RSS and the growth above baseline. Robust aggregators that must hold every update
(median, trimmed mean, Krum, the geometric median, centered clipping) are measured separately at 10 and 100 updates: their memory is O(clients × model) by
design, and the table shows it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PARAMS = {
    "layer1.weight": (1000, 768),
    "layer1.bias": (1000,),
    "layer2.weight": (231, 1000),
    "layer2.bias": (232,),
}
# 768,000 + 1,000 + 231,000 + 232 = 1,000,232 parameters

STREAMING = {
    "FedAvg": "dp.FedAvg()",
    "Validate(FedAvg)": "dp.Validate(dp.FedAvg(), max_norm=1e6)",
    "FedAdam(DPFedAvg(Clip adaptive))": (
        "dp.FedAdam(dp.DPFedAvg(dp.Clip(dp.FedAvg(), "
        "clip=dp.QuantileClip(count_noise_std=5.0, expected_clients=max(n, 1))), "
        "noise_multiplier=1.0, expected_clients=max(n, 1)))"
    ),
    "NormBound(FedAvg)": "dp.NormBound(dp.FedAvg(), max_norm=10.0)",
    "FLTrust": "dp.FLTrust()",
}
BUFFERED = {
    "TrimmedMean(0.2)": "dp.TrimmedMean(beta=0.2)",
    "CoordinateMedian": "dp.CoordinateMedian()",
    "Krum(f=2, multi)": "dp.Krum(byzantine=2, select=None)",
    "GeometricMedian (RFA)": "dp.GeometricMedian()",
    "CenteredClip(τ=10)": "dp.CenteredClip(tau=10.0)",
}

CHILD = r"""
import json, resource, sys, torch
import deltaplane as dp
n = int(sys.argv[1]); params = json.loads(sys.argv[2])
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
def update():
    return dp.Delta({k: torch.randn(*s, generator=g) * 0.01 for k, s in params.items()})
agg = eval(sys.argv[3])
if isinstance(agg, dp.FLTrust):
    agg.set_reference(update())
ref = update()  # baseline holds one update too, like the aggregators' input buffer
for _ in range(n):
    agg.add(update(), 1.0)
if n:
    out = agg.result()
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def peak_mib(expr: str, n: int) -> float:
    # glibc raises its mmap threshold after the first large free, after which freed 4 MB tensors stay in the
    # heap and RSS measures fragmentation rather than live memory; pinning the threshold returns every large
    # tensor to the OS when freed, so the peak reflects what the aggregator actually holds.
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(n), json.dumps(PARAMS), expr],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"] / 1024


def main() -> None:
    import argparse

    from _record import record, table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="AGGREGATOR", help="only these rows (names as in the table)")
    ap.add_argument(
        "--key-suffix", help="with --only: record into a section of its own (key and title get this suffix)"
    )
    args = ap.parse_args()
    unknown = set(args.only or ()) - set(STREAMING) - set(BUFFERED)
    if unknown or bool(args.only) != bool(args.key_suffix):
        ap.error(
            f"--only and --key-suffix go together, with rows of {[*STREAMING, *BUFFERED]} (not {unknown})"
        )
    streaming = {k: v for k, v in STREAMING.items() if not args.only or k in args.only}
    buffered = {k: v for k, v in BUFFERED.items() if not args.only or k in args.only}
    assert sum(__import__("math").prod(s) for s in PARAMS.values()) == 1_000_232
    base = peak_mib("dp.FedAvg()", 0)
    print(f"baseline peak RSS (no updates): {base:.1f} MiB")
    rows = []
    worst = 0.0
    for name, expr in streaming.items():
        peaks = {n: peak_mib(expr, n) for n in (10, 100, 1000)}
        growth = peaks[1000] / peaks[10] - 1
        worst = max(worst, growth)
        rows.append(
            [
                name,
                "yes",
                *(f"{peaks[n]:.1f}" for n in (10, 100, 1000)),
                f"{100 * growth:+.1f}%",
                f"{peaks[1000] - base:.1f}",
            ]
        )
        print(rows[-1], flush=True)
    for name, expr in buffered.items():
        peaks = {n: peak_mib(expr, n) for n in (10, 100)}
        growth = peaks[100] / peaks[10] - 1
        rows.append(
            [
                name,
                "no (holds all)",
                f"{peaks[10]:.1f}",
                f"{peaks[100]:.1f}",
                "not run",
                f"{100 * growth:+.1f}% (10→100)",
                f"{peaks[100] - base:.1f} (at 100)",
            ]
        )
        print(rows[-1], flush=True)
    verdict = "PASS" if worst <= 0.10 else "MISS"
    body = (
        f"1,000,232-parameter model (4.0 MB of float32 per update); updates generated one at a time in the child "
        f"process. Peak RSS (`ru_maxrss`) of a fresh process per cell, glibc `MALLOC_MMAP_THRESHOLD_=131072` (so freed "
        f"tensors return to the OS and RSS tracks live memory), baseline without updates {base:.1f} MiB.\n\n"
        + table(
            [
                "aggregator",
                "streaming",
                "peak MiB @10",
                "@100",
                "@1000",
                "growth 10→1000",
                "MiB above baseline",
            ],
            rows,
        )
        + (
            f"\n\nTarget: streaming aggregators flat within 10% from 10 to 1,000 updates — **{verdict}** "
            f"(worst growth {100 * worst:+.1f}%). "
            if streaming
            else "\n\n"
        )
        + "Buffered methods are run at 10 and 100 updates only: at 1,000 they would hold 4 GB of updates by design."
        + (
            f" These rows were measured apart from the full table (the section of the same title without "
            f"“— {args.key_suffix}”), by the command above, at the date and load above."
            if args.key_suffix
            else ""
        )
    )
    key, title = "aggregation-memory", "Aggregation memory vs number of client updates (acceptance 1)"
    if args.key_suffix:
        key, title = f"{key}-{args.key_suffix}", f"{title} — {args.key_suffix}"
    record(key, title, body)


if __name__ == "__main__":
    main()
