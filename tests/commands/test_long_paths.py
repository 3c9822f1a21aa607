"""Paths and URLs a command prints for the user to copy come out whole when stdout is not a terminal.

rich wraps at 80 columns when stdout is no terminal (a pipe, a CI log, ``$(...)``): a long path was broken across
lines mid-way and a ``[..]`` in it was read as markup and dropped, so the printed path could not be pasted into the
next command. Each case runs a command through typer's CliRunner (no terminal) on a path longer than 120
characters with ``[..]`` in it and looks for the path, or the whole line, in the output.
"""

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from deltaplane.cli import app


def _long(tmp_path: Path, name: str) -> Path:
    """A path over 120 characters, with rich markup in it."""
    path = tmp_path / (name + "-" + "x" * 100) / "[copy me]"
    assert len(str(path)) > 120
    return path


def _invoke(*args: str) -> Any:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, (args, r.output, r.exception)
    return r


def _checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    base = {"fc.weight": torch.randn(8, 4, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({k: v + 0.01 for k, v in base.items()}, tmp_path / "new.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "new.safetensors"


def _registry_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    home = _long(tmp_path, "home")
    return _invoke("registry", "init", "--home", str(home)).output, [f"registry ready at {home} ("]


def _registry_rotate_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    home = _long(tmp_path, "home")
    _invoke("registry", "init", "--home", str(home))
    r = _invoke("registry", "rotate-key", "--home", str(home))
    return r.output, [
        re.compile(f"every blob is wrapped by key \\w+ \\(from {re.escape(str(home))}/keys/kek/\\w+\\.key\\)")
    ]


def _registry_pull(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    home, out = tmp_path / "home", _long(tmp_path, "pulled")
    monkeypatch.setenv("DELTAPLANE_HOME", str(home))
    _, new = _checkpoints(tmp_path)
    _invoke("registry", "init")
    _invoke("registry", "register", "m", str(new))
    return _invoke("registry", "pull", "m", "-o", str(out)).output, [f"signature verified) → {out}\n"]


def _fleet_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    home = _long(tmp_path, "home")
    (tmp_path / "fleet.yaml").write_text("clients: 2\nrounds: 1\n")
    r = _invoke(
        "fleet", "init", "--federation", str(tmp_path / "fleet.yaml"), "--model", "m", "--home", str(home)
    )
    return r.output, [f"m@1 registered in {home} (production)"]


def _fleet_enroll(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    class Admin:  # the service's side of enrolment: one token per device
        def __init__(self, url: str, token: str, tls: Any, service_spki: str | None = None) -> None:
            pass

        def issue_token(self, device: str, cohort: str, models: object = None) -> str:
            return f"token-of-{device}"

    monkeypatch.setattr("deltaplane.serve.client.AdminClient", Admin)
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "a" * 20)
    out = _long(tmp_path, "tokens")
    r = _invoke("fleet", "enroll", "--url", "http://127.0.0.1:9", "--devices", "2", "--out", str(out))
    assert (out / "device-1.token").read_text() == "token-of-device-1"
    return r.output, [f"2 device tokens written to {out}/ ("]


_TOKEN_LINE = r"admin token \(set DELTAPLANE_ADMIN_TOKEN to choose one\): [\w-]{32}\n"


def _serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    monkeypatch.setattr("deltaplane.serve.serve", lambda *a, **k: None)  # the notices, not the server
    monkeypatch.delenv("DELTAPLANE_ADMIN_TOKEN", raising=False)
    host = "node-" + "h" * 120 + ".example"
    _invoke("registry", "init", "--home", str(tmp_path / "home"))
    r = _invoke("serve", "--home", str(tmp_path / "home"), "--host", host, "--insecure-http")
    return r.output, [f"dashboard: http://{host}:8000/ui/ (sign in", re.compile(_TOKEN_LINE)]


def _ui(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    monkeypatch.setattr("deltaplane.serve.serve", lambda *a, **k: None)
    monkeypatch.delenv("DELTAPLANE_ADMIN_TOKEN", raising=False)
    home, host = _long(tmp_path, "home"), "node-" + "h" * 120 + ".example"
    r = _invoke("ui", "--home", str(home), "--runs", str(tmp_path), "--host", host, "--insecure-http")
    return r.output, [
        f"no registry in {home}: showing the runs only",
        f"dashboard: http://{host}:8050/ui/\n",
        re.compile(_TOKEN_LINE),
    ]


def _codecs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    base, new = _checkpoints(tmp_path)
    folder = _long(tmp_path, "codecs")
    folder.mkdir(parents=True)
    payload, delta, model = folder / "u.dpln", folder / "delta.safetensors", folder / "model.safetensors"
    outputs = [
        _invoke(
            "compress", str(new), "--base", str(base), "--codec", "quant(bits=8)", "-o", str(payload)
        ).output,
        _invoke("decompress", str(payload), "-o", str(delta)).output,
        _invoke("apply", str(delta), "--base", str(base), "-o", str(model)).output,
    ]
    return "".join(outputs), [f"wrote {payload}\n", f"wrote delta to {delta}\n", f"; wrote {model}\n"]


@pytest.mark.parametrize(
    "command",
    [_registry_init, _registry_rotate_key, _registry_pull, _fleet_init, _fleet_enroll, _serve, _ui, _codecs],
    ids=lambda f: f.__name__.strip("_"),
)
def test_printed_paths_are_whole_when_stdout_is_no_terminal(command, tmp_path, monkeypatch):
    output, expected = command(tmp_path, monkeypatch)
    for want in expected:
        found = want.search(output) if isinstance(want, re.Pattern) else want in output
        assert found, (want, output)


@pytest.mark.parametrize(("command", "port"), [("serve", 8000), ("ui", 8050)])
def test_the_dashboard_url_of_an_ipv6_host_has_brackets(command, port, tmp_path, monkeypatch):
    monkeypatch.setattr("deltaplane.serve.serve", lambda *a, **k: None)  # the notices, not the server
    _invoke("registry", "init", "--home", str(tmp_path / "home"))
    extra = ["--runs", str(tmp_path)] if command == "ui" else []
    r = _invoke(command, "--home", str(tmp_path / "home"), *extra, "--host", "::1", "--insecure-http")
    assert f"dashboard: http://[::1]:{port}/ui/" in r.output
