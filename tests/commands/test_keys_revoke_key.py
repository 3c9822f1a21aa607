"""Revoking a device's identity *key*, not only its id: ``keys revoke`` finds device-3's certificate in the
enrollment folder and records its key (revocation list version 3), so the leaked key asking to be certified as
device-9 (a fresh certification request it signed) is refused by ``keys certify --revocations``; revoking an id
with no certificate at hand says the key is not covered. A version-2 list (ids only) is still read with that
meaning, and a forged list is still refused."""

from __future__ import annotations

import hashlib
import struct
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from deltaplane.aggregation.secagg import CertificationRequest, DeviceCertificate, SecAggAuthError
from deltaplane.aggregation.secagg.revocation import RevocationList, load_revocations


def _flat(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


@pytest.fixture
def leak(cli, authority, tmp_path):
    """device-3 made its key on the device and was certified; then its key leaked, and the list the CLI wrote
    revokes it (found in the enrollment folder). Returns the folders, the key's raw public half and the list."""
    auth, pem = authority
    device, enrolled = tmp_path / "device", tmp_path / "enrolled"
    assert cli("keys", "identity", "--device", 3, "--out", device).exit_code == 0
    r = cli(
        "keys", "certify", "--authority-key", pem, "--out", enrolled, "--request", device / "device-3.request"
    )
    assert r.exit_code == 0, r.output
    out = tmp_path / "revoked.bin"
    r = cli("keys", "revoke", "--authority-key", pem, "--device", 3, "--enrolled", enrolled, "--out", out)
    assert r.exit_code == 0, r.output
    key = load_pem_private_key((device / "device-3.identity.pem").read_bytes(), password=None)
    raw = key.public_key().public_bytes_raw()
    fp = hashlib.sha256(raw).hexdigest()[:16]
    assert f"device-3: key SHA256:{fp}… revoked under any device id" in _flat(r.output)
    return {"auth": auth, "pem": pem, "key": key, "raw": raw, "out": out, "tmp": tmp_path}


def test_the_list_keys_revoke_writes_names_device_3s_key_and_is_the_authoritys(leak) -> None:
    data = leak["out"].read_bytes()
    # read without the library's decoder: version 3, the key's SHA-256 right before the signature, signed
    assert data[:5] == b"DPRL\x03"
    assert data[-64 - 32 : -64] == hashlib.sha256(leak["raw"]).digest()
    assert struct.unpack(">HH", data[37:41]) == (1, 1)  # one device entry, one key
    Ed25519PublicKey.from_public_bytes(leak["auth"].public_raw).verify(
        data[-64:], b"deltaplane/secagg/revocation-list/v1\x00" + data[:-64]
    )
    rl = load_revocations(leak["out"], leak["auth"].trust())
    assert rl.revoked == {("device-3", "fleet")} and rl.names_key(leak["raw"])


def test_the_leaked_key_asking_for_device_9_is_refused_by_keys_certify(cli, leak) -> None:
    thief = leak["tmp"] / "thief"
    thief.mkdir()
    req = thief / "device-9.request"
    req.write_bytes(CertificationRequest.sign(leak["key"], "device-9", cohort="fleet").to_bytes())
    r = cli(
        "keys", "certify", "--authority-key", leak["pem"], "--out", thief, "--request", req,
        "--revocations", leak["out"],
    )  # fmt: skip
    said = _flat(r.output)
    # exit 2 as for a revoked id (docs/cli.md: an input refused before any work is a usage error); it was 1
    assert r.exit_code == 2 and "revokes that key" in said and "as device-9" in said, said
    assert "keys identity" in said and not (thief / "device-9.cert").exists()
    # a fresh key's request for device-9 is certified under the same list (the id is free, the key new)
    assert cli("keys", "identity", "--device", 9, "--out", leak["tmp"] / "new").exit_code == 0
    r = cli(
        "keys", "certify", "--authority-key", leak["pem"], "--out", thief,
        "--request", leak["tmp"] / "new" / "device-9.request", "--revocations", leak["out"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    cert = DeviceCertificate.from_bytes((thief / "device-9.cert").read_bytes())
    assert cert.identity_public != leak["raw"]


def test_revoking_an_id_with_no_certificate_at_hand_says_its_key_is_not_covered(
    cli, authority, tmp_path
) -> None:
    auth, pem = authority
    out = tmp_path / "revoked.bin"
    r = cli("keys", "revoke", "--authority-key", pem, "--device", 5, "--out", out)
    assert r.exit_code == 0 and "device-5: its id only; its key is not covered" in _flat(r.output), r.output
    rl = load_revocations(out, auth.trust())
    assert rl.revoked == {("device-5", "fleet")} and rl.keys == frozenset()


def _v2(auth, revoked: list[tuple[str, str]], sequence: int, next_update: int) -> bytes:
    """A version-2 list as the earlier code signed it (devices only), built by hand."""
    entries = sorted(bytes([len(d)]) + d.encode() + bytes([len(c)]) + c.encode() for d, c in revoked)
    body = struct.pack(">4sB8sQQQH", b"DPRL", 2, auth.id, sequence, 1, next_update, len(entries))
    body += b"".join(entries)
    return body + auth._key.sign(b"deltaplane/secagg/revocation-list/v1\x00" + body)


def test_a_version_2_list_keeps_its_meaning_and_keys_revoke_re_issues_it(cli, authority, tmp_path) -> None:
    auth, pem = authority
    out = tmp_path / "revoked.bin"
    out.write_bytes(_v2(auth, [("device-3", "fleet")], sequence=4, next_update=4_000_000_000))
    rl = load_revocations(out, auth.trust())
    assert (rl.version, rl.sequence, rl.revoked, rl.keys) == (2, 4, {("device-3", "fleet")}, frozenset())
    assert rl.to_bytes() == out.read_bytes()  # re-encoded as read: its signature and digest unchanged
    # its meaning: device-3 revoked by id; its key certified under another id is not (version 2 names no keys)
    key = load_pem_private_key(auth.to_pem(), password=None)  # any key: the point is the id
    raw = key.public_key().public_bytes_raw()
    exp = 4_000_000_000
    assert rl.names(auth.issue("device-3", raw, cohort="fleet", expires=exp))
    assert not rl.names(auth.issue("device-9", raw, cohort="fleet", expires=exp))
    r = cli("keys", "revoke", "--authority-key", pem, "--out", out)  # re-issue: version 3, the same devices
    assert r.exit_code == 0, r.output
    new = load_revocations(out, auth.trust())
    assert (new.version, new.sequence, new.revoked) == (3, 5, {("device-3", "fleet")})


def test_a_forged_list_is_still_refused(cli, leak) -> None:
    data = bytearray(leak["out"].read_bytes())
    data[-64 - 1] ^= 1  # one bit of the revoked key's digest: the signature no longer covers it
    with pytest.raises(SecAggAuthError, match="forged or altered"):
        RevocationList.verified(bytes(data), leak["auth"].trust())
    forged = leak["tmp"] / "forged.bin"
    forged.write_bytes(bytes(data))
    r = cli(
        "keys", "certify", "--authority-key", leak["pem"], "--out", leak["tmp"] / "x", "--device", 1,
        "--revocations", forged,
    )  # fmt: skip
    assert r.exit_code == 2 and "forged or altered" in _flat(r.output), r.output


def test_a_newer_version_is_refused_by_name(leak) -> None:
    data = bytearray(leak["out"].read_bytes())
    data[4] = 4
    with pytest.raises(SecAggAuthError, match="v4.*newer deltaplane; upgrade"):
        RevocationList.verified(bytes(data), leak["auth"].trust())


def test_a_new_authority_carries_the_old_lists_revoked_key(cli, leak) -> None:
    """Changing the enrollment authority (docs/security.md): `keys revoke --carry` brings the old list's ids and
    keys into the new authority's first list, so the leaked key's request is refused under the new authority too."""
    new_dir = leak["tmp"] / "new-authority"
    assert cli("keys", "enrollment", "--out", new_dir).exit_code == 0
    new_pem, new_list = new_dir / "enrollment.ed25519.pem", new_dir / "revoked.bin"
    r = cli("keys", "revoke", "--authority-key", new_pem, "--carry", leak["out"], "--out", new_list)
    assert r.exit_code == 0, r.output
    data = new_list.read_bytes()
    assert data[5:13] != leak["out"].read_bytes()[5:13]  # another authority's list
    assert hashlib.sha256(leak["raw"]).digest() in data and b"device-3" in data
    req = leak["tmp"] / "device-3.request"
    req.write_bytes(CertificationRequest.sign(leak["key"], "device-3", cohort="fleet").to_bytes())
    r = cli(
        "keys", "certify", "--authority-key", new_pem, "--out", leak["tmp"] / "re", "--request", req,
        "--revocations", new_list,
    )  # fmt: skip
    assert r.exit_code != 0 and "revokes that key" in _flat(r.output), r.output


def _re_enrolled(leak, name: str, kept: str):
    """device-3 re-enrolled under a new authority in folder ``name`` (its key ``k.pem``, certificate ``c.cert``
    and the new authority's ``a.pub``), still keeping the old authority's list in ``kept``: the new authority,
    the folder and the kept file."""
    from deltaplane.aggregation.secagg import DeviceIdentity, EnrollmentAuthority

    new = EnrollmentAuthority.generate()
    ident = DeviceIdentity.enroll(new, "device-3", cohort="fleet", expires=4_000_000_000)
    d = leak["tmp"] / name
    d.mkdir()
    (d / "k.pem").write_bytes(ident.key_pem())
    (d / "c.cert").write_bytes(ident.certificate.to_bytes())
    (d / "a.pub").write_text(new.public_text() + "\n")
    (d / kept).write_bytes(leak["out"].read_bytes())  # the old authority's list
    return new, d, d / kept


def test_a_device_re_enrolled_under_a_new_authority_says_to_remove_its_old_list(leak) -> None:
    """Step 3 of changing the authority: a device given the new authority's certificate and key file, still
    keeping the old authority's list, refuses to start saying to remove that file (it fetches the new one)."""
    from deltaplane.commands.fleet import _credentials as fleet_credentials

    _, d, kept = _re_enrolled(leak, "dev", "device-3.revocations")
    with pytest.raises(SecAggAuthError, match=f"does not trust.*remove {kept}"):
        fleet_credentials(d / "k.pem", d / "c.cert", d / "a.pub", kept)
    kept.unlink()
    assert fleet_credentials(d / "k.pem", d / "c.cert", d / "a.pub", kept).revocations is None


def test_a_flower_node_re_enrolled_under_a_new_authority_says_to_replace_its_old_list(leak) -> None:
    """The Flower node's step 3 of changing the authority: a node given the new authority's certificate and key
    file, its `secagg-revocations` still holding the old authority's list, refused the stage with the generic
    "does not trust" alone. It says now to write the new authority's list there (same exception type), and takes
    that list once written."""
    from deltaplane.aggregation.secagg.revocation import revoke, write_revocations
    from deltaplane.flower.secagg import node_credentials

    new, d, kept = _re_enrolled(leak, "node", "revoked.bin")
    config = {
        "secagg-identity-key": str(d / "k.pem"),
        "secagg-certificate": str(d / "c.cert"),
        "secagg-enrollment-authority": str(d / "a.pub"),
        "secagg-revocations": str(kept),
    }
    with pytest.raises(SecAggAuthError, match=f"does not trust.*write the new authority's list to {kept}"):
        node_credentials(config)
    write_revocations(kept, revoke(new, [("device-9", "fleet")], issued=int(time.time()), valid_s=86_400))
    assert node_credentials(config).revocations.revoked == {("device-9", "fleet")}
