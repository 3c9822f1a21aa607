"""`deltaplane run -o OUT`: a bad OUT is refused before the run, and OUT is always one run's complete output.

Before: OUT being a file (or under one) was a traceback after the whole federation ran; --overwrite left an
earlier run's personal/ (or deploy/) next to the new files; Ctrl-C in the follow-up after the model was written
left a new model.json beside the old report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deltaplane import cli

TINY = ["run", "--clients", "3", "--rounds", "1", "--no-baseline", "--no-followup"]


def _run(*args: str):
    return CliRunner().invoke(cli.app, [*TINY, *args], terminal_width=200)


@pytest.fixture
def no_runs(monkeypatch):
    """Fail the test if the federation starts: the refusal must come first."""

    def execute(plan):
        raise AssertionError("the run started")

    monkeypatch.setattr(cli, "_execute", execute)


def test_an_out_that_cannot_be_a_folder_is_refused_before_the_run(tmp_path: Path, no_runs) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out, words in (
        (afile, "is a file, not a folder"),
        (afile / "sub", "cannot be created: "),
    ):
        r = _run("-o", str(out))
        assert r.exit_code == 2 and words in r.output, r.output
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    r = _run("--overwrite", "-o", str(foreign))  # --overwrite replaces a run's folder, not someone's notes
    assert r.exit_code == 2 and "not a run's (todo.txt)" in r.output, r.output
    assert (foreign / "todo.txt").read_text() == "mine" and afile.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "notes"]  # no staging folder left


def test_overwrite_leaves_nothing_of_the_earlier_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _run("--personalization", "ditto", "--save-personal", "-o", str(out)).exit_code == 0
    assert (out / "personal").is_dir()
    r = _run("--overwrite", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == [
        "model.json",
        "model.safetensors",
        "report.html",
        "report.json",
    ]
    assert (
        json.loads((out / "model.json").read_text())["config"]["personalization"] == "alpha_mix"
    )  # the default
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_interrupted_overwrite_keeps_the_earlier_run_whole(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"
    assert _run("-o", str(out)).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C in the follow-up, after the new model was written

    monkeypatch.setattr(cli, "_followup", ctrl_c)
    r = CliRunner().invoke(
        cli.app,
        [
            "run",
            "--clients",
            "3",
            "--rounds",
            "1",
            "--no-baseline",
            "--seed",
            "1",
            "--overwrite",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_save_personal_without_personalization_is_refused_before_the_run(tmp_path: Path, no_runs) -> None:
    r = _run("--personalization", "none", "--save-personal", "-o", str(tmp_path / "run"))
    assert r.exit_code == 2 and "--save-personal needs --personalization" in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_a_terminated_run_leaves_no_hidden_staging_folder(tmp_path: Path) -> None:
    """``kill``, ``timeout`` or a cancelled CI job (SIGTERM) stopped ``deltaplane run`` with Python's default
    action, so the hidden ``.OUT.*`` folder it writes into stayed beside ``--out`` (found by a newcomer who
    stopped a run that way: an empty ``.killed.2whlgvjn`` under runs/). SIGTERM now ends it as Ctrl-C does."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DELTAPLANE_SMALL", None)
    cmd = [sys.executable, "-m", "deltaplane", "run", "--clients", "3", "--rounds", "200", "--no-baseline"]
    cmd += ["--no-followup", "-o", "out"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]:  # the run has begun
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) != 0
    finally:
        proc.kill()
        proc.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither a half-written --out nor its stage
