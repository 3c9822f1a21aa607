"""`deltaplane fleet …` options and inputs refused before any connection (commands/fleet.py)."""

import os
import re

from typer.testing import CliRunner

from deltaplane.cli import app


def test_fleet_refuses_non_finite_waits_and_scales_and_names_a_fifo(tmp_path, monkeypatch):
    """Before: --deadline nan, --stage-wait nan and --weight-scale nan passed click's float range (NaN compares
    false) and --patience inf too ("waiting up to inf s"), so coordinate and device ran with a wait that never
    ends or a NaN scale; a FIFO given as --federation was reported as "does not exist". Now usage errors
    (exit 2) naming the option, before any connection is tried."""
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "a" * 20)
    fed = tmp_path / "fed.yaml"
    fed.write_text("clients: 3\nrounds: 1\n")
    fifo = tmp_path / "fed.fifo"
    os.mkfifo(fifo)
    url = ["--url", "http://127.0.0.1:9"]
    # --patience 1: before the fix, an accepted value went on to try the (closed) port for only a second
    coordinate = ["fleet", "coordinate", *url, "--federation", str(fed), "--model", "m", "--rounds", "1"]
    device = ["fleet", "device", *url, "--token-file", str(fed), "--federation", str(fed), "--model", "m"]
    for args, option in (
        ([*coordinate, "--patience", "1", "--deadline", "nan"], "--deadline"),
        ([*coordinate, "--patience", "1", "--deadline", "1", "--weight-scale", "nan"], "--weight-scale"),
        ([*coordinate, "--deadline", "1", "--patience", "inf"], "--patience"),
        ([*device, "--device", "0", "--stage-wait", "nan"], "--stage-wait"),
    ):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and option in r.output and "must be a finite number" in r.output, (
            args, r.output, r.exception
        )  # fmt: skip
    r = CliRunner().invoke(app, ["fleet", "init", "--federation", str(fifo), "--model", "m"])
    assert r.exit_code == 2 and "a federation file must be a regular file, not a FIFO" in r.output, r.output


def _own_devices_task(tmp_path, monkeypatch) -> None:
    """``own_devices:make_task``: a task that brings its own 4 devices (one dataset each), importable."""
    (tmp_path / "own_devices.py").write_text(
        "import torch\nfrom torch import nn\nfrom deltaplane.engine import Dataset, Task\n\n\n"
        "def make_task():\n"
        "    data = [Dataset(torch.randn(20, 4), torch.arange(20) % 2) for _ in range(4)]\n"
        "    return Task(name='own', model=lambda: nn.Linear(4, 2), clients=data, test=data[0])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_fleet_init_refuses_a_federation_whose_devices_the_fleet_cannot_build(tmp_path, monkeypatch):
    """Walking docs/byo.md -> fleet.md with a task of one dataset per device (`clients=`, 4 of them) and a
    fleet.yaml of `clients: {count: 3}`: `fleet init` registered the model and tagged it production, and only
    `fleet device` and `fleet coordinate` then refused the file ("brings its own 4 devices"). `fleet init`
    now builds the devices as they will and refuses first, registering nothing."""
    _own_devices_task(tmp_path, monkeypatch)
    home = tmp_path / "home"
    out = {}
    for count in (3, 4):
        fed = tmp_path / f"fleet{count}.yaml"
        fed.write_text(f'task: {{path: "own_devices:make_task"}}\nclients: {{count: {count}, rounds: 1}}\n')
        r = CliRunner().invoke(
            app, ["fleet", "init", "--federation", str(fed), "--model", f"m{count}", "--home", str(home)]
        )
        out[count] = (r.exit_code, " ".join(r.output.split()))
    assert out[3][0] == 2 and "brings its own 4 devices; set clients to 4" in out[3][1], out[3]
    assert out[4] == (0, f"m4@1 registered in {home} (production); serve it with --federation"), out[4]
    from deltaplane.registry import Registry

    assert Registry(home).versions("m3") == [] and len(Registry(home).versions("m4")) == 1


def test_serve_refuses_a_federation_whose_own_devices_the_fleet_cannot_build(tmp_path, monkeypatch):
    """After `fleet init` refused it (0087953), `deltaplane serve --federation` still started on a fleet.yaml of
    `clients: {count: 3}` for a task that brings its own 4 devices, and only `fleet device` and `fleet
    coordinate` refused the file later. `serve` now refuses it at start with their message: exit 2, no admin
    token printed, no app made, nothing served, nothing written."""
    import deltaplane.serve as serve_pkg

    _own_devices_task(tmp_path, monkeypatch)
    made, served = [], []
    monkeypatch.setattr(serve_pkg, "create_app", lambda config, **kw: made.append(config) or object())
    monkeypatch.setattr(serve_pkg, "serve", lambda app_, **kw: served.append(kw))
    out = {}
    for count in (3, 4):
        fed = tmp_path / f"fleet{count}.yaml"
        fed.write_text(f'task: {{path: "own_devices:make_task"}}\nclients: {{count: {count}, rounds: 1}}\n')
        home = tmp_path / f"home{count}"
        r = CliRunner().invoke(app, ["serve", "--home", str(home), "--federation", str(fed)])
        out[count] = (r.exit_code, " ".join(r.output.split()), len(made), len(served))
    code, said, apps, serves = out[3]
    assert code == 2 and "task 'own' brings its own 4 devices; set clients to 4" in said, said
    assert (apps, serves) == (0, 0) and "admin token" not in said and not (tmp_path / "home3").exists()
    assert out[4][0] == 0 and out[4][2:] == (1, 1), out[4]  # the matching file serves, as before
    assert made[0].federation.clients == 4


def test_coordinate_prints_each_round_on_one_line_as_plain_text(tmp_path, monkeypatch):
    """Walking docs/fleet.md with the output in a log file (80 columns): the round line broke after `ε`
    (`..., version 2, ε \\n4.649, 12.3 s`), and a failed round's reason, the service's own words, went through
    rich markup, which drops a bracketed `[device-3]` and raises on a `[/path]`. Now one line, verbatim."""
    from deltaplane.serve import coordinator as coordinator_module  # what the command runs (no torch)
    from deltaplane.serve.coordinator import RoundSummary

    def fake(admin, run, *, progress, say, **kwargs):
        ok = RoundSummary(1, "secagg", 1, 3, 3, 2, 4.649, 12.3, authenticated=True)
        bad = RoundSummary(2, "secagg", 2, 3, 0, None, None, 1.0, failed="refused [device-3] at [/tmp/x]")
        say("the service answers again after 4.2 s [/tmp/y] " + "x" * 80)
        for s in (ok, bad):
            progress(s)
        return [ok, bad]

    monkeypatch.setattr(coordinator_module, "coordinate", fake)
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "a" * 20)
    fed = tmp_path / "fed.yaml"
    fed.write_text("clients: 3\nrounds: 2\nsecagg: {enabled: true}\n")
    args = ["fleet", "coordinate", "--url", "http://127.0.0.1:9", "--federation", str(fed), "--model", "m"]
    r = CliRunner().invoke(app, [*args, "--rounds", "2", "--deadline", "60"])
    assert r.exit_code == 1, (r.output, r.exception)  # one round failed
    lines = r.output.splitlines()
    assert (
        "round 1/2 (secagg, authenticated #1): 3/3 devices (0 dropped out), version 2, ε 4.649, 12.3 s"
        in lines
    )
    assert "round 2/2 (secagg #2): failed: refused [device-3] at [/tmp/x]" in lines
    assert "the service answers again after 4.2 s [/tmp/y] " + "x" * 80 in lines


def test_fleet_enroll_add_issues_tokens_in_the_fleets_cohort_without_the_authority_key(tmp_path, monkeypatch):
    """`--add K` enrols "in the cohort of OUT's certificates" (its help); without `--authority-key` it read no
    certificate and issued the new device's token in cohort "fleet", so withdrawing the fleet's consent
    (its cohort) left the new device in. The certificates are read without the key now, as `--cohort` is
    checked against them."""
    from deltaplane.aggregation.secagg import EnrollmentAuthority
    from deltaplane.serve.client import AdminClient

    issued: list[tuple[str, str]] = []
    monkeypatch.setattr(
        AdminClient, "issue_token", lambda self, d, c, **kw: issued.append((d, c)) or f"tok-{d}"
    )
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "a" * 20)
    key = tmp_path / "enrollment.ed25519.pem"
    key.write_bytes(EnrollmentAuthority.generate().to_pem())
    out, url = tmp_path / "tokens", ["--url", "http://127.0.0.1:9"]
    args = ["fleet", "enroll", *url, "--out", str(out), "--devices", "2", "--authority-key", str(key)]
    r = CliRunner().invoke(app, [*args, "--cohort", "north"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["fleet", "enroll", *url, "--out", str(out), "--add", "1"])
    assert r.exit_code == 0, r.output
    assert issued == [("device-0", "north"), ("device-1", "north"), ("device-2", "north")]
    r = CliRunner().invoke(
        app, ["fleet", "enroll", *url, "--out", str(out), "--add", "1", "--cohort", "south"]
    )
    assert r.exit_code == 2 and "certified in ['north']" in " ".join(r.output.split()), r.output


def test_fleet_enroll_add_keeps_the_fleets_model_scope_and_cohort(tmp_path, monkeypatch):
    """`fleet enroll --model cnn` scopes a fleet's tokens to cnn, but `--add K` issued the new devices' tokens
    unscoped (every model of the service), and without certificates in cohort "fleet" whatever the fleet's was
    (outside its consent withdrawal). --add now reads both from the fleet's tokens in OUT; a --model that is
    not the fleet's scope is a usage error naming it."""
    import base64
    import json

    from deltaplane.serve.auth import TokenAuthority
    from deltaplane.serve.client import AdminClient

    authority = TokenAuthority(b"s" * 32, audience="svc")

    def claims(path):
        body = path.read_text().partition(".")[0]
        return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))

    def issue(self, d, c, *, models=None, **kw):
        return authority.issue_token(d, c, models=None if models is None else tuple(models)).token

    monkeypatch.setattr(AdminClient, "issue_token", issue)
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "a" * 20)
    out, url = tmp_path / "tokens", ["--url", "http://127.0.0.1:9"]
    enroll = ["fleet", "enroll", *url, "--out", str(out)]
    r = CliRunner().invoke(app, [*enroll, "--devices", "2", "--model", "cnn", "--cohort", "north"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [*enroll, "--add", "1"])
    assert r.exit_code == 0, r.output
    added = claims(out / "device-2.token")
    assert (added.get("m"), added["c"]) == (["cnn"], "north"), added
    r = CliRunner().invoke(app, [*enroll, "--add", "1", "--model", "cnn"])  # the fleet's own scope: fine
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [*enroll, "--add", "1", "--model", "lm"])
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "--model lm, but the fleet's tokens" in flat and "['cnn']" in flat, r.output
    assert not (out / "device-4.token").exists()
    plain = tmp_path / "plain"  # an unscoped fleet stays unscoped
    r = CliRunner().invoke(app, ["fleet", "enroll", *url, "--out", str(plain), "--devices", "1"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["fleet", "enroll", *url, "--out", str(plain), "--add", "1"])
    assert r.exit_code == 0, r.output
    assert "m" not in claims(plain / "device-1.token")


def test_fleet_enroll_add_names_a_malformed_certificate_in_out_as_a_usage_error(tmp_path, monkeypatch):
    """`--add K` reads the cohort from OUT's certificates; a damaged one (truncated here) ended the command with
    exit 1 and the decoder's message alone. It is the operator's folder to fix: exit 2 naming the file and what
    to do, before any token is issued, for `fleet enroll --add` and `keys certify --add` alike."""
    from deltaplane.aggregation.secagg import EnrollmentAuthority
    from deltaplane.serve.client import AdminClient

    issued: list[str] = []
    monkeypatch.setattr(AdminClient, "issue_token", lambda self, d, c, **kw: issued.append(d) or f"tok-{d}")
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "a" * 20)
    key = tmp_path / "enrollment.ed25519.pem"
    key.write_bytes(EnrollmentAuthority.generate().to_pem())
    out, url = tmp_path / "tokens", ["--url", "http://127.0.0.1:9"]
    args = ["fleet", "enroll", *url, "--out", str(out), "--devices", "2", "--authority-key", str(key)]
    assert CliRunner().invoke(app, args).exit_code == 0
    cert = out / "device-1.cert"
    cert.write_bytes(cert.read_bytes()[:-7])
    before = sorted(p.name for p in out.iterdir())
    for command in (
        ["fleet", "enroll", *url, "--out", str(out), "--add", "1"],
        ["keys", "certify", "--authority-key", str(key), "--out", str(out), "--add", "1"],
    ):
        r = CliRunner().invoke(app, command)
        flat = " ".join(r.output.split())
        assert r.exit_code == 2 and f"{cert} is not a device certificate" in flat, (command, r.output)
        assert "signature bytes" in flat and f"move the file out of {out}" in flat, flat
        assert sorted(p.name for p in out.iterdir()) == before  # nothing written
    assert issued == ["device-0", "device-1"]


def test_fleet_enroll_add_never_reissues_an_id_whose_token_was_removed(tmp_path, monkeypatch):
    """`fleet enroll --add 1` took the id past the tokens in OUT: device-2's token removed (the device revoked,
    no list given), device-2 was issued again, a token the service then refuses to seat. OUT keeps the highest id
    ever issued there (`enrollment.issued`), so the new device is device-3."""
    from deltaplane.serve.client import AdminClient

    issued: list[str] = []
    monkeypatch.setattr(AdminClient, "issue_token", lambda self, d, c, **kw: issued.append(d) or f"tok-{d}")
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "a" * 20)
    out, url = tmp_path / "tokens", ["--url", "http://127.0.0.1:9"]
    assert (
        CliRunner().invoke(app, ["fleet", "enroll", *url, "--out", str(out), "--devices", "3"]).exit_code == 0
    )
    (out / "device-2.token").unlink()
    r = CliRunner().invoke(app, ["fleet", "enroll", *url, "--out", str(out), "--add", "1"])
    assert r.exit_code == 0, r.output
    assert issued == ["device-0", "device-1", "device-2", "device-3"]
    assert (out / "enrollment.issued").read_text() == "device-3\n"


def test_fleet_device_last_line_counts_one_published_round_in_the_singular(tmp_path, monkeypatch):
    """A device that took part in one round ended with "took part in 1 published rounds"; now "1 published
    round", and "2 published rounds" still for more (the line docs/fleet.md quotes)."""
    from types import SimpleNamespace

    from deltaplane.registry import signing
    from deltaplane.serve import fleet as fleet_module

    # run_device's rows say whether the device's update went into each round (`took_part`): a personalized device
    # also reports the rounds it sat out, and the line counts only those it took part in
    rows: list[list[dict]] = [
        [{"round": 1, "took_part": True}, {"round": 2, "took_part": False}],
        [{"round": 1, "took_part": True}, {"round": 2, "took_part": True}],
    ]
    monkeypatch.setattr(signing, "load_trusted_keys", lambda path: [])
    monkeypatch.setattr(fleet_module, "load_device", lambda conn, run, device, *, model: SimpleNamespace())
    monkeypatch.setattr(fleet_module, "run_device", lambda dev, **kw: rows.pop(0))
    monkeypatch.setattr(fleet_module, "keep_releases", lambda dev, path: None)  # no local DP here
    fed, token = tmp_path / "fed.yaml", tmp_path / "device-0.token"
    fed.write_text("clients: 3\nrounds: 2\n")
    token.write_text("tok")
    args = ["fleet", "device", "--url", "http://127.0.0.1:9", "--token-file", str(token)]
    args += ["--federation", str(fed), "--model", "m", "--device", "0", "--trusted", str(token)]
    for want in ("device 0: took part in 1 published round\n", "device 0: took part in 2 published rounds\n"):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, (r.output, r.exception)
        assert r.output.endswith(want), r.output


def test_rounds_help_shows_the_configs_own_default(monkeypatch):
    """`fleet coordinate --rounds` and `run --rounds` said "120" as a literal in their help: RunConfig's default
    changed, the help would still say 120. Both read it from one constant that RunConfig's field uses."""
    from deltaplane.engine import RunConfig

    monkeypatch.setenv("COLUMNS", "200")
    default = RunConfig.model_fields["rounds"].default
    assert RunConfig().rounds == default
    r = CliRunner().invoke(app, ["fleet", "coordinate", "--help"])
    assert f"clients.rounds; {default} when it names none" in " ".join(r.output.split()), r.output
    r = CliRunner().invoke(app, ["run", "--help"])
    assert re.search(rf"--rounds .*\[default: \(?{default}\)?\]", r.output), r.output


def test_fleet_enroll_failing_part_way_spends_the_ids_whose_tokens_were_issued(tmp_path, monkeypatch):
    """The service failed at device-2's token after issuing device-0's and device-1's: nothing was written and
    the mark not raised, so a second `fleet enroll --devices 3` issued device-0 and device-1 again, a second
    live token for each. Now their tokens are written, their ids spent (`enrollment.ledger`), and the run says
    so; `--devices 3` is refused there and `--add 1` takes device-2."""
    from deltaplane.serve.client import AdminClient, ServiceError

    issued: list[str] = []
    failed: list[str] = []

    def issue(self, d, c, **kw):
        if d == "device-2" and not failed:  # once: the service fails mid-way through the first run
            failed.append(d)
            raise ServiceError(503, "the registry database is unavailable")
        issued.append(d)
        return f"tok-{d}"

    monkeypatch.setattr(AdminClient, "issue_token", issue)
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "a" * 20)
    out, url = tmp_path / "tokens", ["--url", "http://127.0.0.1:9"]
    enroll = ["fleet", "enroll", *url, "--out", str(out)]
    r = CliRunner().invoke(app, [*enroll, "--devices", "3"])
    assert r.exit_code == 1, (r.output, r.exception)
    assert "2 of 3 tokens were issued (device-0 … device-1)" in " ".join(r.output.split()), r.output
    assert sorted(p.name for p in out.iterdir()) == [
        "device-0.token",
        "device-1.token",
        "enrollment.issued",
        "enrollment.ledger",
    ]  # no enrollment.reserved: device-2 was given back
    assert (out / "device-1.token").read_text() == "tok-device-1"
    assert (out / "enrollment.ledger").read_text() == "device-0..device-1\n"
    assert (out / "enrollment.issued").read_text() == "device-1\n"
    r = CliRunner().invoke(app, [*enroll, "--devices", "3"])
    assert r.exit_code == 2 and "--add" in r.output, r.output  # before: device-0 and device-1 issued again
    r = CliRunner().invoke(app, [*enroll, "--add", "1"])
    assert r.exit_code == 0, r.output
    assert issued == ["device-0", "device-1", "device-2"]


def test_fleet_enroll_refused_at_the_first_token_leaves_nothing(tmp_path, monkeypatch):
    """A refusal before any token was issued (a wrong admin token) still leaves no folder, file or mark."""
    from deltaplane.serve.client import AdminClient, ServiceError

    def refuse(self, d, c, **kw):
        raise ServiceError(401, "invalid admin token")

    monkeypatch.setattr(AdminClient, "issue_token", refuse)
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "a" * 20)
    out = tmp_path / "tokens"
    r = CliRunner().invoke(
        app, ["fleet", "enroll", "--url", "http://127.0.0.1:9", "--out", str(out), "--devices", "2"]
    )
    assert r.exit_code != 0 and not out.exists(), r.output


def _cli_in_fresh_process(tmp_path, *args: str) -> tuple[int, str, bool]:
    """Run ``deltaplane ARGS`` in a new interpreter: its exit code, its stderr, and whether it loaded torch."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src"
    code = (
        "import atexit, json, runpy, sys\n"
        "atexit.register(lambda: print(json.dumps('torch' in sys.modules), file=sys.stderr))\n"
        f"sys.argv = ['deltaplane', *{list(args)!r}]\n"
        "runpy.run_module('deltaplane', run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(src), "DELTAPLANE_ADMIN_TOKEN": "a" * 40, "COLUMNS": "400"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    *lines, torch = done.stderr.strip().splitlines()
    return done.returncode, "\n".join(lines), json.loads(torch)


def test_fleet_enroll_and_coordinate_check_the_federation_without_torch(tmp_path):
    """Reading --federation built the federation's codecs and aggregators to check them, which loaded torch
    (~1.1 s of CPU, ~220 MB) in every `fleet enroll`, and in `fleet coordinate` before it refused a flag. Now
    the check needs no torch (deltaplane.engine.buildable), with the same verdicts and messages."""
    (tmp_path / "fleet.yaml").write_text(
        'task: {path: "mytask:make_task"}\nclients: {count: 3, rounds: 2}\nsecagg: {enabled: true}\n'
        "clip: 2.0\ndp_noise: 0.8\ndp_delta: 0.001\ndownlink_codec: identity\n"
    )
    (tmp_path / "plain.yaml").write_text('task: {path: "mytask:make_task"}\nclients: {count: 3}\n')
    url = ["--url", "http://127.0.0.1:9"]
    code, err, torch = _cli_in_fresh_process(
        tmp_path, "fleet", "enroll", *url, "--federation", "fleet.yaml", "--out", "tokens"
    )
    assert code == 1 and "cannot reach the service at http://127.0.0.1:9" in err and not torch, err
    code, err, torch = _cli_in_fresh_process(
        tmp_path, "fleet", "coordinate", *url, "--federation", "plain.yaml", "--model", "m", "--deadline", "1",
        "--secagg-neighbours", "2",
    )  # fmt: skip
    assert (
        code == 2 and "it needs secure aggregation, and plain.yaml runs plain rounds" in err and not torch
    ), err
