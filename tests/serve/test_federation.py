"""`deltaplane run --transport http`: the same federation through a real loopback server."""

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from deltaplane.errors import UnsupportedOption
from deltaplane.serve.federation import run_http_simulation
from deltaplane.sim import RunConfig, run_simulation


def test_http_transport_reproduces_the_in_process_run_exactly():
    cfg = RunConfig(
        clients=3, rounds=2, codec="topk(0.05) | quant(bits=8)", downlink_codec="topk(0.2) | quant(bits=8)"
    )
    # devices over HTTP train one by one, so compare bit for bit with the in-process sequential client loop
    a, b = run_simulation(cfg.replace(engine="sequential")), run_http_simulation(cfg)
    assert [r.test_accuracy for r in a.rounds] == [r.test_accuracy for r in b.rounds]
    # same tensor payloads; only the header's model id/version differ ("sim/digits-cnn" v0 vs "digits-cnn" v1)
    assert all(
        abs(ra.uplink_bytes - rb.uplink_bytes) <= 20 * cfg.clients
        for ra, rb in zip(a.rounds, b.rounds, strict=True)
    )
    assert all(torch.equal(a.final_state[k], b.final_state[k]) for k in a.final_state)
    # downlink: the same compressed update per device plus the signed chain framing and header
    for ra, rb in zip(a.rounds, b.rounds, strict=True):
        assert 0 < rb.downlink_bytes - ra.downlink_bytes <= 40 * cfg.clients
    assert (
        b.transport["uploads_accepted"] == 6 and b.transport["registry_ok"] and b.transport["rejected"] == {}
    )
    assert len(b.drift) == 2 and all("prediction_psi" in d for d in b.drift)


def test_cli_run_transport_http_writes_a_report_with_a_drift_section(tmp_path):
    from deltaplane.cli import app

    assert isinstance(app, typer.Typer)
    r = CliRunner().invoke(
        app,
        [
            "run",
            "--transport",
            "http",
            "--clients",
            "3",
            "--rounds",
            "2",
            "--no-baseline",
            "--no-followup",
            "--out",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "over HTTP" in r.output  # the terminal says which transport carried the run (issue 22)
    html = (tmp_path / "report.html").read_text()
    assert "<h2>Drift</h2>" in html and "prediction PSI" in html
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["runs"][0]["transport"]["kind"] == "http"
    bad = CliRunner().invoke(
        app, ["run", "--transport", "carrier-pigeon", "--rounds", "1", "--out", str(tmp_path)]
    )
    assert bad.exit_code == 2 and "transport" in bad.output and "inproc" in bad.output


def test_default_digits_evaluator_gates_an_http_trained_model(tmp_path):
    from deltaplane.registry import Registry, promote
    from deltaplane.serve.evaluators import digits

    cfg = RunConfig(clients=3, rounds=3, codec="identity")
    result = run_http_simulation(cfg, home=tmp_path / "h")
    reg = Registry(tmp_path / "h")
    latest = reg.resolve("digits-cnn:training")
    m = digits(reg.load_state(latest))
    assert m["accuracy"] == result.final.test_accuracy  # the same test split `deltaplane run` reports on
    assert 0 <= m["ood_accuracy"] <= 1
    res = promote(reg, latest.ref, evaluator=digits, raise_on_refusal=False)
    # three rounds lift test accuracy from chance (initial model, production) to ~0.48: the gate lets it through
    assert res.promoted and res.candidate_metrics["accuracy"] > res.baseline_metrics["accuracy"] + 0.2
    # scrambled weights (every tensor flipped along its first axis) are then refused against it
    broken = reg.register_model(
        "digits-cnn", {k: v.flip(0) for k, v in reg.load_state(latest).items()}, parent=latest.number
    )
    refused = promote(reg, broken.ref, evaluator=digits, raise_on_refusal=False)
    assert not refused.promoted and reg.tag("digits-cnn", "production") == latest.number


_SMALL = RunConfig(clients=3, rounds=2, local_epochs=1, lr=0.1, codec="topk(0.05) | quant(bits=8)")


@pytest.mark.parametrize(
    "change",
    [
        # bit for bit needs the seeded noise the service uses only when asked (it defaults to the OS CSPRNG)
        {
            "clip": "1.0",
            "dp_noise": 0.5,
            "epsilon_budget": 50.0,
            "aggregator": "fedadam",
            "dp_noise_source": "seeded",
        },
        {"clip": "adaptive", "dp_noise": 0.5, "dp_noise_source": "seeded"},
        {"defense": "fltrust"},
        {"attack": "sign_flip:0.4", "train_shifts": 1, "server_lr": 0.5, "prox_mu": 0.1},
        {"clip": "1.0", "local_dp_noise": 0.3, "downlink_codec": "quant(bits=8)"},
        # the service's norm guard (10x the base model's norm) used to refuse these, which the engine accepts:
        # every identity-coded local-DP update (noise z*clip per coordinate), a scaled attacker's update
        {"clip": "1.0", "local_dp_noise": 0.5, "codec": "identity"},
        {"attack": "sign_flip(0.34, scale=200)"},
        # compact uploads in the session the devices fetched from the service, of the shared layers only
        {"personalization": "fedper"},
        # under central DP a round whose every update is refused releases its noise and spends ε on both
        # sides (before, the transport stopped the run at round 1 on the refusals, told without noise)
        {"clip": "1.0", "dp_noise": 1.0, "max_update_norm": 1e-9, "dp_noise_source": "seeded"},
    ],
    ids=[
        "dp-budget-fedadam",
        "dp-adaptive-clip",
        "fltrust",
        "attack-shifts",
        "local-dp",
        "local-dp-identity",
        "scaled-attack",
        "fedper",
        "dp-every-update-refused",
    ],
)  # the rest of the features: tests/flower/test_parity_matrix.py
def test_the_service_runs_the_same_server_step_as_in_process(change) -> None:
    """The service used to hard-code FedAvg and the transport to ignore train_shifts; now every option runs
    the engine's steps on both sides of the wire, bit for bit as the sequential in-process driver."""
    cfg = _SMALL.replace(**change)
    a, b = run_simulation(cfg), run_http_simulation(cfg)
    assert all(torch.equal(a.final_state[k], b.final_state[k]) for k in a.final_state)

    def seen(r):
        return [
            (
                m.test_accuracy,
                m.epsilon,
                m.rejected,
                m.clipped_fraction,
                m.personal_accuracy_mean,
                m.backdoor_success,
            )
            for m in r.rounds
        ]

    assert seen(a) == seen(b)
    if "dp_noise" in change:
        assert b.rounds[0].epsilon is not None and b.rounds[0].epsilon < b.rounds[1].epsilon


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"engine": "batched"}, "stacked training is an in-process engine"),
    ],
)
def test_options_the_transport_cannot_run_are_refused_with_the_reason(change, match) -> None:
    with pytest.raises(UnsupportedOption, match=match):
        run_http_simulation(_SMALL.replace(**change))


def test_a_round_whose_drift_window_is_too_small_to_test_still_reports(tmp_path):
    """Tiny holdouts (3 devices x ~4 samples, under the monitor's min_samples of 30) leave every PSI of the
    window unmeasured (None): the run used to crash in max() on them; now the report shows — for them."""
    from deltaplane.cli import app

    (tmp_path / "small.yaml").write_text("holdout_fraction: 0.01\n")
    out = tmp_path / "out"
    args = [
        "run",
        "-c",
        str(tmp_path / "small.yaml"),
        "--transport",
        "http",
        "--clients",
        "3",
        "--rounds",
        "1",
    ]
    r = CliRunner().invoke(
        app, [*args, "--codec", "identity", "--no-baseline", "--no-followup", "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    (row,) = json.loads((out / "report.json").read_text())["runs"][0]["drift"]
    assert row["max_feature_psi"] is None and row["prediction_psi"] is None  # not measured, not 0
    html = (out / "report.html").read_text()
    drift = html[html.index("<h2>Drift</h2>") :]
    assert '<td class="num">—</td><td class="num">—</td>' in drift and "too few samples" in drift


def test_devices_larger_than_the_default_example_bound_are_taken_over_http(big_task, tmp_path) -> None:
    """The service bounds the example count an upload claims (``--max-examples``, 100,000 by default); an engine
    run over HTTP knows its devices' sizes, so a device holding more is taken as in process, not refused."""
    from deltaplane.engine import build_clients, make_task

    cfg = RunConfig(task=big_task, clients=2, rounds=1, alpha=100.0, batch_size=8192, local_epochs=1)
    assert min(c.num_samples for c in build_clients(cfg, make_task(cfg))) > 100_000
    a, b = run_simulation(cfg), run_http_simulation(cfg, home=tmp_path / "h")
    assert [r.rejected for r in b.rounds] == [0]
    for k, v in a.final_state.items():
        torch.testing.assert_close(b.final_state[k], v, rtol=0, atol=0)


def test_an_unshifted_http_run_raises_no_prediction_alert_while_the_model_learns():
    """Each version's held-out predictions are compared with the same version's predictions on the training
    set (registered by the run when it publishes the version). Compared with the label prior, every round of
    this run alerted on the predicted class (PSI 8.3 in round 1: the first model predicts one class), with no
    data drift at all."""
    res = run_http_simulation(RunConfig(clients=3, rounds=2))
    assert [d["alerts"] for d in res.drift] == [[], []]
    assert all(d["prediction_psi"] is not None and d["prediction_psi"] < 0.1 for d in res.drift), res.drift


def test_an_http_run_reports_each_devices_held_out_size_as_fleet_devices_do(tmp_path):
    """``deltaplane run --transport http``'s devices reported their held-out accuracy alone, while fleet devices
    also report ``holdout_samples`` (the Fleet page's smallest held-out set): the service it leaves behind
    said "—" there for a run's rounds. Each report now carries its device's held-out size."""
    from deltaplane.engine import build_clients, make_task
    from deltaplane.registry import Registry
    from deltaplane.serve.fleet_history import FleetHistory

    cfg = RunConfig(clients=3, rounds=1)
    run_http_simulation(cfg, home=tmp_path / "h")
    (reports,) = FleetHistory(Registry(tmp_path / "h")).load().reports.values()
    sizes = sorted(float(len(c.holdout)) for c in build_clients(cfg, make_task(cfg)))
    assert sorted(r["metrics"]["holdout_samples"] for r in reports) == sizes and min(sizes) > 0
