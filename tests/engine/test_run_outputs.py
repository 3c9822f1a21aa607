"""`deltaplane run` writes its final model; `registry register` takes the run folder; `registry pull` gives it back."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from deltaplane.cli import app


def _cli(*args: str):
    return CliRunner().invoke(app, list(args), terminal_width=200)


def test_run_register_pull_round_trip(tmp_path) -> None:
    out, home, pulled = tmp_path / "run", tmp_path / "home", tmp_path / "pulled"
    r = _cli("run", "--clients", "3", "--rounds", "2", "--no-baseline", "--no-followup", "--personalization",
             "alpha_mix", "--save-personal", "--out", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    model = load_file(str(out / "model.safetensors"))
    record = json.loads((out / "model.json").read_text())
    assert record["task"] == "digits" and record["config"]["rounds"] == 2
    personal = sorted(p.name for p in (out / "personal").iterdir())
    assert personal == [f"device-{i:05d}.safetensors" for i in range(3)]
    assert any(
        not torch.equal(load_file(str(out / "personal" / personal[0]))[k], v) for k, v in model.items()
    )

    assert _cli("registry", "init", "--home", str(home)).exit_code == 0
    r = _cli("registry", "register", "digits-fed", str(out), "--home", str(home))
    assert r.exit_code == 0, r.output
    r = _cli("registry", "pull", "digits-fed@1", "-o", str(pulled), "--home", str(home))
    assert r.exit_code == 0, r.output
    back = load_file(str(pulled / "model.safetensors"))
    assert back.keys() == model.keys() and all(torch.equal(back[k], v) for k, v in model.items())
    manifest = json.loads((pulled / "manifest.json").read_text())
    assert manifest["verified"] and manifest["lineage"]["run"]["task"] == "digits"
    assert manifest["lineage"]["run"]["final"]["test_accuracy"] == record["final"]["test_accuracy"]


def test_register_refuses_a_folder_that_is_not_a_run(tmp_path) -> None:
    home = tmp_path / "home"
    assert _cli("registry", "init", "--home", str(home)).exit_code == 0
    (tmp_path / "empty").mkdir()
    r = _cli("registry", "register", "m", str(tmp_path / "empty"), "--home", str(home))
    assert r.exit_code == 2 and "`deltaplane run` output" in r.output and "model.safetensors" in r.output


def _strict(text: str):
    """``json.loads`` refusing NaN/Infinity (not JSON; strict readers such as JavaScript's JSON.parse fail)."""

    def refuse(token: str):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_run_record_with_nan_metrics_is_strict_json_and_registers_as_nulls(tmp_path) -> None:
    """A population run whose Poisson sampling (central DP, q = 0.1 of 4 devices) chose nobody has no sampled
    device to score: its client accuracies are NaN. model.json held them as the NaN token, which is not JSON;
    `registry register` then stored them in the version's lineage and `registry list --json` printed NaN. They
    are null now, and a record written by an older run is registered with nulls too."""
    config = tmp_path / "nan.yaml"
    config.write_text(
        "clients: {count: 4, rounds: 1, sample_fraction: 0.1}\ndp_noise: 1.0\nclip: 1.0\ndp_delta: 0.001\n"
        "engine: {name: population}\n"
    )
    out, home = tmp_path / "run", tmp_path / "home"
    r = _cli("run", "--config", str(config), "--no-baseline", "--no-followup", "--out", str(out))
    assert r.exit_code == 0, r.output
    record = _strict((out / "model.json").read_text())
    assert record["final"]["clients"] == 0 and record["final"]["client_accuracy_mean"] is None

    old = json.loads((out / "model.json").read_text())
    old["final"]["client_accuracy_mean"] = float("nan")  # as an older run wrote it
    (out / "model.json").write_text(json.dumps(old))
    assert _cli("registry", "init", "--home", str(home)).exit_code == 0
    r = _cli("registry", "register", "nan-run", str(out), "--home", str(home))
    assert r.exit_code == 0, r.output
    r = _cli("--quiet", "registry", "list", "--json", "--home", str(home))
    assert r.exit_code == 0, r.output
    listed = _strict(r.stdout)
    assert "client_accuracy_mean" in r.stdout and "NaN" not in r.stdout and listed
