"""A version a DP round publishes records the ε spent so far in its lineage (registry entry, pulled manifest)."""

from __future__ import annotations

import pytest
import torch

from deltaplane.aggregation import build_aggregator
from deltaplane.codecs import Compressor
from deltaplane.delta import Delta
from deltaplane.engine.server import MemoryPublisher, ServerStep
from deltaplane.registry.lineage import summarize_lineage


class _Recording(MemoryPublisher):
    def __init__(self) -> None:
        super().__init__(Compressor("identity"), "b")
        self.lineages: list[dict] = []

    def publish(self, update, *, base_version, lineage):
        self.lineages.append(lineage)
        return super().publish(update, base_version=base_version, lineage=lineage)


def _rounds(dp_noise: float, n: int = 2) -> tuple[list[dict], list[dict]]:
    agg = build_aggregator(dp_noise=dp_noise, clip=1.0, expected_clients=2, sampling_rate=1.0, dp_delta=1e-3)
    pub = _Recording()
    step = ServerStep(agg, pub, {"w": torch.zeros(2)}, base_id="b")
    measured = []
    for r in range(1, n + 1):
        step.open(r)
        step.receive_delta("c1", Delta({"w": torch.tensor([0.5, 0.0])}), 1.0)
        step.receive_delta("c2", Delta({"w": torch.tensor([0.0, 0.5])}), 1.0)
        measured.append(step.close().measurements)
    return pub.lineages, measured


def test_a_dp_round_records_its_epsilon_in_the_published_lineage() -> None:
    """Before: the lineage was round and uploads only, so `registry show` and a pulled model's manifest of a
    DP federation said nothing of the ε it cost (only the coordinator's lines and the Fleet page did)."""
    lineages, measured = _rounds(0.8)
    for lineage, m in zip(lineages, measured, strict=True):
        assert lineage["dp"] == {
            "epsilon": pytest.approx(m["epsilon"]),
            "delta": 1e-3,
            "adjacency": "add/remove",
        }
    assert lineages[0]["dp"]["epsilon"] < lineages[1]["dp"]["epsilon"]  # cumulative, as the accountant's
    text, _ = summarize_lineage(lineages[1])
    assert text == f"round 2, DP ε {measured[1]['epsilon']:.3f} at δ 0.001 (add/remove)"  # no exact count
    # a version published before the adjacency was stored reads as it did
    assert summarize_lineage({"dp": {"epsilon": 1.5, "delta": 1e-3}})[0] == "DP ε 1.500 at δ 0.001"


def test_a_distributed_dp_round_records_its_epsilon_as_zero_out() -> None:
    """Under SecAgg the devices add the noise: removing a device would remove its share, so the ε the version
    records holds for zero-out neighbours, and says so (docs/aggregation.md)."""
    agg = build_aggregator(
        dp_noise=0.8,
        clip=1.0,
        expected_clients=2,
        sampling_rate=1.0,
        dp_delta=1e-3,
        distributed_min_contributors=2,
    )
    pub = _Recording()
    step = ServerStep(agg, pub, {"w": torch.zeros(2)}, base_id="b")
    step.open(1)
    step.receive_secure_sum(Delta({"w": torch.tensor([0.25, 0.25])}), contributors=2, uplink_bytes=0)
    measured = step.close().measurements
    assert step.dp_adjacency == "zero-out"
    assert pub.lineages[0]["dp"] == {"epsilon": measured["epsilon"], "delta": 1e-3, "adjacency": "zero-out"}
    assert (
        pub.lineages[0]["uploads"] == 2
    )  # zero-out: the device takes part either way, the count has one law
    assert summarize_lineage(pub.lineages[0])[0].endswith("at δ 0.001 (zero-out)")


def test_without_dp_noise_the_lineage_claims_no_privacy() -> None:
    lineages, _ = _rounds(0.0)
    assert all("dp" not in lineage for lineage in lineages)
    assert summarize_lineage({"dp": {"epsilon": "x"}})[0] == "+1 more"  # malformed: counted, never read as ε


def test_a_central_dp_version_records_no_exact_participation_count() -> None:
    """Under add/remove neighbours an exact count is itself a release ε does not cover: one client more moves
    the upload count by one (the example count by its examples) with no noise, so with every client in every
    round it tells the two neighbours apart with certainty; DP-FedAvg divides by the fixed expected count for
    that reason. The lineage travels with the version to whoever ε protects against: without DP it keeps the
    count, under central DP it records none."""
    lineages, _ = _rounds(0.8)
    assert all(not {"uploads", "examples"} & set(lineage) for lineage in lineages)
    plain, _ = _rounds(0.0)
    assert [lineage["uploads"] for lineage in plain] == [2, 2]
    from deltaplane.engine.server import released_lineage

    assert released_lineage({"round": 1, "uploads": 3, "examples": 40}, "add/remove") == {"round": 1}
    assert released_lineage({"round": 1, "uploads": 3}, "zero-out") == {"round": 1, "uploads": 3}
