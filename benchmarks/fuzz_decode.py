"""Structure-aware fuzzing of the wire decoder (issue #14 item 9): 20,000+ meaningful mutations.

Payloads of every registered codec and pipeline (``deltaplane.codecs.fuzzing.SPECS``) for a ~0.8 MB delta are
taken apart and mutated on meaning — shapes, field lengths, codec specs and parameters, metadata, dtypes,
nesting, nodes spliced between codecs, consistent size bombs — then re-framed with a valid CRC, so each
mutation reaches the decoder's semantic checks. Each is decoded as a receiver would (with the model's
expected layout; a quarter as standalone files, without one, under a 16x-model budget) and must give a
well-formed delta (exactly the original where the mutation keeps the meaning) or a ``DeltaplaneError``.
Measured per decode: wall and CPU time (a hang is > 1 s of CPU: on a shared machine wall time measures
the load more than the decoder) and peak resident memory above the
pre-decode RSS (VmHWM reset per decode, C heap trimmed first), against 4 x model bytes + 10 x payload bytes;
a decode whose peak exceeds 0.8 of that bound is decoded twice more and the smallest peak counts (decoding
is deterministic, so a real excess repeats; a burst of allocator or garbage-collector page faults does not).

Baseline in the same run: the same fuzzer against the decoder with its pre-decode checks switched off
(layout, budget, per-codec counts), which is what the checks catch.

Run: ``.venv/bin/python benchmarks/fuzz_decode.py [--mutations 20000] [--seed 0]``; ``--compact`` fuzzes
compact session frames instead (its own section), then stacks of compact frames, some damaged, through the
stacked decoder (``decompress_many``, the codecs' ``decode_rows``) against each frame decoded alone
(``--stacks``, at most ``--stacked-seconds``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from _record import record, table
from deltaplane.codecs.fuzzing import FEWER, STACKABLE_KINDS, FuzzReport, StackReport, fuzz, fuzz_stacked


def _summary(r: FuzzReport) -> dict[str, object]:
    untyped = sum("untyped" in f for f in r.failures)
    return {
        "mutations": f"{r.mutations:,}",
        "exact": r.outcomes["exact"],
        "decoded (other delta)": r.outcomes["decoded"],
        "refused DecodeError": r.outcomes["refused:DecodeError"],
        "refused ShapeMismatch": r.outcomes["refused:ShapeMismatch"],
        "untyped exceptions": untyped,
        "other contract failures": len(r.failures) - untyped,
        "hangs (> 1 s CPU)": r.hangs,
        "slowest decode, CPU": f"{r.max_cpu_seconds * 1000:.1f} ms",
        "slowest decode, wall": f"{r.max_seconds * 1000:.1f} ms",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutations", type=int, default=20_000)
    ap.add_argument("--baseline", type=int, default=2_000, help="mutations against the unchecked decoder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--compact",
        action="store_true",
        help="fuzz compact session frames instead (recorded under fuzz-decode-compact; no baseline run)",
    )
    ap.add_argument(
        "--stacks", type=int, default=600, help="with --compact: stacks of frames decoded together"
    )
    ap.add_argument(
        "--stacked-seconds",
        type=float,
        default=300.0,
        help="with --compact: stop the stacked fuzz after this long",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.compact:
        return _compact(args)

    t0 = time.perf_counter()
    report = fuzz(
        args.mutations,
        seed=args.seed,
        measure_memory=True,
        progress=lambda i: print(f"  {i + 1:,} mutations", flush=True) if (i + 1) % 5000 == 0 else None,
    )
    elapsed = time.perf_counter() - t0
    with (
        mock.patch("deltaplane.codecs.compressor.check_budget", lambda *a, **k: 1 << 62),
        mock.patch("deltaplane.codecs.compressor.check_nodes", lambda *a, **k: None),
    ):
        baseline = fuzz(args.baseline, seed=args.seed + 1, measure_memory=True, kill_after=5.0)

    checked, unchecked = _summary(report), _summary(baseline)
    rows = [[k, checked[k], unchecked[k]] for k in checked]
    rows.append(
        [
            "worst peak memory / (4 x model + 10 x payload + 1 MiB)",
            f"{report.max_memory_ratio:.2f}",
            f"{baseline.max_memory_ratio:.2f}",
        ]
    )
    rows.append(
        [
            "largest peak memory",
            f"{report.max_peak_bytes / 2**20:.1f} MiB",
            f"{baseline.max_peak_bytes / 2**20:.1f} MiB",
        ]
    )
    rows.append(
        [
            "decodes re-measured (first peak > 0.8 of the bound, lower again)",
            report.remeasured,
            baseline.remeasured,
        ]
    )
    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(report.kinds.items()))
    body = (
        f"{len(report.specs)} codec specs (every registered codec, pipelines, a policy, zstd), a delta of "
        f"{report.model_bytes:,} bytes; {elapsed:.0f} s for the checked run.\n\n"
        + table(
            ["", "decoder (checked)", f"baseline: pre-decode checks off ({args.baseline:,} mutations)"], rows
        )
        + f"\n\nMutations by kind: {kinds}.\n\nWorst memory case: {report.worst_memory}.\n"
    )
    if baseline.failures:
        body += f"\nA failure the baseline shows: `{baseline.failures[0][:200]}`\n"
    print(body)
    record("fuzz-decode", "Wire decoder under structure-aware fuzzing", body)
    ok = not report.failures and report.hangs == 0 and report.max_memory_ratio <= 1.0
    if report.failures:
        print("\n".join(report.failures[:20]))
    return 0 if ok else 1


def _compact(args: argparse.Namespace) -> int:
    """The same fuzzer on compact frames: each mutation framed in its codec's wire session (entropy coding
    on), plus compact-only lies (field codings, stored lengths, corrupted rANS streams, another session or
    base version, bytes cut or added), every one with a valid CRC, decoded in the session."""
    t0 = time.perf_counter()
    report = fuzz(
        args.mutations,
        seed=args.seed,
        measure_memory=True,
        compact=True,
        progress=lambda i: print(f"  {i + 1:,} mutations", flush=True) if (i + 1) % 5000 == 0 else None,
    )
    elapsed = time.perf_counter() - t0
    summary = _summary(report)
    summary["refused SessionMismatch"] = report.outcomes["refused:SessionMismatch"]
    summary["refused VersionMismatch"] = report.outcomes["refused:VersionMismatch"]
    summary["worst peak memory / (4 x model + 10 x payload + 1 MiB)"] = f"{report.max_memory_ratio:.2f}"
    summary["largest peak memory"] = f"{report.max_peak_bytes / 2**20:.1f} MiB"
    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(report.kinds.items()))
    body = (
        f"{len(report.specs)} codec specs, a delta of {report.model_bytes:,} bytes, each mutation framed as a "
        "compact payload of its codec's `WireSession` (entropy coding on) and decoded in that session with its "
        "layout; on top of the self-describing mutations, 15% tell a compact-only lie (a field's coding, its "
        "stored length, a flipped bit in a coded stream) and 8% a frame-level one (another session id or base "
        f"version, bytes cut, added or flipped), all with a valid CRC-32C. {elapsed:.0f} s.\n\n"
        + table(["", "compact decoder"], [[k, v] for k, v in summary.items()])
        + f"\n\nMutations by kind: {kinds}.\n\nWorst memory case: {report.worst_memory}.\n"
    )
    stacked = fuzz_stacked(
        args.stacks,
        seed=args.seed,
        measure_memory=True,
        seconds=args.stacked_seconds,
        progress=lambda i: print(f"  {i + 1:,} stacks", flush=True) if (i + 1) % 250 == 0 else None,
    )
    body += _stacked_body(stacked, args)
    print(body)
    record("fuzz-decode-compact", "Compact wire frames under structure-aware fuzzing", body)
    failures = report.failures + stacked.failures
    if failures:
        print("\n".join(failures[:20]))
    ok = report.hangs == 0 and report.max_memory_ratio <= 1.0
    ok = ok and stacked.hangs == 0 and stacked.max_memory_ratio <= 1.0
    return 0 if ok and not failures else 1


def _stacked_body(r: StackReport, args: argparse.Namespace) -> str:
    """The stacked-decode part of the compact section."""
    untyped = sum("untyped" in f or "raised" in f for f in r.failures)
    rows = [
        ["stacks (2-6 frames of one session)", f"{r.stacks:,}"],
        ["frames", f"{r.payloads:,}"],
        *[[f"frames alone: {k}", f"{v:,}"] for k, v in sorted(r.outcomes.items())],
        *[[f"tensors stacked: {k}", f"{v:,}"] for k, v in sorted(r.stacked.items()) if "fewer" not in k],
        ["stacks with fewer than 2 frames past the frame checks", f"{r.stacked[FEWER]:,}"],
        ["untyped exceptions, or raised for the whole stack", untyped],
        ["other contract failures (another outcome than alone)", len(r.failures) - untyped],
        ["hangs (> 1 s CPU per stack)", r.hangs],
        ["slowest stack, CPU", f"{r.max_cpu_seconds * 1000:.1f} ms"],
        ["worst peak memory / (rows x 5 x model + 10 x payloads + 1 MiB)", f"{r.max_memory_ratio:.2f}"],
        ["largest peak memory", f"{r.max_peak_bytes / 2**20:.1f} MiB"],
    ]
    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(r.kinds.items()))
    text = (
        "\n\n### Stacks of frames through the stacked decoder\n\n"
        "A server decodes a round's compact frames together (`decompress_many`: the tensors of all frames on "
        "one stack, through the codecs' `decode_rows`). Each stack holds 2-6 frames of one codec's session: "
        "good frames of four different deltas and, in 90% of the stacks, at least one damaged by the mutations "
        f"above (70% of the damaged ones by a kind that keeps the stack alike: {', '.join(STACKABLE_KINDS)}). "
        "`decompress_many` must give each frame's own `decompress` outcome in its place (the same delta, or "
        "the same error class and message), and `decode_tree_rows` on the frames past the frame checks must "
        "give each tensor exactly as decoded alone or raise an error class a row raises alone. "
        f"{r.seconds:.0f} s (at most {args.stacked_seconds:.0f} s, {args.stacks:,} stacks).\n\n"
        + table(["", "stacked decoder"], rows)
        + f"\n\nFrames by the damage's first kind: {kinds}.\n"
    )
    if r.failures:
        text += f"\nFirst failure: `{r.failures[0][:300]}`\n"
    return text


if __name__ == "__main__":
    sys.exit(main())
