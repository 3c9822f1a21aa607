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
