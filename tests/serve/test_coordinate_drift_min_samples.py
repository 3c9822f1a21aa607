"""`fleet coordinate --drift-min-samples`: the drift monitor's min_samples, which a small fleet needs lower."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

import deltaplane.serve.coordinator as coordinator
import deltaplane.serve.fleet as fleet
from deltaplane.cli import app
from deltaplane.engine import RunConfig
from deltaplane.errors import ConfigError
from deltaplane.serve.fleet_reference import REFERENCE_KEY, FleetReference


class _Admin:
    """The admin client's calls a zero-round coordinator makes: the versions (the fleet reference `fleet init`
    registered) and the drift reference's PUT."""

    def __init__(self) -> None:
        self.puts: list[dict[str, Any]] = []

    def versions(self, model: str) -> dict[str, Any]:
        stored = FleetReference({}, {}, (10, 20, 30)).to_lineage(RunConfig(clients=3))
        return {"model": model, "versions": [{"number": 1, "lineage": {REFERENCE_KEY: stored}}]}

    def set_drift_reference(self, model: str, spec: Any, reference: Any, **kw: Any) -> dict[str, Any]:
        self.puts.append(kw)
        return {}


@pytest.fixture
def no_task(monkeypatch):
    """The coordinator reads the reference `fleet init` registered: building the task would be a failure."""
    monkeypatch.setattr(fleet, "make_task", lambda config: pytest.fail("the coordinator built the task"))


def test_coordinate_sends_min_samples_with_the_drift_reference(no_task) -> None:
    """Before, the reference went without min_samples, so the service's monitor kept its 30: on a fleet of 3
    devices holding a few dozen samples each, every feature stayed "not enough samples"."""
    admin = _Admin()
    config = RunConfig(clients=3)
    fleet.coordinate(admin, config, model="m", rounds=0, deadline=1, drift_min_samples=12)  # type: ignore[arg-type]
    assert admin.puts == [{"window": 3, "min_samples": 12}]
    fleet.coordinate(admin, config, model="m", rounds=0, deadline=1)  # type: ignore[arg-type]
    assert admin.puts[-1]["min_samples"] == 30  # the monitor's own default


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "12"])
def test_coordinate_refuses_a_min_samples_below_one_or_not_an_integer(no_task, bad: Any) -> None:
    admin = _Admin()
    with pytest.raises(ConfigError, match="drift_min_samples must be an integer of at least 1"):
        fleet.coordinate(admin, RunConfig(clients=3), model="m", rounds=0, deadline=1, drift_min_samples=bad)  # type: ignore[arg-type]
    assert admin.puts == []  # refused before the reference was sent


def _coordinate_cli(tmp_path, monkeypatch, federation: str, key: str) -> tuple[list, list[str]]:
    """`fleet coordinate`'s arguments for a federation file of text ``federation``, with the coordinator
    replaced by one that records its keyword ``key``: (what it recorded, the arguments)."""
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "a" * 20)
    seen: list = []
    monkeypatch.setattr(coordinator, "coordinate", lambda *a, **kw: seen.append(kw[key]) or [])
    fed = tmp_path / "fed.yaml"
    fed.write_text(federation)
    args = ["fleet", "coordinate", "--url", "http://127.0.0.1:9", "--federation", str(fed), "--model", "m"]
    return seen, [*args, "--deadline", "5"]


def test_fleet_coordinate_option(tmp_path, monkeypatch) -> None:
    """--drift-min-samples reaches the coordinator (default 30); 0 and 2.5 are usage errors naming it."""
    seen, args = _coordinate_cli(tmp_path, monkeypatch, "clients: 3\nrounds: 1\n", "drift_min_samples")
    for extra, want in (([], 30), (["--drift-min-samples", "12"], 12)):
        r = CliRunner().invoke(app, [*args, "--rounds", "1", *extra])
        assert r.exit_code == 0 and seen[-1] == want, r.output
    for bad, says in (("0", "x>=1"), ("2.5", "not a valid integer")):
        r = CliRunner().invoke(app, [*args, "--drift-min-samples", bad])
        assert r.exit_code == 2 and "--drift-min-samples" in r.output and says in r.output, r.output


def test_fleet_coordinate_runs_the_federations_rounds_unless_given(tmp_path, monkeypatch) -> None:
    """Before: --rounds was required, so a federation's `clients: {rounds: 5}` had to be repeated, and the
    guide's `--rounds 2` silently overrode a file edited to 5. Now the file's rounds are the default."""
    seen, args = _coordinate_cli(tmp_path, monkeypatch, "clients: {count: 3, rounds: 5}\n", "rounds")
    for extra, want in (([], 5), (["--rounds", "2"], 2)):
        r = CliRunner().invoke(app, [*args, *extra])
        assert r.exit_code == 0 and seen[-1] == want, r.output
    r = CliRunner().invoke(app, [*args, "--rounds", "0"])
    assert r.exit_code == 2 and "--rounds" in r.output, r.output
