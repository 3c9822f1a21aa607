"""`keys certify` and `fleet enroll` refuse more devices than one SecAgg round can hold, before writing anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from deltaplane.aggregation.secagg import EnrollmentAuthority
from deltaplane.cli import app
from deltaplane.commands import MAX_ENROLL_DEVICES, fleet_size


def test_the_bound_is_a_secagg_rounds_roster() -> None:
    """The bound says "a SecAgg round's roster holds no more": keep it that roster's limit on the service."""
    from deltaplane.serve.secagg_routes import OpenSecAggRequest

    limits = OpenSecAggRequest.model_fields["devices"].metadata
    assert any(getattr(m, "max_length", None) == MAX_ENROLL_DEVICES for m in limits), limits


@pytest.mark.parametrize("option", ["--devices", "--add"])
@pytest.mark.parametrize("command", ["keys certify", "fleet enroll"])
def test_absurd_fleets_are_refused_before_any_file(
    tmp_path: Path, monkeypatch, command: str, option: str
) -> None:
    """Before, `keys certify --devices 1000000` began writing a million key pairs and certificates (and `fleet
    enroll` asked the service for a million tokens); now a usage error naming the bound and why, nothing
    written."""
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "a" * 20)
    key = tmp_path / "enrollment.ed25519.pem"
    key.write_bytes(EnrollmentAuthority.generate().to_pem())
    out = tmp_path / "out"
    where = ["--authority-key", str(key)] if command == "keys certify" else ["--url", "http://127.0.0.1:9"]
    for n in (MAX_ENROLL_DEVICES + 1, 10**12):
        r = CliRunner().invoke(app, [*command.split(), *where, "--out", str(out), option, str(n)])
        assert r.exit_code == 2, r.output
        assert f"at most {MAX_ENROLL_DEVICES:,} devices" in r.output and "SecAgg round" in r.output, r.output
        assert not out.exists()
    assert fleet_size(MAX_ENROLL_DEVICES) == MAX_ENROLL_DEVICES  # the bound itself is allowed


def test_fleet_enroll_refuses_a_federation_past_the_bound(tmp_path: Path, monkeypatch) -> None:
    """--federation's clients.count is --devices' default: the same bound, named with the file."""
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "a" * 20)
    fed = tmp_path / "fed.yaml"
    fed.write_text(f"clients: {MAX_ENROLL_DEVICES + 1}\nrounds: 1\n")
    out = tmp_path / "out"
    r = CliRunner().invoke(
        app, ["fleet", "enroll", "--url", "http://127.0.0.1:9", "--federation", str(fed), "--out", str(out)]
    )
    assert r.exit_code == 2 and f"{fed} has clients.count 100,001" in r.output, r.output
    assert not out.exists()
