"""``deltaplane keys certify``: device identities certified offline by the enrollment authority (no service), the
files ``fleet enroll --authority-key`` writes, and each Flower node's ``--node-config``."""

from __future__ import annotations

import shlex
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from deltaplane.aggregation.secagg import (
    DeviceCredentials,
    DeviceIdentity,
    EnrollmentAuthority,
    SecAggAuthError,
    TrustedAuthorities,
)
from deltaplane.aggregation.secagg.enrollment import NODE_CONFIG_KEYS, load_authority, node_config_arg
from deltaplane.errors import ConfigError


def _identity(out: Path, i: int) -> DeviceIdentity:
    return DeviceIdentity.from_files(
        (out / f"device-{i}.identity.pem").read_bytes(), (out / f"device-{i}.cert").read_bytes()
    )


def _node_configs(output: str) -> dict[str, dict[str, str]]:
    """device name → the node_config each printed ``flower-supernode --node-config '…'`` line gives."""
    configs = {}
    for line in output.splitlines():
        if "flower-supernode" in line:
            name, _, command = line.partition(": ")
            argv = shlex.split(command)
            assert argv[:2] == ["flower-supernode", "--node-config"], line
            pairs = dict(p.split("=", 1) for p in shlex.split(argv[2]))
            configs[name] = {k: v.strip('"') for k, v in pairs.items()}
    return configs


def test_certified_identities_verify_under_their_authority_only(cli, authority, tmp_path) -> None:
    auth, key = authority
    out = tmp_path / "nodes"
    before = time.time()
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--devices", 3, "--cohort", "north",
            "--valid-days", 30)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "3 identities certified by enrollment authority" in r.output, r.output
    # enrollment.ledger: the ids issued in OUT, never handed out again; enrollment.issued: the highest of them,
    # which an earlier release reads (files added on purpose)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"device-{i}.{s}" for i in range(3) for s in ("cert", "identity.pem")]
        + ["enrollment.ed25519.pub", "enrollment.issued", "enrollment.ledger"]
    )
    trust, other = auth.trust(), EnrollmentAuthority.generate().trust()
    for i in range(3):
        ident = _identity(out, i)
        cert = ident.certificate
        assert (cert.device_id, cert.cohort) == (f"device-{i}", "north")
        assert before + 30 * 86400 - 1 <= cert.expires <= time.time() + 30 * 86400
        trust.check(cert, now=time.time())
        with pytest.raises(SecAggAuthError, match="does not trust"):
            other.check(cert, now=time.time())
        for suffix in ("identity.pem", "cert"):  # secrets of the node, as fleet enroll writes them
            assert stat.S_IMODE((out / f"device-{i}.{suffix}").stat().st_mode) == 0o600
    # the .pub written beside them is the authority's: what every node is told to trust
    pub = TrustedAuthorities.from_text((out / "enrollment.ed25519.pub").read_text())
    pub.check(_identity(out, 0).certificate, now=time.time())
    # each printed node_config names the node's own files, and they load as its credentials
    configs = _node_configs(r.output)
    assert sorted(configs) == ["device-0", "device-1", "device-2"]
    for i in range(3):
        cfg = configs[f"device-{i}"]
        assert list(cfg) == list(NODE_CONFIG_KEYS)
        assert Path(cfg["secagg-identity-key"]) == (out / f"device-{i}.identity.pem").resolve()
        creds = DeviceCredentials.from_files(*(cfg[k] for k in NODE_CONFIG_KEYS))
        assert creds.identity.device_id == f"device-{i}"


def test_the_printed_node_config_is_what_flower_parses(cli, authority, tmp_path) -> None:
    """The line goes to ``flower-supernode --node-config`` unchanged, which reads it as TOML pairs (a path with a
    space in it included)."""
    config = pytest.importorskip("flwr.common.config")
    _, key = authority
    out = tmp_path / "my nodes"
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--device", 4)
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("device-4: "))
    argv = shlex.split(line.partition(": ")[2])
    parsed = config.parse_config_args([argv[2]])
    assert parsed == {
        "secagg-identity-key": str((out / "device-4.identity.pem").resolve()),
        "secagg-certificate": str((out / "device-4.cert").resolve()),
        "secagg-enrollment-authority": str((out / "enrollment.ed25519.pub").resolve()),
    }


def test_existing_identities_are_never_replaced_without_force(cli, authority, tmp_path) -> None:
    _, key = authority
    out = tmp_path / "nodes"
    assert cli("keys", "certify", "--authority-key", key, "--out", out, "--device", 1).exit_code == 0
    old = (out / "device-1.identity.pem").read_bytes(), (out / "device-1.cert").read_bytes()
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--device", 0, "--device", 1)
    assert r.exit_code == 2 and "device-1.identity.pem already exists" in r.output and "--force" in r.output
    assert not (out / "device-0.cert").exists()  # nothing written: device-0 is not half-enrolled
    assert ((out / "device-1.identity.pem").read_bytes(), (out / "device-1.cert").read_bytes()) == old
    r = cli(
        "keys", "certify", "--authority-key", key, "--out", out, "--device", 1, "--force", "--reissue-ids"
    )
    assert r.exit_code == 0, r.output
    assert (out / "device-1.identity.pem").read_bytes() != old[0]
    assert stat.S_IMODE((out / "device-1.identity.pem").stat().st_mode) == 0o600
    # another authority's identities do not go where this one's trusted key is
    other = tmp_path / "other.pem"
    other.write_bytes(EnrollmentAuthority.generate().to_pem())
    r = cli("keys", "certify", "--authority-key", other, "--out", out, "--device", 2)
    assert r.exit_code == 2 and "another enrollment authority" in r.output, r.output
    assert not (out / "device-2.cert").exists()


def test_bad_input_is_a_usage_error_saying_what_to_fix(cli, authority, tmp_path) -> None:
    auth, key = authority
    key.with_suffix(".pub").write_text(auth.public_text() + "\n")
    out = tmp_path / "nodes"
    rsa = tmp_path / "rsa.pem"
    rsa.write_bytes(
        generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        )
    )
    cases = [
        (["--authority-key", tmp_path / "none.pem", "--devices", 2], "keys enrollment --out DIR"),
        (
            ["--authority-key", key.with_suffix(".pub"), "--devices", 2],
            "not an enrollment authority's private key",
        ),
        (["--authority-key", rsa, "--devices", 2], "is Ed25519; got RSAPrivateKey"),
        (["--authority-key", key, "--device", -1], "--device"),
        (["--authority-key", key, "--device", 10**70], "1 to 64 UTF-8 bytes"),
        (
            ["--authority-key", key, "--devices", 2, "--cohort", ""],
            "cohort is 1 to 64",
        ),  # not silently 'fleet'
        (["--authority-key", key, "--devices", 0], "--devices"),
        (["--authority-key", key], "give --devices N"),
        (["--authority-key", key, "--devices", 2, "--device", 3], "not both"),
        (["--authority-key", key, "--devices", 2, "--valid-days", "nan"], "finite"),
        (["--authority-key", key, "--devices", 2, "--valid-days", 0.5], "--valid-days"),
        # a --node-dir Flower's --node-config cannot carry: refused before any file is written (was a traceback)
        (["--authority-key", key, "--devices", 2, "--node-dir", 'on"node'], "cannot carry a path with a"),
    ]
    for args, message in cases:
        r = cli("keys", "certify", "--out", out, *args)
        assert r.exit_code == 2 and message in " ".join(r.output.replace("│", " ").split()), (args, r.output)
        assert not out.exists(), args  # refused before anything was written


def test_the_library_errors_are_typed() -> None:
    with pytest.raises(ConfigError, match="keys enrollment"):
        load_authority("/nonexistent/enrollment.ed25519.pem")
    with pytest.raises(ConfigError, match="cannot carry a path with a '\"'"):
        node_config_arg('a"b.pem', "c.cert", "d.pub")


@pytest.mark.parametrize("command", ["certify", "identity"])
def test_a_file_appearing_after_the_check_is_not_overwritten_without_force(
    cli, authority, tmp_path, monkeypatch, command
) -> None:
    """The existence check and the write were two steps: a key or certificate written by another run in between
    (two operators certifying into one folder) was replaced. The write itself now refuses an existing target
    (a hard link, which fails if the name exists), so the other run's file stays byte for byte."""
    import deltaplane.commands.ops as ops

    _, key = authority
    out = tmp_path / "nodes"
    theirs = b"another run's key\n"
    writable = ops._writable

    def race(folder: Path, option: str) -> None:  # runs after the check, right before the write
        writable(folder, option)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "device-0.identity.pem").write_bytes(theirs)

    monkeypatch.setattr(ops, "_writable", race)
    if command == "certify":
        r = cli("keys", "certify", "--authority-key", key, "--out", out, "--device", 0)
    else:
        r = cli("keys", "identity", "--device", 0, "--out", out)
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "device-0.identity.pem already exists" in flat, r.output
    assert (out / "device-0.identity.pem").read_bytes() == theirs
    # no certificate or request left beside the other run's key, and no temp file
    assert sorted(p.name for p in out.iterdir()) == ["device-0.identity.pem"]


def test_add_certifies_the_next_free_ids_in_the_fleets_cohort_never_a_revoked_one(
    cli, authority, tmp_path
) -> None:
    """Replacing a revoked device: `--add K` certifies new ids past every device-I in OUT and every id the held
    list names (device-5 here, whose files were removed), in the cohort OUT's certificates name; a revoked id
    asked for by number is refused. Before, `--add` and `--revocations` did not exist."""
    _, key = authority
    out, crl = tmp_path / "nodes", tmp_path / "revoked.bin"
    assert (
        cli(
            "keys", "certify", "--authority-key", key, "--out", out, "--devices", 3, "--cohort", "north"
        ).exit_code
        == 0
    )
    assert cli("keys", "revoke", "--authority-key", key, "--out", crl, "--device", 1, "--device", 5,
               "--cohort", "north").exit_code == 0  # fmt: skip
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--add", 2, "--revocations", crl)
    assert r.exit_code == 0, r.output
    assert [_identity(out, i).certificate.cohort for i in (6, 7)] == ["north", "north"]
    assert not (out / "device-3.cert").exists() and "device-6: flower-supernode" in r.output
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--device", 5, "--revocations", crl)
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "device-5 is revoked in" in flat and "never reused" in flat, flat
    assert not (out / "device-5.cert").exists()
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--add", 1, "--cohort", "south")
    assert r.exit_code == 2 and "certified in ['north']" in " ".join(r.output.split()), r.output
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--add", 1, "--devices", 2)
    assert r.exit_code == 2 and "not both" in r.output, r.output


def test_a_certificate_that_cannot_be_written_takes_back_the_key_this_run_made(
    cli, authority, tmp_path, monkeypatch
) -> None:
    """`keys certify` wrote the identity key, then failed on the certificate (here a folder where device-0.cert
    goes, an OSError) and left the key behind with no certificate: a node reading OUT would start half-enrolled.
    The key this run created is now removed, with the same exit code (1, an OSError) and message as before."""
    _, key = authority
    out = tmp_path / "nodes"
    (out / "device-0.cert").mkdir(parents=True)
    r = cli(
        "keys", "certify", "--authority-key", key, "--out", out, "--device", 0, "--force", "--reissue-ids"
    )
    assert r.exit_code == 1 and "device-0.cert" in r.output, r.output
    assert sorted(p.name for p in out.iterdir()) == ["device-0.cert"]  # no key, no temp file
    # a key that was there before a --force run is the caller's to replace: not removed when the cert fails
    import deltaplane.aggregation.secagg.enrollment as enrollment

    auth = load_authority(key)
    ident = DeviceIdentity.enroll(auth, "device-1", cohort="fleet", expires=int(time.time()) + 60)
    (out / "device-1.identity.pem").write_bytes(b"held\n")

    def refused(*args: object, **kwargs: object) -> Path:
        raise PermissionError(13, "Permission denied", str(out / "device-1.cert"))

    monkeypatch.setattr(enrollment, "write_certificate", refused)
    with pytest.raises(PermissionError):
        enrollment.write_identity(out, ident)
    assert (out / "device-1.identity.pem").exists()
    with pytest.raises(PermissionError):
        enrollment.write_identity(
            out,
            DeviceIdentity.enroll(auth, "device-2", cohort="fleet", expires=int(time.time()) + 60),
            replace=False,
        )
    assert not (out / "device-2.identity.pem").exists()


def test_add_never_hands_out_again_an_id_issued_or_revoked_in_out(cli, authority, tmp_path) -> None:
    """`--add K` without `--revocations` took the next id past the files in OUT, so a revoked device whose files
    were removed had its id handed out again (the service then leaves the new device out as revoked). OUT now
    keeps a mark of the highest id ever issued there (`enrollment.issued`, 0600), and `keys revoke --enrolled OUT`
    raises it to the ids it revokes, so a folder from before the mark is covered once its ids are revoked."""
    _, key = authority
    out, crl = tmp_path / "nodes", tmp_path / "revoked.bin"
    assert cli("keys", "certify", "--authority-key", key, "--out", out, "--devices", 3).exit_code == 0
    mark = out / "enrollment.issued"

    def drop(i: int) -> None:
        for p in out.glob(f"device-{i}.*"):
            p.unlink()

    def add_one() -> str:
        r = cli("keys", "certify", "--authority-key", key, "--out", out, "--add", 1)
        assert r.exit_code == 0, r.output
        return next(line.split(":")[0] for line in r.output.splitlines() if "flower-supernode" in line)

    r = cli("keys", "revoke", "--authority-key", key, "--out", crl, "--device", 2, "--enrolled", out)
    assert r.exit_code == 0, r.output
    drop(2)  # the revoked device's files removed from the folder, no list given to --add
    assert add_one() == "device-3" and not (out / "device-2.cert").exists()
    assert mark.read_text() == "device-3\n" and stat.S_IMODE(mark.stat().st_mode) == 0o600
    drop(3)  # an issued id, never revoked, its files gone: not handed out again either
    assert add_one() == "device-4" and mark.read_text() == "device-4\n"
    # a folder from before the mark: revoking with --enrolled records the revoked id, beyond the files there
    mark.unlink()
    r = cli("keys", "revoke", "--authority-key", key, "--out", crl, "--device", 9, "--enrolled", out)
    assert r.exit_code == 0 and mark.read_text() == "device-9\n", r.output
    assert add_one() == "device-10"
    mark.write_text("device-x\n")
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--add", 1)
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and f"{mark} does not hold the highest device id" in flat, flat
    assert not (out / "device-11.cert").exists()


def test_one_identity_is_counted_in_the_singular(cli, authority, tmp_path) -> None:
    r = cli("keys", "certify", "--authority-key", authority[1], "--out", tmp_path / "one", "--devices", 1)
    assert r.exit_code == 0, r.output
    assert "1 identity certified by enrollment authority" in r.output, r.output
