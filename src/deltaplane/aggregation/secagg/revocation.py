"""Revoking device certificates before they expire: a revocation list signed by the enrollment authority.

A device certificate (:class:`~deltaplane.aggregation.secagg.identity.DeviceCertificate`) is valid until its
expiry. If a device's identity key leaks before then, whoever holds it can sign key advertisements as that
device, and a server colluding with them can seat a sybil in the device's roster slot. The standard remedy is a
certificate revocation list (RFC 5280 §5, in spirit): the issuing authority signs the list of certificates it
withdraws, with a sequence number that only grows, and every relying party refuses what the list names.

What is revoked is a *device in a cohort*, ``(device id, cohort)`` under the list's authority: a certificate
carries no serial number, and the pair is what a device's neighbours check it by (the device id binds its
advertisement, the cohort its neighbourhood). So a revocation covers every certificate that authority ever
issued the device in that cohort, including ones the operator no longer has a copy of; a replacement device is
enrolled under a new device id.

The encoding is fixed-layout and strict (no canonical JSON to get wrong), at most :data:`REVOCATIONS_MAX_BYTES`::

    magic "DPRL" | version (1 byte) | authority id (8) | sequence (u64) | issued (u64, unix s) | count (u16)
    count × [len (1) | device id (UTF-8) | len (1) | cohort (UTF-8)], strictly increasing, no repeats
    signature (64): Ed25519 by the authority over a domain tag and everything before it

A device holds at most one list (:attr:`DeviceCredentials.revocations
<deltaplane.aggregation.secagg.identity.DeviceCredentials>`) and never trades it for one of a lower sequence
(:meth:`RevocationList.supersedes`).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from deltaplane.aggregation.secagg.errors import SecAggAuthError
from deltaplane.aggregation.secagg.identity import (
    NAME_BYTES,
    SIGNATURE_BYTES,
    DeviceCertificate,
    EnrollmentAuthority,
    TrustedAuthorities,
    read_name,
)
from deltaplane.errors import ConfigError, DecodeError
from deltaplane.textfile import read_bounded_bytes, write_secret_file

__all__ = [
    "MAX_REVOKED",
    "REVOCATIONS_MAX_BYTES",
    "RevocationList",
    "load_revocations",
    "read_server_revocations",
    "revoke",
    "write_revocations",
]

_MAGIC = b"DPRL"
_VERSION = 1
_HEAD = struct.Struct(">4sB8sQQH")  # magic, version, authority id, sequence, issued (unix s), entry count
#: the most devices one list revokes (a fleet that revokes more re-enrolls under a new authority)
MAX_REVOKED = 4096
#: the largest revocation list: the head, :data:`MAX_REVOKED` entries of two longest names, the signature
REVOCATIONS_MAX_BYTES = _HEAD.size + MAX_REVOKED * 2 * (1 + NAME_BYTES) + SIGNATURE_BYTES


def _entry(device: str, cohort: str) -> bytes:
    d, c = device.encode(), cohort.encode()
    for raw, what, text in ((d, "device id", device), (c, "cohort", cohort)):
        if not 1 <= len(raw) <= NAME_BYTES:
            raise ConfigError(f"a revoked {what} is 1 to {NAME_BYTES} UTF-8 bytes. Found {text!r}")
    return bytes([len(d)]) + d + bytes([len(c)]) + c


@dataclass(frozen=True)
class RevocationList:
    """The authority ``authority``'s (an :func:`~deltaplane.aggregation.secagg.identity.authority_id`) list of
    revoked ``(device id, cohort)`` pairs, number ``sequence``, issued at ``issued`` (unix seconds).

    Only :func:`revoke` (signing) and :meth:`verified` (checking a signature) make one, so a list a device holds
    has always been verified under an authority it trusts.
    """

    authority: bytes
    sequence: int
    issued: int
    revoked: frozenset[tuple[str, str]]
    signature: bytes

    def signed_part(self) -> bytes:
        """The list's bytes without the signature, entries in their one canonical (sorted) order."""
        entries = sorted(_entry(d, c) for d, c in self.revoked)
        head = _HEAD.pack(_MAGIC, _VERSION, self.authority, self.sequence, self.issued, len(entries))
        return head + b"".join(entries)

    def to_bytes(self) -> bytes:
        """The list on the wire and on disk."""
        return self.signed_part() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> RevocationList:
        """Strict inverse of :meth:`to_bytes`, *signature unchecked* (use :meth:`verified`): anything else, an
        oversized list, or entries out of canonical order, is a :class:`DecodeError` saying what."""
        data = bytes(data)
        if not _HEAD.size + SIGNATURE_BYTES <= len(data) <= REVOCATIONS_MAX_BYTES:
            raise DecodeError(
                f"a revocation list is {_HEAD.size + SIGNATURE_BYTES} to {REVOCATIONS_MAX_BYTES} bytes; "
                f"got {len(data)}"
            )
        magic, version, auth, sequence, issued, count = _HEAD.unpack_from(data)
        if magic != _MAGIC or version != _VERSION:
            raise DecodeError(f"not a version-{_VERSION} revocation list (magic {magic!r}, v{version})")
        if count > MAX_REVOKED:
            raise DecodeError(f"a revocation list names at most {MAX_REVOKED} devices; this one {count}")
        pos, end, revoked, last = _HEAD.size, len(data) - SIGNATURE_BYTES, set(), b""
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
        return cls(auth, sequence, issued, frozenset(revoked), data[end:])

    @classmethod
    def verified(cls, data: bytes, trusted: TrustedAuthorities) -> RevocationList:
        """The list in ``data`` once it decodes and an authority of ``trusted`` signed it; anything else is a
        :class:`SecAggAuthError` saying what (a malformed list is refused as one that cannot be authenticated)."""
        try:
            rl = cls.from_bytes(data)
        except DecodeError as exc:
            raise SecAggAuthError(f"refused revocation list: {exc}") from None
        trusted.check_revocations(rl.authority, rl.signed_part(), rl.signature)
        return rl

    def names(self, cert: DeviceCertificate) -> bool:
        """Whether this list revokes ``cert``: its authority issued it and lists its device in its cohort."""
        return cert.authority == self.authority and (cert.device_id, cert.cohort) in self.revoked

    def supersedes(self, held: RevocationList | None) -> bool:
        """Whether a device holding ``held`` takes this list instead: raises :class:`SecAggAuthError` for a
        rollback (a lower sequence, or the same sequence with other contents: the authority never signs two);
        False for the very list held; True otherwise. A list of another authority than ``held``'s is refused
        too (one list per device: its enrollment's authority)."""
        if held is None:
            return True
        if held.authority != self.authority:
            raise SecAggAuthError(
                f"refused revocation list of authority {self.authority.hex()}: this device holds authority "
                f"{held.authority.hex()}'s"
            )
        if self.sequence < held.sequence or (self.sequence == held.sequence and self != held):
            raise SecAggAuthError(
                f"refused revocation list number {self.sequence}: this device holds number {held.sequence}, and "
                "a list never goes back (a rollback would un-revoke devices)"
            )
        return self.sequence > held.sequence


def revoke(
    authority: EnrollmentAuthority,
    devices: Iterable[tuple[str, str]],
    *,
    issued: int,
    previous: RevocationList | None = None,
) -> RevocationList:
    """The list ``previous`` (verified, of ``authority``; None: an empty one) with ``devices`` (``(device id,
    cohort)`` pairs) added, numbered one past it and signed by ``authority``. Revoking a revoked device again is
    harmless; a list of more than :data:`MAX_REVOKED` devices is a :class:`ConfigError`."""
    if previous is not None and previous.authority != authority.id:
        raise ConfigError(
            f"the existing revocation list is authority {previous.authority.hex()}'s, not this key's "
            f"({authority.id.hex()}): give its own authority key, or another output file"
        )
    revoked = set(previous.revoked if previous else ()) | set(devices)
    for d, c in revoked:
        _entry(d, c)
    if len(revoked) > MAX_REVOKED:
        raise ConfigError(
            f"a revocation list names at most {MAX_REVOKED} devices; this one would {len(revoked)}"
        )
    sequence = previous.sequence + 1 if previous else 1
    if not 0 <= issued < 2**64 or sequence >= 2**64:
        raise ConfigError("a revocation list's issue time and sequence are unsigned 64-bit integers")
    unsigned = RevocationList(authority.id, sequence, int(issued), frozenset(revoked), b"")
    return dataclasses.replace(unsigned, signature=authority.sign_revocations(unsigned.signed_part()))


def load_revocations(path: str | os.PathLike[str], trusted: TrustedAuthorities) -> RevocationList:
    """The revocation list in the file ``path``, verified under ``trusted``: a missing or oversized file is a
    :class:`ConfigError`, a malformed or unauthenticated list a :class:`SecAggAuthError`, each naming the file."""
    data = read_bounded_bytes(path, limit=REVOCATIONS_MAX_BYTES, what="revocation list")
    try:
        return RevocationList.verified(data, trusted)
    except SecAggAuthError as exc:
        raise SecAggAuthError(f"{os.fspath(path)}: {exc}") from None


def read_server_revocations(path: str | os.PathLike[str]) -> RevocationList:
    """The revocation list in the file ``path`` for a *server* (the HTTP service, a Flower
    :class:`~deltaplane.flower.SecAggStrategy`), signature unchecked: a server holds no enrollment key, the file
    is its operator's own, and refusing a device it names only spares the honest devices a roster they would
    refuse anyway (they verify their own copy). A missing, oversized or malformed file is a :class:`ConfigError`
    naming it."""
    data = read_bounded_bytes(path, limit=REVOCATIONS_MAX_BYTES, what="revocation list")
    try:
        return RevocationList.from_bytes(data)
    except DecodeError as exc:
        raise ConfigError(f"{os.fspath(path)}: {exc}; give the file `deltaplane keys revoke` wrote") from None


def write_revocations(path: str | os.PathLike[str], revocations: RevocationList) -> None:
    """Write ``revocations`` to ``path`` atomically (a device or server reading it never sees half a list)."""
    write_secret_file(path, revocations.to_bytes())
