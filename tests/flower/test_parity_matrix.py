"""The parity matrix (issue #13 acceptance 1, small sizes): every driver × every server/client feature gives the
sequential driver's per-round accuracy and bytes.

Drivers: batched (stacked training; equal up to float32 rounding, within the documented tolerance), HTTP
service + devices and Flower (ServerApp/ClientApps on a loopback grid: Flower's real code path without Ray) —
both bit-identical. Bytes: Flower's uplink payloads equal the sequential ones exactly; over HTTP each payload
header names the registry's model id and version ("digits-cnn" v1 instead of "sim/digits-cnn" v0), a few bytes
per payload. Personalization (α-mix, FedPer, Ditto) runs on every driver: its state stays with each device
(the simulated device over HTTP, the node's ``Context.state`` on Flower), FedPer's devices upload and are sent
only the shared layers, and the personal figures are the devices' own. The population driver builds
virtual devices of its own, so it has no sequential twin (tests/sim/test_population.py checks it runs each
feature). SecAgg runs as messages on every driver (in process, the service's SecAgg endpoints, Flower
query messages): the unmasked sums, and so the models, are bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict

from deltaplane.engine import RunConfig
from deltaplane.flower import task_client_app, task_server_app
from deltaplane.serve.federation import run_http_simulation
from deltaplane.sim import run_simulation

BASE = RunConfig(clients=3, rounds=2, local_epochs=1, lr=0.1)
#: DP noise from the run seed: the drivers are compared bit for bit (the service defaults to the OS CSPRNG)
SEEDED = {"dp_noise_source": "seeded"}
FEATURES = {
    "fedavg": {},
    "fedadam": {"aggregator": "fedadam"},
    "dp-fixed": {"clip": "1.0", "dp_noise": 0.5, **SEEDED},
    "dp-adaptive": {"clip": "adaptive", "dp_noise": 0.5, **SEEDED},
    # Poisson sampling at the accountant's rate on every driver (Flower's nodes drawn like the devices)
    "dp-sampled": {"clip": "1.0", "dp_noise": 0.5, "sample_fraction": 0.5, "clients": 4, **SEEDED},
    # seed 13 samples nobody in round 2: every driver still releases that round's noise (and counts its ε)
    "dp-empty-round": {
        "clip": "1.0",
        "dp_noise": 0.3,
        "sample_fraction": 1 / 3,
        "clients": 6,
        "seed": 13,
        **SEEDED,
    },
    # 5 devices: ⌊0.2 · 5⌋ = 1 a side (over 3 it trimmed nothing, and a run configured so is refused now)
    "trimmed-mean": {"defense": "trimmed_mean:0.2", "clients": 5},
    # the other server optimizers and robust rules, two by two (slow: SLOW_FEATURES; without drivers, their
    # arrival-order independence is tests/aggregation/test_rule_references.py's)
    "fedyogi-median": {"aggregator": "fedyogi", "defense": "median"},
    "fedavgm-multi-krum": {"aggregator": "fedavgm", "defense": "multi_krum(byzantine=0)"},
    "fedadagrad-krum": {"aggregator": "fedadagrad", "defense": "krum(byzantine=1)", "clients": 5},
    "server-lr-norm-bound": {"server_lr": 0.5, "defense": "norm_bound(1.0)"},
    # RFA's geometric median; centered clipping over 3 rounds, so each driver carries the centre (the previous
    # round's aggregate) from round to round, and binds (τ = 0.05 is below the devices' update norms)
    "geometric-median": {"defense": "geometric_median"},
    "fedadam-centered-clip": {"aggregator": "fedadam", "defense": "centered_clip(0.05)", "rounds": 3},
    "topk-quant-ef": {"codec": "topk(0.05) | quant(bits=8)"},
    "downlink": {"downlink_codec": "topk(0.2) | quant(bits=8)"},
    "alpha-mix": {"personalization": "alpha_mix"},
    "fedper": {"personalization": "fedper"},
    "ditto": {"personalization": "ditto"},
    "fedper-secagg-downlink": {
        "personalization": "fedper",
        "secagg": True,
        "clip": "2.0",
        "downlink_codec": "topk(0.2) | quant(bits=8)",
    },
    "secagg": {"secagg": True, "clip": "2.0"},
    # authenticated SecAgg (each driver enrolls its devices with the run's own authority): the same figures
    "secagg-authenticated": {"secagg": True, "clip": "2.0", "secagg_authenticated": True},
    # distributed DP: the devices noise under SecAgg (from the seed), Poisson-sampled at q = 1/2; seed 2 samples
    # 1, 3 and 2 devices: a lone device, a published sum, a pair short of m_min = 3 (neither short round runs
    # SecAgg: nothing is unmasked)
    "secagg-dp": {
        "secagg": True,
        "clip": "1.0",
        "dp_noise": 0.5,
        "clients": 6,
        "sample_fraction": 0.5,
        "rounds": 3,
        "seed": 2,
        "secagg_min_contributors": 3,
        **SEEDED,
    },
    # a protocol-level attacker: one device of three sends a CRC-valid frame whose tensor table lies about a
    # shape (compact, in the run's wire session); every driver refuses it (ShapeMismatch) and goes on
    "malformed-frame": {"attack": "malformed_frame(0.34)", "codec": "topk(0.05) | quant(bits=8)"},
    "dgc": {
        "codec": "topk(0.05)",
        "momentum_correction": 0.5,
        "momentum_masking": True,
        "local_clip": 1.0,
        "sparsity_warmup": 1,
    },
    # the relative clip binds for one device of three in rounds 2 and 3 (its update grows past 1.1 times its
    # own earlier norms): each driver keeps the device's norm history as it keeps its velocity
    "dgc-relative-clip": {
        "codec": "topk(0.05)",
        "momentum_correction": 0.5,
        "momentum_masking": True,
        "local_clip_relative": 1.1,
        "rounds": 3,
    },
}
#: per-round test accuracy may differ by this many of the 359 test digits on the batched driver
BATCHED_TOLERANCE = 1 / 359


def _seen(r):
    return r.driver_invariants()


SLOW_FEATURES = {
    "fedyogi-median",
    "fedavgm-multi-krum",
    "fedadagrad-krum",
    "server-lr-norm-bound",
    "geometric-median",
    "fedadam-centered-clip",
}


@pytest.mark.parametrize(
    "feature", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_FEATURES else f for f in FEATURES]
)
def test_every_driver_matches_the_sequential_one(feature, run_flower) -> None:
    cfg = BASE.replace(**FEATURES[feature])
    seq = run_simulation(cfg)
    # ε's neighbouring relation, labelled on every round (and so, through _seen, on every driver's):
    # zero-out under distributed DP, where removing a device would remove its noise share too
    labelled = "zero-out" if cfg.secagg else "add/remove"
    assert {r.dp_adjacency for r in seq.rounds} == {labelled if cfg.dp_noise > 0 else None}

    bat = run_simulation(cfg.replace(engine="batched"))
    for a, b in zip(seq.rounds, bat.rounds, strict=True):
        assert abs(a.test_accuracy - b.test_accuracy) <= BATCHED_TOLERANCE
        assert abs(a.uplink_bytes - b.uplink_bytes) <= 0.02 * a.uplink_bytes  # top-k may pick another tie

    http = run_http_simulation(cfg)
    assert [_seen(r) for r in http.rounds] == [_seen(r) for r in seq.rounds]
    assert all(torch.equal(http.final_state[k], v) for k, v in seq.final_state.items())
    for a, b in zip(seq.rounds, http.rounds, strict=True):
        assert abs(a.uplink_bytes - b.uplink_bytes) <= 20 * cfg.clients  # header: model id and version only

    rounds, finals = run_flower(cfg)
    assert [(_seen(r), r.uplink_bytes) for r in rounds] == [(_seen(r), r.uplink_bytes) for r in seq.rounds]
    assert all(torch.equal(finals[k], v) for k, v in seq.final_state.items())


def test_flower_stops_at_the_privacy_budget_like_the_sequential_driver(loopback_grid) -> None:
    dp = BASE.replace(rounds=3, dp_noise=1.0, clip="1.0", dp_delta=1e-3, **SEEDED)
    eps = [r.epsilon for r in run_simulation(dp).rounds]
    cfg = dp.replace(epsilon_budget=(eps[1] + eps[2]) / 2)  # room for two rounds, not three
    seq = run_simulation(cfg)
    rounds, finals, stops = [], {}, []
    server = task_server_app(
        cfg,
        on_round=lambda m, t: rounds.append(m),
        on_done=lambda s, st: finals.update(st),
        on_stop=stops.append,
    )
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server(grid=loopback_grid(task_client_app(cfg), cfg.clients), context=context)
    assert [_seen(r) for r in rounds] == [_seen(r) for r in seq.rounds] and len(rounds) == 2
    assert stops == [seq.stopped] and "privacy budget exhausted at round 3" in stops[0]
    assert all(torch.equal(finals[k], v) for k, v in seq.final_state.items())
