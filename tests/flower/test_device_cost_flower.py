"""Per-round device cost on the Flower driver: the sequential driver's figures, priced on Flower's own bytes."""

from __future__ import annotations

import pytest

from deltaplane.apps.runner import run_federation
from deltaplane.engine import RunConfig


def _huang_uj_per_byte(alpha: float, beta: float, mbps: float) -> float:
    # Huang et al. MobiSys 2012, Table 3: P = α·t + β mW at t Mbit/s, so a bit costs (α·t + β)/t nJ
    return 8 * (alpha * mbps + beta) / mbps / 1000


LTE_UP, LTE_DOWN = _huang_uj_per_byte(438.39, 1288.04, 6), _huang_uj_per_byte(51.97, 1288.04, 13)


def test_flower_run_reports_the_sequential_runs_device_cost() -> None:
    cfg = RunConfig(clients=3, rounds=2, codec="topk(0.05) | quant(bits=8)")
    seq = run_federation(cfg)
    flower = run_federation(cfg.replace(engine="flower"))
    got, want = flower.device_cost, seq.device_cost
    assert got is not None and want is not None
    # the same model and partition: the same training work per device
    assert got["forward_macs_per_sample"] == want["forward_macs_per_sample"] > 0
    assert got["train_samples_per_device"] == want["train_samples_per_device"]
    assert len(got["per_round"]) == len(flower.rounds) == 2
    for row, ref, r in zip(got["per_round"], want["per_round"], flower.rounds, strict=True):
        assert row["train_macs"] == ref["train_macs"] and row["compute_uj"] == pytest.approx(
            ref["compute_uj"]
        )
        # the radio share is priced from the bytes Flower itself moved
        assert row["bytes_up"] == pytest.approx(r.uplink_bytes / r.clients, abs=0.5)
        assert row["bytes_down"] == pytest.approx(r.downlink_bytes / r.clients, abs=0.5)
        assert row["bytes_up"] == ref["bytes_up"]  # the same wire payloads up
        # down: Flower's own message bytes, which add its record framing (array names and shapes on the first,
        # full-model round, config keys after) to the same payload: measured +1.4% and +0.1% per device
        assert ref["bytes_down"] <= row["bytes_down"] <= 1.02 * ref["bytes_down"]
        lte = row["bytes_up"] * LTE_UP + row["bytes_down"] * LTE_DOWN
        assert row["radio_uj"]["lte"] == pytest.approx(lte)
        assert row["total_uj"]["lte"] == pytest.approx(ref["total_uj"]["lte"], rel=0.02)
    assert flower.to_dict()["device_cost"] is got
