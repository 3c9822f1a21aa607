"""What recording a delta's base costs: ``base_fingerprint`` on all-MiniLM-L6-v2 (22.7M float32 values).

The fingerprint is one SHA-256 pass over the base's bytes. It is timed next to what surrounds it where it is
recorded by default (``Delta.between``, and the file I/O of the CLI: writing the delta durably, reading it
back with every value touched) and next to ``hashlib.sha256``
of the same bytes as one buffer (the floor: the canonical encoding's per-tensor overhead is the difference).
One torch thread; best and median of N runs.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _minilm import minilm_weights
from _record import record, table
from deltaplane.delta import Delta, base_fingerprint

RUNS = int(os.environ.get("BASE_FINGERPRINT_RUNS", "7"))


def timed(fn) -> tuple[float, float]:
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3, statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    base = minilm_weights()
    new = {k: v + 1e-3 for k, v in base.items()}
    delta = Delta.between(base, new)
    scratch = tempfile.TemporaryDirectory()
    path = Path(scratch.name) / "delta.safetensors"
    delta.save(path)
    n = sum(t.numel() for t in base.values())
    nbytes = sum(t.numel() * t.element_size() for t in base.values())
    flat = torch.cat([t.reshape(-1) for t in base.values()]).numpy()
    assert base_fingerprint(dict(reversed(list(base.items())))) == base_fingerprint(base)
    rows = []
    for what, fn in (
        ("base_fingerprint(state)", lambda: base_fingerprint(base)),
        ("hashlib.sha256 of the same bytes, one buffer", lambda: hashlib.sha256(flat).hexdigest()),
        ("Delta.between(base, new)", lambda: Delta.between(base, new)),
        ("Delta.between(base, new, record_base=True)", lambda: Delta.between(base, new, record_base=True)),
        ("Delta.save of the delta (atomic, fsync)", lambda: delta.save(path)),
        (
            "Delta.load of it, every value read",
            lambda: sum(float(t.sum()) for t in Delta.load(path).values()),
        ),
    ):
        best, median = timed(fn)
        rows.append([what, f"{best:.0f}", f"{median:.0f}"])
        print(f"{what}: best {best:.0f} ms, median {median:.0f} ms")
    fp_ms = float(rows[0][1])
    body = (
        f"all-MiniLM-L6-v2: {len(base)} float tensors, {n:,} values, {nbytes / 1e6:.1f} MB float32; "
        f"best and median of {RUNS} runs, one torch thread.\n\n"
        + table(["operation", "best (ms)", "median (ms)"], rows)
        + f"\n\nFingerprinting runs at {nbytes / fp_ms / 1e6:.2f} GB/s, hashlib's own speed. The CLI records and "
        "checks it always (it reads and writes checkpoints anyway); `Delta.between` records it only with "
        "`record_base=True`, so the round engine's per-client delta adds no hashing (the session's base "
        "version names the base there)."
    )
    scratch.cleanup()
    record("base-fingerprint", "Base fingerprint cost (MiniLM)", body)


if __name__ == "__main__":
    main()
