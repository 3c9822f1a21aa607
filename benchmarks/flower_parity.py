"""Flower parity: the default ``deltaplane run`` federation on the in-process engine and on Flower's simulation
engine (Ray), same seed and config. Acceptance: final accuracy within 0.5 point, uplink bytes within 1%.

Uplink bytes are the lengths of the wire payloads each engine really sent (on Flower: read from the reply
messages' records); the Flower column also gives the full reply-message size Flower counts.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from _record import record, table  # benchmarks/ is on sys.path when a script here runs
from deltaplane.cli import DEFAULT_RUN_CODEC, DEFAULT_RUN_DGC
from deltaplane.flower import run_flower
from deltaplane.sim import RunConfig, run_simulation


def main() -> None:
    cfg = RunConfig(codec=DEFAULT_RUN_CODEC, **DEFAULT_RUN_DGC)  # deltaplane run's uplink, on both engines
    print(f"in-process: {cfg.clients} clients, {cfg.rounds} rounds, {cfg.codec} ...", flush=True)
    t0 = time.perf_counter()
    local = run_simulation(cfg)
    t_local = time.perf_counter() - t0
    print("flower (Ray simulation) ...", flush=True)
    traffic: list = []
    t0 = time.perf_counter()
    flower = run_flower(cfg, traffic=traffic)
    t_flower = time.perf_counter() - t0

    gap = 100 * abs(local.final.test_accuracy - flower.final.test_accuracy)
    up_l, up_f = local.total_uplink_bytes, flower.total_uplink_bytes
    up_diff = 100 * abs(up_f - up_l) / up_l
    msg_bytes = sum(t.uplink_message_bytes for t in traffic)
    # Steady-state round time: round 1 on Flower includes starting Ray's actors.
    per_round_l = sum(r.seconds for r in local.rounds[1:]) / (cfg.rounds - 1)
    per_round_f = sum(r.seconds for r in flower.rounds[1:]) / (cfg.rounds - 1)
    rows = [
        [
            "in-process",
            f"{local.final.test_accuracy:.4f}",
            f"{up_l:,}",
            "—",
            f"{t_local:.1f} s (1.00×)",
            f"{per_round_l:.2f} s",
        ],
        [
            "Flower simulation (Ray)",
            f"{flower.final.test_accuracy:.4f}",
            f"{up_f:,}",
            f"{msg_bytes:,}",
            f"{t_flower:.1f} s ({t_flower / t_local:.2f}×)",
            f"{per_round_f:.2f} s ({per_round_f / per_round_l:.2f}×)",
        ],
    ]
    ok_acc, ok_bytes = gap <= 0.5, up_diff <= 1.0
    codec = cfg.codec.replace("|", "\\|")  # a bare | would split the markdown cell
    body = (
        f"Default config ({cfg.clients} clients, {cfg.rounds} rounds, α={cfg.alpha}, seed {cfg.seed}), codec "
        f"`{codec}` with error feedback and DGC momentum correction {cfg.momentum_correction} with momentum masking "
        "(`deltaplane run`'s uplink), identity downlink.\n\n"
        + table(
            [
                "engine",
                "final test acc",
                "uplink payload bytes",
                "uplink message bytes",
                "wall time (ratio)",
                "round 2+ mean (ratio)",
            ],
            rows,
        )
        + f"\n\nAccuracy gap {gap:.2f} points (target ≤ 0.5: {'met' if ok_acc else 'MISSED'}); uplink bytes "
        f"differ by {up_diff:.3f}% (target ≤ 1%: {'met' if ok_bytes else 'MISSED'}). Per-round accuracies "
        f"identical in {sum(a.test_accuracy == b.test_accuracy for a, b in zip(local.rounds, flower.rounds, strict=True))}"
        f" of {cfg.rounds} rounds. Flower's wall time includes starting Ray and its actors; Ray runs one "
        "ClientApp per core (2 here); the in-process default engine='sequential' is the same per-client loop, "
        "so the two engines compute the same model bit for bit (engine='batched' equals it only up to float "
        "rounding)."
    )
    print(body)
    record("flower-parity", "Flower engine parity (default federation)", body)


if __name__ == "__main__":
    main()
