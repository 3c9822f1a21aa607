"""`deltaplane run --engine flower`: the real Flower simulation engine (Ray) against the in-process engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deltaplane.cli import DEFAULT_RUN_CODEC, DEFAULT_RUN_DGC, DEFAULT_RUN_PERSONALIZATION, app
from deltaplane.errors import ConfigError
from deltaplane.sim import RunConfig, run_simulation


def test_cli_flower_engine_matches_in_process_engine(tmp_path: Path) -> None:
    """`deltaplane run --engine flower` as a user types it, end to end: the default personalization (α-mix in
    every round) on Ray's nodes, then the follow-up. Same seed and config as the in-process engine: accuracy
    within 0.5 point and uplink bytes within 1% (measured: identical); every device's row is its node's report,
    equal to the in-process device's; the personal models stayed on the nodes, so the merge is skipped and
    says why, and the run exits cleanly (the deploy's gates refuse a 3-round model, which is not an error)."""
    out = tmp_path / "run"
    args = [
        "run",
        "--engine",
        "flower",
        "--clients",
        "3",
        "--rounds",
        "3",
        "--no-baseline",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "report.json").read_text())
    (flower,) = doc["runs"]

    expected = run_simulation(
        RunConfig(
            clients=3,
            rounds=3,
            codec=DEFAULT_RUN_CODEC,
            personalization=DEFAULT_RUN_PERSONALIZATION,
            **DEFAULT_RUN_DGC,
        )
    )
    assert flower["config"]["personalization"] == DEFAULT_RUN_PERSONALIZATION == "alpha_mix"
    assert len(flower["rounds"]) == 3
    for got, want in zip(flower["rounds"], expected.rounds, strict=True):
        assert abs(got["test_accuracy"] - want.test_accuracy) <= 0.005
        assert abs(got["uplink_bytes"] - want.uplink_bytes) <= 0.01 * want.uplink_bytes
    # a compact stc(0.002) frame of the 18,346-parameter CNN: about 140 bytes per client, not 73 kB
    assert 3 * 50 < flower["rounds"][0]["uplink_bytes"] < 3 * 1_000

    # the personalization: the nodes' own rows (their models never left them), the in-process devices' rows
    assert flower["clients"] == expected.clients and len(expected.clients) == 3
    assert flower["final"]["personal_accuracy_mean"] == pytest.approx(expected.final.personal_accuracy_mean)
    p = doc["followup"]["personalization"]
    assert p["method"] == "alpha_mix" and p["in_round"] is True and p["devices"] == 3
    keys = ("client", "global_accuracy", "personal_accuracy", "alpha")
    assert [{k: r[k] for k in keys} for r in p["clients"]] == expected.clients
    assert p["devices_personalized"] == sum(c["alpha"] > 0 for c in expected.clients) > 0
    # the merge: nothing to merge on the server, said in the report, its table and the HTML
    m = doc["followup"]["merge"]
    assert m["models"] == 0 and set(m["results"]) == {"global"}
    assert m["skipped"] == "the run's personal models stayed on the devices (Flower nodes); nothing to merge"
    assert "merge skipped: the run's personal models stayed on the devices" in " ".join(result.output.split())
    assert "<h2>Merge</h2><p>Skipped" in (out / "report.html").read_text()
    assert not (out / "personal").exists()  # no personal model reached the server to be saved


def test_config_must_fit_the_data() -> None:
    with pytest.raises(ConfigError, match="use fewer devices"):
        run_simulation(RunConfig(clients=1000, rounds=1))


def test_train_shifts_let_1000_clients_hold_data() -> None:
    from deltaplane.sim.client import make_clients
    from deltaplane.sim.simulation import federation_data

    cfg = RunConfig(clients=1000, train_shifts=8, min_client_samples=2)
    base, _ = federation_data(RunConfig())
    train, test = federation_data(cfg)
    assert len(train) == 9 * len(base) == 9 * 1438 and len(test) == 1797 - 1438
    torch.testing.assert_close(train.x[: len(base)], base.x)  # the originals first, then the shifted copies
    assert not torch.equal(train.x[len(base) : 2 * len(base)], base.x)
    clients = make_clients(cfg, train)
    assert len(clients) == 1000 and min(len(c.train) for c in clients) >= 1


def _device_grid(nodes: list[int]):
    """A Flower grid stand-in whose node ``nodes[i]`` runs partition ``i`` (answers the device query so)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from deltaplane.flower.digits import DEVICE_KEY

    class Grid:
        def get_node_ids(self):
            return sorted(nodes)

        def send_and_receive(self, messages, *, timeout=None):
            return [
                Message(
                    RecordDict(
                        {DEVICE_KEY: ConfigRecord({"partition-id": nodes.index(m.metadata.dst_node_id)})}
                    ),
                    reply_to=m,
                )
                for m in messages
            ]

    return Grid()


def test_flower_samples_nodes_as_every_driver_samples_devices() -> None:
    from flwr.app import ArrayRecord, ConfigRecord

    from deltaplane.engine import sample_clients
    from deltaplane.engine.seeding import Stream, numpy_rng
    from deltaplane.flower.digits import SeededSampling

    # node ids unrelated to the partitions (real Flower's are random); sampling orders nodes by partition-id
    nodes = [130, 100, 120, 110, 190, 150, 160, 170, 180, 140]  # nodes[i] runs partition i

    for dp in (True, False):
        inner = SeededSampling(
            seed=3, central_dp=dp, fraction_train=0.3, min_train_nodes=1, min_available_nodes=10
        )
        counts = set()
        for rnd in range(1, 25):
            got = [
                m.metadata.dst_node_id
                for m in inner.configure_train(rnd, ArrayRecord(), ConfigRecord(), _device_grid(nodes))
            ]
            want = sample_clients(10, 0.3, numpy_rng(3, Stream.CLIENT_SAMPLING, rnd), central_dp=dp)
            assert got == [nodes[i] for i in want]
            counts.add(len(got))
        # Poisson under central DP (what the accountant's ε assumes): the count varies from round to round
        assert len(counts) > 2 if dp else counts == {3}


def test_flower_samples_each_device_at_the_accountants_rate() -> None:
    """Under central DP each device joins a round with the probability the accountant composes (measured over
    3000 rounds, independently of sample_round: every device's share within 4 binomial standard errors of
    the built chain's sampling_rate, 0.2 for 10 devices at fraction 0.25). A node claiming a device outside the
    run's ``clients`` is refused: before, the draw ran over the 11 connected nodes and sampled each device at
    round(0.25 · 11) / 11 = 3/11 (measured 0.273), ε reported for q = 0.2 (z = 1, 100 rounds, δ = 1e-5, RDP:
    ε 16.1 reported against 22.2 spent)."""
    from flwr.app import ArrayRecord, ConfigRecord

    from deltaplane.aggregation import DPFedAvg
    from deltaplane.flower.digits import FlowerRunError, SeededSampling

    cfg = RunConfig(clients=10, sample_fraction=0.25, dp_noise=1.0, clip=1.0, rounds=1)
    q = cfg.build_aggregator().find(DPFedAvg).accountant.sampling_rate
    assert q == pytest.approx(0.2)
    nodes = [100 + 7 * i for i in range(10)]
    inner = SeededSampling(
        seed=5, central_dp=True, fraction_train=0.25, min_train_nodes=1, min_available_nodes=10
    )
    rounds = 3000
    joined = torch.zeros(10)
    for rnd in range(1, rounds + 1):
        for m in inner.configure_train(rnd, ArrayRecord(), ConfigRecord(), _device_grid(nodes)):
            joined[nodes.index(m.metadata.dst_node_id)] += 1
    se = (q * (1 - q) / rounds) ** 0.5
    assert torch.all((joined / rounds - q).abs() < 4 * se), (joined / rounds).tolist()

    extra = SeededSampling(
        seed=5, central_dp=True, fraction_train=0.25, min_train_nodes=1, min_available_nodes=10
    )
    with pytest.raises(FlowerRunError, match=r"partition-ids \[10\], outside the run's 10 devices"):
        extra.configure_train(1, ArrayRecord(), ConfigRecord(), _device_grid([*nodes, 999]))


@pytest.mark.slow
def test_ray_flower_engine_samples_the_devices_the_simulator_samples() -> None:
    """Ray gives nodes random ids: a sampled run still trains the sequential driver's devices, bit for bit
    (before the sampler learned each node's partition-id: accuracies [0.100, 0.100] vs [0.198, 0.150])."""
    from deltaplane.flower import run_flower

    cfg = RunConfig(clients=4, rounds=2, local_epochs=1, lr=0.1, sample_fraction=0.5)
    seq = run_simulation(cfg)
    got = run_flower(cfg, num_cpus=1)
    assert [r.test_accuracy for r in got.rounds] == [r.test_accuracy for r in seq.rounds]
    assert [r.downlink_bytes for r in got.rounds] == [r.downlink_bytes for r in seq.rounds]
    assert all(torch.equal(got.final_state[k], v) for k, v in seq.final_state.items())
