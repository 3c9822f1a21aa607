"""Acceptance 4: accuracy and backdoor success for each attack × defence at 10/20/30% malicious clients.

100 clients on digits (Dirichlet(0.5) label skew), all in every round, 40 rounds, 64→32→10 MLP; loop in
``benchmarks/_fl_digits.py``. Malicious clients are fixed for the run. Backdoor success = share of test images
of other classes that, stamped with the 2×2 trigger, are classified as the target class 0. Defence settings are
fixed without knowing the attack fraction: trimmed mean β = 0.3, multi-Krum f = 30, norm bound at the median
update norm (adaptive), FLTrust with a 100-sample clean root set at the server.
"""

from __future__ import annotations

import logging
import sys
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ATTACKS = ["sign_flip", "model_replacement", "label_flip", "gaussian", "backdoor"]
DEFENSES = ["none", "trimmed_mean:0.3", "median", "multi_krum:30", "norm_bound:adaptive", "fltrust"]
FRACTIONS = [0.1, 0.2, 0.3]


def job(args):
    from _fl_digits import run

    logging.getLogger("absl").setLevel(logging.ERROR)
    attack, defense = args
    return run(clients=100, rounds=40, lr=0.3, attack=attack, defense=None if defense == "none" else defense)


def main() -> None:
    from _record import record, table

    jobs = [(None, d) for d in DEFENSES]
    jobs += [(f"{a}:{f}", d) for f in FRACTIONS for a in ATTACKS for d in DEFENSES]
    with Pool(2) as pool:
        res = pool.map(job, jobs, chunksize=1)
    by = dict(zip(jobs, res, strict=True))
    clean = by[(None, "none")].accuracy
    head = ["attack", "malicious", *DEFENSES]
    rows = [
        [
            "none (clean)",
            "0%",
            *(f"{by[(None, d)].accuracy:.3f} / {by[(None, d)].backdoor:.2f}" for d in DEFENSES),
        ]
    ]
    verdicts = []
    for f in FRACTIONS:
        for a in ATTACKS:
            cells = [by[(f"{a}:{f}", d)] for d in DEFENSES]
            rows.append([a, f"{round(100 * f)}%", *(f"{r.accuracy:.3f} / {r.backdoor:.2f}" for r in cells)])
            if f == 0.2:
                best = max(range(len(DEFENSES)), key=lambda i: (cells[i].accuracy, -cells[i].backdoor))
                ok = cells[best].accuracy >= clean - 0.02 and cells[best].backdoor <= 0.10
                verdicts.append([a, DEFENSES[best], f"{cells[best].accuracy:.3f}", f"{100 * (cells[best].accuracy - clean):+.1f}",
                                 f"{cells[best].backdoor:.2f}", "PASS" if ok else "MISS"])  # fmt: skip
            print(rows[-1], flush=True)
    body = (
        "Each cell: test accuracy / backdoor success rate.\n\n"
        + table(head, rows)
        + f"\n\nClean FedAvg accuracy {clean:.3f}. Acceptance at 20% malicious (best defence within 2 points of clean, "
        "backdoor success ≤ 10%):\n\n"
        + table(
            ["attack @20%", "best defence", "accuracy", "points vs clean", "backdoor", "verdict"], verdicts
        )
    )
    record("robustness", "Robust aggregation: attacks × defences (acceptance 4)", body)


if __name__ == "__main__":
    main()
