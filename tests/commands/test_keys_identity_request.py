"""Device-made identity keys: ``deltaplane keys identity`` makes the key and a self-signed certification request
on the device, ``keys certify --request`` certifies the request's key and writes its certificate only (never a
private key), and devices enrolled this way run an exact authenticated SecAgg round."""

from __future__ import annotations

import dataclasses
import stat
import struct
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deltaplane.aggregation.secagg import (
    CertificationRequest,
    DeviceCredentials,
    SecAggConfig,
    run_secagg,
)
from deltaplane.aggregation.secagg.enrollment import NODE_CONFIG_KEYS, read_request
from deltaplane.aggregation.secagg.identity import REQUEST_MAX_BYTES
from deltaplane.commands.fleet import _credentials as fleet_credentials
from deltaplane.errors import ConfigError, DecodeError

from .test_keys_certify import _node_configs


def _flat(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


def test_requests_round_trip_to_certificates_and_an_exact_authenticated_round(
    cli, authority, tmp_path
) -> None:
    auth, key = authority
    n = 4
    nodes, operator = tmp_path / "nodes", tmp_path / "operator"
    for i in range(n):
        r = cli("keys", "identity", "--device", i, "--cohort", "north", "--out", nodes / f"n{i}")
        assert r.exit_code == 0, r.output
        # the hint names the certificate file the device is to put beside its key, not a pattern
        assert f"put the device-{i}.cert it returns next to the key" in _flat(r.output), r.output
        folder = nodes / f"n{i}"
        assert sorted(p.name for p in folder.iterdir()) == [f"device-{i}.identity.pem", f"device-{i}.request"]
        assert stat.S_IMODE((folder / f"device-{i}.identity.pem").stat().st_mode) == 0o600
        assert len((folder / f"device-{i}.request").read_bytes()) <= REQUEST_MAX_BYTES
    requests = [a for i in range(n) for a in ("--request", nodes / f"n{i}" / f"device-{i}.request")]
    r = cli("keys", "certify", "--authority-key", key, "--out", operator, *requests, "--valid-days", 30)
    assert r.exit_code == 0, r.output
    # only certificates, the authority's public key and the record of the ids issued (enrollment.ledger and
    # enrollment.issued, added on purpose: no run hands them out again): no private key on the operator's side
    assert sorted(p.name for p in operator.iterdir()) == sorted(
        [f"device-{i}.cert" for i in range(n)]
        + ["enrollment.ed25519.pub", "enrollment.issued", "enrollment.ledger"]
    )
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in operator.iterdir())
    assert stat.S_IMODE((operator / "device-0.cert").stat().st_mode) == 0o600
    # each node puts its certificate and the .pub next to its own key; the printed --node-config names them there
    creds = {}
    for i in range(n):
        folder = nodes / f"n{i}"
        for name in (f"device-{i}.cert", "enrollment.ed25519.pub"):
            (folder / name).write_bytes((operator / name).read_bytes())
        c = DeviceCredentials.from_files(
            folder / f"device-{i}.identity.pem",
            folder / f"device-{i}.cert",
            folder / "enrollment.ed25519.pub",
        )
        cert = c.identity.certificate
        assert (cert.device_id, cert.cohort) == (f"device-{i}", "north")
        assert cert.identity_public == read_request(folder / f"device-{i}.request").identity_public
        auth.trust().check(cert, now=time.time())
        assert cert.expires <= time.time() + 30 * 86400
        creds[i] = c
    # `fleet device` takes such files as they are (--identity-key, --certificate, --enrollment-authority)
    folder = nodes / "n0"
    started = fleet_credentials(
        folder / "device-0.identity.pem", folder / "device-0.cert", folder / "enrollment.ed25519.pub"
    )
    assert started.identity.certificate == creds[0].identity.certificate
    configs = _node_configs(r.output)
    where = [operator.resolve() / f"device-2.{s}" for s in ("identity.pem", "cert")]
    assert configs["device-2"] == dict(
        zip(
            NODE_CONFIG_KEYS,
            [*map(str, where), str(operator.resolve() / "enrollment.ed25519.pub")],
            strict=True,
        )
    )
    # one exact authenticated round of the devices enrolled this way (signed adverts, rosters, consistency)
    cfg = SecAggConfig(num_clients=n, threshold=3, bits=8, vector_size=16, round_id=1, graph_seed=5)
    rng = np.random.default_rng(0)
    codes = {u: rng.integers(0, 256, 16).astype(np.uint32) for u in range(n)}
    total, rep = run_secagg(codes, cfg, credentials=creds, session=b"csr/1", randbytes=rng.bytes)
    assert rep.survivors == list(range(n))
    assert np.array_equal(total, sum(c.astype(np.uint64) for c in codes.values()))


def test_node_dir_names_the_files_where_they_lie_on_the_node(cli, authority, tmp_path) -> None:
    _, key = authority
    assert cli("keys", "identity", "--device", 7, "--out", tmp_path / "node").exit_code == 0
    r = cli("keys", "certify", "--authority-key", key, "--out", tmp_path / "op", "--request",
            tmp_path / "node" / "device-7.request", "--node-dir", "/etc/deltaplane")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert _node_configs(r.output)["device-7"] == {
        "secagg-identity-key": "/etc/deltaplane/device-7.identity.pem",
        "secagg-certificate": "/etc/deltaplane/device-7.cert",
        "secagg-enrollment-authority": "/etc/deltaplane/enrollment.ed25519.pub",
    }


def _forgeries(good: bytes, req: CertificationRequest) -> dict[str, tuple[bytes, str]]:
    other = Ed25519PrivateKey.generate()
    swapped = dataclasses.replace(
        req, identity_public=CertificationRequest.sign(other, "x", cohort="c").identity_public
    )
    renamed = dataclasses.replace(req, device_id="device-9")  # another id than the signature covers
    recohorted = dataclasses.replace(req, cohort="south")
    head = struct.calcsize(">4sB32s")
    return {
        "swapped key": (swapped.to_bytes(), "self-signature does not verify"),
        "other device id": (renamed.to_bytes(), "self-signature does not verify"),
        "other cohort": (recohorted.to_bytes(), "self-signature does not verify"),
        "truncated": (good[:-1], "signature bytes"),
        "truncated head": (good[: head - 3], "at most"),
        "oversized": (good + b"\0" * (REQUEST_MAX_BYTES - len(good) + 1), "over the 231 bytes limit"),
        "wrong magic": (b"DPDC" + good[4:], "not a version-1 certification request"),
        "wrong version": (good[:4] + b"\x02" + good[5:], "not a version-1 certification request"),
        "empty": (b"", "at most"),
    }


def test_forged_or_malformed_requests_are_refused_naming_the_file(cli, authority, tmp_path) -> None:
    _, key = authority
    assert cli("keys", "identity", "--device", 3, "--out", tmp_path / "node").exit_code == 0
    good = (tmp_path / "node" / "device-3.request").read_bytes()
    req = CertificationRequest.from_bytes(good)
    out = tmp_path / "op"
    for what, (data, message) in _forgeries(good, req).items():
        bad = tmp_path / f"bad-{what.replace(' ', '-')}.request"
        bad.write_bytes(data)
        with pytest.raises(ConfigError, match=message) as info:
            read_request(bad)
        assert str(bad) in str(info.value), what
        r = cli("keys", "certify", "--authority-key", key, "--out", out, "--request", good_path := tmp_path / "node"
                / "device-3.request", "--request", bad)  # fmt: skip
        assert r.exit_code == 2 and bad.name in _flat(r.output), (what, r.output)
        assert not out.exists(), what  # refused before anything was written, the good request's cert included
        assert good_path.read_bytes() == good
    # the library refuses the same bytes as a typed DecodeError
    with pytest.raises(DecodeError, match="self-signature"):
        CertificationRequest.from_bytes(_forgeries(good, req)["swapped key"][0])
    # a correctly self-signed request for a name that is not device-I (a path) is refused: names become file names
    evil = tmp_path / "evil.request"
    evil.write_bytes(
        CertificationRequest.sign(Ed25519PrivateKey.generate(), "../x", cohort="fleet").to_bytes()
    )
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--request", evil)
    assert r.exit_code == 2 and "requests are for device-I" in _flat(r.output), r.output
    assert not out.exists() and not (tmp_path / "x.cert").exists()


def test_certify_request_usage_errors(cli, authority, tmp_path) -> None:
    _, key = authority
    node = tmp_path / "node"
    for i in (1, 2):
        assert cli("keys", "identity", "--device", i, "--cohort", "north", "--out", node).exit_code == 0
    req = node / "device-1.request"
    twin = tmp_path / "twin.request"
    twin.write_bytes(req.read_bytes())
    out = tmp_path / "op"
    cases = [
        (["--request", req, "--devices", 2], "not both"),
        (["--request", req, "--device", 1], "not both"),
        (["--request", req, "--cohort", "south"], "asks for cohort 'north', not --cohort 'south'"),
        (["--request", req, "--request", twin], "two --request files ask for device-1"),
        (["--request", tmp_path / "none.request"], "cannot read certification request"),
    ]
    for args, message in cases:
        r = cli("keys", "certify", "--authority-key", key, "--out", out, *args)
        assert r.exit_code == 2 and message in _flat(r.output), (args, r.output)
        assert not out.exists(), args
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--request", req, "--cohort", "north")
    assert r.exit_code == 0, r.output
    # a partition id keys certify --request refuses (over 18 digits) makes no key on the device
    r = cli("keys", "identity", "--device", 10**18, "--out", node)
    assert r.exit_code == 2 and "at most 18 digits" in _flat(r.output), r.output
    assert not list(node.glob("device-1000000000000000000.*"))
    assert cli("keys", "identity", "--device", 10**18 - 1, "--out", node).exit_code == 0
    largest = node / f"device-{10**18 - 1}.request"  # the largest keys certify --request takes
    assert cli("keys", "certify", "--authority-key", key, "--out", out, "--request", largest).exit_code == 0


def test_nothing_is_overwritten_without_force(cli, authority, tmp_path) -> None:
    _, key = authority
    node, out = tmp_path / "node", tmp_path / "op"
    assert cli("keys", "identity", "--device", 1, "--out", node).exit_code == 0
    old_key, old_req = (node / "device-1.identity.pem").read_bytes(), (node / "device-1.request").read_bytes()
    r = cli("keys", "identity", "--device", 1, "--out", node)
    assert (
        r.exit_code == 2
        and "device-1.identity.pem already exists" in _flat(r.output)
        and "--force" in r.output
    )
    (node / "device-1.identity.pem").unlink()  # the request alone also blocks: it would stop matching its key
    r = cli("keys", "identity", "--device", 1, "--out", node)
    assert r.exit_code == 2 and "device-1.request already exists" in _flat(r.output)
    assert (node / "device-1.request").read_bytes() == old_req
    r = cli("keys", "identity", "--device", 1, "--out", node, "--force")
    assert r.exit_code == 0, r.output
    assert (node / "device-1.identity.pem").read_bytes() != old_key
    assert stat.S_IMODE((node / "device-1.identity.pem").stat().st_mode) == 0o600
    assert (node / "device-1.request").read_bytes() != old_req
    # the operator's certificate is not replaced without --force either
    req = node / "device-1.request"
    assert cli("keys", "certify", "--authority-key", key, "--out", out, "--request", req).exit_code == 0
    cert = (out / "device-1.cert").read_bytes()
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--request", req)
    assert r.exit_code == 2 and "device-1.cert already exists" in _flat(r.output)
    assert (out / "device-1.cert").read_bytes() == cert
    r = cli(
        "keys",
        "certify",
        "--authority-key",
        key,
        "--out",
        out,
        "--request",
        req,
        "--force",
        "--valid-days",
        2,
    )
    assert r.exit_code == 0 and (out / "device-1.cert").read_bytes() != cert
    assert not (out / "device-1.identity.pem").exists()


def test_certify_refuses_a_request_whose_key_differs_from_the_identity_key_in_out(
    cli, authority, tmp_path
) -> None:
    """Node and operator share a folder: a stale device-1.identity.pem there (an older key) would get a certificate
    for another key, which only shows when the node starts. certify refuses (exit 2, nothing written, both files
    named, what to do), --force included (it replaces certificates, never a key); the device's own key is fine."""
    _, key = authority
    shared, node = tmp_path / "shared", tmp_path / "node"
    assert cli("keys", "identity", "--device", 1, "--out", shared).exit_code == 0  # the older key, left there
    (shared / "device-1.request").unlink()
    stale = (shared / "device-1.identity.pem").read_bytes()
    assert cli("keys", "identity", "--device", 1, "--out", node).exit_code == 0  # the key the device uses now
    req = node / "device-1.request"
    for force in ([], ["--force"]):
        r = cli("keys", "certify", "--authority-key", key, "--out", shared, "--request", req, *force)
        out = _flat(r.output)
        assert r.exit_code == 2, (force, r.output)
        assert "device-1.identity.pem" in out and "device-1.request" in out and "another identity key" in out
        assert "remove" in out or "another --out" in out
        assert sorted(p.name for p in shared.iterdir()) == ["device-1.identity.pem"]  # nothing written
        assert (shared / "device-1.identity.pem").read_bytes() == stale
    # not a key at all: refused the same way, naming it
    (shared / "device-1.identity.pem").write_text("not a key\n")
    r = cli("keys", "certify", "--authority-key", key, "--out", shared, "--request", req)
    assert r.exit_code == 2 and "device-1.identity.pem" in _flat(r.output), r.output
    assert sorted(p.name for p in shared.iterdir()) == ["device-1.identity.pem"]
    # the request's own key next to it (keys identity and certify in one folder): certified
    r = cli("keys", "certify", "--authority-key", key, "--out", node, "--request", req)
    assert r.exit_code == 0, r.output
    DeviceCredentials.from_files(
        node / "device-1.identity.pem", node / "device-1.cert", node / "enrollment.ed25519.pub"
    )


def test_a_replayed_request_for_a_revoked_device_is_refused_given_the_list(cli, authority, tmp_path) -> None:
    """A device's old request (its leaked key, its id) sent again after the id was revoked: `keys certify
    --request` with `--revocations` refuses it, even asking for another cohort than the revoked one (the service
    matches the list by device id), and writes no certificate. The list names ids, not keys: what it cannot
    refuse is the leaked key asking under a new id (the operator decides who gets one). Passes on main."""
    _, key = authority
    node, op, crl = tmp_path / "node", tmp_path / "op", tmp_path / "revoked.bin"
    assert cli("keys", "identity", "--device", 2, "--cohort", "north", "--out", node).exit_code == 0
    r = cli("keys", "certify", "--authority-key", key, "--out", op, "--request", node / "device-2.request")
    assert r.exit_code == 0, r.output
    (op / "device-2.cert").unlink()  # the operator removed the revoked device's files
    r = cli("keys", "revoke", "--authority-key", key, "--out", crl, "--device", 2, "--cohort", "south")
    assert r.exit_code == 0, r.output
    r = cli("keys", "certify", "--authority-key", key, "--out", op, "--request", node / "device-2.request",
            "--revocations", crl)  # fmt: skip
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "device-2 is revoked in" in flat, flat
    assert not (op / "device-2.cert").exists()


def test_a_revoked_device_is_named_before_a_stale_key_beside_its_request(cli, authority, tmp_path) -> None:
    """An operator's walk: the revoked device's old identity key was still in the operator's folder, and `keys
    certify --request … --revocations` answered "remove the stale device-2.identity.pem", a fix after which the
    id is refused anyway. The revocation is what makes the request uncertifiable, so it is said first."""
    _, key = authority
    node, other, op, crl = (tmp_path / n for n in ("node", "other", "op", "revoked.bin"))
    assert cli("keys", "identity", "--device", 2, "--out", node).exit_code == 0
    assert cli("keys", "identity", "--device", 2, "--out", other).exit_code == 0  # another key for the id
    op.mkdir()
    (op / "device-2.identity.pem").write_bytes((other / "device-2.identity.pem").read_bytes())
    r = cli("keys", "revoke", "--authority-key", key, "--out", crl, "--device", 2)
    assert r.exit_code == 0, r.output
    r = cli("keys", "certify", "--authority-key", key, "--out", op, "--request", node / "device-2.request",
            "--revocations", crl)  # fmt: skip
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "device-2 is revoked in" in flat and "stale" not in flat, flat
    assert not (op / "device-2.cert").exists()


def test_without_node_dir_a_request_whose_key_is_not_in_out_is_told_to_give_node_dir(
    cli, authority, tmp_path
) -> None:
    """Walking docs/fleet.md with device-made keys, `keys certify --request` printed a --node-config naming
    OUT/device-I.identity.pem, a file that does not exist (the key stays on the device): it now says so."""
    _, key = authority
    assert cli("keys", "identity", "--device", 2, "--out", tmp_path / "node").exit_code == 0
    r = cli("keys", "certify", "--authority-key", key, "--out", tmp_path / "op", "--request",
            tmp_path / "node" / "device-2.request")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "device-2: no identity key in" in _flat(r.output)
    assert "give --node-dir DIR" in _flat(r.output)
    # the node and the operator sharing the folder: the key is there, no note
    assert cli("keys", "identity", "--device", 3, "--out", tmp_path / "shared").exit_code == 0
    r = cli("keys", "certify", "--authority-key", key, "--out", tmp_path / "shared", "--request",
            tmp_path / "shared" / "device-3.request")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "note:" not in r.output
