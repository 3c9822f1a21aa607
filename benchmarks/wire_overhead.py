"""Wire overhead (issue #16 part 1): bytes per uplink payload, self-describing vs compact vs compact + entropy.

Runs the default federation (``deltaplane run``'s RunConfig: 20 non-IID digits clients, seed 0, error
feedback on) with each codec below, self-describing payloads on the wire, and keeps every payload the
server step receives. Each real payload is then framed again, its bodies byte for byte, as a compact frame
of the run's :class:`~deltaplane.codecs.WireSession` (layout, codec and template agreed once), without and
with per-field entropy coding; every re-framed payload is decoded and must give exactly the delta the
self-describing one gives. A second run of the first codec with the engine's default wire (compact +
entropy) checks that the engine's own per-round uplink count equals the re-framed total (the same training,
the same bytes). Reported: mean bytes per payload in each format, what the header costs, and the ratio to
the fp32 update (``4 × parameters``).

Run: ``.venv/bin/python benchmarks/wire_overhead.py [--rounds 120]`` (about 2 CPU-minutes per codec).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

SPECS = ["topk(0.003) | quant(bits=4)", "stc(0.005)", "topk(0.01) | quant(bits=8)"]


def _capture(config) -> tuple[list[tuple[bytes, int]], object]:
    """Run ``config`` and keep every (payload, base version) the server step receives."""
    from deltaplane.engine import server as server_mod
    from deltaplane.sim import run_simulation

    seen: list[tuple[bytes, int]] = []
    original = server_mod.ServerStep.receive_payload

    def spy(self, client_id, payload, weight):
        seen.append((bytes(payload), self.version))
        return original(self, client_id, payload, weight)

    server_mod.ServerStep.receive_payload = spy
    try:
        result = run_simulation(config)
    finally:
        server_mod.ServerStep.receive_payload = original
    return seen, result


def _reframe(payloads: list[tuple[bytes, int]], layout, spec: str) -> dict[str, list[int]]:
    """Bytes of each payload in the three formats; every compact frame decodes to the same delta."""
    import deltaplane as dp
    from deltaplane.codecs import WireSession
    from deltaplane.codecs.wire import read_body, read_table
    from deltaplane.sim.simulation import BASE_ID

    plain_s = WireSession.create(layout, spec, base_id=BASE_ID, entropy=False)
    coded_s = WireSession.create(layout, spec, base_id=BASE_ID, entropy=True)
    sizes: dict[str, list[int]] = {"self": [], "body": [], "compact": [], "entropy": []}
    for i, (payload, version) in enumerate(payloads):
        table = read_table(payload)
        trees = read_body(table)
        compact = plain_s.pack(trees, version)
        coded = coded_s.pack(trees, version)
        sizes["self"].append(len(payload))
        sizes["body"].append(table.size)
        sizes["compact"].append(len(compact))
        sizes["entropy"].append(len(coded))
        if i % 7 == 0:  # a sample of every run, decoded all three ways: the same delta, bit for bit
            want = dp.decompress(payload, expect_base=(BASE_ID, version), expect_layout=layout)
            for s, p in ((plain_s, compact), (coded_s, coded)):
                got = dp.decompress(p, session=s, expect_base=(BASE_ID, version))
                assert all(torch.equal(got[k], want[k]) for k in want), spec
    return sizes


def main() -> int:
    from _record import record, table
    from deltaplane.codecs import Layout
    from deltaplane.engine import make_task
    from deltaplane.sim import RunConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=RunConfig().rounds)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    base = RunConfig().replace(rounds=args.rounds, wire="self-describing")
    rows, check = [], ""
    for n, spec in enumerate(SPECS):
        payloads, result = _capture(base.replace(codec=spec))
        fp32 = result.raw_update_bytes  # one fp32 update: 4 bytes a parameter
        model = make_task(base).build_model(0)
        layout = Layout.of(model.state_dict())
        sizes = _reframe(payloads, layout, spec)
        mean = {k: sum(v) / len(v) for k, v in sizes.items()}
        rows.append(
            [
                "`" + spec.replace("|", "\\|") + "`",
                f"{len(payloads):,}",
                f"{mean['body']:.1f}",
                f"{mean['self']:.1f} ({mean['self'] - mean['body']:.1f})",
                f"{mean['compact']:.1f} ({mean['compact'] - mean['body']:.1f})",
                f"{mean['entropy']:.1f}",
                f"{fp32 / mean['self']:.0f}×",
                f"{fp32 / mean['compact']:.0f}×",
                f"{fp32 / mean['entropy']:.0f}×",
                f"{result.final.test_accuracy:.3f}",
            ]
        )
        print(rows[-1], flush=True)
        if n == 0:  # the engine's own count with its default wire: the re-framed bytes, round by round
            _, engine = _capture(base.replace(codec=spec, wire="compact", entropy_coding=True))
            per_round = [r.uplink_bytes for r in engine.rounds]
            clients = len(payloads) // args.rounds
            framed = [sum(sizes["entropy"][r * clients : (r + 1) * clients]) for r in range(args.rounds)]
            same = per_round == framed
            acc_same = engine.final.test_accuracy == result.final.test_accuracy
            check = (
                f"Engine check (`{spec}`, default wire = compact + entropy): its per-round uplink counts "
                f"{'equal' if same else 'DIFFER from'} the re-framed totals in all {args.rounds} rounds "
                f"({sum(per_round):,} bytes vs {sum(sizes['self']):,} self-describing), and the final "
                f"accuracy is {'the same' if acc_same else 'DIFFERENT'} ({engine.final.test_accuracy:.3f})."
            )
            print(check, flush=True)
            if not (same and acc_same):
                return 1
    body = (
        f"Default federation ({RunConfig().clients} clients, {args.rounds} rounds, seed 0, error feedback on), "
        f"digits CNN of {fp32 // 4:,} parameters: fp32 update = {fp32:,} bytes. Every uplink payload the server "
        "received, re-framed; mean bytes per payload (in brackets: bytes beyond the codec's bodies). "
        "Compact = `WireSession` frame (magic, 6-byte session id, base version, the tensor table's "
        "differences from the session template, CRC-32C); entropy = the same with per-field rANS where it "
        f"wins. {time.perf_counter() - t0:.0f} s in all.\n\n"
        + table(
            [
                "uplink codec",
                "payloads",
                "bodies",
                "self-describing",
                "compact",
                "compact + entropy",
                "vs fp32: self",
                "compact",
                "compact + entropy",
                "final accuracy",
            ],
            rows,
        )
        + f"\n\n{check}\n"
    )
    print(body)
    record(
        "wire-overhead", "Wire overhead: self-describing vs compact session frames vs entropy coding", body
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
