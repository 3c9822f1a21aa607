import hashlib
import json

import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

import deltaplane as dp
from deltaplane.commands.ops import register
from deltaplane.registry import Registry

EVALUATOR = """
def evaluate(state):
    # "accuracy" is a stand-in that tracks the weights' scale: version 3 (scaled down) regresses
    s = float(state["w"].abs().mean())
    return {"accuracy": min(1.0, s), "ood_accuracy": min(1.0, s)}
"""


@pytest.fixture
def cli(tmp_path, monkeypatch):
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        pass

    register(app)
    (tmp_path / "gate_eval.py").write_text(EVALUATOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DELTAPLANE_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


def test_registry_lifecycle_through_the_cli(cli, tmp_path):
    assert cli("registry", "init").exit_code == 0
    r = cli("keys", "init")
    assert r.exit_code == 1 and "already exists" in r.output and "--force" in r.output
    for i, scale in enumerate([0.9, 0.95, 0.3]):
        f = tmp_path / f"m{i}.safetensors"
        save_file({"w": torch.full((4, 4), scale)}, str(f))
        r = cli("registry", "register", "cnn", str(f), "--lineage", f'{{"round": {i}}}', "--cohort", "eu")
        assert r.exit_code == 0, r.output
    assert cli("registry", "promote", "cnn@1", "--evaluator", "gate_eval:evaluate").exit_code == 0
    r = cli("registry", "promote", "cnn@2", "--evaluator", "gate_eval:evaluate")
    assert r.exit_code == 0 and "promoted" in r.output
    r = cli(
        "registry",
        "promote",
        "cnn@3",
        "--evaluator",
        "gate_eval:evaluate",
        "--tolerance",
        "accuracy=0.05",
        "--tolerance",
        "ood_accuracy=0.05",
    )
    assert r.exit_code == 3 and "REFUSED" in r.output and "accuracy drops by 0.6500" in r.output  # a gate
    reg = Registry(tmp_path / "home")
    assert reg.tag("cnn", "production") == 2
    r = cli("registry", "rollback", "cnn")
    assert r.exit_code == 0 and "cnn:production -> 1" in r.output
    assert hashlib.sha256(reg.read(reg.resolve("cnn:production"))).hexdigest() == reg.get("cnn", 1).sha256
    assert cli("registry", "tag", "cnn@3", "production").exit_code == 2
    assert cli("registry", "tag", "cnn@3", "staging").exit_code == 0
    r = cli("registry", "list", "cnn")
    assert r.exit_code == 0 and "cnn@3" in r.output and "staging" in r.output
    r = cli("registry", "show", "cnn:production")
    assert r.exit_code == 0 and '"round": 0' in r.output and "evaluation" in r.output
    r = cli("registry", "show", "cnn:production", "--json")
    doc = json.loads(r.output)
    assert doc["ref"] == "cnn@1" and doc["lineage"]["round"] == 0 and len(doc["evaluations"]) == 2
    listed = json.loads(cli("registry", "list", "cnn", "--json").output)
    assert [(v["ref"], v["tags"]) for v in listed] == [
        ("cnn@1", ["production"]),
        ("cnn@2", []),
        ("cnn@3", ["staging"]),
    ]
    r = cli("registry", "withdraw", "eu")
    assert "cnn@1" in r.output
    assert cli("registry", "promote", "cnn@2", "--evaluator", "gate_eval:evaluate").exit_code == 3
    assert cli("registry", "verify").exit_code == 0
    blob = reg.blob_path(reg.get("cnn", 2).sha256)
    raw = blob.read_bytes()
    blob.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    r = cli("registry", "verify")
    assert r.exit_code == 1 and "cnn@2" in r.output


def test_bad_arguments_give_clean_errors(cli, tmp_path):
    cli("registry", "init")
    save_file({"w": torch.ones(3)}, str(tmp_path / "m.safetensors"))
    assert cli("registry", "register", "m", str(tmp_path / "m.safetensors")).exit_code == 0
    # an evaluator that raises or returns no mapping: one line naming it, nothing tagged (was a traceback)
    (tmp_path / "broken_eval.py").write_text("def crash(state):\n    raise KeyError('w2')\n"
                                             "def nothing(state):\n    return 0.9\n")  # fmt: skip
    for fn, message in (("crash", "evaluator 'broken_eval:crash' failed on m@1 (KeyError: 'w2')"),
                        ("nothing", "must return a mapping of metric name to number; it returned float")):  # fmt: skip
        r = cli("registry", "promote", "m@1", "--evaluator", f"broken_eval:{fn}")
        assert (
            r.exit_code == 2 and message in r.output and not isinstance(r.exception, KeyError | TypeError)
        ), r.output
    assert Registry(tmp_path / "home").tags("m") == {}
    assert "version reference" in cli("registry", "show", "cnn").output
    r = cli("registry", "promote", "cnn@1", "--evaluator", "nope")
    assert r.exit_code == 2 and "module:function" in r.output


def test_a_lineage_that_is_not_a_json_object_of_json_numbers_is_a_usage_error(cli, tmp_path):
    """Before: --lineage '[]' (or '"x"') was a TypeError traceback ('list' object is not a mapping, exit 1), and
    --lineage '{"a": NaN}' or '{"a": 1e999}' was stored and printed back by `registry list --json` as NaN /
    Infinity, which is not JSON. Now a usage error naming --lineage; nothing is registered."""
    cli("registry", "init")
    save_file({"w": torch.ones(3)}, str(tmp_path / "m.safetensors"))
    for lineage, message in (
        ("[]", "--lineage must be a JSON object"),
        ('"x"', "--lineage must be a JSON object"),
        ('{"a": NaN}', "NaN is not a JSON number"),
        ('{"a": [1, -Infinity]}', "-Infinity is not a JSON number"),
        ('{"a": 1e999}', "1e999 is beyond the float range"),
    ):
        r = cli("registry", "register", "m", str(tmp_path / "m.safetensors"), "--lineage", lineage)
        assert r.exit_code == 2 and message in r.output, (lineage, r.output, r.exception)
    assert Registry(tmp_path / "home").versions() == []
    with pytest.raises(dp.ConfigError, match="lineage must be a mapping"):
        Registry(tmp_path / "home").register_model("m", {"w": torch.ones(3)}, lineage=[("a", 1)])
    r = cli("registry", "register", "m", str(tmp_path / "m.safetensors"), "--lineage", '{"a": 1.5}')
    assert r.exit_code == 0 and json.loads(cli("registry", "list", "--json").output)[0]["lineage"]["a"] == 1.5


def test_keys_tls_refuses_bad_host_and_device_names_before_writing(cli, tmp_path):
    """Before: --host '' (or one over 64 characters) was a ValueError traceback from cryptography after ca.pem and
    ca.key were written, and --device '../x' wrote its key and certificate outside --out. Now a usage error
    naming the option, and nothing is written."""
    out = tmp_path / "tls"
    for option, value in (
        ("--host", ""),
        ("--host", "a b"),
        ("--host", "x" * 70),
        ("--host", "999.999.1.1"),  # a mistyped IP address was taken as a DNS name: no client would match it
        ("--host", "10.0.0.256"),
        ("--device", "../escaped"),
        ("--device", "a/b"),
        ("--device", ""),
        ("--device", "d" * 65),
    ):
        r = cli("keys", "tls", "--out", str(out), option, value)
        assert r.exit_code == 2 and f"{option} must be" in r.output, (option, value, r.output, r.exception)
        assert not out.exists() and not (tmp_path / "escaped.pem").exists()
    r = cli(
        "keys",
        "tls",
        "--out",
        str(out),
        "--host",
        "*.example.org",
        "--host",
        "10.0.0.5",
        "--device",
        "dev-001",
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == [
        "ca.key", "ca.pem", "device-dev-001.key", "device-dev-001.pem", "server.key", "server.pem"
    ]  # fmt: skip


def test_output_folders_under_a_file_are_usage_errors(cli, tmp_path):
    """A --home / --out that is a file or lies under one, or a --key-file that is missing, is one line and
    exit 2 (or 1), before any work: they were NotADirectoryError / FileNotFoundError tracebacks."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    cases = [
        (["keys", "init", "--home", str(afile)], "give --home a folder path"),
        (["registry", "init", "--home", str(afile / "h")], "afile is a file, not a folder"),
        (["keys", "tls", "--out", str(afile)], "give --out a folder path"),
        (["keys", "tls", "--out", str(afile / "tls")], "afile is a file, not a folder"),
    ]
    for args, message in cases:
        r = cli(*args)
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, (args, r.output)
    assert cli("registry", "init").exit_code == 0
    save_file({"w": torch.ones(3)}, str(tmp_path / "m.safetensors"))
    assert cli("registry", "register", "m", str(tmp_path / "m.safetensors")).exit_code == 0
    r = cli("registry", "pull", "m@1", "--out", str(afile / "x"))
    assert r.exit_code == 2 and "afile is a file, not a folder" in r.output, r.output
    r = cli("registry", "rotate-key", "--key-file", str(tmp_path / "missing.key"))
    # read bounded, as every key file: a --key-file that cannot be read is a usage error, as a missing config is
    assert r.exit_code == 2 and "missing.key" in r.output and not isinstance(r.exception, OSError), r.output
    assert afile.read_text() == "not a folder"


def test_contradictory_or_out_of_range_options_change_nothing(cli, tmp_path):
    """Options that were taken silently: two different cohorts (the --cohort one was withdrawn), a negative gc
    age (which also removes temp files of writes still in progress), a torture run of no kills (exit 0 after
    creating a registry), and a dashboard whose --home is a file (it served without a registry)."""
    cli("registry", "init")
    home = tmp_path / "home"
    save_file({"w": torch.ones(3)}, str(tmp_path / "m.safetensors"))
    assert cli("registry", "register", "m", str(tmp_path / "m.safetensors"), "--cohort", "c2").exit_code == 0
    r = cli("registry", "withdraw", "c1", "--cohort", "c2")
    assert r.exit_code == 2 and "two cohorts given ('c1' and --cohort 'c2')" in r.output, r.output
    assert Registry(home).withdrawn_cohorts() == set()
    assert cli("registry", "withdraw", "c2", "--cohort", "c2").exit_code == 0  # the same one twice is fine
    tmp = home / "blobs" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "in-flight.tmp").write_bytes(b"a write in progress")
    for age in ("-1", "nan", "inf"):
        r = cli("registry", "gc", "--min-age", age)
        assert r.exit_code == 2 and "min_age_s must be a finite number of seconds >= 0" in r.output, r.output
    assert (tmp / "in-flight.tmp").exists()
    r = cli("registry", "torture", "--kills", "-3", "--home", str(tmp_path / "tort"))
    assert r.exit_code == 2 and "kills must be a positive integer" in r.output, r.output
    assert not (tmp_path / "tort").exists()
    afile = tmp_path / "afile"
    afile.write_text("not a registry")
    r = cli("ui", "--home", str(afile), "--port", "1")
    assert r.exit_code == 2 and "is a file; give the registry's folder" in r.output, r.output


@pytest.mark.parametrize("when", ["model", "manifest"])
def test_an_interrupted_pull_leaves_the_previous_pull_whole(cli, tmp_path, monkeypatch, when):
    """Ctrl-C while pulling left model.safetensors.tmp behind, or (during the manifest) the new model beside the
    previous pull's manifest: a folder whose manifest names another version than its model."""
    import pathlib

    cli("registry", "init")
    for value in (1.0, 2.0):
        save_file({"w": torch.full((3,), value)}, str(tmp_path / "m.safetensors"))
        assert cli("registry", "register", "m", str(tmp_path / "m.safetensors")).exit_code == 0
    out = tmp_path / "pulled"
    assert cli("registry", "pull", "m@1", "--out", str(out)).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for method in ("write_text", "write_bytes"):  # however the files are written
        real_write = getattr(pathlib.Path, method)

        def interrupted_write(self, *args, _real=real_write, **kwargs):
            if self.name.startswith(f"{when}."):
                if when == "model":  # the model written in full, then Ctrl-C
                    _real(self, *args, **kwargs)
                raise KeyboardInterrupt
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, method, interrupted_write)
    r = cli("registry", "pull", "m@2", "--out", str(out))
    assert r.exit_code != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_deltaplane_serve_starts_and_answers(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    Registry.create(tmp_path / "home")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DELTAPLANE_ADMIN_TOKEN": "a" * 20, "DELTAPLANE_HOME": str(tmp_path / "home")}
    cmd = [
        sys.executable,
        "-m",
        "deltaplane.cli",
        "serve",
        "--port",
        str(port),
        "--evaluator",
        "deltaplane.serve.evaluators:digits",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/openapi.json")
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[
                    -2000:
                ]
                time.sleep(0.2)
        assert r.status_code == 200 and r.json()["info"]["title"] == "deltaplane"
        admin = httpx.get(
            f"http://127.0.0.1:{port}/admin/stats", headers={"Authorization": "Bearer " + "a" * 20}
        )
        assert admin.status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/admin/stats").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_dashboard_refuses_plain_http_off_loopback_like_serve(cli, tmp_path, monkeypatch):
    """`deltaplane ui --host 0.0.0.0` served the sign-in form (the admin token) and the session cookie over
    plain HTTP to the network, where `deltaplane serve` refuses to: it now has serve's --tls-cert/--tls-key and
    --insecure-http (behind a TLS proxy) and the same refusal."""
    import deltaplane.serve as serve_module
    from deltaplane.serve.tls import make_tls_bundle

    served = []
    monkeypatch.setattr(serve_module, "serve", lambda app, **kw: served.append(kw))
    runs = tmp_path / "runs"
    runs.mkdir()
    r = cli("ui", "--runs", str(runs), "--host", "0.0.0.0", "--admin-token", "a" * 20)
    assert r.exit_code == 2 and "refusing plain HTTP on 0.0.0.0" in r.output, r.output
    assert served == []
    r = cli("ui", "--runs", str(runs), "--host", "0.0.0.0", "--admin-token", "a" * 20, "--insecure-http")
    assert r.exit_code == 0 and served[-1]["host"] == "0.0.0.0" and not served[-1].get("ssl_options"), (
        r.output
    )
    bundle = make_tls_bundle(tmp_path / "tls")
    r = cli(
        "ui", "--runs", str(runs), "--host", "0.0.0.0", "--admin-token", "a" * 20,
        "--tls-cert", str(bundle.server_cert), "--tls-key", str(bundle.server_key),
    )  # fmt: skip
    assert r.exit_code == 0 and served[-1]["ssl_options"]["ssl_certfile"], r.output
    assert "https://0.0.0.0:8050/ui/" in r.output
    r = cli("ui", "--runs", str(runs), "--admin-token", "a" * 20, "--tls-cert", str(bundle.server_cert))
    assert r.exit_code == 2 and "--tls-cert and --tls-key go together" in r.output, r.output
    assert cli("ui", "--runs", str(runs), "--admin-token", "a" * 20).exit_code == 0  # loopback: plain is fine
    assert served[-1]["host"] == "127.0.0.1"


def test_the_dashboard_refuses_a_port_out_of_range_and_a_runs_file(cli, tmp_path, monkeypatch):
    """`ui --port 70000` started and printed http://127.0.0.1:70000/ui/ (uvicorn bound another port, or none:
    `--port -1` only logged an error), and `ui --runs FILE` served an empty dashboard as if no run existed."""
    import deltaplane.serve as serve_module

    served = []
    monkeypatch.setattr(serve_module, "serve", lambda app, **kw: served.append(kw))
    for port in ("70000", "0", "-1"):
        for command in ("ui", "serve"):
            r = cli(command, "--port", port, "--admin-token", "a" * 20)
            assert r.exit_code == 2 and "--port" in r.output, (command, port, r.output)
    afile = tmp_path / "afile"
    afile.write_text("not a folder of runs")
    r = cli("ui", "--runs", str(afile), "--admin-token", "a" * 20)
    assert r.exit_code == 2 and "--runs" in r.output and "is a file" in r.output, r.output
    assert served == []


def test_serve_and_ui_refuse_non_finite_or_zero_numbers(cli, tmp_path, monkeypatch):
    """Before: --session-idle-minutes nan was a ValueError traceback and --session-max-hours inf an
    OverflowError one (exit 1), serve --fleet 0 a ZeroDivisionError, serve --per-round 0 was taken as the whole
    fleet and serve --rate nan started a service whose rate limiter compares against NaN. Now usage errors
    (exit 2) naming the option, and nothing is served."""
    import deltaplane.serve as serve_module

    served = []
    monkeypatch.setattr(serve_module, "serve", lambda app, **kw: served.append(kw))
    cli("registry", "init")
    token = ["--admin-token", "a" * 20]
    for command in ("serve", "ui"):
        for option, value in (("--session-idle-minutes", "nan"), ("--session-max-hours", "inf")):
            r = cli(command, option, value, *token)
            assert r.exit_code == 2 and option in r.output and "must be a finite number" in r.output, (
                command, option, r.output, r.exception
            )  # fmt: skip
    for option, value, message in (
        ("--fleet", "0", "'--fleet': 0 is not in the range x>=1"),
        ("--per-round", "0", "'--per-round': 0 is not in the range x>=1"),
        ("--rate", "nan", "rate must be positive"),
    ):
        r = cli("serve", option, value, *token, "--device-secret", "s" * 32)
        assert r.exit_code == 2 and message in r.output, (option, r.output, r.exception)
    assert served == []


def test_serve_refuses_tls_files_openssl_cannot_use_before_starting(cli, tmp_path, monkeypatch):
    """Before: --tls-cert/--tls-key holding junk (or a key of another certificate) passed the check and the
    service died in uvicorn with an ssl.SSLError traceback (exit 1); a FIFO was reported as "does not exist".
    Now a usage error (exit 2) naming the files, before anything is served."""
    import os

    import deltaplane.serve as serve_module

    served = []
    monkeypatch.setattr(serve_module, "serve", lambda app, **kw: served.append(kw))
    cli("registry", "init")
    assert cli("keys", "tls", "--out", str(tmp_path / "tls")).exit_code == 0
    tls = tmp_path / "tls"
    junk = tmp_path / "junk.pem"
    junk.write_bytes(os.urandom(300))
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)
    token = ["--admin-token", "a" * 20, "--device-secret", "s" * 32]
    for files, message in (
        ([junk, junk], "are not a PEM certificate and its private key"),
        ([tls / "server.pem", tls / "ca.key"], "are not a PEM certificate and its private key"),
        ([tls / "server.pem", tls / "server.key", junk], "--tls-client-ca"),
        ([fifo, tls / "server.key"], "a TLS file must be a regular file, not a FIFO"),
    ):
        args = ["--tls-cert", str(files[0]), "--tls-key", str(files[1])]
        args += ["--tls-client-ca", str(files[2])] if len(files) > 2 else []
        r = cli("serve", *args, *token)
        assert r.exit_code == 2 and message in r.output, (files, r.output, r.exception)
    assert served == []
    r = cli("serve", "--tls-cert", str(tls / "server.pem"), "--tls-key", str(tls / "server.key"), *token)
    assert r.exit_code == 0 and served[0]["ssl_options"]["ssl_certfile"] == str(tls / "server.pem"), r.output


def test_an_empty_host_is_refused_by_serve_and_ui(cli, tmp_path, monkeypatch):
    """Before: `--host ''` said "refusing plain HTTP on : ...", and with --insecure-http (or TLS) listened on
    every interface, which asyncio makes of an empty host. Now a usage error (exit 2) asking for an address,
    before anything listens."""
    import deltaplane.serve as serve_module

    served = []
    monkeypatch.setattr(serve_module, "serve", lambda app, **kw: served.append(kw))
    runs = tmp_path / "runs"
    runs.mkdir()
    for host in ("", "  "):
        for args in (
            ("ui", "--runs", str(runs), "--admin-token", "a" * 20),
            ("serve", "--home", str(tmp_path / "reg"), "--admin-token", "a" * 20),
        ):
            r = cli(*args, "--host", host, "--insecure-http")
            assert r.exit_code == 2 and "--host is empty; give the address to listen on" in r.output, r.output
    assert served == []


def test_keys_help_names_both_of_its_commands(cli):
    """`deltaplane --help` said `keys` was "Ed25519 signing keys." while it also makes serve's TLS certificates
    (`keys tls`, the first command of docs/fleet.md): a newcomer looking for TLS found no command for it."""
    out = " ".join(cli("--help").output.replace("│", " ").split())  # rich's box, wrapped at any width
    assert (
        "Ed25519 signing keys (init), the SecAgg enrollment authority and device identities (enrollment, identity, certify, revoke), and TLS certificates for serve (tls)"
        in out
    ), out


def test_keys_prints_long_paths_unbroken_when_stdout_is_no_terminal(cli, tmp_path, monkeypatch):
    """rich wraps at 80 columns when stdout is not a terminal: `keys tls` broke its paths mid-way, and a broken
    path cannot be copied into the next command."""
    out = tmp_path / ("tls-" + "x" * 90) / "[bundle]"  # longer than the console, and with rich markup in it
    r = cli("keys", "tls", "--out", str(out), "--device", "d0")
    assert r.exit_code == 0, r.output
    for name in ("ca.pem", "server.pem", "server.key", "device-d0.pem", "device-d0.key"):
        assert str(out / name) in r.output, (name, r.output)
    home = tmp_path / ("home-" + "y" * 90)
    monkeypatch.setenv("DELTAPLANE_HOME", str(home))
    r = cli("keys", "init")
    assert r.exit_code == 0 and str(home / "keys") in r.output, r.output


def test_pulling_a_version_trained_on_a_withdrawn_cohort_warns_and_says_so_in_the_manifest(cli, tmp_path):
    """A version whose cohort withdrew consent pulled silently with "verified": true, as if nothing were wrong;
    promotion, serving and round bases refuse it, so the user pulling it is told (on stderr, even with -q's
    console silenced) and the manifest names the cohort. "verified" still means hash and signature."""
    cli("registry", "init")
    save_file({"w": torch.ones(3)}, str(tmp_path / "m.safetensors"))
    assert cli("registry", "register", "m", str(tmp_path / "m.safetensors"), "--cohort", "eu").exit_code == 0
    clean = tmp_path / "clean"
    r = cli("registry", "pull", "m@1", "--out", str(clean))
    assert r.exit_code == 0 and "withdrew consent" not in r.stderr
    assert json.loads((clean / "manifest.json").read_text())["consent"] == {"withdrawn_cohorts": []}
    assert cli("registry", "withdraw", "eu").exit_code == 0
    out = tmp_path / "pulled"
    r = cli("registry", "pull", "m@1", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "m@1 was trained on 'eu', which withdrew consent" in " ".join(r.stderr.split())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["consent"] == {"withdrawn_cohorts": ["eu"]}
    assert manifest["verified"] is True


def test_serve_flush_every_sets_the_fleet_flush_period_and_refuses_a_bad_one(cli, tmp_path, monkeypatch):
    """The periodic flush of the fleet's contacts and counts ran every 5 s, a value only code could change
    (``ServiceState.flush_every_s``). It is ``ServiceConfig.flush_every_s`` now and ``serve --flush-every``:
    the running service uses it, and a period that is not positive, not finite or over an hour is refused
    (exit 2, naming the setting) before anything is served."""
    import math

    import deltaplane.serve as serve_pkg
    from deltaplane.errors import ConfigError
    from deltaplane.registry import Registry
    from deltaplane.serve import ServiceConfig, create_app

    served = []
    monkeypatch.setattr(serve_pkg, "serve", lambda app_, **kw: served.append(app_))
    home = tmp_path / "home"
    Registry.create(home)
    args = ["serve", "--home", str(home), "--admin-token", "a" * 20]
    r = cli(*args, "--flush-every", "0.5")
    assert r.exit_code == 0, (r.output, r.exception)
    assert served[0].state.deltaplane.flush_every_s == 0.5
    for bad in ("0", "-1", "3601", "nan"):
        r = cli(*args, "--flush-every", bad)
        said = " ".join(r.output.split())
        assert r.exit_code == 2 and ("flush" in said) and "Traceback" not in said, (bad, said)
    assert len(served) == 1
    base = {"home": str(home), "admin_token": "a" * 20}
    for bad in (0.0, -1.0, 3600.5, math.nan, math.inf):
        with pytest.raises(ConfigError, match="flush_every_s must be in"):
            ServiceConfig(**base, flush_every_s=bad)
    assert ServiceConfig(**base).flush_every_s == 5.0
    # the running service's period is the config's (state.flush_every_s is what the lifespan waits on)
    assert create_app(ServiceConfig(**base, flush_every_s=3600)).state.deltaplane.flush_every_s == 3600


@pytest.mark.parametrize("tag", ["production", "production.eu"])
def test_registry_tag_refuses_what_devices_are_served_as_production(cli, tmp_path, tag):
    # `registry tag M@N production.eu` skipped the gate: eu devices are served production.eu before production
    assert cli("registry", "init").exit_code == 0
    for i in range(2):
        f = tmp_path / f"m{i}.safetensors"
        save_file({"w": torch.full((2,), float(i))}, str(f))
        assert cli("registry", "register", "cnn", str(f)).exit_code == 0
    r = cli("registry", "tag", "cnn@2", tag)
    assert r.exit_code == 2 and "registry promote cnn@2 --to " + tag in r.output.replace("\n", " "), r.output
    assert Registry(tmp_path / "home").tags("cnn", verify=True) == {}
    assert cli("registry", "tag", "cnn@2", "production_eu").exit_code == 0  # another tag, never served
