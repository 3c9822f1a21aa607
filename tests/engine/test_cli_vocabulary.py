"""`deltaplane run`: --engine/--transport/--task mean what the YAML fields mean; mistakes are one-line errors."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from deltaplane.cli import app


def _run(args, tmp_path):
    return CliRunner().invoke(
        app,
        ["run", "--no-baseline", "--no-followup", "--overwrite", "--out", str(tmp_path / "out"), *args],
        terminal_width=200,
    )


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--task", "no_such_pkg_zz.tasks:make"], "module 'no_such_pkg_zz.tasks' does not import"),
        (["--task-option", "oops"], "--task-option must be key=value"),
        (["--task-option", "colour=red"], "options \\['colour'\\] do not fit"),
        # the value is YAML: malformed, it was a yaml.ParserError traceback (exit 1)
        (["--task-option", "devices=[4"], "--task-option devices: invalid YAML at line 1"),
        (["--task-option", "devices={a: 1, a: 2}"], "--task-option devices: key 'a' is given twice"),
        (["--engine", "flower", "--transport", "http"], "choose one of --engine flower and --transport http"),
        (["--engine", "population", "--personalization", "ditto"], "personal model per device"),
    ],
)
def test_mistakes_are_one_line_errors(tmp_path, args, match) -> None:
    r = _run(["--rounds", "1", "--clients", "3", *args], tmp_path)
    assert r.exit_code == 2, r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1, r.output
    assert re.search(match, r.output.replace("\n", " ")), r.output


def test_engine_in_yaml_and_on_the_command_line_mean_the_same(tmp_path) -> None:
    (tmp_path / "run.yaml").write_text(
        "engine: {name: population}\nclients: {count: 60, sample_fraction: 0.1}\n"
    )
    r = _run(["--config", str(tmp_path / "run.yaml"), "--rounds", "2", "--codec", "identity"], tmp_path)
    assert r.exit_code == 0, r.output
    (run,) = json.loads((tmp_path / "out" / "report.json").read_text())["runs"]
    assert run["config"]["engine"] == "population" and [x["clients"] for x in run["rounds"]] == [6, 6]
    r2 = _run(["--engine", "population", "--clients", "60", "--rounds", "2", "--codec", "identity"], tmp_path)
    assert r2.exit_code == 0, r2.output
