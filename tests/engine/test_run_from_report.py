"""A ``deltaplane run`` reproduced from Python: ``run_federation(RunConfig.from_report(OUT, name))`` gives the CLI's
figures, and a config rebuilt by hand from the command line's values does not (the CLI's own defaults)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from deltaplane.apps.runner import run_federation
from deltaplane.cli import (
    DEFAULT_RUN_CODEC,
    DEFAULT_RUN_DGC,
    DEFAULT_RUN_ENGINE,
    DEFAULT_RUN_PERSONALIZATION,
    app,
)
from deltaplane.engine import RunConfig
from deltaplane.errors import ConfigError


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``DELTAPLANE_SMALL=1 deltaplane run --clients 10 --rounds 3`` on digits at lr 0.05 (4 devices learn at it;
    at the default 0.2 the baseline sits at chance by round 2, where any two runs agree)."""
    folder = tmp_path_factory.mktemp("cli")
    config = folder / "run.yaml"
    config.write_text("clients: {lr: 0.05}\n")
    out = folder / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DELTAPLANE_SMALL", "1")
        result = CliRunner().invoke(
            app,
            [
                "run",
                "--config",
                str(config),
                "--clients",
                "10",
                "--rounds",
                "3",
                "--no-followup",
                "-o",
                str(out),
            ],
        )
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("name", ["baseline", "compressed"])
def test_run_federation_of_the_report_s_config_reproduces_the_cli_run(cli_run: Path, name: str) -> None:
    doc = json.loads((cli_run / "report.json").read_text())
    cli = next(r for r in doc["runs"] if r["name"] == name)
    cfg = RunConfig.from_report(cli_run, name)
    assert (cfg.clients, cfg.rounds) == (4, 2)  # DELTAPLANE_SMALL's caps, which only the CLI applies
    result = run_federation(cfg)
    # the compressed run's global model is still at chance after 2 rounds of stc(0.006); its devices' α-mix
    # models (personal_accuracy_mean) are not, so they are compared too
    fields = ("test_accuracy", "client_accuracy_mean", "personal_accuracy_mean")
    ours = [[getattr(m, f) for f in fields] for m in result.rounds]
    assert ours == [[pytest.approx(m[f], abs=1e-6) for f in fields] for m in cli["rounds"]]
    learned = ours[-1][0] if name == "baseline" else ours[-1][2]
    assert learned > 0.3  # above chance (0.1): agreeing at chance would prove little
    if name == "compressed":  # OUT/model.safetensors is the last run's final global model
        saved = load_file(str(cli_run / "model.safetensors"))
        assert saved.keys() == result.final_state.keys()
        for key, tensor in saved.items():
            torch.testing.assert_close(result.final_state[key], tensor, rtol=1e-5, atol=1e-6)


def test_a_config_rebuilt_from_the_command_line_misses_the_cli_s_defaults(cli_run: Path) -> None:
    """What ``RunConfig(...)`` with the command's values leaves out: the CLI's codec, DGC options, α-mix and
    engine for the compressed digits run (docs/byo.md lists them); its fp32 baseline is plain FedAvg."""
    by_hand = RunConfig(clients=4, rounds=2, lr=0.05).to_dict()
    for name, differ in (
        ("baseline", {"engine": DEFAULT_RUN_ENGINE}),
        (
            "compressed",
            {
                "codec": DEFAULT_RUN_CODEC,
                **DEFAULT_RUN_DGC,
                "personalization": DEFAULT_RUN_PERSONALIZATION,
                "engine": DEFAULT_RUN_ENGINE,
            },
        ),
    ):
        cli = RunConfig.from_report(cli_run / "report.json", name).to_dict()
        assert {k: v for k, v in cli.items() if by_hand[k] != v} == differ


def test_from_report_names_the_runs_it_holds(cli_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds 2 runs \\(baseline, compressed\\); name the one to load"):
        RunConfig.from_report(cli_run)
    with pytest.raises(ConfigError, match="holds no run 'fp32'; its runs are: baseline, compressed"):
        RunConfig.from_report(cli_run, "fp32")
    (tmp_path / "report.json").write_text('{"format": 0}')
    with pytest.raises(ConfigError, match="not a deltaplane report"):
        RunConfig.from_report(tmp_path)
