"""Codecs on the stacked [clients × params] updates: compress_many vs one compressor at a time.

Per round, C clients' DigitsCNN-sized updates (the shapes of ``deltaplane.sim.build_model(0)``) are
compressed with ``topk(0.01) | quant(bits=8)`` and error feedback, once by a loop of
``Compressor.compress`` (the simulator's former path) and once by ``compress_many`` on the stack; the payloads
are checked to be identical. Then the batched simulator's per-round time with that codec, with the stacked
uploads and with the per-client loop patched back in (same run, same machine).

Run: ``.venv/bin/python benchmarks/stacked_codecs.py``
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

import deltaplane.engine.client as engine_client
from _record import record, table
from deltaplane.codecs import Compressor, compress_many
from deltaplane.delta import Delta
from deltaplane.sim import RunConfig, build_model, run_simulation

CODEC = "topk(0.01) | quant(bits=8)"
REPEATS = 9
SIM_ROUNDS = 12


def loop_compress(
    compressors, stacked, *, base_id="", base_version=0, meta=None, return_exceptions=False, session=None
):
    """The per-client path: one ``Compressor.compress`` per row of the stack (in the same wire session)."""
    return [
        c.compress(
            Delta({k: v[i] for k, v in stacked.items()}),
            base_id=base_id,
            base_version=base_version,
            session=session,
        )
        for i, c in enumerate(compressors)
    ]


def stacks(clients: int, rounds: int) -> list[dict[str, torch.Tensor]]:
    shapes = {k: v.shape for k, v in build_model(0).state_dict().items()}
    g = torch.Generator().manual_seed(clients)
    return [
        {k: torch.randn(clients, *s, generator=g) * 0.01 for k, s in shapes.items()} for _ in range(rounds)
    ]


def time_codec(clients: int) -> tuple[float, float]:
    """Median seconds of one round (with a residual carried from the round before) for the loop and the stack."""
    times: dict[str, list[float]] = {"loop": [], "stack": []}
    rounds = stacks(clients, 2)
    for _ in range(REPEATS):
        payloads = {}
        for name, fn in (("loop", loop_compress), ("stack", compress_many)):
            comps = [Compressor(CODEC, error_feedback=True, seed=s) for s in range(clients)]
            fn(comps, rounds[0])  # round 1: the residuals appear
            t0 = time.perf_counter()
            payloads[name] = fn(comps, rounds[1])
            times[name].append(time.perf_counter() - t0)
        assert payloads["loop"] == payloads["stack"], "compress_many must give the loop's bytes"
    return statistics.median(times["loop"]), statistics.median(times["stack"])


def time_sim(patch_loop: bool) -> tuple[float, list[int], list[float]]:
    """Median per-round seconds of rounds 2.. of the batched simulator, with its uplink bytes and accuracy."""
    real = engine_client.compress_many
    if patch_loop:
        engine_client.compress_many = loop_compress  # type: ignore[assignment]
    try:
        r = run_simulation(RunConfig(engine="batched", threads=2, codec=CODEC, rounds=SIM_ROUNDS))
    finally:
        engine_client.compress_many = real
    return (
        statistics.median(m.seconds for m in r.rounds[1:]),
        [m.uplink_bytes for m in r.rounds],
        [m.test_accuracy for m in r.rounds],
    )


def main() -> None:
    torch.set_num_threads(2)
    params = sum(v.numel() for v in build_model(0).state_dict().values())
    rows = []
    for clients in (20, 100):
        loop_s, stack_s = time_codec(clients)
        print(
            f"{clients} clients: loop {loop_s * 1e3:.1f} ms/round, compress_many {stack_s * 1e3:.1f} ms/round, "
            f"ratio {stack_s / loop_s:.2f}x"
        )
        rows.append(
            [clients, f"{loop_s * 1e3:.1f}", f"{stack_s * 1e3:.1f}", f"{stack_s / loop_s:.2f}×", "identical"]
        )
    time_sim(False)  # warm-up: data loading, kernel caches
    before, up_before, acc_before = time_sim(True)
    after, up_after, acc_after = time_sim(False)
    same = up_before == up_after and acc_before == acc_after
    print(
        f"batched simulator, {CODEC}: per-client compression {before * 1e3:.1f} ms/round, "
        f"stacked {after * 1e3:.1f} ms/round, ratio {after / before:.2f}x; same bytes and accuracy: {same}"
    )
    assert same, "the stacked uploads must not change a run"
    body = (
        f"`{CODEC}` with error feedback on {params:,}-parameter DigitsCNN updates (random normal × 0.01), "
        f"one round with residuals carried, median of {REPEATS} repeats, torch threads 2. Ratio = "
        "`compress_many` time / per-client `Compressor.compress` loop time (lower is better); the payloads "
        "are checked byte for byte.\n\n"
        + table(["clients", "loop ms/round", "compress_many ms/round", "ratio", "payloads"], rows)
        + f"\n\nBatched simulator (`RunConfig(engine='batched', threads=2, codec='{CODEC}', rounds={SIM_ROUNDS})`,"
        f" median of rounds 2–{SIM_ROUNDS}): {before * 1e3:.1f} ms/round with per-client compression, "
        f"{after * 1e3:.1f} ms/round with the stacked uploads ({after / before:.2f}×); per-round uplink bytes "
        f"and test accuracy identical: {same}.\n"
    )
    record("stacked_codecs", "Codecs on the stacked updates (compress_many)", body)


if __name__ == "__main__":
    main()
