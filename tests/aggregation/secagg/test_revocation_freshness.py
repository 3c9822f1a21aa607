"""Revocation lists' next update, the version-1 format refused, and the one way a device or server takes a newer
list: expired, forged, rolled-back and oversized lists are refused, and a restarted device keeps its sequence.

Expected times are written out as numbers (the wire offset of the next update, 7 days = 604,800 s, the 300 s
skew), not computed with the module's own constants.
"""

import struct

import pytest
from tests.aggregation.secagg import test_identity
from tests.aggregation.secagg.test_identity import EXPIRES, NOW

from deltaplane.aggregation.secagg import DeviceCredentials, DeviceIdentity, EnrollmentAuthority
from deltaplane.aggregation.secagg.errors import RevocationRollback, RevocationsStale, SecAggAuthError
from deltaplane.aggregation.secagg.identity import check_round_authentication
from deltaplane.aggregation.secagg.revocation import (
    RevocationList,
    RevocationMark,
    load_revocations,
    replace_server_revocations,
    revoke,
    take_revocations,
    write_revocations,
)
from deltaplane.errors import ConfigError, DecodeError

authority = test_identity.authority  # the module-scoped fixture
ISSUED = int(NOW)  # 1_800_000_000
WEEK_LATER = 1_800_604_800


def _creds(authority, clock=lambda: NOW, revocations=None) -> DeviceCredentials:
    ident = DeviceIdentity.enroll(authority, "device-0", cohort="fleet", expires=EXPIRES)
    return DeviceCredentials(ident, authority.trust(), clock, revocations)


def _check(creds) -> None:
    check_round_authentication(True, creds, 7, this="device", enrolled_as="x", stale_fix="FETCH-A-NEW-ONE")


def test_next_update_is_on_the_wire_and_signed(authority) -> None:
    rl = revoke(authority, [("device-3", "fleet")], issued=ISSUED)
    data = rl.to_bytes()
    assert data[:5] == b"DPRL\x03"  # version 3: revoked keys too (docs/security.md)
    # magic 4, version 1, authority 8, sequence 8, issued 8: the next update is bytes 29..37
    assert struct.unpack(">QQQ", data[13:37]) == (1, ISSUED, WEEK_LATER)
    assert rl.next_update == WEEK_LATER
    assert revoke(authority, [], issued=ISSUED, valid_s=3600).next_update == 1_800_003_600
    # moving the next update breaks the signature: a server cannot extend a list's life
    later = data[:29] + struct.pack(">Q", WEEK_LATER + 10**6) + data[37:]
    with pytest.raises(SecAggAuthError, match="forged or altered"):
        RevocationList.verified(later, authority.trust())
    for bad in (0, 90 * 86_400 + 1):
        with pytest.raises(ConfigError, match="1 s to 90 days"):
            revoke(authority, [], issued=ISSUED, valid_s=bad)


def test_a_device_refuses_authenticated_rounds_once_its_list_is_stale(authority) -> None:
    rl = revoke(authority, [("device-3", "fleet")], issued=ISSUED)
    _check(_creds(authority, lambda: float(WEEK_LATER), rl))
    _check(_creds(authority, lambda: WEEK_LATER + 300.0, rl))  # within the stated clock skew
    with pytest.raises(RevocationsStale, match="FETCH-A-NEW-ONE") as exc:
        _check(_creds(authority, lambda: WEEK_LATER + 301.0, rl))
    assert exc.value.next_update == WEEK_LATER and "1800604800" in str(exc.value)
    # an operator reads the dates, not only unix seconds (walking docs/fleet.md's stale list)
    assert "(2027-01-22 08:00:00 UTC: its next update" in str(exc.value)
    assert "(2027-01-22 08:05:01 UTC)" in str(exc.value)
    assert isinstance(exc.value, SecAggAuthError)
    _check(_creds(authority, lambda: 4e9))  # no list held: nothing to expire (revocation is opt-in)
    # an unauthenticated round is refused for the enrollment (as before), not the list
    with pytest.raises(SecAggAuthError, match="not authenticated"):
        check_round_authentication(
            False, _creds(authority, lambda: 4e9, rl), 7, this="device", enrolled_as="x", stale_fix=""
        )


def _v1(authority, revoked: list[tuple[str, str]], sequence: int) -> bytes:
    """A version-1 list (before next updates) as the earlier code signed it, built by hand."""
    entries = sorted(bytes([len(d)]) + d.encode() + bytes([len(c)]) + c.encode() for d, c in revoked)
    body = struct.pack(">4sB8sQQH", b"DPRL", 1, authority.id, sequence, ISSUED, len(entries))
    body += b"".join(entries)
    return body + authority._key.sign(b"deltaplane/secagg/revocation-list/v1\x00" + body)


def test_a_version_1_list_is_refused_and_re_issued_by_keys_revoke(authority, tmp_path) -> None:
    old = tmp_path / "revoked.bin"
    old.write_bytes(_v1(authority, [("device-3", "fleet")], sequence=4))
    with pytest.raises(SecAggAuthError, match="version-1 .* re-issue it with `deltaplane keys revoke"):
        load_revocations(old, authority.trust())
    with pytest.raises(DecodeError, match="no next update"):
        RevocationList.from_bytes(old.read_bytes())
    legacy = load_revocations(old, authority.trust(), legacy=True)
    assert (legacy.version, legacy.sequence, legacy.revoked) == (1, 4, {("device-3", "fleet")})
    new = revoke(authority, [], issued=ISSUED, previous=legacy)
    assert (new.version, new.sequence, new.revoked) == (3, 5, {("device-3", "fleet")})
    assert RevocationList.verified(new.to_bytes(), authority.trust()) == new


def test_take_keeps_the_newest_list_and_a_restarted_device_refuses_a_rollback(authority, tmp_path) -> None:
    first = revoke(authority, [("device-3", "fleet")], issued=ISSUED)
    second = revoke(authority, [("device-5", "fleet")], issued=ISSUED + 60, previous=first)
    kept = tmp_path / "device-0.revocations"
    creds = take_revocations(_creds(authority), first.to_bytes(), keep=kept)
    creds = take_revocations(creds, second.to_bytes(), keep=kept)
    assert creds.revocations == second and kept.read_bytes() == second.to_bytes()
    assert take_revocations(creds, second.to_bytes(), keep=kept) is creds  # the very list: unchanged
    # a man in the middle (or the service) replays the older, still-current list: refused, file untouched
    with pytest.raises(RevocationRollback, match="number 1: this device holds number 2"):
        take_revocations(creds, first.to_bytes(), keep=kept)
    assert kept.read_bytes() == second.to_bytes()
    # the device restarts: it reads its kept list, and still refuses the rollback
    restarted = _creds(authority, revocations=load_revocations(kept, authority.trust()))
    with pytest.raises(RevocationRollback):
        take_revocations(restarted, first.to_bytes(), keep=kept)
    # forged (another authority's key, relabelled) and truncated lists: refused, file untouched
    rogue = revoke(EnrollmentAuthority.generate(), [], issued=ISSUED + 120)
    forged = RevocationList(authority.id, 9, ISSUED, WEEK_LATER, frozenset(), rogue.signature)
    for bad in (forged.to_bytes(), second.to_bytes()[:-1], bytes(700_000)):
        with pytest.raises(SecAggAuthError, match="refused revocation list|forged or altered"):
            take_revocations(restarted, bad, keep=kept)
    assert kept.read_bytes() == second.to_bytes()


def test_a_server_replaces_its_list_only_with_a_newer_current_authentic_one(authority, tmp_path) -> None:
    path, trust = tmp_path / "server.bin", authority.trust()
    first = revoke(authority, [("device-3", "fleet")], issued=ISSUED)
    second = revoke(authority, [("device-5", "fleet")], issued=ISSUED, previous=first)
    assert replace_server_revocations(path, first.to_bytes(), trust, now=NOW) == (first, True)
    assert replace_server_revocations(path, second.to_bytes(), trust, now=NOW) == (second, True)
    assert replace_server_revocations(path, second.to_bytes(), trust, now=NOW) == (second, False)
    with pytest.raises(RevocationRollback):
        replace_server_revocations(path, first.to_bytes(), trust, now=NOW)
    with pytest.raises(RevocationsStale):  # newer, but already past its next update: not stored
        replace_server_revocations(
            path,
            revoke(authority, [], issued=ISSUED, previous=second).to_bytes(),
            trust,
            now=WEEK_LATER + 301,
        )
    with pytest.raises(SecAggAuthError, match="does not trust"):
        replace_server_revocations(
            path, revoke(EnrollmentAuthority.generate(), [], issued=ISSUED).to_bytes(), trust, now=NOW
        )
    with pytest.raises(DecodeError, match="bytes; got"):
        replace_server_revocations(path, bytes(700_000), trust, now=NOW)
    assert path.read_bytes() == second.to_bytes()
    # a held file that no longer decodes is repaired by an upload; a held version-1 list is compared by number
    path.write_bytes(b"garbage")
    assert replace_server_revocations(path, first.to_bytes(), trust, now=NOW)[1] is True
    path.write_bytes(_v1(authority, [], sequence=3))
    with pytest.raises(RevocationRollback):
        replace_server_revocations(path, second.to_bytes(), trust, now=NOW)
    write_revocations(path, first)
    assert replace_server_revocations(path, second.to_bytes(), trust, now=NOW)[1] is True


def test_a_list_of_the_retired_authority_is_refused_as_retired_not_as_a_new_one(authority, tmp_path) -> None:
    """Walking docs/security.md's authority change, a list issued by mistake with the *old* authority's key after
    the change was refused with "put the new authority's public key … in place of the old one": advice that
    would put the retired key back. The service's marks know the old authority: the refusal now says so."""
    path, new = tmp_path / "server.bin", EnrollmentAuthority.generate()
    stale_key = revoke(authority, [("device-3", "fleet")], issued=ISSUED)
    marks = {authority.id: RevocationMark(authority.id, 4, "0" * 64)}
    with pytest.raises(SecAggAuthError, match=r"held that authority's lists before \(up to number 4\)") as e:
        replace_server_revocations(path, stale_key.to_bytes(), new.trust(), now=NOW, marks=marks)
    assert "do not put its key back" in str(e.value) and "in place of the old one" not in str(e.value)
    # an authority the service never held: possibly the new one, as before
    with pytest.raises(SecAggAuthError, match="in place of the old one"):
        replace_server_revocations(path, stale_key.to_bytes(), new.trust(), now=NOW, marks={})
    assert not path.exists()
