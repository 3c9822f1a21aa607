"""A warning during a command is one `warning:` line on stderr, not Python's `/path/module.py:N: UserWarning:`
followed by a line of deltaplane's source (as `deltaplane run --engine batched` printed for a BatchNorm model)."""

from __future__ import annotations

import warnings

import typer
from typer.testing import CliRunner

from deltaplane import cli


def test_warnings_are_one_line_and_the_callers_handler_comes_back(monkeypatch) -> None:
    def warn() -> None:
        warnings.warn(
            "engine='batched' falls back to the sequential client loop: model BN has buffers", stacklevel=1
        )

    app = typer.Typer()
    app.callback()(cli.main)
    app.command("warn")(warn)
    before = warnings.showwarning
    for args, where in ((["warn"], False), (["-v", "warn"], True)):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        lines = r.output.strip().splitlines()
        assert lines[0].startswith("warning: engine='batched' falls back") and len(lines) == 1, r.output
        assert (
            "(UserWarning, test_cli_warnings.py:" in r.output
        ) is where and "warnings.warn(" not in r.output
    assert warnings.showwarning is before
