"""Acceptance 3: secure aggregation — exact sums under 30% dropout, upload overhead, round time.

Clients hold 8-bit quantized updates (codes in [0, 255]) of a 1,000,000-value model. The protocol runs
in-process with every message serialized to its wire size; one core does all clients' and the server's work in
turn, so a round's time is the *total* compute of all parties (a real deployment runs clients in parallel).
The baseline is the same round without secure aggregation: each client packs its 8-bit codes, the server unpacks
and sums them. Times are CPU seconds of this single-threaded process (``time.process_time``: the work done,
unaffected by other jobs on a shared machine), with wall-clock seconds next to them. Each timed round, plaintext
and secure alike, is the least of 3 runs: one estimator for both sides of the ratio (a single secure run against
the best of 3 plaintext runs biased the ratio upwards by whatever the load did to that one run). The target
(issue #16) is SecAgg+ with 100 clients ≤ 15× plaintext.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from deltaplane.aggregation.secagg import SecAggConfig, pack, ring_bits, run_secagg, unpack
from deltaplane.aggregation.secagg.prg import add_masks
from deltaplane.aggregation.secagg.protocol import default_threshold
from deltaplane.aggregation.secagg.ring import word_count

D = 1_000_000
BITS = 8
#: Timed rounds (plaintext and secure) are the least of this many runs.
REPEATS = 3
TARGET = 15.0  # SecAgg+ (20 neighbours), 100 clients: round CPU time / plaintext round CPU time


def codes_for(n: int, d: int, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.integers(0, 1 << BITS, d).astype(np.uint32) for u in range(n)}


def plain_round(codes: dict[int, np.ndarray], d: int) -> tuple[np.ndarray, float, float]:
    """(sum, CPU s, wall s) of the round without secure aggregation; the least of :data:`REPEATS` runs."""
    best = (np.inf, np.inf)
    for _ in range(REPEATS):
        t0, c0 = time.perf_counter(), time.process_time()
        total = np.zeros(d, dtype=np.uint64)
        for c in codes.values():
            total += unpack(pack(c, BITS), BITS, d)
        best = min(best, (time.process_time() - c0, time.perf_counter() - t0))
    return total, *best


def timed_secure_round(codes, d, *, neighbours=None):
    """(sum, report, CPU s, wall s) of the secure round: the least of :data:`REPEATS` runs, as the plaintext
    round; every run's sum is returned equal or the benchmark stops."""
    best = None
    for _ in range(REPEATS):
        total, rep, cpu, wall = secure_round(codes, d, neighbours=neighbours)
        assert best is None or np.array_equal(total, best[0])
        best = (
            (total, rep, cpu, wall) if best is None else (total, rep, min(cpu, best[2]), min(wall, best[3]))
        )
    return best


def secure_round(codes, d, *, neighbours=None, before=(), after=(), seed=0):
    n = len(codes)
    group = (neighbours if neighbours is not None else n - 1) + 1
    cfg = SecAggConfig(
        num_clients=n,
        threshold=default_threshold(group),  # what real devices accept (check_device_policy)
        bits=BITS,
        vector_size=d,
        neighbours=neighbours,
        graph_seed=seed,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    total, rep = run_secagg(
        codes,
        cfg,
        drop_before_upload=before,
        drop_after_upload=after,
        randbytes=np.random.default_rng(seed).bytes,
    )
    return total, rep, time.process_time() - c0, time.perf_counter() - t0


def crypto_floor(n: int, d: int, neighbours: int) -> tuple[float, float, int, int]:
    """CPU seconds of a SecAgg+ round's masks and key agreements, each measured alone, and their counts.

    The masks: every device expands and adds its self mask and one pairwise mask per neighbour, the server
    removes the ``n`` self masks (no dropouts), with the same :func:`add_masks` the protocol uses. The
    agreements: two X25519 agreements per device and neighbour (share encryption and pairwise mask keys).
    """
    rng = np.random.default_rng(0)
    ring = ring_bits(BITS, n)
    per_device = [[(rng.bytes(16), 1) for _ in range(neighbours + 1)] for _ in range(n)]
    server = [(rng.bytes(16), -1) for _ in range(n)]
    acc = np.zeros(word_count(d, ring), dtype=np.uint64)  # lane words (message version 4)
    c0 = time.process_time()
    for masks in per_device:
        add_masks(acc, masks)
    add_masks(acc, server)
    t_masks = time.process_time() - c0
    agreements = 2 * n * neighbours
    mine, peer = X25519PrivateKey.generate(), X25519PrivateKey.generate().public_key()
    c0 = time.process_time()
    for _ in range(agreements):
        mine.exchange(peer)
    return t_masks, time.process_time() - c0, n * (neighbours + 2), agreements


def main() -> None:
    from _record import record, table

    out = []
    # -- exactness with 30% dropout, 100 clients -------------------------------------------------------------
    n = 100
    codes = codes_for(n, D, seed=1)
    drop = set(np.random.default_rng(7).choice(n, size=30, replace=False).tolist())
    exact_rows = []
    for label, kw, summed in [
        ("30 drop after uploading their masked input", {"after": drop}, set(range(n))),
        ("30 drop after sharing keys, before uploading", {"before": drop}, set(range(n)) - drop),
    ]:
        total, rep, secs, _ = secure_round(codes, D, **kw)
        expected = sum(codes[u].astype(np.uint64) for u in sorted(summed))
        exact = bool(np.array_equal(total, expected))
        exact_rows.append(
            [
                label,
                len(rep.survivors),
                len(rep.responders),
                "yes" if exact else "NO",
                f"{rep.overhead(BITS, D):.3f}×",
            ]
        )
        print(exact_rows[-1], f"{secs:.1f}s", flush=True)
    out.append(
        f"100 clients, complete graph (original SecAgg), threshold {default_threshold(100)}, 1,000,000 values of 8 bits, "
        "ring 2^15:\n\n"
        + table(
            [
                "scenario",
                "in the sum",
                "answered unmasking",
                "server sum == plaintext sum (exact, integers)",
                "largest per-client upload / unmasked 8-bit update",
            ],
            exact_rows,
        )
    )
    # -- upload overhead by model size and graph --------------------------------------------------------------
    over_rows = []
    for d in (18_346, 1_000_000):
        for nb in (None, 20):
            _, rep, _, _ = secure_round(codes_for(n, d, seed=2), d, neighbours=nb)
            plain = -(-d * BITS // 8)
            worst = max(rep.upload_bytes.values())
            over_rows.append(
                [
                    f"{d:,}",
                    "complete (SecAgg)" if nb is None else f"SecAgg+ {nb} neighbours",
                    f"{plain:,}",
                    f"{worst:,}",
                    f"{worst / plain:.3f}×",
                    "PASS" if worst / plain <= 2 else "MISS",
                ]
            )
            print(over_rows[-1], flush=True)
    out.append(
        "Per-client upload over the whole protocol (keys, encrypted shares, masked vector, unmasking shares) vs "
        "the unmasked 8-bit update packed at 8 bits (target ≤ 2×):\n\n"
        + table(["values", "graph", "unmasked bytes", "SecAgg upload bytes", "overhead", "≤ 2×"], over_rows)
    )
    # -- round time -------------------------------------------------------------------------------------------
    time_rows = []
    c_plain = c_plus = 0.0
    for n in (10, 50, 100):
        codes = codes_for(n, D, seed=3)
        ref, c_plain, w_plain = plain_round(codes, D)
        total, _, c_full, w_full = timed_secure_round(codes, D)
        assert np.array_equal(total, ref)
        row = [
            n,
            f"{c_plain:.3f} ({w_plain:.3f})",
            f"{c_full:.2f} ({w_full:.2f})",
            f"{c_full / c_plain:.1f}×",
        ]
        if n >= 50:
            total, _, c_plus, w_plus = timed_secure_round(codes, D, neighbours=20)
            assert np.array_equal(total, ref)
            ratio = c_plus / c_plain
            verdict = ((" ✅" if ratio <= TARGET else " ❌") + f" (≤{TARGET:.0f}×)") if n == 100 else ""
            row += [f"{c_plus:.2f} ({w_plus:.2f})", f"{ratio:.1f}×{verdict}", f"{w_plus / w_plain:.1f}×"]
        else:
            row += ["—", "—", "—"]
        time_rows.append(row)
        print(row, flush=True)
    t_masks, t_agree, n_masks, n_agree = crypto_floor(100, D, 20)
    keystream_gb = n_masks * word_count(D, ring_bits(BITS, 100)) * 8 / 1e9  # a 64-bit word per 4 values
    rest, ratio = c_plus - t_masks - t_agree, c_plus / c_plain
    floor = (t_masks + t_agree) / c_plain
    met = (
        f"#16's ≤ {TARGET:.0f}× is met in this run ({ratio:.1f}×)"
        if ratio <= TARGET
        else f"#16's ≤ {TARGET:.0f}× is not met in this run ({ratio:.1f}×)"
    )
    out.append(
        "Round time, all parties' compute on one core, 1,000,000 values: CPU seconds (wall seconds), and the ratio "
        "of CPU times to the plaintext round measured in the same run, each the least of 3 runs (target: SecAgg+ "
        "with 100 clients ≤ "
        f"{TARGET:.0f}×). Masks are AES-128-CTR keystreams added to lane words (message version 4): for a ring of "
        "9 to 16 bits (here 8-bit codes: 12 to 15 bits) each 64-bit keystream word masks a word of 4 values:\n\n"
        + table(
            [
                "clients",
                "plaintext CPU s (wall)",
                "SecAgg CPU s (wall)",
                "ratio",
                "SecAgg+ (20 nbrs) CPU s (wall)",
                "ratio",
                "SecAgg+ ratio (wall)",
            ],
            time_rows,
        )
    )
    out.append(
        f"Where the SecAgg+ round of 100 clients goes ({c_plus:.2f} s CPU; each part below measured alone in this "
        f"run): expanding and adding its {n_masks:,} masks of 250,000 64-bit words (each device its self mask and 20 "
        f"pairwise masks, the server the 100 self masks back out; {keystream_gb:.1f} GB of AES-128-CTR keystream) "
        f"takes {t_masks:.2f} s ({t_masks / c_plain:.1f}× the plaintext round) and its {n_agree:,} X25519 "
        f"agreements (two key pairs per device, as in Bell et al.) {t_agree:.2f} s ({t_agree / c_plain:.1f}×): "
        f"{floor:.1f}× before anything else. Everything else (putting each device's codes into 60-bit lane words "
        f"and packing its masked words, adding each upload's words to the server's sum, Shamir sharing and "
        f"recovery, HKDF, AES-GCM of the shares, the messages) takes "
        f"{max(rest, 0.0):.2f} s ({max(rest, 0.0) / c_plain:.1f}×). {met}. The plaintext round is memory-bound "
        "and slows more than the SecAgg+ round when other jobs share the machine, so the ratio falls with the "
        "load (see the load line above): compare figures measured at similar load."
    )
    record("secagg", "Secure aggregation (acceptance 3)", "\n\n".join(out))


if __name__ == "__main__":
    main()
