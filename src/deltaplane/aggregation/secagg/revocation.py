"""Revoking device certificates before they expire: a revocation list signed by the enrollment authority.

A device certificate (:class:`~deltaplane.aggregation.secagg.identity.DeviceCertificate`) is valid until its
expiry. If a device's identity key leaks before then, whoever holds it can sign key advertisements as that
device, and a server colluding with them can seat a sybil in the device's roster slot. The standard remedy is a
certificate revocation list (RFC 5280 §5, in spirit): the issuing authority signs the list of certificates it
withdraws, with a sequence number that only grows, and every relying party refuses what the list names.

What is revoked is a *device in a cohort*, ``(device id, cohort)`` under the list's authority, and, since
version 3, the device's *identity key*: a certificate carries no serial number, and the pair is what a device's
neighbours check it by (the device id binds its advertisement, the cohort its neighbourhood). So a revocation
covers every certificate that authority ever issued the device in that cohort, including ones the operator no
longer has a copy of; a replacement device is enrolled under a new device id. The pair alone would not stop the
leaked key itself: a certification request for a new id signed by it, or a certificate for it issued under
another id, names no revoked pair. So the list also names revoked keys by their SHA-256
(:func:`~deltaplane.aggregation.secagg.identity.key_fingerprint` of the raw Ed25519 key a certificate binds), and
every relying party refuses a certificate binding one, whatever id, cohort or authority it names
(:class:`~deltaplane.aggregation.secagg.errors.KeyRevoked`: the device generates a new key).

The encoding is fixed-layout and strict (no canonical JSON to get wrong), at most :data:`REVOCATIONS_MAX_BYTES`::

    magic "DPRL" | version 3 (1 byte) | authority id (8) | sequence (u64) | issued (u64, unix s)
    next update (u64, unix s) | count (u16) | key count (u16)
    count × [len (1) | device id (UTF-8) | len (1) | cohort (UTF-8)], strictly increasing, no repeats
    key count × [SHA-256 of a revoked identity public key (32)], strictly increasing, no repeats
    signature (64): Ed25519 by the authority over a domain tag and everything before it

Version 2 is the same without the key count and keys: it is still read, with its meaning (devices only), and
re-issued as version 3 by ``keys revoke``; a reader of version 2 refuses a version-3 list by its version byte
("not a version-2 revocation list (…, v3)") rather than misread it, as version-1 readers refused version 2.

A list is *current* until its next update (RFC 5280 §5.1.2.5, ``nextUpdate``), plus :data:`CLOCK_SKEW_S` for
clocks that disagree: past it, a device refuses authenticated rounds and a server refuses to open them
(:meth:`RevocationList.check_current`, :class:`~deltaplane.aggregation.secagg.errors.RevocationsStale`), so a
server that withholds a newer list can do so for at most one validity period (``keys revoke --valid-days``),
not for the whole life of the certificates. Version 1 lists had no next update and are refused by name: re-issue
one with ``deltaplane keys revoke``, which reads it (:func:`load_revocations` with ``legacy=True``) and signs its
devices into a version-2 list numbered one past it.

A device holds at most one list (:attr:`DeviceCredentials.revocations
<deltaplane.aggregation.secagg.identity.DeviceCredentials>`) and never trades it for one of a lower sequence
(:meth:`RevocationList.supersedes`); :func:`take_revocations` is the one way a device takes a newer list (from a
file, or from the service's ``GET /v1/secagg/revocations``), keeping it in its file so a restart cannot roll it
back either. A Flower node, whose list is a file its operator replaces, reads it at each stage through
:func:`take_revocations_file`, which keeps the highest list the process has taken from each file, so a file
rolled back to an older list is refused too (:class:`RevocationRollback`) rather than un-revoking devices; a
Flower :class:`~deltaplane.flower.SecAggStrategy` re-reading its file keeps the same per-process mark
(:func:`take_revocations_from_path`). The HTTP service keeps its mark durably, as a :class:`RevocationMark` per
authority in its database (:meth:`~deltaplane.serve.service_store.ServiceStore.hold_revocations`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from deltaplane.aggregation.secagg.errors import (
    KeyRevoked,
    RevocationRollback,
    RevocationsStale,
    SecAggAuthError,
)
from deltaplane.aggregation.secagg.identity import (
    NAME_BYTES,
    SIGNATURE_BYTES,
    DeviceCertificate,
    DeviceCredentials,
    EnrollmentAuthority,
    TrustedAuthorities,
    key_fingerprint,
    read_name,
)
from deltaplane.errors import ConfigError, DecodeError
from deltaplane.textfile import read_bounded_bytes, write_secret_file

__all__ = [
    "CLOCK_SKEW_S",
    "DEFAULT_VALID_DAYS",
    "MAX_REVOKED",
    "MAX_VALID_DAYS",
    "REVOCATIONS_MAX_BYTES",
    "RevocationList",
    "RevocationMark",
    "load_revocations",
    "read_server_revocations",
    "replace_server_revocations",
    "revoke",
    "take_revocations",
    "take_revocations_file",
    "take_revocations_from_path",
    "trusts_kept_list",
    "write_revocations",
]

_MAGIC = b"DPRL"
_VERSION = 3
# magic, version, authority id, sequence, issued (unix s), next update (unix s), entry count, key count
_HEAD = struct.Struct(">4sB8sQQQHH")
_HEAD_V2 = struct.Struct(">4sB8sQQQH")  # version 2: devices only, no revoked keys (read with that meaning)
_HEAD_V1 = struct.Struct(">4sB8sQQH")  # version 1: no next update (read only to re-issue it, keys revoke)
#: how far a list may be past its next update before it is refused: clocks of devices, service and authority
#: disagree by seconds to minutes (the same five minutes Kerberos allows); a list is re-issued days apart
CLOCK_SKEW_S = 300
#: a list's validity (next update minus issue time) when ``keys revoke`` is not told (``--valid-days``)
DEFAULT_VALID_DAYS = 7
#: the longest validity: withholding a newer list goes unnoticed for at most this long
MAX_VALID_DAYS = 90
#: the most devices one list revokes, and the most keys (a fleet that revokes more re-enrolls under a new
#: authority)
MAX_REVOKED = 4096
#: the bytes of a revoked key's entry: the SHA-256 of its raw public key
_KEY_BYTES = 32
#: who trusts the authority key a service verifies its list under, as refusals of another authority's list say
SERVER_HOLDER = "this service (its --secagg-enrollment-authority key)"
#: the largest revocation list: the head, :data:`MAX_REVOKED` entries of two longest names and as many keys, the
#: signature
REVOCATIONS_MAX_BYTES = _HEAD.size + MAX_REVOKED * (2 * (1 + NAME_BYTES) + _KEY_BYTES) + SIGNATURE_BYTES
#: what a refusal of a revoked key tells its device to do
_NEW_KEY = (
    "the device generates a new identity key and is certified anew under a new device id (`deltaplane keys "
    "identity` on the device, then `keys certify --request`; or `fleet enroll --add 1` / `keys certify --add 1`)"
)


def _entry(device: str, cohort: str) -> bytes:
    d, c = device.encode(), cohort.encode()
    for raw, what, text in ((d, "device id", device), (c, "cohort", cohort)):
        if not 1 <= len(raw) <= NAME_BYTES:
            raise ConfigError(f"a revoked {what} is 1 to {NAME_BYTES} UTF-8 bytes. Found {text!r}")
    return bytes([len(d)]) + d + bytes([len(c)]) + c


@dataclass(frozen=True)
class RevocationMark:
    """The highest revocation list of authority ``authority`` a relying party has held: its number ``sequence``
    and the SHA-256 (hex) of its bytes, all it takes to refuse a rollback (:meth:`RevocationList.supersedes`)
    without keeping the list itself (the HTTP service keeps one per authority in its database)."""

    authority: bytes
    sequence: int
    sha256: str


@dataclass(frozen=True)
class RevocationList:
    """The authority ``authority``'s (an :func:`~deltaplane.aggregation.secagg.identity.authority_id`) list of
    revoked ``(device id, cohort)`` pairs and revoked ``keys`` (SHA-256 of identity public keys:
    :func:`~deltaplane.aggregation.secagg.identity.key_fingerprint`), number ``sequence``, issued at ``issued``
    and current until ``next_update`` (unix seconds).

    Only :func:`revoke` (signing) and :meth:`verified` (checking a signature) make one, so a list a device holds
    has always been verified under an authority it trusts. ``version`` is 2 for a list read from the version-2
    encoding (no keys; re-encoded as it was, so its signature still verifies), 1 only for a legacy list read to
    be re-issued (:func:`load_revocations` with ``legacy=True``; its ``next_update`` is 0).
    """

    authority: bytes
    sequence: int
    issued: int
    next_update: int
    revoked: frozenset[tuple[str, str]]
    signature: bytes
    version: int = _VERSION
    keys: frozenset[bytes] = frozenset()

    def signed_part(self) -> bytes:
        """The list's bytes without the signature, entries and keys in their one canonical (sorted) order."""
        entries = sorted(_entry(d, c) for d, c in self.revoked)
        if self.version < _VERSION and self.keys:
            raise ConfigError(
                f"a version-{self.version} revocation list names no keys; issue a version-{_VERSION} one"
            )
        if self.version == 1:
            head = _HEAD_V1.pack(_MAGIC, 1, self.authority, self.sequence, self.issued, len(entries))
        elif self.version == 2:
            head = _HEAD_V2.pack(
                _MAGIC, 2, self.authority, self.sequence, self.issued, self.next_update, len(entries)
            )
        else:
            head = _HEAD.pack(
                _MAGIC,
                _VERSION,
                self.authority,
                self.sequence,
                self.issued,
                self.next_update,
                len(entries),
                len(self.keys),
            )
        return head + b"".join(entries) + b"".join(sorted(self.keys))

    def to_bytes(self) -> bytes:
        """The list on the wire and on disk."""
        return self.signed_part() + self.signature

    def mark(self) -> RevocationMark:
        """This list as a high-water mark: its authority, number and SHA-256 (one encoding per list, so two
        lists of one number have one digest only if they are the same list)."""
        return RevocationMark(self.authority, self.sequence, hashlib.sha256(self.to_bytes()).hexdigest())

    @classmethod
    def from_bytes(cls, data: bytes, *, legacy: bool = False) -> RevocationList:
        """Strict inverse of :meth:`to_bytes`, *signature unchecked* (use :meth:`verified`): anything else, an
        oversized list, or entries out of canonical order, is a :class:`DecodeError` saying what. A version-1
        list (no next update) is refused with how to re-issue it, unless ``legacy`` (``keys revoke`` only)."""
        data = bytes(data)
        if not _HEAD_V1.size + SIGNATURE_BYTES <= len(data) <= REVOCATIONS_MAX_BYTES:
            raise DecodeError(
                f"a revocation list is {_HEAD_V2.size + SIGNATURE_BYTES} to {REVOCATIONS_MAX_BYTES} bytes; "
                f"got {len(data)}"
            )
        magic, version = data[:4], data[4]
        if magic != _MAGIC:
            raise DecodeError(f"not a revocation list (magic {magic!r}, not {_MAGIC!r})")
        if version not in (1, 2, _VERSION):
            raise DecodeError(
                f"not a version-2 or version-{_VERSION} revocation list (v{version}): a list of a later format, "
                "written by a newer deltaplane; upgrade this one to read it"
            )
        if version == 1 and not legacy:
            raise DecodeError(
                "a version-1 revocation list, which has no next update (so a server could withhold a newer one "
                "for as long as certificates last); re-issue it with `deltaplane keys revoke --authority-key "
                "… --out FILE`, which keeps its devices and numbers the new list one past it"
            )
        key_count = 0
        if version == 1:
            _, _, auth, sequence, issued, count = _HEAD_V1.unpack_from(data)
            next_update, pos = 0, _HEAD_V1.size
        else:
            head = _HEAD_V2 if version == 2 else _HEAD
            if len(data) < head.size + SIGNATURE_BYTES:
                raise DecodeError(
                    f"a version-{version} revocation list is at least {head.size + SIGNATURE_BYTES} bytes"
                )
            _, _, auth, sequence, issued, next_update, count, *more = head.unpack_from(data)
            key_count, pos = (more[0] if more else 0), head.size
        if count > MAX_REVOKED or key_count > MAX_REVOKED:
            raise DecodeError(
                f"a revocation list names at most {MAX_REVOKED} devices and {MAX_REVOKED} keys; this one "
                f"{count} and {key_count}"
            )
        end, revoked, last = len(data) - SIGNATURE_BYTES - key_count * _KEY_BYTES, set(), b""
        if end < pos:
            raise DecodeError(f"revocation list: too short for its {key_count} keys")
        for i in range(count):
            start = pos
            device, pos = read_name(data, pos, end, f"revocation list entry {i}: the device id")
            cohort, pos = read_name(data, pos, end, f"revocation list entry {i}: the cohort")
            if data[start:pos] <= last:  # one encoding per list: sorted, no repeats
                raise DecodeError(f"revocation list entry {i} is out of order or repeated")
            last = data[start:pos]
            revoked.add((device, cohort))
        if pos != end:
            raise DecodeError(f"revocation list: {end - pos} bytes after its {count} entries")
        keys = [data[k : k + _KEY_BYTES] for k in range(end, end + key_count * _KEY_BYTES, _KEY_BYTES)]
        if any(a >= b for a, b in itertools.pairwise(keys)):  # one encoding per list, as entries
            raise DecodeError("revocation list: its keys are out of order or repeated")
        sig = len(data) - SIGNATURE_BYTES
        return cls(
            auth, sequence, issued, next_update, frozenset(revoked), data[sig:], version, frozenset(keys)
        )

    @classmethod
    def verified(cls, data: bytes, trusted: TrustedAuthorities, *, legacy: bool = False) -> RevocationList:
        """The list in ``data`` once it decodes and an authority of ``trusted`` signed it; anything else is a
        :class:`SecAggAuthError` saying what (a malformed list is refused as one that cannot be authenticated).
        ``legacy``: a version-1 list is read too (only to re-issue it)."""
        try:
            rl = cls.from_bytes(data, legacy=legacy)
        except DecodeError as exc:
            raise SecAggAuthError(f"refused revocation list: {exc}") from None
        trusted.check_revocations(rl.authority, rl.signed_part(), rl.signature)
        return rl

    def names(self, cert: DeviceCertificate) -> bool:
        """Whether this list revokes ``cert``: its authority issued it and lists its device in its cohort, or
        the list revokes the key it binds (:meth:`names_key`, whatever authority issued it)."""
        return self.names_key(cert.identity_public) or (
            cert.authority == self.authority and (cert.device_id, cert.cohort) in self.revoked
        )

    def names_key(self, identity_public: bytes) -> bool:
        """Whether this list revokes the identity key ``identity_public`` (raw Ed25519), by its SHA-256."""
        return key_fingerprint(identity_public) in self.keys

    def check_certificate(
        self, cert: DeviceCertificate, *, client: int | None = None, where: str = ""
    ) -> None:
        """Raise if this list revokes ``cert``: :class:`KeyRevoked` for its key (the device needs a new one),
        else a :class:`SecAggAuthError` for its device in its cohort (a replacement is enrolled under a new id);
        ``client`` is its roster slot, if any, ``where`` what the message starts with ("client 3: "). The one
        refusal every relying party gives (devices, Flower nodes, the service's and a Flower strategy's
        :class:`~deltaplane.aggregation.secagg.SecAggServer`)."""
        who = f"{where}device {cert.device_id!r} of cohort {cert.cohort!r}"
        if self.names_key(cert.identity_public):
            fp = key_fingerprint(cert.identity_public)
            raise KeyRevoked(
                f"{who} holds identity key SHA256:{fp.hex()[:16]}…, which revocation list number "
                f"{self.sequence} revokes (a revoked key stays revoked under any device id): {_NEW_KEY}",
                fingerprint=fp,
                client=client,
            )
        if self.names(cert):
            raise SecAggAuthError(f"{who} is revoked (revocation list number {self.sequence})", client=client)

    def check_current(self, now: float, *, holder: str, fix: str) -> None:
        """Raise :class:`RevocationsStale` if ``now`` (unix s) is past this list's next update by more than
        :data:`CLOCK_SKEW_S`: a relying party does not act on a list its authority has replaced or should have
        (RFC 5280 §5.1.2.5). ``holder`` names whose list it is ("this device's", "the service's"), ``fix`` says how
        it gets a current one."""
        if now > self.next_update + CLOCK_SKEW_S:
            raise RevocationsStale(
                f"{holder} revocation list number {self.sequence} of authority {self.authority.hex()} was "
                f"current until {self.next_update} ({_utc(self.next_update)}: its next update; unix s) and it is "
                f"now {int(now)} ({_utc(now)}), past "
                f"that by more than the {CLOCK_SKEW_S} s allowed for clock skew: a newer list may revoke devices "
                f"this one does not, so authenticated rounds are refused until {fix}",
                next_update=self.next_update,
            )

    def supersedes(
        self, held: RevocationList | RevocationMark | None, *, holder: str = "this device"
    ) -> bool:
        """Whether ``holder`` (a device, a server), holding ``held`` (the list, or its :meth:`mark`), takes this
        list instead: raises :class:`RevocationRollback` for a rollback (a lower sequence, or the same sequence
        with other contents: the authority never signs two), naming both numbers and how to get past it; False
        for the very list held; True otherwise. A list of another authority than ``held``'s is refused too (one
        list per device: its enrollment's authority)."""
        if held is None:
            return True
        mark = held.mark() if isinstance(held, RevocationList) else held
        if mark.authority != self.authority:
            raise SecAggAuthError(
                f"refused revocation list of authority {self.authority.hex()}: {holder} holds authority "
                f"{mark.authority.hex()}'s"
            )
        if self.sequence > mark.sequence:
            return True
        if self.sequence < mark.sequence:
            why = f"{holder} holds number {mark.sequence}, and a list never goes back"
        elif self.mark() != mark:
            why = (
                f"{holder} holds another list of that number (SHA-256 {mark.sha256[:16]}…, this one "
                f"{self.mark().sha256[:16]}…; the authority never signs two), and a list never goes back"
            )
        else:
            return False
        raise RevocationRollback(
            f"refused revocation list number {self.sequence}: {why} (a rollback would un-revoke devices). Give "
            f"it list number {mark.sequence} again or a newer one: `deltaplane keys revoke --out FILE`, FILE "
            f"holding list number {mark.sequence}, issues one numbered one past it",
            sequence=self.sequence,
            held=mark.sequence,
        )


def _utc(unix_s: float) -> str:
    """``unix_s`` as a UTC date and time an operator reads at a glance (as ``keys revoke`` prints the next update)."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix_s))


def revoke(
    authority: EnrollmentAuthority,
    devices: Iterable[tuple[str, str]],
    *,
    issued: int,
    valid_s: int = DEFAULT_VALID_DAYS * 86_400,
    previous: RevocationList | None = None,
    keys: Iterable[bytes] = (),
) -> RevocationList:
    """The list ``previous`` (verified, of ``authority``; None: an empty one) with ``devices`` (``(device id,
    cohort)`` pairs) and ``keys`` (revoked identity keys' SHA-256,
    :func:`~deltaplane.aggregation.secagg.identity.key_fingerprint`) added, numbered one past it, current for
    ``valid_s`` seconds from ``issued`` (its next update), signed by ``authority`` in the current version (a
    version-1 or -2 ``previous`` is re-issued as one, its devices kept). Revoking a revoked device or key again
    is harmless, and revoking none re-issues the list with a new next update; a list of more than
    :data:`MAX_REVOKED` devices or keys, a key that is not 32 bytes, or a validity outside 1 s to
    :data:`MAX_VALID_DAYS`, is a :class:`ConfigError`."""
    if not 1 <= valid_s <= MAX_VALID_DAYS * 86_400:
        raise ConfigError(
            f"a revocation list is current for 1 s to {MAX_VALID_DAYS} days (withholding a newer one goes "
            f"unnoticed that long). Found {valid_s} s"
        )
    if previous is not None and previous.authority != authority.id:
        raise ConfigError(
            f"the existing revocation list is authority {previous.authority.hex()}'s, not this key's "
            f"({authority.id.hex()}): give its own authority key, or another output file"
        )
    revoked = set(previous.revoked if previous else ()) | set(devices)
    for d, c in revoked:
        _entry(d, c)
    revoked_keys = set(previous.keys if previous else ()) | {bytes(k) for k in keys}
    if any(len(k) != _KEY_BYTES for k in revoked_keys):
        raise ConfigError(f"a revoked key is named by its {_KEY_BYTES}-byte SHA-256 (key_fingerprint)")
    if len(revoked) > MAX_REVOKED or len(revoked_keys) > MAX_REVOKED:
        raise ConfigError(
            f"a revocation list names at most {MAX_REVOKED} devices and {MAX_REVOKED} keys; this one would "
            f"{len(revoked)} and {len(revoked_keys)}"
        )
    sequence = previous.sequence + 1 if previous else 1
    if not 0 <= issued < 2**64 - valid_s or sequence >= 2**64:
        raise ConfigError("a revocation list's times and sequence are unsigned 64-bit integers")
    unsigned = RevocationList(
        authority.id,
        sequence,
        int(issued),
        int(issued) + int(valid_s),
        frozenset(revoked),
        b"",
        keys=frozenset(revoked_keys),
    )
    return dataclasses.replace(unsigned, signature=authority.sign_revocations(unsigned.signed_part()))


def load_revocations(
    path: str | os.PathLike[str], trusted: TrustedAuthorities, *, legacy: bool = False
) -> RevocationList:
    """The revocation list in the file ``path``, verified under ``trusted``: a missing or oversized file is a
    :class:`ConfigError`, a malformed or unauthenticated list a :class:`SecAggAuthError`, each naming the file.
    ``legacy``: a version-1 list is read too (``keys revoke`` re-issuing it)."""
    data = read_bounded_bytes(path, limit=REVOCATIONS_MAX_BYTES, what="revocation list")
    try:
        return RevocationList.verified(data, trusted, legacy=legacy)
    except SecAggAuthError as exc:
        raise SecAggAuthError(f"{os.fspath(path)}: {exc}") from None


def read_server_revocations(
    path: str | os.PathLike[str],
    trusted: TrustedAuthorities | None = None,
    *,
    now: float | None = None,
    fix: str = "",
    legacy: bool = False,
    holder: str = SERVER_HOLDER,
) -> RevocationList:
    """The revocation list in the file ``path`` for a *server* (the HTTP service, a Flower
    :class:`~deltaplane.flower.SecAggStrategy`), verified under ``trusted`` when the server was given the
    enrollment authority's public key, else unchecked: the file is then its operator's own, and refusing a device
    it names only spares the honest devices a roster they would refuse anyway (they verify their own copy). A
    missing, oversized, malformed or (given ``trusted``) unauthenticated file is a :class:`ConfigError` naming
    it. Given ``now``, a list past its next update is a :class:`RevocationsStale` (``fix``: how the server gets
    a current one): a server opens no authenticated round on it, as its devices would refuse the round.
    ``legacy``: a version-1 list is read too (``keys revoke`` re-issuing it). ``holder`` names whose key
    ``trusted`` is, in the refusal of another authority's list."""
    data = read_bounded_bytes(path, limit=REVOCATIONS_MAX_BYTES, what="revocation list")
    try:
        rl = RevocationList.from_bytes(data, legacy=legacy)
        if trusted is not None:
            trusted.check_revocations(rl.authority, rl.signed_part(), rl.signature, holder=holder)
    except (DecodeError, SecAggAuthError) as exc:
        raise ConfigError(f"{os.fspath(path)}: {exc}; give the file `deltaplane keys revoke` wrote") from None
    if now is not None:
        rl.check_current(now, holder=f"the server's ({os.fspath(path)})", fix=fix)
    return rl


def replace_server_revocations(
    path: str | os.PathLike[str],
    data: bytes,
    trusted: TrustedAuthorities,
    *,
    now: float,
    marks: dict[bytes, RevocationMark] | None = None,
) -> tuple[RevocationList, bool]:
    """Replace a server's revocation list file ``path`` with the list ``data`` (an upload), atomically, once it
    is the authority's and newer: the list and whether it replaced the one held (False: the very list held).

    Checked in order, each refusal typed: ``data`` decodes (:class:`DecodeError`), an authority of ``trusted``
    signed it (:class:`SecAggAuthError`), it is current at ``now`` (:class:`RevocationsStale`: a server storing a
    stale list would only refuse every authenticated round), and it does not roll back the list in ``path``
    (:class:`RevocationRollback`; a list of another authority than the held one's is a :class:`SecAggAuthError`
    while the service still trusts the held one's authority, and replaces it once it does not: the enrollment
    authority changed),
    nor the highest list of its authority the server has ever held (``marks``, by authority id: a file rolled
    back or deleted by hand is no way around it). A held file that does not decode is replaced (the upload is how an operator repairs it); a version-1 one is
    compared by its sequence. The caller serializes uploads (check then write is not atomic by itself)."""
    rl = RevocationList.from_bytes(data)
    if not trusted.trusts(rl.authority):
        try:
            trusted.check_revocations(rl.authority, rl.signed_part(), rl.signature, holder=SERVER_HOLDER)
        except SecAggAuthError as exc:
            retired = (marks or {}).get(rl.authority)
            if retired is not None:  # an authority this service held lists of: retired, not the new one
                raise SecAggAuthError(
                    f"{exc}. This service held that authority's lists before (up to number {retired.sequence}): "
                    "it is the retired authority, so do not put its key back; issue the list with the key of the "
                    "authority the service trusts now (keys revoke --authority-key …) and upload that (docs/"
                    "security.md, changing the enrollment authority)"
                ) from None
            raise SecAggAuthError(
                f"{exc}. If the enrollment authority was changed, put the new authority's public key "
                "(its enrollment.ed25519.pub) in the service's --secagg-enrollment-authority file in place of the "
                "old one (it is re-read at each upload), then upload this list again (docs/security.md, changing "
                "the enrollment authority)"
            ) from None
    trusted.check_revocations(rl.authority, rl.signed_part(), rl.signature, holder=SERVER_HOLDER)
    rl.check_current(now, holder="the uploaded", fix="the authority issues a current one (keys revoke)")
    held = None
    if os.path.lexists(path):
        try:
            held = RevocationList.from_bytes(
                read_bounded_bytes(path, limit=REVOCATIONS_MAX_BYTES, what="revocation list"), legacy=True
            )
        except (DecodeError, ConfigError):
            held = None
    if held is not None and held.version == 1:  # compared by number only: its contents are never current
        held = None if rl.sequence > held.sequence else held
    if held is not None and held.authority != rl.authority:
        if trusted.trusts(held.authority):  # both trusted: which list holds is the operator's call, not ours
            raise SecAggAuthError(
                f"refused revocation list of authority {rl.authority.hex()}: this service holds authority "
                f"{held.authority.hex()}'s ({os.fspath(path)}) and trusts both. To change the enrollment "
                f"authority, leave only the new authority's key in the service's --secagg-enrollment-authority "
                f"file (it is re-read at each upload), then upload this list again: it replaces the old "
                f"authority's (docs/security.md, changing the enrollment authority)"
            )
        held = None  # an authority the service no longer trusts: its list is obsolete (the authority changed)
    rl.supersedes((marks or {}).get(rl.authority), holder="this service")
    if not rl.supersedes(held, holder="this service"):
        return rl, False
    write_revocations(path, rl)
    return rl, True


def take_revocations(
    credentials: DeviceCredentials, data: bytes, *, keep: str | os.PathLike[str] | None = None
) -> DeviceCredentials:
    """A device's credentials holding the revocation list ``data`` (from the service, or a file) if it is newer
    than the one they hold; the same credentials for the very list held. The one way a device takes a list:
    verified under the device's own trusted authorities (:class:`SecAggAuthError`: forged, altered, or of an
    authority it does not trust; malformed included), never older than the held one
    (:class:`RevocationRollback`). A newer list is written to ``keep`` (atomically) before it is taken, so a
    restarted device starts from it and refuses a rollback too."""
    rl = RevocationList.verified(data, credentials.trusted)
    taken = credentials.with_revocations(rl)
    if taken is not credentials and keep is not None:
        write_revocations(keep, rl)
    return taken


#: the highest list this process has taken from each revocation file, keyed by (real path, authority id):
#: :func:`take_revocations_file`'s memory of what a file may not roll back to
_TAKEN_FROM_FILE: dict[tuple[str, bytes], RevocationList] = {}
_TAKEN_LOCK = threading.Lock()


def take_revocations_file(credentials: DeviceCredentials, path: str | os.PathLike[str]) -> DeviceCredentials:
    """``credentials`` holding the revocation list in the file ``path`` (a Flower node's ``secagg-revocations``,
    read at each stage so that a newer list the operator writes there applies at once), never a lower one than
    the highest this process has already taken from that file under that authority.

    The same rule as a device taking a list from the service (:meth:`RevocationList.supersedes`, through
    :meth:`~deltaplane.aggregation.secagg.identity.DeviceCredentials.with_revocations`): a file replaced by a
    newer list is taken and remembered, the very list again is taken as it is, and a file rolled back to a lower
    sequence (or the same one with other contents) is a :class:`RevocationRollback` naming the file, as taking
    it would un-revoke devices; the node then refuses rounds until the file holds the newer list again. A
    missing or oversized file is a :class:`ConfigError`, a malformed or unauthenticated list a
    :class:`SecAggAuthError`, each naming the file. The memory is the process's: a restarted node starts from
    the file, as it has nothing else to keep a high-water mark in (the fleet device keeps its own file)."""
    rl = take_revocations_from_path(path, load_revocations(path, credentials.trusted), holder="this node")
    return credentials.with_revocations(rl)


def trusts_kept_list(trusted: TrustedAuthorities, kept: str | os.PathLike[str]) -> bool:
    """Whether ``trusted`` (a device's or a node's enrollment authority keys) trusts the authority of the list kept
    in ``kept``: False is the kept list of an authority replaced since (the enrollment authority was changed), the
    one case whose refusal must say what to do with that file. True also when the file cannot be read: the
    caller's own error says what is wrong then."""
    try:
        return trusted.trusts(read_server_revocations(kept, legacy=True).authority)
    except ConfigError:
        return True


def take_revocations_from_path(
    path: str | os.PathLike[str], revocations: RevocationList, *, holder: str
) -> RevocationList:
    """``revocations``, just read from the file ``path`` by ``holder`` (a Flower node, a
    :class:`~deltaplane.flower.SecAggStrategy`), once it is no older than the highest list this process has taken
    from that file under its authority; it is then the highest. A lower sequence (or the same one with other
    contents) is a :class:`RevocationRollback` naming the file and both numbers (:meth:`RevocationList.supersedes`).
    The one per-process high-water mark of a re-read file: the caller has verified the list as it may."""
    key = (os.path.realpath(path), revocations.authority)
    with _TAKEN_LOCK:
        try:
            if revocations.supersedes(_TAKEN_FROM_FILE.get(key), holder=holder):
                _TAKEN_FROM_FILE[key] = revocations
        except RevocationRollback as exc:
            raise RevocationRollback(
                f"{os.fspath(path)}: {exc}", sequence=exc.sequence, held=exc.held
            ) from None
    return revocations


def write_revocations(path: str | os.PathLike[str], revocations: RevocationList) -> None:
    """Write ``revocations`` to ``path`` atomically (a device or server reading it never sees half a list)."""
    write_secret_file(path, revocations.to_bytes())
