"""Foundation benchmark: the default ``RunConfig``, fp32 FedAvg vs ``deltaplane run``'s default uplink.

20 non-IID clients (Dirichlet α=0.5) on digits, the small CNN, the default RunConfig; the two runs are the two
``deltaplane run`` makes by default: fp32 FedAvg, and its default codec with error feedback and DGC's
momentum correction and masking (``DEFAULT_RUN_DGC``). Bytes are real payload lengths (headers included),
summed over all clients and rounds.
"""

from __future__ import annotations

import os
import time

from _record import record, table  # benchmarks/ is on sys.path when a script here runs
from deltaplane.cli import DEFAULT_RUN_CODEC, DEFAULT_RUN_DGC
from deltaplane.report import summarize
from deltaplane.sim import RunConfig, run_simulation


def main() -> None:
    base_cfg = RunConfig()
    runs, cpu = [], {}
    # as `deltaplane run`: the compressed run adds DGC's device-side techniques, the fp32 baseline none
    for name, codec, dgc in (
        ("baseline", "identity", {}),
        ("compressed", DEFAULT_RUN_CODEC, DEFAULT_RUN_DGC),
    ):
        cfg = base_cfg.replace(codec=codec, **dgc)
        print(f"running {name}: {codec} ...", flush=True)
        # CPU seconds as well as wall time: on a shared machine wall time measures the neighbours too.
        t0 = time.process_time()
        runs.append({"name": name, **run_simulation(cfg).to_dict()})
        cpu[name] = time.process_time() - t0
    rows = summarize(runs, baseline="baseline")
    headers = [
        "run",
        "codec",
        "final test acc",
        "client acc mean / min",
        "uplink bytes",
        "ratio",
        "wall time",
        "CPU time",
    ]
    body = [
        [
            r.name,
            "`" + r.codec.replace("|", "\\|") + "`",  # a bare | would split the markdown cell
            f"{r.final_accuracy:.4f}",
            f"{r.client_accuracy_mean:.3f} / {r.client_accuracy_min:.3f}",
            f"{r.uplink_bytes:,}",
            f"{r.ratio_vs_baseline:.1f}×",
            f"{r.wall_time_s:.1f} s",
            f"{cpu[r.name]:.1f} s",
        ]
        for r in rows
    ]
    base, comp = rows
    gap = 100 * (base.final_accuracy - comp.final_accuracy)
    text = (
        f"Default config: {base_cfg.clients} clients, α={base_cfg.alpha}, {base_cfg.rounds} rounds, "
        f"{base_cfg.local_epochs} local epochs, lr {base_cfg.lr}, momentum {base_cfg.momentum}, "
        f"batch {base_cfg.batch_size}, seed {base_cfg.seed}; error feedback on; the compressed run adds "
        f"{', '.join(f'{k}={v}' for k, v in DEFAULT_RUN_DGC.items())}, as `deltaplane run` does.\n\n"
        + table(headers, body)
        + f"\n\nAccuracy gap {gap:+.2f} points for {comp.ratio_vs_baseline:.1f}× fewer uplink bytes. "
        # Wall time includes whatever else the machine runs; CPU time is the run's own cost.
        + f"Load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores."
    )
    print(text)
    title = f"Foundation: FedAvg on digits, fp32 vs `{DEFAULT_RUN_CODEC}` with error feedback and DGC"
    record("foundation", title, text)


if __name__ == "__main__":
    main()
