"""`deltaplane fleet …` options and inputs refused before any connection (commands/fleet.py)."""

import os

from typer.testing import CliRunner

from deltaplane.cli import app


def test_fleet_refuses_non_finite_waits_and_scales_and_names_a_fifo(tmp_path, monkeypatch):
    """Before: --deadline nan, --stage-wait nan and --weight-scale nan passed click's float range (NaN compares
    false) and --patience inf too ("waiting up to inf s"), so coordinate and device ran with a wait that never
    ends or a NaN scale; a FIFO given as --federation was reported as "does not exist". Now usage errors
    (exit 2) naming the option, before any connection is tried."""
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "a" * 20)
    fed = tmp_path / "fed.yaml"
    fed.write_text("clients: 3\nrounds: 1\n")
    fifo = tmp_path / "fed.fifo"
    os.mkfifo(fifo)
    url = ["--url", "http://127.0.0.1:9"]
    # --patience 1: before the fix, an accepted value went on to try the (closed) port for only a second
    coordinate = ["fleet", "coordinate", *url, "--federation", str(fed), "--model", "m", "--rounds", "1"]
    device = ["fleet", "device", *url, "--token-file", str(fed), "--federation", str(fed), "--model", "m"]
    for args, option in (
        ([*coordinate, "--patience", "1", "--deadline", "nan"], "--deadline"),
        ([*coordinate, "--patience", "1", "--deadline", "1", "--weight-scale", "nan"], "--weight-scale"),
        ([*coordinate, "--deadline", "1", "--patience", "inf"], "--patience"),
        ([*device, "--device", "0", "--stage-wait", "nan"], "--stage-wait"),
    ):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and option in r.output and "must be a finite number" in r.output, (
            args, r.output, r.exception
        )  # fmt: skip
    r = CliRunner().invoke(app, ["fleet", "init", "--federation", str(fifo), "--model", "m"])
    assert r.exit_code == 2 and "a federation file must be a regular file, not a FIFO" in r.output, r.output
