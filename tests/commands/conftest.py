"""Fixtures of the ``deltaplane keys`` command tests: the ``keys`` CLI and an enrollment authority on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from deltaplane.aggregation.secagg import EnrollmentAuthority
from deltaplane.commands.ops import register


@pytest.fixture
def cli():
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        pass

    register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args], terminal_width=300)


@pytest.fixture
def authority(tmp_path: Path) -> tuple[EnrollmentAuthority, Path]:
    auth = EnrollmentAuthority.generate()
    key = tmp_path / "enrollment" / "enrollment.ed25519.pem"
    key.parent.mkdir()
    key.write_bytes(auth.to_pem())
    return auth, key
