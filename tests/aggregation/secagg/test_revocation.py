"""Certificate revocation: the enrollment authority's signed revocation list, strict on the wire, and a revoked
device's advertisement refused by every honest device holding the list (the round fails closed) and by a server
given it (the round goes on without the device); an unrevoked fleet is unaffected.

The sybil these tests refuse is real: whoever holds a leaked identity key signs advertisements that verify under
the device's genuine certificate, so without revocation every device accepts them.
"""

import dataclasses
import struct

import numpy as np
import pytest
from tests.aggregation.secagg import test_identity
from tests.aggregation.secagg.test_identity import EXPIRES, NOW, N, _cfg, _codes

from deltaplane.aggregation.secagg import (
    DeviceCredentials,
    DeviceIdentity,
    EnrollmentAuthority,
    RevocationList,
    SecAggAuthError,
    SecAggClient,
    SecAggError,
    SecAggServer,
    Stage,
)
from deltaplane.aggregation.secagg.revocation import (
    MAX_REVOKED,
    REVOCATIONS_MAX_BYTES,
    load_revocations,
    revoke,
    write_revocations,
)
from deltaplane.errors import ConfigError, DecodeError

REVOKED = 4
authority = test_identity.authority  # the module-scoped fixture: one enrollment authority


@pytest.fixture(scope="module")
def idents(authority) -> dict[int, DeviceIdentity]:
    return {
        u: DeviceIdentity.enroll(authority, f"device-{u}", cohort="fleet", expires=EXPIRES) for u in range(N)
    }


@pytest.fixture(scope="module")
def crl(authority) -> RevocationList:
    return revoke(authority, [(f"device-{REVOKED}", "fleet")], issued=int(NOW))


def _creds(authority, idents, revocations=None) -> dict[int, DeviceCredentials]:
    trust = authority.trust()
    return {u: DeviceCredentials(i, trust, lambda: NOW, revocations) for u, i in idents.items()}


def _clients(cfg, creds) -> dict[int, SecAggClient]:
    return {
        u: SecAggClient(u, cfg, randbytes=np.random.default_rng(100 + u).bytes, credentials=c, session=b"m/1")
        for u, c in creds.items()
    }


def _round(clients: dict[int, SecAggClient], server: SecAggServer) -> np.ndarray:
    """The rest of an authenticated round after key advertisement, every client in ``clients`` present."""
    codes, roster = _codes(), server.roster()
    for c in clients.values():
        server.receive_shares(c.share_keys(roster))
    server.close_shares()
    for u, c in clients.items():
        server.receive_masked_input(c.masked_input(server.inbox(u), codes[u]))
    req = server.unmask_request()
    for c in clients.values():
        server.receive_signature(c.sign_survivors(req))
    sigs = server.survivor_signatures()
    for c in clients.values():
        server.receive_unmask(c.unmask(req, sigs))
    return server.result()


# -- the list itself ----------------------------------------------------------------------------------------


def test_round_trip_append_and_canonical_form(authority, crl) -> None:
    assert RevocationList.verified(crl.to_bytes(), authority.trust()) == crl
    assert crl.sequence == 1 and crl.revoked == {(f"device-{REVOKED}", "fleet")}
    more = revoke(authority, [("device-1", "fleet"), ("device-0", "lab")], issued=int(NOW) + 5, previous=crl)
    assert more.sequence == 2 and len(more.revoked) == 3 and more.issued == int(NOW) + 5
    again = revoke(authority, [("device-1", "fleet")], issued=int(NOW) + 9, previous=more)
    assert again.revoked == more.revoked and again.sequence == 3  # revoking twice is harmless, still numbered
    # one encoding per list: entries swapped out of order are refused, even under a valid signature
    body = more.signed_part()
    head, e = body[:41], body[41:]  # the head: 4 + 1 + 8 + 8 + 8 + 8 + 2 + 2 bytes (version 3: no keys here)
    entries, pos = [], 0
    while pos < len(e):
        n = e[pos]
        m = e[pos + 1 + n]
        entries.append(e[pos : pos + 2 + n + m])
        pos += 2 + n + m
    swapped = head + entries[1] + entries[0] + b"".join(entries[2:])
    with pytest.raises(DecodeError, match="out of order or repeated"):
        RevocationList.from_bytes(swapped + authority.sign_revocations(swapped))


def test_forged_truncated_and_oversized_lists_are_refused(authority, crl) -> None:
    trust = authority.trust()
    # valid structure, wrong signer: another authority's list, relabelled as ours
    rogue = EnrollmentAuthority.generate()
    forged = dataclasses.replace(revoke(rogue, [], issued=int(NOW)), authority=authority.id)
    with pytest.raises(SecAggAuthError, match="forged or altered"):
        RevocationList.verified(forged.to_bytes(), trust)
    with pytest.raises(SecAggAuthError, match="does not trust"):
        RevocationList.verified(revoke(rogue, [], issued=int(NOW)).to_bytes(), trust)
    # an entry removed from a genuine list (the signature no longer covers it)
    emptied = dataclasses.replace(crl, revoked=frozenset())
    with pytest.raises(SecAggAuthError, match="forged or altered"):
        RevocationList.verified(emptied.to_bytes(), trust)
    # a certificate signature is not a revocation-list signature (domain separation)
    body = crl.signed_part()
    cert_sig = authority._key.sign(b"deltaplane/secagg/device-certificate/v1\x00" + body)
    with pytest.raises(SecAggAuthError, match="forged or altered"):
        RevocationList.verified(body + cert_sig, trust)
    data = crl.to_bytes()
    for cut in (1, 64, 65, len(data) - 30):
        with pytest.raises(SecAggAuthError, match="refused revocation list"):
            RevocationList.verified(data[:-cut], trust)
    with pytest.raises(DecodeError, match="bytes after"):
        RevocationList.from_bytes(body + b"\0" + crl.signature)
    with pytest.raises(DecodeError, match="magic"):
        RevocationList.from_bytes(b"DPRX" + data[4:])
    too_many = struct.pack(">4sB8sQQQH", b"DPRL", 2, authority.id, 1, 1, 2, MAX_REVOKED + 1) + bytes(64)
    with pytest.raises(DecodeError, match="at most 4096"):
        RevocationList.from_bytes(too_many)
    with pytest.raises(DecodeError, match="bytes; got"):
        RevocationList.from_bytes(bytes(REVOCATIONS_MAX_BYTES + 1))
    with pytest.raises(ConfigError, match="1 to 64"):
        revoke(authority, [("x" * 65, "fleet")], issued=1)
    with pytest.raises(ConfigError, match="not this key's"):
        revoke(rogue, [("a", "b")], issued=1, previous=crl)


def test_a_device_never_rolls_its_list_back(authority, idents, crl) -> None:
    newer = revoke(authority, [("device-1", "fleet")], issued=int(NOW), previous=crl)
    creds = _creds(authority, idents, newer)[0]
    with pytest.raises(SecAggAuthError, match="number 1: this device holds number 2"):
        creds.with_revocations(crl)
    # the same number with other contents (an equivocating list): refused too
    twin = revoke(authority, [("device-2", "fleet")], issued=int(NOW), previous=crl)
    with pytest.raises(SecAggAuthError, match="never goes back"):
        creds.with_revocations(twin)
    assert creds.with_revocations(newer) is creds
    newest = revoke(authority, [], issued=int(NOW), previous=newer)
    assert creds.with_revocations(newest).revocations == newest
    assert _creds(authority, idents)[0].with_revocations(crl).revocations == crl
    # credentials refuse a list their authority did not sign, however they are built
    with pytest.raises(SecAggAuthError, match="does not trust"):
        DeviceCredentials(idents[0], EnrollmentAuthority.generate().trust(), revocations=crl)


def test_credentials_read_the_list_from_file(tmp_path, authority, idents, crl) -> None:
    (tmp_path / "k.pem").write_bytes(idents[0].key_pem())
    (tmp_path / "c").write_bytes(idents[0].certificate.to_bytes())
    (tmp_path / "a.pub").write_text(authority.public_text() + "\n")
    write_revocations(tmp_path / "crl", crl)
    files = [tmp_path / n for n in ("k.pem", "c", "a.pub")]
    assert DeviceCredentials.from_files(*files, revocations=tmp_path / "crl").revocations == crl
    assert DeviceCredentials.from_files(*files).revocations is None
    (tmp_path / "bad").write_bytes(crl.to_bytes()[:-1])
    with pytest.raises(SecAggAuthError, match="bad: refused revocation list"):
        DeviceCredentials.from_files(*files, revocations=tmp_path / "bad")
    with pytest.raises(ConfigError, match="cannot read revocation list"):
        load_revocations(tmp_path / "missing", authority.trust())


# -- rounds -------------------------------------------------------------------------------------------------


def test_a_sybil_with_a_leaked_key_is_accepted_without_revocation(authority, idents) -> None:
    # the premise: device-4's leaked identity key signs keys of the thief's own, and every device accepts them
    cfg = _cfg()
    clients = _clients(cfg, _creds(authority, idents))
    thief = SecAggClient(REVOKED, cfg, credentials=_creds(authority, idents)[REVOKED], session=b"m/1")
    server = SecAggServer(cfg, authenticated=True)
    for u, c in clients.items():
        server.receive_keys((thief if u == REVOKED else c).advertise_keys())
    roster = server.roster()
    for u in range(N):
        if u != REVOKED:
            clients[u].share_keys(roster)  # accepted: nothing tells device-4's key from its thief


def test_every_honest_device_refuses_a_revoked_slot_and_the_round_fails_closed(
    authority, idents, crl
) -> None:
    # a server without the list (or colluding with the key's thief) seats device-4's certificate in slot 4
    cfg = _cfg()
    thief = SecAggClient(REVOKED, cfg, credentials=_creds(authority, idents)[REVOKED], session=b"m/1")
    clients = _clients(cfg, _creds(authority, idents, crl))
    server = SecAggServer(cfg, authenticated=True)
    for u, c in clients.items():
        server.receive_keys((thief if u == REVOKED else c).advertise_keys())
    roster = server.roster()
    for u, c in clients.items():
        if u == REVOKED:
            continue
        with pytest.raises(
            SecAggAuthError, match=f"roster slot {REVOKED}: device 'device-4'.*revoked"
        ) as exc:
            c.share_keys(roster)
        assert exc.value.client == REVOKED and c.stage == Stage.ADVERTISE  # nothing sent, state unchanged
    # the thief alone shares keys: below the threshold, so the round cannot go on (it fails closed)
    server.receive_shares(thief.share_keys(roster))
    with pytest.raises(SecAggError, match="only 1 clients shared keys"):
        server.close_shares()


def test_a_server_given_the_list_refuses_the_revoked_device_and_the_round_goes_on(
    authority, idents, crl
) -> None:
    cfg = _cfg()
    clients = _clients(cfg, _creds(authority, idents, crl))
    server = SecAggServer(cfg, authenticated=True, revocations=crl)
    with pytest.raises(SecAggAuthError, match="'device-4'.*revoked") as exc:
        server.receive_keys(clients[REVOKED].advertise_keys())
    assert exc.value.client == REVOKED and REVOKED not in server.keys
    rest = {u: c for u, c in clients.items() if u != REVOKED}
    for c in rest.values():
        server.receive_keys(c.advertise_keys())
    codes = _codes()
    assert np.array_equal(_round(rest, server), sum(codes[u].astype(np.uint64) for u in rest))


def test_an_unrevoked_fleet_is_unaffected(authority, idents) -> None:
    cfg = _cfg()
    other = revoke(authority, [("device-9", "fleet"), ("device-1", "lab")], issued=int(NOW))
    server = SecAggServer(cfg, authenticated=True, revocations=other)
    clients = _clients(cfg, _creds(authority, idents, other))
    for c in clients.values():
        server.receive_keys(c.advertise_keys())
    assert np.array_equal(_round(clients, server), sum(c.astype(np.uint64) for c in _codes().values()))
