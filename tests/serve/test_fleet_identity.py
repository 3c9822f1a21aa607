"""Fleet devices with enrolled SecAgg identities: `keys enrollment`, `fleet enroll --authority-key`, authenticated
rounds opened by the coordinator, and devices that refuse rounds their enrollment does not match."""

from __future__ import annotations

import dataclasses
import stat
import time

from deltaplane.aggregation.secagg import (
    DeviceCredentials,
    DeviceIdentity,
    EnrollmentAuthority,
    TrustedAuthorities,
)
from deltaplane.aggregation.secagg.revocation import revoke
from deltaplane.serve import fleet

from .test_fleet import MODEL, Fleet, _cli, _config, _env, _threads


def test_an_authenticated_secagg_fleet_round_publishes_and_an_unenrolled_device_sits_it_out(
    byo_task, tmp_path
) -> None:
    cfg = _config(byo_task, clients=4, secagg=True, clip="2.0", wire="self-describing")
    authority = EnrollmentAuthority.generate()
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(4)]
        logs: list[str] = []
        for i, dev in enumerate(devices[:3]):
            ident = DeviceIdentity.enroll(
                authority, fleet.device_id(i), cohort="fleet", expires=4_000_000_000
            )
            dev.credentials = DeviceCredentials(ident, authority.trust())
        devices[3].log = logs.append  # no identity: it cannot sign, so it refuses before training
        threads = _threads(devices, rounds=1, stage_wait=20)
        out = fleet.coordinate(
            f.admin, cfg, model=MODEL, rounds=1, deadline=10, poll=0.05, authenticated=True
        )
        for t in threads[:3]:
            t.join(30)
        assert out[0].failed is None and out[0].contributors == 3 and out[0].version is not None
        assert any("no enrolled identity" in line for line in logs), logs
        assert f.admin.secagg_status(MODEL, out[0].number)["authenticated"] is True
    # the coordinator's line says so, as the dashboard's fleet page does ("secagg, authenticated")
    assert out[0].line(1).startswith(f"round 1/1 (secagg, authenticated #{out[0].number}): 3/4 devices")


def test_a_round_no_device_advertised_in_says_the_identity_mismatch_may_be_why(byo_task, tmp_path) -> None:
    """Walking docs/byo.md -> fleet.md, enrolled devices under a coordinator run without --authenticated each
    logged why they sat the round out, but the coordinator's line said only "only 0 clients advertised keys;
    threshold 3". It now adds that a refusing device sends nothing, and the identity mismatch that makes it
    refuse, so the operator knows where to look."""
    cfg = _config(byo_task, secagg=True, clip="2.0", wire="self-describing")
    authority = EnrollmentAuthority.generate()
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(3)]
        logs: list[str] = []
        for i, dev in enumerate(devices):
            ident = DeviceIdentity.enroll(
                authority, fleet.device_id(i), cohort="fleet", expires=4_000_000_000
            )
            dev.credentials = DeviceCredentials(ident, authority.trust())
            dev.log = logs.append
        threads = _threads(devices, rounds=1, stage_wait=20)
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=3, poll=0.05)
        for t in threads:
            t.join(30)
    assert out[0].failed is not None and "only 0 clients advertised keys" in out[0].failed, out[0].failed
    assert (
        "devices enrolled with a SecAgg identity sit out rounds opened without --authenticated"
        in out[0].failed
    )
    assert any("the round is not authenticated" in line for line in logs), logs
    assert out[0].line(1).startswith("round 1/1 (secagg #"), out[0].line(1)  # not an authenticated round


def test_enrollment_authority_and_device_identities_from_the_cli(byo_task, tmp_path) -> None:
    cfg = _config(byo_task)
    env = _env(tmp_path)
    done = _cli("keys", "enrollment", "--out", "authority", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    key, pub = (
        tmp_path / "authority" / "enrollment.ed25519.pem",
        tmp_path / "authority" / "enrollment.ed25519.pub",
    )
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    done = _cli("keys", "enrollment", "--out", "authority", cwd=tmp_path, env=env)
    assert (
        done.returncode == 2 and "already exists" in done.stderr
    )  # never replaced: certificates would break
    with Fleet(tmp_path / "svc", cfg) as f:
        done = _cli("fleet", "enroll", "--url", f.url, "--ca", str(f.tls.ca_cert), "--devices", "2", "--out",
                    "tokens", "--authority-key", str(key), "--cohort", "north", cwd=tmp_path, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        names = sorted(p.name for p in (tmp_path / "tokens").iterdir())
        # enrollment.ledger and enrollment.issued (added on purpose): the ids issued there, never handed out again
        assert names == [f"device-{i}.{s}" for i in range(2) for s in ("cert", "identity.pem", "token")] + [
            "enrollment.issued",
            "enrollment.ledger",
        ]
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (tmp_path / "tokens").iterdir())
        trust = TrustedAuthorities.from_text(pub.read_text())
        for i in range(2):
            ident = DeviceIdentity.from_files(
                (tmp_path / "tokens" / f"device-{i}.identity.pem").read_bytes(),
                (tmp_path / "tokens" / f"device-{i}.cert").read_bytes(),
            )
            assert (ident.device_id, ident.certificate.cohort) == (f"device-{i}", "north")
            trust.check(ident.certificate, now=0)  # signed by the authority the devices are given
        # half an enrollment is refused before the device connects: never a silent unauthenticated device
        done = _cli("fleet", "device", "--url", f.url, "--ca", str(f.tls.ca_cert), "--token-file",
                    str(tmp_path / "tokens" / "device-0.token"), "--trusted",
                    str(f.reg.home / "keys" / "signing.ed25519.pub"), "--federation", "fleet.yaml", "--model", MODEL,
                    "--device", "0", "--identity-key", str(tmp_path / "tokens" / "device-0.identity.pem"),
                    cwd=tmp_path, env=env)  # fmt: skip
        assert done.returncode == 2 and "go together" in done.stderr, done.stderr


def test_a_device_given_the_wrong_enrollment_authority_or_an_expired_certificate_stops_at_start(
    tmp_path,
) -> None:
    """Walking docs/byo.md -> fleet.md, a device started with `--enrollment-authority` naming another key (the
    registry's signing key sits next to it) started, waited for rounds, and would only find out in a round,
    as a roster that does not verify, sitting out every round. It now refuses at start (exit 2, before any
    request: the URL here answers nothing), saying which authority its certificate names."""
    from typer.testing import CliRunner

    from deltaplane.cli import app

    authority, other = EnrollmentAuthority.generate(), EnrollmentAuthority.generate()
    (tmp_path / "right.pub").write_text(authority.public_text() + "\n")
    (tmp_path / "wrong.pub").write_text(other.public_text() + "\n")
    (tmp_path / "t.token").write_text("x")
    for name, expires in (("valid", 4_000_000_000), ("expired", 1_000)):
        ident = DeviceIdentity.enroll(authority, "device-0", cohort="fleet", expires=expires)
        (tmp_path / f"{name}.pem").write_bytes(ident.key_pem())
        (tmp_path / f"{name}.cert").write_bytes(ident.certificate.to_bytes())

    def device(name: str, pub: str) -> tuple[int, str]:
        r = CliRunner().invoke(app, [
            "fleet", "device", "--url", "http://127.0.0.1:9", "--token-file", str(tmp_path / "t.token"),
            "--trusted", str(tmp_path / "right.pub"), "--federation", str(tmp_path / "none.yaml"),
            "--model", "m", "--device", "0", "--identity-key", str(tmp_path / f"{name}.pem"),
            "--certificate", str(tmp_path / f"{name}.cert"), "--enrollment-authority", str(tmp_path / pub),
        ])  # fmt: skip
        return r.exit_code, " ".join(r.output.split())

    code, out = device("valid", "wrong.pub")
    assert code == 2 and "does not verify under --enrollment-authority" in out, out
    assert authority.id.hex() in out and "enrollment.ed25519.pub of the authority" in out, out
    code, out = device("expired", "right.pub")
    assert code == 2 and "expired" in out and "enroll the device again" in out, out
    code, out = device("valid", "right.pub")  # the credentials pass; the next check is the federation file
    assert code == 2 and "federation file" in out and "does not exist" in out, out


def test_fleet_devices_take_an_uploaded_list_before_the_round_and_keep_it(byo_task, tmp_path) -> None:
    """Real fleet devices (run_device) and the coordinator over TLS: the devices start holding a list past its next
    update (a week offline), the operator uploads a current one revoking device-3 without restarting the service;
    the service leaves device-3 out of the round it opens (the coordinator says so), so no stage waits for it: the
    round publishes with the other three well inside the deadline. Before the round each of them fetches the list,
    verifies it, keeps it in its file and takes part (the stale one would have made it refuse)."""
    cfg = _config(byo_task, clients=4, secagg=True, clip="2.0", wire="self-describing")
    authority = EnrollmentAuthority.generate()
    now = int(time.time())
    stale = revoke(authority, [], issued=now - 9 * 86_400)  # its next update was two days ago
    current = revoke(authority, [(fleet.device_id(3), "fleet")], issued=now, previous=stale)
    pub = tmp_path / "enrollment.ed25519.pub"
    pub.write_text(authority.public_text() + "\n")
    with Fleet(tmp_path, cfg) as f:
        f.stop()  # the same service, configured to keep and verify a list
        f.service = dataclasses.replace(
            f.service, secagg_revocations=str(tmp_path / "service.bin"), secagg_authority=str(pub)
        )
        f.start_again()
        assert f.admin.upload_revocations(current.to_bytes())["replaced"] is True
        devices = [f.device(i) for i in range(4)]
        logs: dict[int, list[str]] = {i: [] for i in range(4)}
        for i, dev in enumerate(devices):
            ident = DeviceIdentity.enroll(
                authority, fleet.device_id(i), cohort="fleet", expires=4_000_000_000
            )
            dev.credentials = DeviceCredentials(ident, authority.trust(), revocations=stale)
            dev.revocations_file = tmp_path / f"device-{i}.revocations"
            dev.log = logs[i].append
        threads = _threads(devices, rounds=1, stage_wait=60)
        said: list[str] = []
        deadline = 60  # before, every stage waited this long for device-3, which sat the round out
        out = fleet.coordinate(
            f.admin,
            cfg,
            model=MODEL,
            rounds=1,
            deadline=deadline,
            poll=0.05,
            authenticated=True,
            say=said.append,
        )
        for t in threads[:3]:
            t.join(30)
        status = f.admin.secagg_status(MODEL, out[0].number)
    line = out[0].line(1)
    assert out[0].failed is None and out[0].contributors == 3 and out[0].version is not None, line
    assert out[0].revoked == ("device-3",) and out[0].invited == 3 and out[0].dropouts == 0, line
    assert "3/3 devices (0 dropped out)" in line and line.endswith("; device-3 revoked: left out"), line
    assert f"device-3 revoked: left out of SecAgg round {out[0].number}" in said, said
    assert status["revoked"] == ["device-3"] and status["dropped"] == [], status
    assert out[0].seconds < deadline / 2, line  # no stage waited out the deadline for device-3
    for i in range(3):
        assert (tmp_path / f"device-{i}.revocations").read_bytes() == current.to_bytes()
        assert any("took revocation list number 2" in line for line in logs[i]), logs[i]
    assert not any("SecAgg round" in line for line in logs[3]), logs[3]  # never invited: never asked


def test_a_revoked_device_is_replaced_by_fleet_enroll_add_and_the_replacement_takes_part(
    byo_task, tmp_path, monkeypatch
) -> None:
    """The operator's path after a leaked key, all through the CLI but the device processes: enrol four devices,
    revoke device-3 and upload the list (`keys revoke --upload`), enrol its replacement (`fleet enroll --add 1`,
    which takes device-4: never the revoked id) and invite the folder's devices (what `coordinate --enrolled`
    does). The replacement trains on device-3's partition under its new identity and the authenticated round
    publishes with it; the revoked device is left out. Before, `--add` did not exist: the replacement's id,
    certificate and token were made by hand."""
    from typer.testing import CliRunner

    from deltaplane.cli import app
    from deltaplane.commands.fleet import _credentials
    from deltaplane.serve.client import DeviceClient

    from .test_fleet import ADMIN

    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", ADMIN)
    monkeypatch.chdir(tmp_path)

    def cli(*args: object) -> str:
        r = CliRunner().invoke(app, [str(a) for a in args], terminal_width=300)
        assert r.exit_code == 0, r.output
        return " ".join(r.output.split())

    cfg = _config(byo_task, clients=4, secagg=True, clip="2.0", wire="self-describing")
    cli("keys", "enrollment", "--out", "authority")
    key, pub = (
        tmp_path / "authority" / "enrollment.ed25519.pem",
        tmp_path / "authority" / "enrollment.ed25519.pub",
    )
    with Fleet(tmp_path / "svc", cfg) as f:
        f.stop()  # a service keeping and verifying the authority's list
        f.service = dataclasses.replace(
            f.service, secagg_revocations=str(tmp_path / "service.bin"), secagg_authority=str(pub)
        )
        f.start_again()
        ca = f.tls.ca_cert
        cli(
            "fleet",
            "enroll",
            "--url",
            f.url,
            "--ca",
            ca,
            "--devices",
            4,
            "--out",
            "tokens",
            "--authority-key",
            key,
        )
        said = cli("keys", "revoke", "--authority-key", key, "--out", "revoked.bin", "--device", 3,
                   "--upload", f.url, "--ca", ca)  # fmt: skip
        assert "the service now holds list number 1 (1 device revoked, 0 keys)" in said, said
        said = cli("fleet", "enroll", "--url", f.url, "--ca", ca, "--add", 1, "--out", "tokens",
                   "--authority-key", key, "--revocations", "revoked.bin")  # fmt: skip
        assert "1 device tokens written to tokens/ (device-4.token), with SecAgg identities" in said, said
        assert "coordinate --enrolled tokens" in said, said
        tokens = tmp_path / "tokens"
        assert sorted(p.name for p in tokens.glob("*.token")) == [f"device-{i}.token" for i in range(5)]
        devices = []
        for name, partition in (("device-0", 0), ("device-1", 1), ("device-2", 2), ("device-4", 3)):
            token = (tokens / f"{name}.token").read_text().strip()
            conn = DeviceClient(f.url, token, verifier=f.reg.verifier, tls=f.ctx)
            dev = fleet.load_device(conn, cfg, partition, model=MODEL)
            dev.credentials = _credentials(
                tokens / f"{name}.identity.pem", tokens / f"{name}.cert", pub, tokens / f"{name}.revocations"
            )
            dev.revocations_file = tokens / f"{name}.revocations"
            dev.log = lambda line: None
            devices.append(dev)
        assert devices[3].credentials.identity.certificate.cohort == "fleet"
        threads = _threads(devices, rounds=1, stage_wait=60)
        names = [fleet.device_id(i) for i in range(5)]  # what coordinate --enrolled tokens invites
        out = fleet.coordinate(
            f.admin, cfg, model=MODEL, rounds=1, deadline=30, poll=0.05, authenticated=True, devices=names
        )
        for t in threads:
            t.join(30)
        status = f.admin.secagg_status(MODEL, out[0].number)
    line = out[0].line(1)
    assert out[0].failed is None and out[0].contributors == 4 and out[0].version is not None, line
    assert out[0].revoked == ("device-3",), line
    # four contributors out of device-0, 1, 2, 4 with device-3 left out: the replacement took part
    assert status["revoked"] == ["device-3"] and status["dropped"] == [], status
