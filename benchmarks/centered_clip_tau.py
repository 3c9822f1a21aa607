"""Centered clipping's radius τ on deltaplane's own federation: a sweep under untargeted attacks and none.

``centered_clip(τ)`` (:class:`deltaplane.aggregation.robust.CenteredClip`) clips each update's distance to the
previous round's aggregate at ``τ``, in update-norm units; its default ``τ = 10`` came from no measurement. Each
cell is one run of :func:`deltaplane.apps.runner.run_federation` as ``benchmarks/robustness.py`` runs it
(:func:`robustness.config`: its defaults — 20 non-IID clients, DigitsCNN, Dirichlet(0.5), 2 local epochs at
lr 0.2 — with ``engine="batched"``, one torch thread, and the robustness sections' uplink ``stc(0.002)`` with DGC
momentum correction 0.5 and momentum masking), cached with those runs. The attacks are 20% ``sign_flip``
(``−Δ``), ``sign_flip(scale=10)`` (``−10Δ``, the scaled attack), ``gaussian`` (N(0, 0.5²) noise) and
``backdoor``, beside no attacker; FedAvg (``none``) is the unclipped reference row.
"""

from __future__ import annotations

import argparse
import math
import sys
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import robustness
from _record import record, table

#: the radii swept (FedAvg, the row above them, is the unclipped mean); the rule's default was 10
TAUS = ["1", "3", "10", "30"]
#: (label, attack spec) of each column: no attacker, three untargeted attacks, the backdoor
ATTACKS = [
    ("no attacker", None),
    ("sign flip 20%", "sign_flip(0.2)"),
    ("sign flip ×10, 20%", "sign_flip(0.2, scale=10)"),
    ("gaussian 20%", "gaussian(0.2)"),
    ("backdoor 20%", "backdoor(0.2)"),
]


def _job(args: tuple) -> dict:
    """One run (:func:`robustness.job`, cached), or, when the federation diverges (every update of a round
    NaN/Inf and refused: FedAvg under the scaled sign flip), a cell that says so instead of ending the sweep."""
    from deltaplane.errors import DeltaplaneError

    try:
        return robustness.job(args)
    except DeltaplaneError as exc:
        return {"accuracy": None, "backdoor": None, "error": type(exc).__name__}


def run_all(jobs: list[tuple], workers: int) -> dict[tuple, dict]:
    with Pool(workers) as pool:
        return dict(zip(jobs, pool.map(_job, jobs, chunksize=1), strict=True))


def _defence(tau: str) -> str:
    return "none" if tau == "none" else f"centered_clip({tau})"


def _mean(runs: list[dict | None], field: str) -> float | None:
    done = [r[field] for r in runs if r is not None and r[field] is not None]
    return sum(done) / len(done) if len(done) == len(runs) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1, each cell their mean")
    ap.add_argument("--taus", nargs="+", default=TAUS)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    codec, seeds, rows_of = (
        robustness.uplink(robustness.DEFAULT_CODEC),
        range(args.seeds),
        ["none", *args.taus],
    )
    jobs = [(codec, a, _defence(t), s, args.rounds) for t in rows_of for _, a in ATTACKS for s in seeds]
    by = run_all(jobs, args.workers)
    rows, worst = [], {}
    for t in rows_of:
        row: list[object] = ["FedAvg (`none`)" if t == "none" else f"`centered_clip({t})`"]
        for _, a in ATTACKS:
            runs = [by[(codec, a, _defence(t), s, args.rounds)] for s in seeds]
            failed = [r["error"] for r in runs if r is not None and r.get("error")]
            if failed:  # the run ended: as bad as an accuracy can be
                row.append(f"diverged (`{failed[0]}`)")
                if t != "none":
                    worst[t] = 0.0
                continue
            acc, bd = _mean(runs, "accuracy"), _mean(runs, "backdoor")
            if acc is None:
                row.append("not run")
                continue
            row.append(
                f"{acc:.3f}" + (f" / {bd:.2f}" if a and a.startswith("backdoor") and bd is not None else "")
            )
            if t != "none" and not (a and a.startswith("backdoor")):
                worst[t] = min(worst.get(t, math.inf), acc)
        row.append(f"{worst[t]:.3f}" if t in worst else "—")
        rows.append(row)
    best = max(worst, key=lambda t: worst[t]) if worst else None
    body = (
        f"`centered_clip(τ)` against FedAvg, {args.rounds} rounds, seeds "
        f"{', '.join(map(str, seeds))} (each cell their mean final test accuracy; the backdoor column also the "
        "mean backdoor success, the share of triggered test images of other classes classified as the target 0). "
        f"Uplink `{robustness.DEFAULT_CODEC}` with DGC momentum correction 0.5 and momentum masking, 20 non-IID "
        "clients, DigitsCNN, `engine=batched`, 1 thread, as `benchmarks/robustness.py` runs them. Attackers are "
        "4 fixed clients of 20. *Diverged*: the run ended when every update of a round held NaN/Inf and was "
        "refused. *Worst* is the row's lowest accuracy over no attacker and the three untargeted attacks"
        + (f"; the best worst case is `τ = {best}`." if best else ".")
        + "\n\n"
        + table(["rule", *(label for label, _ in ATTACKS), "worst (untargeted, none)"], rows)
    )
    print(body)
    record("centered-clip-tau", "Centered clipping: the radius τ under attack, default codec", body)


if __name__ == "__main__":
    main()
