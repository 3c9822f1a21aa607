"""`fleet coordinate` is a light process: the drift reference and SecAgg's weight scale come from the registry,
where `fleet init` stored them, with the same values the coordinator used to compute from the task (torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from deltaplane.cli import app
from deltaplane.engine import RunConfig, build_clients, make_task
from deltaplane.errors import TaskError
from deltaplane.registry import Registry
from deltaplane.serve import coordinator, fleet
from deltaplane.serve.client import ServiceError
from deltaplane.serve.fleet_reference import REFERENCE_KEY, FleetReference

MODEL = "mytask"


class _Admin:
    """The service as a coordinator sees it up to its first round: the registry's versions (as ``GET
    /admin/models/{m}/versions`` gives them), the drift reference's PUT, and an open the service refuses (422:
    the coordinator stops there)."""

    base_url = "http://127.0.0.1:1"

    def __init__(self, versions: dict[str, Any]) -> None:
        self._versions, self.references, self.opens = versions, [], []

    def versions(self, model: str) -> dict[str, Any]:
        return self._versions

    def stats(self) -> dict[str, Any]:  # no round open: none left by a coordinator that is gone
        return {"rounds": {}, "secagg_rounds": {}}

    def set_drift_reference(self, model: str, spec: Any, reference: Any, **kw: Any) -> dict[str, Any]:
        self.references.append((json.dumps(spec, sort_keys=True), json.dumps(reference, sort_keys=True)))
        return {}

    def open_secagg(self, model: str, names: list[str], **kw: Any) -> dict[str, Any]:
        self.opens.append(kw)
        raise ServiceError(422, "refused here: the test ends at the first open")


def _init(tmp_path: Path, monkeypatch, federation: str) -> RunConfig:
    """`fleet init` of ``federation`` (YAML text) into a registry under ``tmp_path``: the federation's config."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DELTAPLANE_HOME", str(tmp_path / "home"))
    (tmp_path / "fleet.yaml").write_text(federation)
    r = CliRunner().invoke(app, ["fleet", "init", "--federation", "fleet.yaml", "--model", MODEL])
    assert r.exit_code == 0, (r.output, r.exception)
    return RunConfig.from_yaml(tmp_path / "fleet.yaml")


def _served_versions(tmp_path: Path) -> dict[str, Any]:
    """The registry's versions of the model as the admin API answers them (JSON)."""
    reg = Registry(tmp_path / "home")
    return json.loads(json.dumps({"model": MODEL, "versions": [a.to_dict() for a in reg.versions(MODEL)]}))


WEIGHTED = (
    'task: {path: "mytask:make_task"}\nclients: {count: 3}\nsecagg: {enabled: true}\nclip: 2.0\nseed: 3\n'
)


def test_fleet_init_registers_the_reference_the_coordinator_computed_from_the_task(
    byo_task, tmp_path, monkeypatch
) -> None:
    """The same drift reference bytes and the same SecAgg weight scale as the coordinator's old path (the task
    built here, `drift_reference` and `weight_scale_of`), now read from the registry: the task is never built."""
    config = _init(tmp_path, monkeypatch, WEIGHTED)
    task = make_task(config)
    clients = build_clients(config, task)
    spec, summary = fleet.drift_reference(task, clients)
    old_scale = fleet.weight_scale_of(config, clients)
    assert old_scale > 0  # a weighted round (no distributed DP): the devices' mean example count
    monkeypatch.setattr(fleet, "make_task", lambda config: pytest.fail("the coordinator built the task"))
    admin = _Admin(_served_versions(tmp_path))
    done = coordinator.coordinate(admin, config, model=MODEL, rounds=1, deadline=1.0, say=lambda line: None)  # type: ignore[arg-type]
    assert admin.references == [
        (json.dumps(spec.to_dict(), sort_keys=True), json.dumps(summary.to_dict(), sort_keys=True))
    ]
    assert [o["weight_scale"] for o in admin.opens] == [old_scale] and done[0].failed


def test_a_federation_of_other_data_builds_the_task_and_says_why(byo_task, tmp_path, monkeypatch) -> None:
    """A federation whose data options differ from those `fleet init` registered (another seed: another
    partition) gets the task's own reference, as before, with one line saying why; never the stored one."""
    config = _init(tmp_path, monkeypatch, WEIGHTED).replace(seed=4)
    said: list[str] = []
    admin = _Admin(_served_versions(tmp_path))
    coordinator.coordinate(admin, config, model=MODEL, rounds=1, deadline=1.0, say=said.append)  # type: ignore[arg-type]
    task = make_task(config)
    clients = build_clients(config, task)
    _, summary = fleet.drift_reference(task, clients)
    assert admin.references[0][1] == json.dumps(summary.to_dict(), sort_keys=True)
    assert admin.opens[0]["weight_scale"] == fleet.weight_scale_of(config, clients)
    assert any("computed for other data (seed 3 there, 4 here)" in line for line in said), said


def test_a_task_the_coordinator_cannot_build_is_refused_naming_what_it_was_needed_for() -> None:
    """No stored reference and a task that does not import on the coordinator's machine: the TaskError says
    first why the coordinator needed the task, before any round."""
    admin = _Admin({"model": MODEL, "versions": [{"number": 1, "lineage": {"round": 0}}]})
    config = RunConfig(task="not_a_module_here:make_task", clients=3)
    with pytest.raises(TaskError, match="needs the task on this machine.*no fleet reference") as info:
        coordinator.coordinate(admin, config, model=MODEL, rounds=1, deadline=1.0, say=lambda line: None)  # type: ignore[arg-type]
    assert "not_a_module_here" in str(info.value) and admin.opens == []


def test_a_malformed_stored_reference_is_not_used() -> None:
    stored = FleetReference({}, {}, (1, 2, 3)).to_lineage(RunConfig(clients=3))
    assert isinstance(FleetReference.from_lineage(stored, RunConfig(clients=3)), FleetReference)
    for broken in ({**stored, "num_samples": [1, True, 3]}, {**stored, "drift": {}}, [], {"options": {}}):
        assert isinstance(FleetReference.from_lineage(broken, RunConfig(clients=3)), str)


_NO_TORCH = """
import json, sys
import deltaplane.commands.fleet as commands
from deltaplane.cli import app
from deltaplane.serve.client import ServiceError

class Admin:
    base_url = "http://127.0.0.1:1"
    def versions(self, model):
        return json.loads(sys.argv[1])
    def stats(self):
        return {"rounds": {}, "secagg_rounds": {}}
    def set_drift_reference(self, model, spec, reference, **kw):
        return {}
    def open_secagg(self, model, names, **kw):
        raise ServiceError(422, "refused here")

commands.admin_client = lambda *a, **kw: Admin()
try:
    app(["fleet", "coordinate", "--url", "http://127.0.0.1:1", "--federation", "fleet.yaml", "--model", "mytask",
         "--deadline", "1", "--rounds", "1"])
except SystemExit as e:
    assert e.code == 1, e.code  # the one round failed (the open refused)
assert "torch" not in sys.modules, "torch was imported"
"""


def test_fleet_coordinate_imports_no_torch(tmp_path) -> None:
    """The docs/fleet.md federation (SecAgg with distributed DP): the coordinator loaded torch and the task's
    data for the drift reference (3.7-4.3 s of CPU, 430 MB) before its first request; now it reads what `fleet
    init` registered."""
    (tmp_path / "fleet.yaml").write_text(
        "clients: {count: 3, rounds: 2}\nsecagg: {enabled: true}\nclip: 2.0\ndp_noise: 0.8\ndp_delta: 0.001\n"
    )
    stored = FleetReference({}, {}, (10, 20, 30)).to_lineage(RunConfig.from_yaml(tmp_path / "fleet.yaml"))
    versions = {"model": MODEL, "versions": [{"number": 1, "lineage": {REFERENCE_KEY: stored}}]}
    env_code = [sys.executable, "-c", _NO_TORCH, json.dumps(versions)]
    proc = subprocess.run(env_code, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
