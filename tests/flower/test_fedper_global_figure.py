"""What "global accuracy" means under FedPer, on every driver (docs/personalization.md).

FedPer's head never leaves the devices, so the server's copy of it is the initial, untrained one: the global
model scored near chance and every device's "gain" over it looked large. As the FedPer paper and Flower's FedPer
baseline do, a FedPer run now reports the personalized model only (the global body with the device's own head):
no device row has a global figure, and the round has no global mean or gain. The sequential, batched, HTTP,
Flower and fleet drivers say the same (the population driver refuses personalization).
"""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from deltaplane.engine import RunConfig
from deltaplane.flower import task_client_app, task_server_app
from deltaplane.serve.federation import run_http_simulation
from deltaplane.sim import run_simulation

CFG = RunConfig(clients=3, rounds=2, local_epochs=1, lr=0.1, personalization="fedper")


def test_fedper_reports_no_global_figure_on_any_driver(loopback_grid) -> None:
    """Before, every driver reported FedPer's global figure as the global body with the never-trained initial
    head (0.26 to 0.33 here, against personal figures of 0.26 to 0.79) and a gain over it; now each reports ``global_accuracy`` None in every
    row, None for the round's global mean and gain, and the same personal figures as the sequential driver."""
    seq = run_simulation(CFG)
    assert [r["global_accuracy"] for r in seq.clients] == [None] * 3
    assert seq.final.client_mix_accuracy_mean is None and seq.final.personal_gain_min is None
    personal = [r["personal_accuracy"] for r in seq.clients]
    assert all(0.0 < p <= 1.0 for p in personal)
    assert seq.final.personal_accuracy_mean == pytest.approx(sum(personal) / 3, abs=1e-12)

    bat = run_simulation(CFG.replace(engine="batched"))
    assert [r["global_accuracy"] for r in bat.clients] == [None] * 3
    assert bat.final.client_mix_accuracy_mean is None and bat.final.personal_gain_min is None
    assert [r["personal_accuracy"] for r in bat.clients] == pytest.approx(personal, abs=0.04)

    http = run_http_simulation(CFG)
    assert http.clients == seq.clients
    assert http.final.client_mix_accuracy_mean is None and http.final.personal_gain_min is None

    rows: list = []
    rounds: list = []
    server = task_server_app(CFG, on_round=lambda m, t: rounds.append(m), on_clients=rows.extend)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server(grid=loopback_grid(task_client_app(CFG), CFG.clients), context=context)
    assert [{k: r[k] for k in ("client", "global_accuracy", "personal_accuracy")} for r in rows] == [
        {k: r[k] for k in ("client", "global_accuracy", "personal_accuracy")} for r in seq.clients
    ]
    assert rounds[-1].client_mix_accuracy_mean is None and rounds[-1].personal_gain_min is None
    assert rounds[-1].personal_accuracy_mean == pytest.approx(seq.final.personal_accuracy_mean)


@pytest.mark.slow  # a whole `deltaplane run` with its follow-up and deploy (about a minute on 2 loaded cores)
def test_deltaplane_run_with_fedper_reports_the_personal_figure_alone(tmp_path) -> None:
    """``deltaplane run --personalization fedper`` as a user types it: the follow-up's personalization table
    and the summary line have no global row or gain (FedPer has no global figure), and the report says so."""
    import json

    from typer.testing import CliRunner

    from deltaplane.cli import app

    out = tmp_path / "run"
    args = ["run", "--personalization", "fedper", "--clients", "3", "--rounds", "2", "--no-baseline"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "(no global model under partial personalization: compare a FedAvg run)" in said
    p = json.loads((out / "report.json").read_text())["followup"]["personalization"]
    assert p["global_accuracy_mean"] is None and p["gain_min"] is None and p["personal_accuracy_mean"] > 0
    assert "global vs personalized" not in (out / "report.html").read_text()  # no scatter against nothing
