"""`deltaplane serve` runs any aggregator chain: the flags reach the service's server step."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import deltaplane.serve as serve_pkg
from deltaplane.cli import app


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake_create_app(config, **kwargs):
        seen["config"] = config
        return object()

    monkeypatch.setattr(serve_pkg, "create_app", fake_create_app)
    monkeypatch.setattr(serve_pkg, "serve", lambda app_, **kw: None)
    return seen


def test_serve_flags_build_the_federation_chain(tmp_path, captured) -> None:
    args = ["serve", "--home", str(tmp_path), "--admin-token", "x" * 20, "--aggregator", "fedadam"]
    args += [
        "--clip",
        "1.0",
        "--dp-noise",
        "0.8",
        "--epsilon-budget",
        "8",
        "--fleet",
        "1000",
        "--per-round",
        "1000",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    run = captured["config"].federation
    assert run.aggregator == "fedadam" and run.dp_noise == 0.8 and run.epsilon_budget == 8.0
    assert run.clients_per_round() == 1000 and run.clients == 1000
    # fewer per round than the fleet would claim sampling amplification the service never performs
    r = CliRunner().invoke(app, [*args[:-1], "50"])
    assert r.exit_code != 0 and "does not sample devices" in r.output
    chain = repr(run.build_aggregator())
    assert "FedAdam" in chain and "DPFedAvg" in chain and "Clip" in chain


def test_serve_without_chain_flags_is_plain_fedavg(tmp_path, captured) -> None:
    r = CliRunner().invoke(app, ["serve", "--home", str(tmp_path), "--admin-token", "x" * 20])
    assert r.exit_code == 0, r.output
    assert captured["config"].federation is None


def test_bad_chain_is_a_one_line_error(tmp_path, captured) -> None:
    r = CliRunner().invoke(
        app, ["serve", "--home", str(tmp_path), "--admin-token", "x" * 20, "--dp-noise", "1"]
    )
    assert r.exit_code == 2 and "needs a clip" in r.output


def test_serve_takes_the_body_budget_and_the_write_deadline(tmp_path, captured) -> None:
    """The write deadline (60 s for a client that never reads a download) had no flag, and the budget of bodies
    in flight is new: both reach the ServiceConfig; a budget below a body cap, or a non-finite or non-positive
    deadline, is a usage error naming its option."""
    base = ["serve", "--home", str(tmp_path), "--admin-token", "x" * 20]
    r = CliRunner().invoke(app, base)
    assert r.exit_code == 0, r.output
    default = captured["config"]
    assert default.write_timeout_s == 60.0 and default.body_budget == 16 * (8 << 20)
    r = CliRunner().invoke(app, [*base, "--write-timeout", "5", "--max-body-bytes-in-flight", str(64 << 20)])
    assert r.exit_code == 0, r.output
    assert captured["config"].write_timeout_s == 5.0 and captured["config"].body_budget == 64 << 20
    for bad in (["--write-timeout", "nan"], ["--write-timeout", "0"], ["--max-body-bytes-in-flight", "4096"]):
        r = CliRunner().invoke(app, [*base, *bad])
        assert r.exit_code != 0, bad
        assert "write" in r.output.lower() or "max_body_bytes_in_flight" in r.output, (bad, r.output)


def test_serve_takes_the_device_share_and_the_minimum_body_rate(tmp_path, captured) -> None:
    """The share of the body budget one device may reserve and the rate a body must keep reach the
    ServiceConfig; a share below a body cap, or a rate that is no finite non-negative number, is a usage error."""
    base = ["serve", "--home", str(tmp_path), "--admin-token", "x" * 20]
    r = CliRunner().invoke(app, base)
    assert r.exit_code == 0, r.output
    default = captured["config"]
    assert default.device_body_share == 16 << 20 and default.min_body_rate == 4096
    flags = ["--max-device-body-bytes", str(32 << 20), "--min-body-rate", "1000", "--body-rate-grace", "30"]
    r = CliRunner().invoke(app, [*base, *flags])
    assert r.exit_code == 0, r.output
    config = captured["config"]
    assert (config.device_body_share, config.min_body_rate, config.body_rate_grace_s) == (32 << 20, 1000, 30)
    for bad in (
        ["--max-device-body-bytes", "4096"],
        ["--min-body-rate", "nan"],
        ["--min-body-rate", "-1"],
        ["--body-rate-grace", "0"],
    ):
        r = CliRunner().invoke(app, [*base, *bad])
        assert r.exit_code != 0, bad
        assert "max_device_body_bytes" in r.output or "rate" in r.output, (bad, r.output)
