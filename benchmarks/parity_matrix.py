"""The parity matrix at the default federation size (issue #13 acceptance 1): every driver × every feature.

For each feature the sequential driver is the reference; the table gives, per driver, the final test accuracy,
the total uplink bytes and whether every round's figures (accuracy, devices, refusals, ε, personal accuracies)
and the final weights equal the reference bit for bit (``=``), or the largest per-round accuracy difference
otherwise, and each driver's uplink and downlink bytes a device against the reference's. Drivers: batched
(stacked clients; equal up to float32 rounding), HTTP (a real uvicorn service on loopback, simulated devices),
Flower (the ServerApp and ClientApps through Flower's message code path on an in-process grid, no Ray), and
population (virtual devices of its own, so no sequential twin: its accuracy, and whether its devices and
refusals a round equal the reference's). A driver that refuses a feature shows its typed error and the reason
in the cell. Personalization runs on every driver but population: each device keeps its personal state (a simulated device over HTTP, its node's ``Context.state`` on
Flower), FedPer's devices send and receive only the shared layers, and the personal figures are the devices'.
The rows after the first ten (sampled and empty rounds, SecAgg, authenticated SecAgg, SecAgg+, distributed DP,
refused devices, a malformed frame, the geometric median, FedAdam over centered clipping) are
the configurations tests/flower/test_parity_matrix.py, test_secagg_plus_drivers.py and test_driver_parity.py
check, some at their small sizes (the row says so).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record, table
from deltaplane.engine.results import RoundMetrics

#: DP noise from the run seed: by default (``auto``) a service draws it from the OS CSPRNG, which no driver can
#: reproduce; the tests compare the same way
SEEDED = {"dp_noise_source": "seeded"}
FEATURES = {
    "FedAvg": {},
    "FedAdam": {"aggregator": "fedadam"},
    "DP-FedAvg, clip 1.0": {"clip": "1.0", "dp_noise": 0.5, **SEEDED},
    "DP-FedAvg, adaptive clip": {"clip": "adaptive", "dp_noise": 0.5, **SEEDED},
    "trimmed mean 0.2": {"defense": "trimmed_mean:0.2"},
    "top-k 1% + 8-bit, EF": {"codec": "topk(0.01) | quant(bits=8)"},
    "downlink top-k 5% + 8-bit": {"downlink_codec": "topk(0.05) | quant(bits=8)"},
    "α-mix": {"personalization": "alpha_mix"},
    "FedPer (head fc2)": {"personalization": "fedper"},
    "Ditto": {"personalization": "ditto"},
    # the same configurations as the tests (tests/flower/test_parity_matrix.py and its neighbours)
    "sampled, 50% a round": {"sample_fraction": 0.5},
    # Poisson sampling under central DP (the accountant's rate); seed 13 samples nobody in round 2, and every
    # driver still releases that round's noise and counts its ε
    "DP, Poisson q = 1/3, empty round 2 (6 clients, seed 13)": {
        "clip": "1.0",
        "dp_noise": 0.3,
        "sample_fraction": 1 / 3,
        "clients": 6,
        "seed": 13,
        **SEEDED,
    },
    "SecAgg, clip 2.0": {"secagg": True, "clip": "2.0"},
    # authenticated SecAgg: devices enrolled by the run's own authority, signed advertisements, the consistency
    # check; the models are the SecAgg row's (the sums do not change), the uplink a few hundred bytes more
    "authenticated SecAgg, clip 2.0": {"secagg": True, "clip": "2.0", "secagg_authenticated": True},
    # SecAgg+: each device masks with 10 of the 19 others (the least degree 20 devices accept)
    "SecAgg+ degree 10, clip 2.0": {"secagg": True, "clip": "2.0", "secagg_neighbours": 10},
    # distributed DP: the devices noise under SecAgg, Poisson-sampled at q = 1/2; seed 2 samples 1, 3 and 2
    # devices: a lone device, a published sum, a pair short of m_min = 3 (neither short round unmasks anything)
    "SecAgg + distributed DP, q = 1/2, m_min 3 (6 clients, seed 2)": {
        "secagg": True,
        "clip": "1.0",
        "dp_noise": 0.5,
        "clients": 6,
        "sample_fraction": 0.5,
        "seed": 2,
        "secagg_min_contributors": 3,
        **SEEDED,
    },
    "FedPer + SecAgg + top-k 20% downlink": {
        "personalization": "fedper",
        "secagg": True,
        "clip": "2.0",
        "downlink_codec": "topk(0.2) | quant(bits=8)",
    },
    # refused devices: 20% of the devices scale a flipped update by 1e39, which overflows to Inf, and each
    # refuses to encode it (NaN or Inf); or by 100, and the server's norm bound (20; honest updates stay under
    # 5) refuses the update
    "refused: Inf update (20% attackers, ×1e39)": {"attack": "sign_flip(0.2, scale=1e39)"},
    "refused: norm > 20 (20% attackers, ×100)": {
        "attack": "sign_flip(0.2, scale=100)",
        "max_update_norm": 20.0,
    },
    # a protocol-level attacker: 20% of the devices send a CRC-valid compact frame (the run's wire session)
    # whose tensor table declares a shape reversed ([8, 1, 3, 3] as [3, 3, 1, 8]: the same element count);
    # the server's strict decode refuses it (ShapeMismatch). On Flower the node's ClientApp forges it in a mod
    # outside delta_mod (tests/flower/test_driver_parity.py also runs a hostile ClientApp of its own)
    "refused: malformed frame (20% attackers, CRC-valid, shape lie)": {
        "attack": "malformed_frame(0.2)",
        "codec": "topk(0.01) | quant(bits=8)",
    },
    # RFA's geometric median; FedAdam over centered clipping, whose centre (the previous round's aggregate) every
    # driver carries from round to round (tests/flower/test_parity_matrix.py: geometric-median,
    # fedadam-centered-clip)
    "geometric median (RFA)": {"defense": "geometric_median"},
    "FedAdam + centered clipping τ = 0.05": {"aggregator": "fedadam", "defense": "centered_clip(0.05)"},
}


class _Grid:
    """Flower Grid stand-in: node 100+i runs the ClientApp with partition-id i and a persistent Context. A
    ClientApp that raises is answered with an error reply, as Flower's runtimes do (``vce_api.py``), and as the
    tests' ``LoopbackGrid`` (tests/flower/conftest.py) does: a device that refuses its own update (NaN or Inf)
    is then a refused node, not the end of the run."""

    def __init__(self, app, n: int) -> None:
        from flwr.app import Context, RecordDict

        self.app = app
        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i, "num-partitions": n},
                             state=RecordDict(), run_config={})
            for i in range(n)
        }  # fmt: skip

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode

        replies = []
        for msg in messages:
            try:
                replies.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as exc:  # what Flower's runtime does with any ClientApp exception
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc)}:<'{exc}'>")
                replies.append(Message(error, reply_to=msg))
        return replies


def _flower(cfg):
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from deltaplane.flower import task_client_app, task_server_app
    from deltaplane.flower.engine import enroll_nodes

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    rounds, finals = [], {}
    app = task_server_app(
        cfg, on_round=lambda m, t: rounds.append(m), on_done=lambda s, st: finals.update(st)
    )
    with tempfile.TemporaryDirectory() as enrolled:  # authenticated SecAgg: each node enrolled, as run_flower
        client = task_client_app(cfg, node_configs=enroll_nodes(cfg, enrolled))
        app(grid=_Grid(client, cfg.clients), context=Context(1, 0, {}, RecordDict(), {}))
    return rounds, finals


def _seen(r):
    """What a round must equal across drivers (``RoundMetrics.DRIVER_INVARIANTS``), as the tests compare."""
    return r.driver_invariants()


def _b(x: float) -> str:
    """A signed byte count: whole bytes as they are, a fraction (bytes shared among devices) to 0.1 B."""
    return f"{x:+.0f}" if x == int(x) else f"{x:+.1f}"


def _per_device(ref, rounds, field: str, devices) -> str:
    """This driver's ``field`` bytes minus the reference's, per device (``devices(round)`` of them; a round
    without devices is left out unless its bytes differ), as measured: one figure, or the range over the
    rounds."""
    pairs = [(getattr(b, field) - getattr(a, field), devices(a)) for a, b in zip(ref, rounds, strict=True)]
    diffs = [d / n for d, n in pairs if n]
    lo, hi = _b(min(diffs)), _b(max(diffs))
    out = f"{lo} B" if lo == hi else f"{lo}…{hi} B"
    empty = [d for d, n in pairs if not n and d]
    if empty:
        out += f" ({max(empty, key=abs):+d} B in a round without devices)"
    return out


def _bytes(ref, rounds) -> str:
    """Uplink a device of the round (the sampled ones upload), downlink a device of the federation (every
    driver counts the round's model sent to every device, as ``downlink_bytes`` says)."""
    up = _per_device(ref.rounds, rounds, "uplink_bytes", lambda r: r.clients)
    down = _per_device(ref.rounds, rounds, "downlink_bytes", lambda r: ref.config.clients)
    return f"up {up}, down {down}"


def _reference(seq) -> str:
    """The sequential cell: accuracy, total uplink and downlink, and the devices and refusals a round when they
    are not every device and none."""
    cell = (
        f"{seq.final.test_accuracy:.4f}, up {sum(r.uplink_bytes for r in seq.rounds) / 2**20:.2f} MiB, "
        f"down {sum(r.downlink_bytes for r in seq.rounds) / 2**20:.2f} MiB"
    )
    if any(r.clients != seq.config.clients for r in seq.rounds):
        cell += "; devices a round " + "/".join(str(r.clients) for r in seq.rounds)
    if any(r.rejected for r in seq.rounds):
        cell += "; refused a round " + "/".join(str(r.rejected) for r in seq.rounds)
    return cell


#: the names of :func:`_seen`'s fields (``RoundMetrics.DRIVER_INVARIANTS``), for the cell that says which differ
SEEN = ("devices", "accuracy", "ε", "ε vs server", "DP adjacency", "refusals", "clipped share", "mix accuracy",
        "personal mean", "personal min", "personal gain")  # fmt: skip
assert len(SEEN) == len(RoundMetrics.DRIVER_INVARIANTS), "a name for each invariant"


def _cell(ref, rounds, state) -> str:
    """A driver's cell: final accuracy, total uplink, ``=`` when bit-identical to the reference, else the largest
    accuracy and weight differences and the round figures that differ; then the bytes a device."""
    if len(rounds) != len(ref.rounds):
        return f"{len(rounds)} rounds, the reference ran {len(ref.rounds)}"
    seen = [(_seen(a), _seen(b)) for a, b in zip(ref.rounds, rounds, strict=True)]
    differ = [name for i, name in enumerate(SEEN) if any(a[i] != b[i] for a, b in seen)]
    dw = max((ref.final_state[k].double() - state[k].double()).abs().max().item() for k in ref.final_state)
    gap = max(abs(a.test_accuracy - b.test_accuracy) for a, b in zip(ref.rounds, rounds, strict=True))
    up = sum(r.uplink_bytes for r in rounds)
    if not differ and dw == 0:
        verdict = "="
    else:
        verdict = f"Δacc ≤ {gap:.4f}, weights ≤ {dw:.1e} apart"
        if [d for d in differ if d != "accuracy"]:
            verdict += "; differ: " + ", ".join(differ)
    return f"{rounds[-1].test_accuracy:.4f}, {up / 2**20:.2f} MiB, {verdict}; {_bytes(ref, rounds)}"


def _population(ref, rounds) -> str:
    """The population driver's cell: it builds virtual devices of its own (no sequential twin), so only its
    final accuracy, and whether its devices and refusals a round equal the reference's (else its own)."""
    counts = [(r.clients, r.rejected) for r in rounds]
    same = counts == [(r.clients, r.rejected) for r in ref.rounds]
    own = "/".join(f"{c}" + (f" ({j} refused)" if j else "") for c, j in counts)
    return f"{rounds[-1].test_accuracy:.4f}; devices and refusals a round " + ("=" if same else own)


def _refused(exc: Exception) -> str:
    """The cell of a driver that refuses the feature: its typed error and reason (pipes escaped for the table)."""
    return f"refused: `{type(exc).__name__}`: " + str(exc).replace("|", "\\|")


def _driver(ref, run, cell=_cell) -> str:
    """One driver's cell, or its refusal: only deltaplane's typed errors are a refusal, anything else a bug."""
    from deltaplane.errors import DeltaplaneError

    try:
        rounds, state = run()
    except DeltaplaneError as exc:
        return _refused(exc)
    return cell(ref, rounds, state)


def main() -> None:
    from deltaplane.engine import RunConfig
    from deltaplane.serve.federation import run_http_simulation
    from deltaplane.sim import run_simulation

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument(
        "--features", nargs="+", metavar="ROW", help="only these rows (names as in the table)"
    )
    parser.add_argument(
        "--key-suffix",
        help="with --features: record into a section of its own (key and title get this suffix)",
    )
    args = parser.parse_args()
    unknown = set(args.features or ()) - set(FEATURES)
    if unknown or bool(args.features) != bool(args.key_suffix):
        parser.error(
            f"--features and --key-suffix go together, with rows of {list(FEATURES)} (not {unknown})"
        )
    torch.set_num_threads(1)
    base = RunConfig(clients=args.clients, rounds=args.rounds)
    rows = []
    t0 = time.perf_counter()
    for name, change in FEATURES.items():
        if args.features and name not in args.features:
            continue
        cfg = base.replace(**change)
        seq = run_simulation(cfg)

        def batched(cfg=cfg):
            r = run_simulation(cfg.replace(engine="batched"))
            return r.rounds, r.final_state

        def http(cfg=cfg):
            r = run_http_simulation(cfg)
            return r.rounds, r.final_state

        row = [name, _reference(seq)]

        def population(cfg=cfg):
            r = run_simulation(cfg.replace(engine="population"))
            return r.rounds, r.final_state

        row += [_driver(seq, run) for run in (batched, http, lambda cfg=cfg: _flower(cfg))]
        row.append(_driver(seq, population, lambda ref, rounds, _: _population(ref, rounds)))
        rows.append(row)
        print(row, flush=True)
    body = (
        f"Digits, {args.clients} clients, {args.rounds} rounds (the `deltaplane run` federation, fewer rounds), "
        "seed 0, unless the row says otherwise (the rows at 6 clients are the tests' configurations: a seed whose "
        "sampling gives the round the row names). Reference cells: final test accuracy, total uplink and "
        "downlink, and the devices and refused updates a round where they are not all devices and none. Driver "
        "cells: final test accuracy, total uplink, `=` when every round's devices, accuracy, ε, refusals, "
        "clipped share (and, with personalization, the devices' personal accuracies) and the final weights "
        "equal the sequential driver's bit for bit, else the largest per-round accuracy difference, the largest "
        "final-weight difference and the round figures that differ (none listed: only accuracy or weights); "
        "then the "
        "driver's uplink bytes a device of the round (the devices that train) and downlink bytes a device of the "
        "federation (every driver counts the round's model sent to every device) minus the sequential driver's, "
        "as measured "
        "(one figure when every round gives the same, else the range over the rounds). A driver that refuses "
        "a feature shows its typed error and reason. The population driver builds virtual devices of its own, so "
        "it has no sequential twin: its cells give its final accuracy and `=` when its devices and refused "
        "updates a round equal the sequential driver's. The DP rows set `dp_noise_source: seeded`: by default "
        "(`auto`) the HTTP service draws its noise from the OS CSPRNG, as a real service must, so no other "
        "driver can reproduce it. The authenticated SecAgg row (`secagg_authenticated`): each driver enrolls its "
        "devices with an enrollment authority of the run's own, the devices sign their key advertisements and the "
        "consistency check runs before the unmasking; the sums, and so its accuracies, are the SecAgg row's, and "
        "its uplink holds the certificates and signatures on top. The refused-device rows: an attacker's update scaled by 1e39 overflows to "
        "Inf, which the device refuses to encode (NaN or Inf) and the server counts as refused; one scaled by "
        "100 is refused by the server's norm bound (`max_update_norm: 20`; honest updates stay under 5). The "
        "malformed-frame row: an attacker (`malformed_frame`) compresses its update as an honest device does, then "
        "sends a well-formed compact frame with a valid CRC-32C whose tensor table declares a tensor's shape "
        "reversed (the same element count); every server refuses it for its shape (`ShapeMismatch`; HTTP 422) "
        "and closes the round on the other updates. The last two rows are the robust rules that hold state or "
        "iterate: RFA's geometric median (smoothed Weiszfeld from the coordinate-wise median), and FedAdam over "
        "centered clipping at τ = 0.05, below the devices' update norms so that the clipping binds, whose centre "
        "(the previous round's aggregate) each driver carries from round to round.\n\n"
        + table(
            ["feature", "sequential (reference)", "batched", "HTTP service", "Flower", "population"], rows
        )
        + f"\n\nTotal time {time.perf_counter() - t0:.0f} s (wall time, on the load above).\n"
        + (
            "These rows were measured apart from the full table (the section of the same title without "
            f"“— {args.key_suffix}”), by the command above, at the date and load above.\n"
            if args.key_suffix
            else ""
        )
    )
    print(body)
    key, title = "parity_matrix", "Parity matrix: every driver × every feature vs the sequential driver (#13)"
    if args.key_suffix:
        key, title = f"{key}-{args.key_suffix}", f"{title} — {args.key_suffix}"
    record(key, title, body)


if __name__ == "__main__":
    main()
