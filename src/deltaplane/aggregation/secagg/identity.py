"""Device identities for secure aggregation: enrollment certificates and signed key advertisements.

The semi-honest protocol trusts the server to forward each device's public keys unchanged: a server that puts
keys of its own in a target's neighbours' place decrypts the target's shares and rebuilds its masks. Bonawitz et
al. 2017 (https://eprint.iacr.org/2017/281, §4 and §6.2, "active adversary") close this with a PKI: every device
holds a long-lived *identity* signing key whose public half an authority the devices trust has certified, and
signs its key advertisement with it; each device checks every neighbour's certificate and signature before it
uses the neighbour's keys. This module is that PKI, with Ed25519 (RFC 8032) from ``cryptography``:

* :class:`EnrollmentAuthority` — the operator's key. It certifies ``(device id, cohort, identity key, expiry)``
  (:class:`DeviceCertificate`). It must not live where the aggregation server runs (it would let the server mint
  identities for keys of its own): ``deltaplane keys enrollment`` makes it apart from the registry's signing
  key, which the service holds to sign what it publishes.
* :class:`TrustedAuthorities` — the authority public keys a device was given out of band.
* :class:`DeviceIdentity` — a device's identity key and certificate; it signs
  :func:`advertisement_statement`: its two X25519 public keys bound to its slot in the round, its device id
  and the round's *binding* (a hash of the round's public parameters and the driver's session name), so a
  signed advertisement cannot be moved to another slot, device or round.
* :class:`DeviceCredentials` — what a device checks rosters with: its identity and the authorities it trusts.
* :class:`CertificationRequest` — what a device that made its identity key itself hands the authority: its
  device id, cohort and public key, self-signed by that key (proof of possession, as a PKCS#10 CSR), so the
  private key never leaves the device (``deltaplane keys identity``, then ``keys certify --request``).

The signed bytes are domain-separated and fixed-layout (no JSON canonicalisation to get wrong); certificates
are a compact strict encoding (at most :data:`CERT_MAX_BYTES`), read with every length checked.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from deltaplane.aggregation.secagg.errors import AdvertisementUnbound, KeyRevoked, SecAggAuthError
from deltaplane.errors import ConfigError, DecodeError
from deltaplane.textfile import KEY_LIMIT, read_bounded_bytes, read_bounded_text

if TYPE_CHECKING:
    from deltaplane.aggregation.secagg.revocation import RevocationList

__all__ = [
    "CERT_MAX_BYTES",
    "REQUEST_MAX_BYTES",
    "SIGNATURE_BYTES",
    "CertificationRequest",
    "DeviceCertificate",
    "DeviceCredentials",
    "DeviceIdentity",
    "EnrollmentAuthority",
    "TrustedAuthorities",
    "advertisement_statement",
    "authority_id",
    "check_round_authentication",
    "consistency_statement",
    "key_fingerprint",
    "read_name",
]

CERT_MAGIC = b"DPDC"
CERT_VERSION = 1
#: most UTF-8 bytes of a device id or a cohort name in a certificate
NAME_BYTES = 64
SIGNATURE_BYTES = 64
_CERT_HEAD = struct.Struct(">4sB8s32sQ")  # magic, version, authority id, identity public key, expiry (unix s)
#: the largest certificate: the head, two length-prefixed names, the authority's signature
CERT_MAX_BYTES = _CERT_HEAD.size + 2 * (1 + NAME_BYTES) + SIGNATURE_BYTES
_CERT_DOMAIN = b"deltaplane/secagg/device-certificate/v1\x00"
_ADVERT_DOMAIN = b"deltaplane/secagg/key-advertisement/v1\x00"
_CONSISTENCY_DOMAIN = b"deltaplane/secagg/consistency/v1\x00"
_REVOCATIONS_DOMAIN = b"deltaplane/secagg/revocation-list/v1\x00"
REQUEST_MAGIC = b"DPIR"
REQUEST_VERSION = 1
_REQUEST_HEAD = struct.Struct(">4sB32s")  # magic, version, identity public key
#: the largest certification request: the head, two length-prefixed names, the device's self-signature
REQUEST_MAX_BYTES = _REQUEST_HEAD.size + 2 * (1 + NAME_BYTES) + SIGNATURE_BYTES
_REQUEST_DOMAIN = b"deltaplane/secagg/certification-request/v1\x00"


def authority_id(public_raw: bytes) -> bytes:
    """The 8-byte id of an authority's public key (the first bytes of its SHA-256), named in certificates."""
    return hashlib.sha256(public_raw).digest()[:8]


def key_fingerprint(identity_public: bytes) -> bytes:
    """The 32-byte SHA-256 of an identity public key (raw Ed25519, 32 bytes): what a revocation list names a
    revoked *key* by, so the key stays revoked whatever device id a certificate or request names it under."""
    return hashlib.sha256(identity_public).digest()


def _public_raw(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _name(text: str, what: str) -> bytes:
    raw = text.encode() if isinstance(text, str) else b""
    if not raw or len(raw) > NAME_BYTES:
        raise ConfigError(f"a certificate's {what} is 1 to {NAME_BYTES} UTF-8 bytes. Found {text!r}")
    return raw


def read_name(data: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    """The length-prefixed UTF-8 name (1 to :data:`NAME_BYTES` bytes) at ``data[pos]``, ending by ``end``, and the
    position after it: how certificates and revocation lists store device ids and cohorts. Anything else is a
    :class:`DecodeError` naming ``what``."""
    n = data[pos] if pos < end else 0
    raw = data[pos + 1 : pos + 1 + n]
    if not 1 <= n <= NAME_BYTES or len(raw) != n or pos + 1 + n > end:
        raise DecodeError(f"{what} is malformed")
    try:
        return raw.decode(), pos + 1 + n
    except UnicodeDecodeError:
        raise DecodeError(f"{what} is not UTF-8") from None


@dataclass(frozen=True)
class DeviceCertificate:
    """The authority's statement that ``identity_public`` is device ``device_id``'s identity key in ``cohort``
    until ``expires`` (unix seconds). ``authority`` is the signer's :func:`authority_id`."""

    device_id: str
    cohort: str
    identity_public: bytes
    expires: int
    authority: bytes
    signature: bytes

    def signed_part(self) -> bytes:
        """The certificate's bytes without the signature (what the authority signs, after the domain tag)."""
        d, c = _name(self.device_id, "device id"), _name(self.cohort, "cohort")
        head = _CERT_HEAD.pack(CERT_MAGIC, CERT_VERSION, self.authority, self.identity_public, self.expires)
        return head + bytes([len(d)]) + d + bytes([len(c)]) + c

    def to_bytes(self) -> bytes:
        """The certificate on the wire and on disk."""
        return self.signed_part() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceCertificate:
        """Strict inverse of :meth:`to_bytes`; anything else is a :class:`DecodeError` saying what."""
        data = bytes(data)
        if not _CERT_HEAD.size < len(data) <= CERT_MAX_BYTES:
            raise DecodeError(f"a device certificate is at most {CERT_MAX_BYTES} bytes; got {len(data)}")
        magic, version, auth, pub, expires = _CERT_HEAD.unpack_from(data)
        if magic != CERT_MAGIC or version != CERT_VERSION:
            raise DecodeError(
                f"not a version-{CERT_VERSION} device certificate (magic {magic!r}, v{version})"
            )
        (device, cohort), signature = _names_and_signature(data, _CERT_HEAD.size, "device certificate")
        return cls(device, cohort, pub, expires, auth, signature)


def _names_and_signature(data: bytes, pos: int, what_doc: str) -> tuple[tuple[str, str], bytes]:
    """The length-prefixed device id and cohort at ``data[pos:]`` (:func:`read_name`) and the signature that must
    end ``data`` (certificates and certification requests share this tail); a :class:`DecodeError` naming
    ``what_doc``."""
    device, pos = read_name(data, pos, len(data), f"{what_doc}: the device id")
    cohort, pos = read_name(data, pos, len(data), f"{what_doc}: the cohort")
    if len(data) - pos != SIGNATURE_BYTES:
        raise DecodeError(f"{what_doc}: {len(data) - pos} signature bytes, not {SIGNATURE_BYTES}")
    return (device, cohort), data[pos:]


@dataclass(frozen=True)
class CertificationRequest:
    """A device's request that the authority certify ``identity_public`` as device ``device_id``'s identity key
    in ``cohort``, signed by that very key (proof of possession: whoever made the request holds the private half,
    so nobody can get a certificate for a key they saw but do not hold).

    The device makes its identity key itself and sends only this (at most :data:`REQUEST_MAX_BYTES`): the
    private key never travels, unlike ``keys certify --devices``, where the operator makes it. The self-signature
    covers every field, so a request whose key, device id or cohort was changed after signing does not verify.
    The authority still decides whether the device may have that id: the request proves key possession only.
    """

    device_id: str
    cohort: str
    identity_public: bytes
    signature: bytes

    @classmethod
    def sign(cls, key: Ed25519PrivateKey, device_id: str, *, cohort: str) -> CertificationRequest:
        """The request for ``key``'s public half as ``device_id`` in ``cohort``, self-signed by ``key``."""
        unsigned = cls(device_id, cohort, _public_raw(key), b"")
        return dataclasses.replace(unsigned, signature=key.sign(_REQUEST_DOMAIN + unsigned.signed_part()))

    def signed_part(self) -> bytes:
        """The request's bytes without the signature (what the device signs, after the domain tag)."""
        d, c = _name(self.device_id, "device id"), _name(self.cohort, "cohort")
        return (
            _REQUEST_HEAD.pack(REQUEST_MAGIC, REQUEST_VERSION, self.identity_public)
            + bytes([len(d)])
            + d
            + (bytes([len(c)]) + c)
        )

    def to_bytes(self) -> bytes:
        """The request on the wire and on disk."""
        return self.signed_part() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> CertificationRequest:
        """Strict inverse of :meth:`to_bytes` whose self-signature verifies; anything else (oversized, truncated,
        another magic or version, malformed names, a signature that does not verify) is a :class:`DecodeError`
        saying what."""
        data = bytes(data)
        if not _REQUEST_HEAD.size < len(data) <= REQUEST_MAX_BYTES:
            raise DecodeError(
                f"a certification request is at most {REQUEST_MAX_BYTES} bytes; got {len(data)}"
            )
        magic, version, pub = _REQUEST_HEAD.unpack_from(data)
        if magic != REQUEST_MAGIC or version != REQUEST_VERSION:
            raise DecodeError(
                f"not a version-{REQUEST_VERSION} certification request (magic {magic!r}, v{version})"
            )
        (device, cohort), signature = _names_and_signature(data, _REQUEST_HEAD.size, "certification request")
        request = cls(device, cohort, pub, signature)
        try:
            Ed25519PublicKey.from_public_bytes(pub).verify(signature, _REQUEST_DOMAIN + request.signed_part())
        except (InvalidSignature, ValueError):
            raise DecodeError(
                f"certification request of {device!r}: the self-signature does not verify under the request's key "
                "(its key, device id or cohort was changed after signing, or it is forged)"
            ) from None
        return request


class EnrollmentAuthority:
    """The operator's certifying key (Ed25519). Keep it off the aggregation server: whoever holds it can
    certify identity keys of their own, which is exactly what device certificates exist to prevent."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_raw = _public_raw(private_key)
        self.id = authority_id(self.public_raw)

    @classmethod
    def generate(cls) -> EnrollmentAuthority:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> EnrollmentAuthority:
        """The authority in a PKCS#8 PEM (``deltaplane keys enrollment`` writes one); ConfigError otherwise."""
        try:
            key = load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"an enrollment authority key is Ed25519; got {type(key).__name__}")
        return cls(key)

    def to_pem(self) -> bytes:
        return self._key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    def public_text(self) -> str:
        """The public key as one base64 line (what devices are given to trust)."""
        return base64.b64encode(self.public_raw).decode()

    def issue(
        self, device_id: str, identity_public: bytes, *, cohort: str, expires: int
    ) -> DeviceCertificate:
        """Certify ``identity_public`` as device ``device_id``'s identity key in ``cohort`` until ``expires``."""
        if len(identity_public) != 32 or not 0 < expires < 2**64:
            raise ConfigError(
                "a certificate needs a 32-byte Ed25519 public key and an expiry in unix seconds"
            )
        unsigned = DeviceCertificate(device_id, cohort, bytes(identity_public), int(expires), self.id, b"")
        return dataclasses.replace(unsigned, signature=self._key.sign(_CERT_DOMAIN + unsigned.signed_part()))

    def sign_revocations(self, signed_part: bytes) -> bytes:
        """Sign a revocation list's bytes (:class:`~deltaplane.aggregation.secagg.revocation.RevocationList`),
        domain-separated from certificates so neither signature verifies as the other."""
        return self._key.sign(_REVOCATIONS_DOMAIN + signed_part)

    def trust(self) -> TrustedAuthorities:
        """The trust a device given this authority's public key holds."""
        return TrustedAuthorities([self.public_raw])


class TrustedAuthorities:
    """The enrollment authorities' public keys a device trusts (given out of band, like the registry's key)."""

    def __init__(self, public_keys: Iterable[bytes]) -> None:
        self._keys: dict[bytes, Ed25519PublicKey] = {}
        for raw in public_keys:
            if len(raw) != 32:
                raise ConfigError(f"an Ed25519 public key is 32 bytes; got {len(raw)}")
            self._keys[authority_id(raw)] = Ed25519PublicKey.from_public_bytes(bytes(raw))
        if not self._keys:
            raise ConfigError("a device must trust at least one enrollment authority key")

    @classmethod
    def from_text(cls, text: str, *, source: str = "trusted authorities") -> TrustedAuthorities:
        """Keys as base64 lines (blank lines and ``#`` comments skipped), e.g. ``enrollment.ed25519.pub``."""
        raws = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                try:
                    raws.append(base64.b64decode(line, validate=True))
                except binascii.Error:
                    raise ConfigError(f"{source} line {n} is not base64: {line[:40]!r}") from None
        return cls(raws)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TrustedAuthorities:
        """The keys in the file ``path`` (``enrollment.ed25519.pub``, :meth:`from_text`'s lines), read bounded: a
        missing, oversized or malformed file is a :class:`~deltaplane.errors.ConfigError` naming it."""
        text = read_bounded_text(path, limit=KEY_LIMIT, what="enrollment authority public key")
        return cls.from_text(text, source=os.fspath(path))

    def trusts(self, authority: bytes) -> bool:
        """Whether the authority of id ``authority`` (an :func:`authority_id`) is one of these."""
        return authority in self._keys

    def check_revocations(
        self, authority: bytes, signed_part: bytes, signature: bytes, *, holder: str = "this device"
    ) -> None:
        """Raise :class:`SecAggAuthError` unless the trusted authority ``authority`` (an :func:`authority_id`)
        signed the revocation list ``signed_part`` (see :meth:`EnrollmentAuthority.sign_revocations`). ``holder``
        names who trusts these keys in the refusal of another authority's list (with the ids it trusts)."""
        key = self._keys.get(authority)
        if key is None:
            trusted = ", ".join(sorted(k.hex() for k in self._keys))
            raise SecAggAuthError(
                f"the revocation list names authority {authority.hex()}, which {holder} does not trust "
                f"(it trusts authority {trusted})"
            )
        try:
            key.verify(signature, _REVOCATIONS_DOMAIN + signed_part)
        except InvalidSignature:
            raise SecAggAuthError(
                f"the revocation list does not verify under authority {authority.hex()}: forged or altered"
            ) from None

    def check(self, cert: DeviceCertificate, *, now: float) -> None:
        """Raise :class:`SecAggAuthError` unless a trusted authority signed ``cert`` and it has not expired."""
        key = self._keys.get(cert.authority)
        if key is None:
            raise SecAggAuthError(
                f"device {cert.device_id!r}'s certificate names authority {cert.authority.hex()}, which this "
                "device does not trust"
            )
        try:
            key.verify(cert.signature, _CERT_DOMAIN + cert.signed_part())
        except InvalidSignature:
            raise SecAggAuthError(
                f"device {cert.device_id!r}'s certificate does not verify under authority {cert.authority.hex()}: "
                "forged or altered"
            ) from None
        if cert.expires <= now:
            raise SecAggAuthError(f"device {cert.device_id!r}'s certificate expired at {cert.expires}")


class DeviceIdentity:
    """A device's identity key (Ed25519) and the certificate of its public half."""

    def __init__(self, private_key: Ed25519PrivateKey, certificate: DeviceCertificate) -> None:
        if _public_raw(private_key) != certificate.identity_public:
            raise ConfigError(
                f"the certificate of device {certificate.device_id!r} certifies another identity key than this one"
            )
        self._key = private_key
        self.certificate = certificate

    @classmethod
    def enroll(
        cls, authority: EnrollmentAuthority, device_id: str, *, cohort: str, expires: int
    ) -> DeviceIdentity:
        """A fresh identity key for ``device_id``, certified by ``authority`` (what enrollment does)."""
        key = Ed25519PrivateKey.generate()
        return cls(key, authority.issue(device_id, _public_raw(key), cohort=cohort, expires=expires))

    @classmethod
    def from_files(cls, key_pem: bytes, certificate: bytes) -> DeviceIdentity:
        """The identity a device keeps on disk: its PKCS#8 PEM key and its certificate's bytes."""
        try:
            key = load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"the device identity key is not an unencrypted PEM private key: {exc}"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"a device identity key is Ed25519; got {type(key).__name__}")
        return cls(key, DeviceCertificate.from_bytes(certificate))

    def key_pem(self) -> bytes:
        return self._key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    @property
    def device_id(self) -> str:
        return self.certificate.device_id

    def sign(self, statement: bytes) -> bytes:
        """Sign an :func:`advertisement_statement` or a :func:`consistency_statement` (each domain-separated)."""
        return self._key.sign(statement)


@dataclass(frozen=True)
class DeviceCredentials:
    """What a device authenticates key rosters with: its own identity and the authorities it trusts.

    They come from the device's own enrollment, never from the server: a device holding credentials refuses
    any roster that is not fully signed, whatever the server's invitation says. ``revocations`` is the
    enrollment authority's latest revocation list the device was given
    (:class:`~deltaplane.aggregation.secagg.revocation.RevocationList`, verified here under ``trusted``): a
    roster slot holding a certificate it revokes is refused like an unauthenticated one, and once the list is
    past its next update the device takes part in no authenticated round (:meth:`check_current`).
    """

    identity: DeviceIdentity
    trusted: TrustedAuthorities
    clock: Callable[[], float] = field(default=time.time)
    revocations: RevocationList | None = None

    def __post_init__(self) -> None:
        rl = self.revocations
        if rl is not None:  # a list the device holds is always one its trusted authority signed
            self.trusted.check_revocations(rl.authority, rl.signed_part(), rl.signature)

    def with_revocations(self, revocations: RevocationList) -> DeviceCredentials:
        """These credentials holding ``revocations`` instead of the list they hold: refused
        (:class:`SecAggAuthError`) when it is not signed by a trusted authority or would roll the held list back
        (a lower sequence: :meth:`~deltaplane.aggregation.secagg.revocation.RevocationList.supersedes`)."""
        if not revocations.supersedes(self.revocations):
            return self
        return dataclasses.replace(self, revocations=revocations)

    def check_certificate(self, cert: DeviceCertificate) -> None:
        """Raise :class:`SecAggAuthError` unless ``cert`` passes the checks every certificate in a roster gets (a
        trusted authority signed it, it has not expired, the held revocation list revokes neither its device nor
        its key: :class:`~deltaplane.aggregation.secagg.errors.KeyRevoked` for a revoked key)."""
        self.trusted.check(cert, now=self.clock())
        if self.revocations is not None:
            self.revocations.check_certificate(cert)

    def check_own(self) -> None:
        """Raise :class:`SecAggAuthError` unless this device's own certificate passes what each neighbour checks
        it by (:meth:`check_certificate`, within :meth:`verify`). A device that would fail refuses rounds itself,
        so the round goes on without it, rather than have every neighbour refuse the roster seating it (one
        misconfigured device failing the round)."""
        self.check_certificate(self.identity.certificate)

    def check_current(self, fix: str) -> None:
        """Raise :class:`~deltaplane.aggregation.secagg.errors.RevocationsStale` if the held revocation list is
        past its next update (beyond the clock-skew tolerance) by this device's clock; ``fix`` says how the
        device gets a current one on its transport. No list held: nothing to check (revocation is opt-in)."""
        if self.revocations is not None:
            self.revocations.check_current(self.clock(), holder="this device's", fix=fix)

    @classmethod
    def from_files(
        cls,
        identity_key: str | os.PathLike[str],
        certificate: str | os.PathLike[str],
        authority: str | os.PathLike[str],
        revocations: str | os.PathLike[str] | None = None,
    ) -> DeviceCredentials:
        """The credentials a device keeps on disk: its identity key (PKCS#8 PEM) and certificate, which ``fleet
        enroll --authority-key`` writes (``device-I.identity.pem``, ``device-I.cert``), the enrollment
        authority's public key it trusts (base64 lines, ``enrollment.ed25519.pub``) and, optionally, the
        authority's revocation list (``deltaplane keys revoke`` writes it). Each file is read bounded; a missing,
        oversized or malformed one is a :class:`~deltaplane.errors.ConfigError` naming it, a revocation list
        not signed by the trusted authority a :class:`SecAggAuthError`."""
        ident = DeviceIdentity.from_files(
            read_bounded_text(identity_key, limit=KEY_LIMIT, what="device identity key").encode(),
            read_bounded_bytes(certificate, limit=KEY_LIMIT, what="device certificate"),
        )
        trusted = TrustedAuthorities.from_file(authority)
        if revocations is None:
            return cls(ident, trusted)
        from deltaplane.aggregation.secagg.revocation import load_revocations  # it builds on this module

        return cls(ident, trusted, revocations=load_revocations(revocations, trusted))

    def verify(
        self, binding: bytes, client_id: int, keys: tuple[bytes, bytes], certificate: bytes, signature: bytes
    ) -> DeviceCertificate:
        """The certificate of roster slot ``client_id``, once its chain and advertisement signature verify.

        Checks, in order: the certificate decodes, a trusted authority signed it, it has not expired, the held
        revocation list does not revoke it, it is of this device's cohort, and its identity key signed ``keys``
        for this slot under ``binding``. Any failure is a :class:`SecAggAuthError` naming the slot.
        """
        try:
            cert = DeviceCertificate.from_bytes(certificate)
            self.check_certificate(cert)
        except KeyRevoked as exc:  # its own type: the fix is a new key, not a new certificate
            raise KeyRevoked(
                f"roster slot {client_id}: {exc}", fingerprint=exc.fingerprint, client=client_id
            ) from None
        except (DecodeError, SecAggAuthError) as exc:
            raise SecAggAuthError(f"roster slot {client_id}: {exc}", client=client_id) from None
        if cert.cohort != self.identity.certificate.cohort:
            raise SecAggAuthError(
                f"roster slot {client_id}: device {cert.device_id!r} is enrolled in cohort {cert.cohort!r}, "
                f"this device in {self.identity.certificate.cohort!r}",
                client=client_id,
            )
        stmt = advertisement_statement(binding, client_id, cert.device_id, *keys)
        try:
            Ed25519PublicKey.from_public_bytes(cert.identity_public).verify(signature, stmt)
        except (InvalidSignature, ValueError):
            raise AdvertisementUnbound(
                f"roster slot {client_id}: the key advertisement is not signed by device {cert.device_id!r}'s "
                "certified identity key for this round and slot: either its keys were replaced after signing, or "
                "it was signed for another round binding (another round, other parameters or another session "
                "name: a replay from another round reads the same); the signature cannot say which",
                client=client_id,
            ) from None
        return cert


def check_round_authentication(
    authenticated: bool,
    credentials: DeviceCredentials | None,
    round_id: object,
    *,
    this: str,
    enrolled_as: str,
    server_fix: str = "",
    unenrolled_fix: str = "",
    stale_fix: str,
) -> None:
    """A device takes part in an authenticated round if and only if it is enrolled (holds ``credentials``): the
    opt-in is the device's own enrollment, never the server's say-so (a server could otherwise switch
    authentication off), and only while the revocation list it holds is current
    (:meth:`DeviceCredentials.check_current`). Raises :class:`SecAggAuthError` otherwise, before the device
    trains or sends anything; ``this`` names the device in the message ("device", "node"), ``enrolled_as`` says
    how it was enrolled, and the ``*_fix`` texts what the operator does about each refusal on its transport (the
    HTTP service, Flower)."""
    enrolled = credentials is not None
    if enrolled and not authenticated:
        raise SecAggAuthError(
            f"refusing SecAgg round {round_id}: this {this} authenticates its neighbours' keys ({enrolled_as}), and "
            f"the round is not authenticated, so the server could substitute them{server_fix}"
        )
    if authenticated and not enrolled:
        raise SecAggAuthError(
            f"refusing SecAgg round {round_id}: it takes signed key advertisements, and this {this} has no "
            f"enrolled identity{unenrolled_fix}"
        )
    if authenticated and credentials is not None:
        credentials.check_current(stale_fix)


def advertisement_statement(
    binding: bytes, client_id: int, device_id: str, c_public: bytes, s_public: bytes
) -> bytes:
    """The bytes a device signs to advertise its X25519 keys: the domain tag, the round's ``binding`` (32 bytes:
    :func:`~deltaplane.aggregation.secagg.protocol.round_binding`), its slot, its device id and both keys."""
    d = _name(device_id, "device id")
    return b"".join([_ADVERT_DOMAIN, binding, struct.pack(">IB", client_id, len(d)), d, c_public, s_public])


def consistency_statement(binding: bytes, client_id: int, request_digest: bytes) -> bytes:
    """The bytes a device signs in the consistency round (Bonawitz et al. 2017 §4, "ConsistencyCheck"): the
    domain tag, the round's ``binding``, its slot and the SHA-256 of the unmasking request it received (its exact
    encoding: round id, survivors and dropped devices). A signature on it vouches for that one request, in that
    round, by that slot: it verifies neither on another survivor set nor moved to another slot or round."""
    if len(binding) != 32 or len(request_digest) != 32:
        raise ConfigError(
            "a consistency statement binds a 32-byte round binding and a 32-byte request digest"
        )
    return b"".join([_CONSISTENCY_DOMAIN, binding, struct.pack(">I", client_id), request_digest])
