"""Per-round device cost: attached after every driver, from the run's own bytes and the task's model."""

from __future__ import annotations

import pytest

from deltaplane.apps.runner import run_federation
from deltaplane.engine import RunConfig, build_clients, make_task
from deltaplane.report import write_report

# DigitsCNN by layer arithmetic: conv1 8 ch × 8×8 × (1·3·3), conv2 16 ch × 8×8 × (8·3·3), fc 256→64, fc 64→10
DIGITS_FORWARD_MACS = 8 * 64 * 9 + 16 * 64 * 72 + 256 * 64 + 64 * 10


def _huang_uj_per_byte(alpha: float, beta: float, mbps: float) -> float:
    # Huang et al. MobiSys 2012, Table 3: P = α·t + β mW at t Mbit/s, so a bit costs (α·t + β)/t nJ
    return 8 * (alpha * mbps + beta) / mbps / 1000


WIFI_UP, WIFI_DOWN = _huang_uj_per_byte(283.17, 132.86, 10), _huang_uj_per_byte(137.01, 132.86, 20)
LTE_UP, LTE_DOWN = _huang_uj_per_byte(438.39, 1288.04, 6), _huang_uj_per_byte(51.97, 1288.04, 13)


def _check(result, mean_samples: float) -> None:
    dc = result.device_cost
    assert dc is not None and dc["forward_macs_per_sample"] == DIGITS_FORWARD_MACS
    assert dc["train_samples_per_device"] == pytest.approx(mean_samples)
    assert len(dc["per_round"]) == len(result.rounds)
    for row, r in zip(dc["per_round"], result.rounds, strict=True):
        up, down = r.uplink_bytes / r.clients, r.downlink_bytes / r.clients
        assert row["bytes_up"] == pytest.approx(up, abs=0.5) and row["bytes_down"] == pytest.approx(
            down, abs=0.5
        )
        # training: forward + backward ≈ 3 forward passes per sample, every local epoch; fp32 MAC 4.6 pJ
        macs = 3 * DIGITS_FORWARD_MACS * mean_samples * result.config.local_epochs
        assert row["train_macs"] == pytest.approx(macs, abs=1)
        assert row["compute_uj"] == pytest.approx(macs * 4.6e-6, rel=1e-6)
        wifi = row["bytes_up"] * WIFI_UP + row["bytes_down"] * WIFI_DOWN
        lte = row["bytes_up"] * LTE_UP + row["bytes_down"] * LTE_DOWN
        assert row["radio_uj"]["wifi"] == pytest.approx(wifi) and row["radio_uj"]["lte"] == pytest.approx(lte)
        assert row["total_uj"]["lte"] == pytest.approx(row["compute_uj"] + lte)
    assert result.to_dict()["device_cost"] is dc


@pytest.mark.parametrize("engine", ["sequential", "batched"])
def test_every_in_process_driver_reports_the_round_cost_of_its_own_bytes(engine: str) -> None:
    cfg = RunConfig(clients=4, rounds=2, engine=engine, codec="topk(0.05) | quant(bits=8)")
    result = run_federation(cfg)
    clients = build_clients(cfg, make_task(cfg))
    _check(result, sum(len(c.train) for c in clients) / len(clients))


def test_population_and_http_drivers_report_it_too() -> None:
    pop = run_federation(RunConfig(clients=6, rounds=1, engine="population", sample_fraction=0.5))
    assert pop.device_cost is not None
    assert 10 <= pop.device_cost["train_samples_per_device"] <= 100  # virtual shards of 20..100, 80% trained
    _check(pop, pop.device_cost["train_samples_per_device"])
    cfg = RunConfig(clients=3, rounds=1, transport="http", codec="quant(bits=8)")
    http = run_federation(cfg)
    clients = build_clients(cfg, make_task(cfg))
    _check(http, sum(len(c.train) for c in clients) / len(clients))


def test_compression_cuts_the_radio_share_and_the_report_shows_it(tmp_path) -> None:
    base = RunConfig(clients=4, rounds=1, codec="identity")
    fp32, small = run_federation(base), run_federation(base.replace(codec="topk(0.01) | quant(bits=8)"))
    up32, up8 = fp32.device_cost["mean"]["bytes_up"], small.device_cost["mean"]["bytes_up"]
    assert up8 < up32 / 50  # the uplink shrinks; training compute is the same work
    assert small.device_cost["mean"]["compute_uj"] == pytest.approx(fp32.device_cost["mean"]["compute_uj"])
    assert small.device_cost["mean"]["total_uj"]["lte"] < fp32.device_cost["mean"]["total_uj"]["lte"]
    files = write_report(
        [{"name": "fp32", **fp32.to_dict()}, {"name": "topk", **small.to_dict()}], tmp_path, baseline="fp32"
    )
    row = files.report["summary"][1]
    assert row["device_round_uj"]["lte"] == pytest.approx(small.device_cost["mean"]["total_uj"]["lte"])
    html = files.html_path.read_text()
    assert "Device cost per round" in html and "Huang et al. MobiSys 2012" in html


def test_a_model_the_estimate_cannot_count_keeps_its_finished_run(monkeypatch) -> None:
    import deltaplane.engine.device_cost as device_cost

    def broken(*_a, **_k):
        raise RuntimeError("unsupported op in the FLOP counter")

    monkeypatch.setattr(device_cost, "round_device_cost", broken)
    with pytest.warns(RuntimeWarning, match="device cost not estimated.*unsupported op"):
        result = run_federation(RunConfig(clients=2, rounds=1))
    assert result.device_cost is None and len(result.rounds) == 1
