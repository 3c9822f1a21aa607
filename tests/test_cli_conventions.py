"""CLI conventions (issue 18, part 3): version, -h, defaults in help, --json, exit codes, --quiet, overwrite."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
import typer
from typer.testing import CliRunner

from deltaplane.cli import app
from deltaplane.commands import EXIT_FAILURE, EXIT_REFUSED, EXIT_USAGE, exit_code_for
from deltaplane.errors import (
    ConfigError,
    DecodeError,
    IntegrityError,
    NotFound,
    PrivacyBudgetExceeded,
    PromotionRefused,
    SpecError,
)

runner = CliRunner()


def test_version_and_short_help() -> None:
    from importlib.metadata import version

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"deltaplane {version('deltaplane')}"
    for args in (["-h"], ["registry", "-h"], ["registry", "list", "-h"], ["privacy", "epsilon", "-h"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0 and "Usage:" in r.output, args


def _commands(cmd: click.Command, path: tuple[str, ...] = ()):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, (*path, name))


def test_every_option_shows_its_default() -> None:
    """Every option's help shows a default: click prints real ones (context show_default); an option whose
    default is resolved at run time (None in the signature) names it, and for `run` that name must be the
    RunConfig default it falls back to (so the help cannot drift from the code)."""
    from deltaplane.engine.config import RunConfig

    root = typer.main.get_command(app)
    assert root.context_settings.get("show_default") is True
    optional_inputs = {  # absence means "not used": the help says what the option adds
        ("decompress", "base"),
        ("decompress", "expect_base_id"),
        ("decompress", "expect_base_version"),
        ("deploy", "exclude"),
        ("serve", "admin_token"),
        ("ui", "admin_token"),
        ("serve", "device_secret"),
        ("serve", "evaluator"),
        ("serve", "runs_dir"),
    }
    missing = []
    for path, cmd in _commands(root):
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.required or p.hidden or p.name == "help":
                continue
            shown = p.default is not None or isinstance(p.show_default, str) or "default" in (p.help or "")
            exempt = (" ".join(path), p.name) in optional_inputs or path[:1] == ("registry",)
            if not shown and not exempt:
                missing.append(f"{' '.join(path)} {p.opts[0]}")
            if path == ("run",) and p.name in RunConfig.model_fields and isinstance(p.show_default, str):
                want = RunConfig.model_fields[p.name].default
                shown = (
                    "none"
                    if want is None
                    else ("on" if want else "off")
                    if isinstance(want, bool)
                    else str(want)
                )
                assert p.show_default == shown, (p.name, p.show_default, want)
    assert not missing, f"options without a shown default: {missing}"


def test_exit_codes_mean_one_thing_each() -> None:
    assert (
        exit_code_for(PromotionRefused("no"))
        == exit_code_for(PrivacyBudgetExceeded("no"))
        == EXIT_REFUSED
        == 3
    )
    assert exit_code_for(ConfigError("x")) == exit_code_for(SpecError("x")) == EXIT_USAGE == 2
    for exc in (DecodeError("x"), IntegrityError("x"), NotFound("x")):
        assert exit_code_for(exc) == EXIT_FAILURE == 1


def test_usage_errors_exit_2_in_the_users_words(tmp_path: Path) -> None:
    r = runner.invoke(app, ["run", "--codec", "nope(1)", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown codec" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: 3\nclients: 0\n")
    r = runner.invoke(app, ["run", "--config", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "(root)" not in r.output and "clients" in r.output


def test_registry_commands_exit_1_on_failures_and_3_on_refusals(tmp_path: Path, monkeypatch) -> None:
    from deltaplane.registry import Registry

    monkeypatch.setenv("DELTAPLANE_HOME", str(tmp_path / "home"))
    r = runner.invoke(app, ["registry", "list"])
    assert r.exit_code == 1 and "registry init" in r.output  # no registry yet: a failure, with the fix
    reg = Registry.create(tmp_path / "home")
    reg.register_model("m", {"w": torch.ones(2)})
    reg.register_model("m", {"w": torch.zeros(2)})
    (tmp_path / "ev.py").write_text("def evaluate(state):\n    return {'accuracy': float(state['w'][0])}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ok = runner.invoke(
        app, ["registry", "promote", "m@1", "--evaluator", "ev:evaluate", "--tolerance", "accuracy=0.1"]
    )
    assert ok.exit_code == 0, ok.output
    no = runner.invoke(
        app, ["registry", "promote", "m@2", "--evaluator", "ev:evaluate", "--tolerance", "accuracy=0.1"]
    )
    assert no.exit_code == 3 and "REFUSED" in no.output
    listed = json.loads(runner.invoke(app, ["registry", "list", "--json"]).output)
    assert [v["ref"] for v in listed] == ["m@1", "m@2"] and listed[0]["tags"] == ["production"]


def test_quiet_hides_progress_and_the_run_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--clients", "3", "--rounds", "1", "--no-baseline", "--no-followup", "--out", str(out)]
    r = runner.invoke(app, ["--quiet", *args])
    assert r.exit_code == 0, r.output
    assert "acc " not in r.stderr  # no progress bar on stderr
    assert "report:" in r.stdout  # results still printed
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert runner.invoke(app, ["--quiet", "--verbose", "registry", "list"]).exit_code == 2


@pytest.mark.parametrize("argv", [["--help"], ["registry", "list", "--home", "/nonexistent-home"]])
def test_light_commands_do_not_import_torch(argv: list[str]) -> None:
    """What keeps `deltaplane --help` under a second: no torch (2-3 s of imports) before a command needs it."""
    code = (
        "import sys; from deltaplane.cli import app\n"
        f"try:\n    app({argv!r})\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "argv",
    [["keys", "enrollment", "--out", "authority"], ["keys", "identity", "--device", "3", "--out", "dev"]],
)
def test_key_commands_do_not_import_torch(argv: list[str], tmp_path: Path) -> None:
    """`keys enrollment` and `keys identity` make Ed25519 keys: they loaded torch (1.6 s of CPU for a 0.2 s
    command) through the eager `deltaplane.deploy` and `deltaplane.aggregation` packages and `deltaplane.delta`."""
    code = (
        "import sys; from deltaplane.cli import app\n"
        f"try:\n    app({argv!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert any((tmp_path / argv[-1]).iterdir())  # the keys were written


def test_fleet_enroll_does_not_import_torch(tmp_path: Path) -> None:
    """`fleet enroll --devices N` asks the service for tokens over HTTP: it loaded torch, the service (FastAPI) and
    the fleet's device code only to word a failed connection (2.0 s of CPU, now 0.3 s)."""
    with socket.socket() as s:  # a loopback port nobody listens on: the command fails to connect, typed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["fleet", "enroll", "--url", f"http://127.0.0.1:{port}", "--devices", "2", "--out", "tokens"]
    code = (
        "import sys; from deltaplane.cli import app\n"
        f"try:\n    app({argv!r})\nexcept SystemExit as e:\n    assert e.code == 1, e.code\n"
        "heavy = [m for m in ('torch', 'fastapi', 'deltaplane.serve.fleet') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "DELTAPLANE_ADMIN_TOKEN": "admin-token"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "cannot reach the service" in proc.stderr and not (tmp_path / "tokens").exists()


def test_python_dash_m_runs_the_same_cli() -> None:
    """`python -m deltaplane` failed with 'No module named deltaplane.__main__'; it is the same app, same name."""
    proc = subprocess.run(
        [sys.executable, "-m", "deltaplane", "decompress", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage: deltaplane decompress" in proc.stdout and "--allow-other-base" in proc.stdout


@pytest.mark.parametrize("name", ["alpha", "seed", "rounds"])
def test_run_help_shows_the_configs_own_defaults(name, monkeypatch) -> None:
    """`deltaplane run --alpha` and `--seed` said "0.5" and "0" as literals in their help (as `--rounds` said
    120): RunConfig's default changed alone, the help would still show the old one. Each reads the constant
    RunConfig's field uses (deltaplane.choices)."""
    import re

    from deltaplane.engine import RunConfig

    default = RunConfig.model_fields[name].default
    assert getattr(RunConfig(), name) == default
    command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    (option,) = [p for p in command.params if p.name == name]
    assert option.show_default == str(default)
    monkeypatch.setenv("COLUMNS", "200")
    r = runner.invoke(app, ["run", "--help"])
    flat = " ".join(r.output.split())  # a long help wraps its default onto the next line
    assert re.search(rf"--{name} [^\[]*\[default: \(?{re.escape(str(default))}\)?\]", flat), r.output
