"""The secure aggregation messages as plain bytes: what devices and the server actually send each other.

Every message is ``magic "DPSA" | u8 version | u8 kind | u32 round id | body`` (big-endian integers). Decoding
is strict and bounded: the caller passes the round's :class:`~deltaplane.aggregation.secagg.SecAggConfig`, every
count is checked against the number of clients *before* anything is read, the total length must be exactly what
the counts imply, ids must be in range and strictly increasing, and the round id must match — so a message can
never make its reader allocate more than the config allows, and any deviation is a :class:`DecodeError` that says
what was wrong. The same bytes travel in process, over HTTP bodies and inside Flower records.

=====================  ====================  =======================================================
message                direction             body
=====================  ====================  =======================================================
``AdvertiseKeys``      device → server       id, X25519 public keys ``c`` (share encryption), ``s`` (masks)
``KeyRoster``          server → devices      count, then (id, c, s) per client that advertised
``ShareKeys``          device → server       sender, count, then (recipient, AES-GCM ciphertext)
``ShareInbox``         server → device       recipient, count, then (sender, ciphertext) addressed to it
``MaskedInput``        device → server       id, the masked lane words: ``ring_bits`` bits per value
``UnmaskRequest``      server → devices      survivors, then dropped clients
``UnmaskResponse``     device → server       id, count, then (owner, Shamir share) per owner asked for
``SignedAdvertiseKeys`` device → server      ``AdvertiseKeys`` then u16 certificate length, certificate,
                                             Ed25519 signature (authenticated rounds, :mod:`.identity`)
``SignedKeyRoster``    server → devices      count, then (id, c, s, u16 length, certificate, signature)
``SurvivorSignature``  device → server       id, Ed25519 signature of the unmasking request it received
                                             (authenticated rounds' consistency check, :mod:`.identity`)
``SurvivorSignatures`` server → devices      count, then (id, signature) per device that signed
=====================  ====================  =======================================================
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Self

from deltaplane.aggregation.secagg import shamir
from deltaplane.aggregation.secagg.errors import SecAggError, SecAggOrderError
from deltaplane.aggregation.secagg.identity import CERT_MAX_BYTES, SIGNATURE_BYTES
from deltaplane.errors import DecodeError

if TYPE_CHECKING:
    from deltaplane.aggregation.secagg.protocol import SecAggConfig

__all__ = [
    "CIPHERTEXT_BYTES",
    "AdvertiseKeys",
    "KeyRoster",
    "MaskedInput",
    "Message",
    "ShareInbox",
    "ShareKeys",
    "SignedAdvertiseKeys",
    "SignedKeyRoster",
    "SurvivorSignature",
    "SurvivorSignatures",
    "UnmaskRequest",
    "UnmaskResponse",
    "check_stated_version",
    "decode_message",
]

MAGIC = b"DPSA"
#: 2: masks of a ring of at most 16 bits are expanded from 16-bit keystream words, not 32-bit ones
#: (version 3 had 16-bit keystream words for rings of at most 16 bits). 3: masks are AES-128-CTR keystreams of 16-byte
#: keys, not AES-256-CTR of 32-byte ones (:mod:`~deltaplane.aggregation.secagg.prg` says why). 4: masks are added
#: to lane words of several ring values (2 to 8 per 64-bit word, in ``Z / 2^W``,
#: :func:`~deltaplane.aggregation.secagg.ring.to_words`), one 64-bit keystream word each, not value by value in
#: ``Z / 2^k``; the masked input's bytes keep their size and bit layout. A peer of another version would unmask
#: with other masks, so its messages are refused rather than summed. 5: authenticated rounds (signed key
#: advertisements, ``SignedAdvertiseKeys`` / ``SignedKeyRoster``, and the consistency check, ``SurvivorSignature(s)``,
#: Bonawitz et al. 2017 §4); the other messages keep their layout, but a version-4 device never signs (an
#: authenticated round would stall at the check) and a version-5 device under a version-4 server could not
#: unmask, so either is refused at its first message, saying which side to upgrade
VERSION = 5
_HEAD = struct.Struct(">4sBBI")  # magic, version, kind, round id


def check_stated_version(stated: object, round_id: object, *, this: str, peer: str, unstated: str) -> None:
    """Refuse, before a device trains or sends anything, a round whose server states another SecAgg message
    version than :data:`VERSION` (or none): every message of the round would be refused (:func:`decode_message`),
    so the device says here which side to upgrade, in a :class:`SecAggError`.

    The server states its version where it invites devices: the HTTP service in its invitation
    (``secagg_version``), Flower's :class:`~deltaplane.flower.SecAggStrategy` in its advertise record
    (``secagg-version``). ``this`` and ``peer`` name the two sides in the message ("device" and "service",
    "node" and "server"); ``unstated`` says what a server that states no version is (e.g. "so it is older
    than 5").
    """
    if stated == VERSION and type(stated) is int:
        return
    if isinstance(stated, int) and not isinstance(stated, bool) and stated > VERSION:
        said, fix = f"speaks version {stated}", f"upgrade this {this} to a release that speaks {stated}"
    else:
        said = f"states none ({unstated})" if stated is None else f"speaks version {stated!r}"
        fix = f"upgrade the {peer} to a release that speaks {VERSION}"
    raise SecAggError(
        f"refusing SecAgg round {round_id}: this {this} speaks SecAgg message version {VERSION} and the "
        f"{peer} {said}, so every message would be refused; {fix}"
    )


KEY_BYTES = 32
#: nonce (12) + two Shamir shares (b and s) + GCM tag (16)
CIPHERTEXT_BYTES = 12 + 2 * shamir.SHARE_BYTES + 16
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_ROSTER_ENTRY = struct.Struct(f">I{KEY_BYTES}s{KEY_BYTES}s")  # id, c public key, s public key
_CIPHERTEXT_ENTRY = struct.Struct(f">I{CIPHERTEXT_BYTES}s")  # peer id, ciphertext
_SHARE_ENTRY = struct.Struct(f">I{shamir.SHARE_BYTES}s")  # owner id, Shamir share
_SIGNATURE_ENTRY = struct.Struct(f">I{SIGNATURE_BYTES}s")  # signer id, Ed25519 signature


class _Reader:
    """Reads a message body with every length checked against what is left."""

    def __init__(self, data: bytes, offset: int, what: str) -> None:
        self.data, self.pos, self.what = data, offset, what

    def _advance(self, n: int) -> int:
        """Where the next ``n`` bytes start; moves past them, or raises if fewer are left."""
        if n < 0 or self.pos + n > len(self.data):
            raise DecodeError(
                f"{self.what}: truncated ({len(self.data)} bytes, needs more than {self.pos + n})"
            )
        self.pos += n
        return self.pos - n

    def take(self, n: int) -> bytes:
        at = self._advance(n)
        return self.data[at : at + n]

    def view(self, n: int) -> memoryview:
        """Like :meth:`take`, as a read-only view of the message's bytes: no copy of a large body."""
        at = self._advance(n)
        return memoryview(self.data)[at : at + n]

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def count(self, limit: int, item_bytes: int, field: str) -> int:
        n = self.u32()
        if n > limit:
            raise DecodeError(f"{self.what}: {n} {field} declared, at most {limit} in this round")
        if self.pos + n * item_bytes > len(self.data):
            raise DecodeError(
                f"{self.what}: {n} {field} declared but only {len(self.data) - self.pos} bytes left"
            )
        return n

    def client(self, config: SecAggConfig, field: str) -> int:
        u = self.u32()
        if u >= config.num_clients:
            raise DecodeError(
                f"{self.what}: {field} {u} is not a client of this round (0..{config.num_clients - 1})"
            )
        return u

    def ids(self, config: SecAggConfig, n: int, field: str) -> list[int]:
        out = list(struct.unpack(f">{n}I", self.take(4 * n)))  # one call for the list: every device reads it
        bad = next((u for u in out if u >= config.num_clients), None)
        if bad is not None:
            raise DecodeError(
                f"{self.what}: {field} {bad} is not a client of this round (0..{config.num_clients - 1})"
            )
        if any(a >= b for a, b in itertools.pairwise(out)):
            raise DecodeError(f"{self.what}: {field}s must be strictly increasing")
        return out

    def entries(self, config: SecAggConfig, n: int, entry: struct.Struct, field: str) -> list[tuple]:
        """``n`` entries ``(id, …)`` of the fixed layout ``entry``, unpacked in one call over their bytes (every
        device and the server read many), with ids checked in range and strictly increasing."""
        out = list(entry.iter_unpack(self.take(n * entry.size)))
        last = -1
        for e in out:
            if e[0] >= config.num_clients:
                raise DecodeError(
                    f"{self.what}: {field} {e[0]} is not a client of this round (0..{config.num_clients - 1})"
                )
            if e[0] <= last:
                raise DecodeError(f"{self.what}: {field}s must be strictly increasing")
            last = e[0]
        return out

    def end(self) -> None:
        if self.pos != len(self.data):
            raise DecodeError(f"{self.what}: {len(self.data) - self.pos} trailing bytes")


class Message:
    """Base of the eleven messages: framing, and strict decoding dispatched on the kind byte."""

    KIND: ClassVar[int] = 0

    round_id: int

    def body(self) -> bytes:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """The message on the wire: header then body."""
        return _HEAD.pack(MAGIC, VERSION, self.KIND, self.round_id) + self.body()

    def wire_size(self) -> int:
        """``len(self.to_bytes())``: what the sender uploaded (a receiver counts it without re-encoding)."""
        return len(self.to_bytes())

    @classmethod
    def max_bytes(cls, config: SecAggConfig) -> int:
        """The largest valid encoding of this message in a round of ``config`` (a body cap for transports)."""
        raise NotImplementedError

    @classmethod
    def _read(cls, r: _Reader, round_id: int, config: SecAggConfig) -> Message:
        """This kind's body from ``r`` (its header already read); each kind defines its own."""
        raise NotImplementedError

    @classmethod
    def from_bytes(cls, data: bytes, config: SecAggConfig) -> Self:
        """Decode ``data`` as this kind of message for the round of ``config``; :class:`DecodeError` otherwise."""
        msg = decode_message(data, config)
        if not isinstance(msg, cls):
            raise DecodeError(f"expected a {cls.__name__} message, got a {type(msg).__name__}")
        return msg


def _items_sorted(d: dict[int, bytes]) -> list[tuple[int, bytes]]:
    return sorted(d.items())


@dataclass(frozen=True)
class AdvertiseKeys(Message):
    """Stage 0, device → server: the client's two X25519 public keys."""

    KIND: ClassVar[int] = 1
    round_id: int
    client_id: int
    c_public: bytes
    s_public: bytes

    def body(self) -> bytes:
        return _U32.pack(self.client_id) + self.c_public + self.s_public

    @classmethod
    def max_bytes(cls, config: SecAggConfig) -> int:
        return _HEAD.size + 4 + 2 * KEY_BYTES

    @classmethod
    def _read(cls, r: _Reader, round_id: int, config: SecAggConfig) -> AdvertiseKeys:
        u = r.client(config, "client id")
        return cls(round_id, u, r.take(KEY_BYTES), r.take(KEY_BYTES))


@dataclass(frozen=True)
class KeyRoster(Message):
    """Stage 0 → 1, server → devices: the public keys of every client that advertised in time."""

    KIND: ClassVar[int] = 2
    round_id: int
    keys: dict[int, tuple[bytes, bytes]]  # client id -> (c_public, s_public)

    def body(self) -> bytes:
        parts = [_U32.pack(len(self.keys))]
        for u, (c, s) in sorted(self.keys.items()):
            parts += [_U32.pack(u), c, s]
        return b"".join(parts)

    @classmethod
    def max_bytes(cls, config: SecAggConfig) -> int:
        return _HEAD.size + 4 + config.num_clients * (4 + 2 * KEY_BYTES)

    @classmethod
    def _read(cls, r: _Reader, round_id: int, config: SecAggConfig) -> KeyRoster:
        n = r.count(config.num_clients, 4 + 2 * KEY_BYTES, "clients")
        keys = {u: (c, s) for u, c, s in r.entries(config, n, _ROSTER_ENTRY, "client id")}
        return cls(round_id, keys)


def _attestation(r: _Reader) -> tuple[bytes, bytes]:
    """A length-prefixed certificate (at most CERT_MAX_BYTES, decoded by the device) and a signature."""
    n = _U16.unpack(r.take(2))[0]
    if n > CERT_MAX_BYTES:
        raise DecodeError(f"{r.what}: a {n}-byte certificate, at most {CERT_MAX_BYTES}")
    return r.take(n), r.take(SIGNATURE_BYTES)


def _attestation_bytes(certificate: bytes, signature: bytes) -> bytes:
    if len(certificate) > CERT_MAX_BYTES or len(signature) != SIGNATURE_BYTES:
        raise DecodeError(
            f"an attestation is a certificate of at most {CERT_MAX_BYTES} bytes and a {SIGNATURE_BYTES}-byte "
            f"signature; got {len(certificate)} and {len(signature)}"
        )
    return _U16.pack(len(certificate)) + certificate + signature


_ATTESTATION_MAX = 2 + CERT_MAX_BYTES + SIGNATURE_BYTES


@dataclass(frozen=True)
class SignedAdvertiseKeys(AdvertiseKeys):
    """Stage 0 of an authenticated round, device → server: the two public keys, the device's certificate and
    its identity key's signature of :func:`~deltaplane.aggregation.secagg.identity.advertisement_statement`."""

    KIND: ClassVar[int] = 8
    certificate: bytes = b""
    signature: bytes = b""

    def body(self) -> bytes:
        return super().body() + _attestation_bytes(self.certificate, self.signature)

    @classmethod
    def max_bytes(cls, config: SecAggConfig) -> int:
        return AdvertiseKeys.max_bytes(config) + _ATTESTATION_MAX

    @classmethod
    def _read(cls, r: _Reader, round_id: int, config: SecAggConfig) -> SignedAdvertiseKeys:
        u = r.client(config, "client id")
        c, s = r.take(KEY_BYTES), r.take(KEY_BYTES)
        return cls(round_id, u, c, s, *_attestation(r))


@dataclass(frozen=True)
class SignedKeyRoster(KeyRoster):
    """Stage 0 → 1 of an authenticated round, server → devices: every advertisement the server accepted, each
    with its certificate and signature, which every device checks before using a neighbour's keys."""

    KIND: ClassVar[int] = 9
    attestations: dict[int, tuple[bytes, bytes]] = field(
        default_factory=dict
    )  # id -> (certificate, signature)

    def body(self) -> bytes:
        if set(self.attestations) != set(self.keys):
            raise DecodeError("a signed roster carries one attestation per advertised client")
        parts = [_U32.pack(len(self.keys))]
        for u, (c, s) in sorted(self.keys.items()):
            parts += [_U32.pack(u), c, s, _attestation_bytes(*self.attestations[u])]
        return b"".join(parts)

    @classmethod
    def max_bytes(cls, config: SecAggConfig) -> int:
        return _HEAD.size + 4 + config.num_clients * (4 + 2 * KEY_BYTES + _ATTESTATION_MAX)

    @classmethod
    def _read(cls, r: _Reader, round_id: int, config: SecAggConfig) -> SignedKeyRoster:
        least = 4 + 2 * KEY_BYTES + 2 + SIGNATURE_BYTES  # an entry's smallest size bounds the declared count
        n = r.count(config.num_clients, least, "clients")
        keys, attest, last = {}, {}, -1
        for _ in range(n):
            u = r.client(config, "client id")
            if u <= last:
                raise DecodeError(f"{r.what}: client ids must be strictly increasing")
            last = u
            keys[u] = (r.take(KEY_BYTES), r.take(KEY_BYTES))
            attest[u] = _attestation(r)
        return cls(round_id, keys, attest)


@dataclass(frozen=True)
class _Addressed(Message):
    """A client id plus ciphertexts keyed by another client id (ShareKeys and ShareInbox share this layout)."""

    round_id: int
    client_id: int
    ciphertexts: dict[int, bytes]

    def _checked(self) -> list[tuple[int, bytes]]:
        items = _items_sorted(self.ciphertexts)
        for v, ct in items:
            if len(ct) != CIPHERTEXT_BYTES:
                raise DecodeError(
                    f"share ciphertext for client {v} is {len(ct)} bytes, not {CIPHERTEXT_BYTES}"
                )
        return items

    def body(self) -> bytes:
        items = self._checked()
        parts = [_U32.pack(self.client_id), _U32.pack(len(items))]
        for v, ct in items:
            parts += [_U32.pack(v), ct]
        return b"".join(parts)

    def wire_size(self) -> int:  # counted, not encoded again: the server counts every sender's bytes
        return _HEAD.size + 8 + len(self._checked()) * _CIPHERTEXT_ENTRY.size

    @classmethod
    def max_bytes(cls, config: SecAggConfig) -> int:
        return _HEAD.size + 8 + (config.num_clients - 1) * (4 + CIPHERTEXT_BYTES)

    @classmethod
    def _read(cls, r: _Reader, round_id: int, config: SecAggConfig) -> _Addressed:
        u = r.client(config, "client id")
        n = r.count(config.num_clients - 1, 4 + CIPHERTEXT_BYTES, "ciphertexts")
        cts = dict(r.entries(config, n, _CIPHERTEXT_ENTRY, "peer id"))
        if u in cts:
            raise DecodeError(f"{r.what}: peer ids must be strictly increasing and differ from the client's")
        return cls(round_id, u, cts)


@dataclass(frozen=True)
class ShareKeys(_Addressed):
    """Stage 1, device → server: ``client_id``'s encrypted Shamir shares, one ciphertext per recipient."""

    KIND: ClassVar[int] = 3


@dataclass(frozen=True)
class ShareInbox(_Addressed):
    """Stage 1 → 2, server → device: the ciphertexts addressed to ``client_id``, keyed by sender."""

    KIND: ClassVar[int] = 4


@dataclass(frozen=True)
class MaskedInput(Message):
    """Stage 2, device → server: the masked lane words of ``vector_size`` values, ``ring_bits`` bits per value.

    Each word of ``L`` values is masked in ``Z / 2^(L·ring_bits)`` (:func:`~deltaplane.aggregation.secagg.ring.
    pack_words`) and travels at exactly its width, so the body is ``⌈vector_size · ring_bits / 8⌉`` bytes: the
    additive-masking limit, as in version 3.
    """

    KIND: ClassVar[int] = 5
    round_id: int
    client_id: int
    #: read-only bytes-like: a view of the decoded message's bytes, or of the device's packed words
    packed: bytes | memoryview

    def body(self) -> bytes:
        return _U32.pack(self.client_id) + self.packed

    def to_bytes(self) -> bytes:
        # one copy of the (large) packed vector, not two
        return b"".join(
            [_HEAD.pack(MAGIC, VERSION, self.KIND, self.round_id), _U32.pack(self.client_id), self.packed]
        )

    def wire_size(self) -> int:
        return _HEAD.size + 4 + len(self.packed)

    @classmethod
    def max_bytes(cls, config: SecAggConfig) -> int:
        return _HEAD.size + 4 + config.packed_bytes

    @classmethod
    def _read(cls, r: _Reader, round_id: int, config: SecAggConfig) -> MaskedInput:
        u = r.client(config, "client id")
        # a view, not a copy, of the largest message's body: the server adds it to its sum and drops it
        return cls(round_id, u, r.view(config.packed_bytes))


@dataclass(frozen=True)
class UnmaskRequest(Message):
    """Stage 2 → 3, server → devices: who is in the sum (survivors) and who shared keys but did not upload."""

    KIND: ClassVar[int] = 6
    round_id: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def body(self) -> bytes:
        return b"".join(
            [
                _U32.pack(len(self.survivors)),
                *map(_U32.pack, self.survivors),
                _U32.pack(len(self.dropped)),
                *map(_U32.pack, self.dropped),
            ]
        )

    @classmethod
    def max_bytes(cls, config: SecAggConfig) -> int:
        return _HEAD.size + 8 + 4 * config.num_clients

    @classmethod
    def _read(cls, r: _Reader, round_id: int, config: SecAggConfig) -> UnmaskRequest:
        surv = r.ids(config, r.count(config.num_clients, 4, "survivors"), "survivor")
        drop = r.ids(config, r.count(config.num_clients - len(surv), 4, "dropped clients"), "dropped client")
        if set(surv) & set(drop):
            raise DecodeError(f"{r.what}: clients {sorted(set(surv) & set(drop))[:5]} listed as both")
        return cls(round_id, tuple(surv), tuple(drop))


@dataclass(frozen=True)
class UnmaskResponse(Message):
    """Stage 3, device → server: for each owner asked about, one Shamir share (``b`` or ``s``, never both)."""

    KIND: ClassVar[int] = 7
    round_id: int
    client_id: int
    shares: dict[int, bytes]  # owner -> share (shamir.SHARE_BYTES)

    def body(self) -> bytes:
        parts = [_U32.pack(self.client_id), _U32.pack(len(self.shares))]
        for v, sh in _items_sorted(self.shares):
            parts += [_U32.pack(v), sh]
        return b"".join(parts)

    def wire_size(self) -> int:  # counted, not encoded again
        return _HEAD.size + 8 + sum(4 + len(sh) for sh in self.shares.values())

    @classmethod
    def max_bytes(cls, config: SecAggConfig) -> int:
        return _HEAD.size + 8 + config.num_clients * (4 + shamir.SHARE_BYTES)

    @classmethod
    def _read(cls, r: _Reader, round_id: int, config: SecAggConfig) -> UnmaskResponse:
        u = r.client(config, "client id")
        n = r.count(config.num_clients, 4 + shamir.SHARE_BYTES, "shares")
        shares = dict(r.entries(config, n, _SHARE_ENTRY, "owner id"))
        for raw in shares.values():
            shamir.share_from_bytes(raw)  # range check now, not when the server combines
        return cls(round_id, u, shares)


@dataclass(frozen=True)
class SurvivorSignature(Message):
    """The consistency check of an authenticated round, device → server: ``client_id``'s identity-key signature
    of :func:`~deltaplane.aggregation.secagg.identity.consistency_statement` for the unmasking request it
    received (Bonawitz et al. 2017 §4, "ConsistencyCheck")."""

    KIND: ClassVar[int] = 10
    round_id: int
    client_id: int
    signature: bytes

    def body(self) -> bytes:
        if len(self.signature) != SIGNATURE_BYTES:
            raise DecodeError(f"a survivor signature is {SIGNATURE_BYTES} bytes; got {len(self.signature)}")
        return _U32.pack(self.client_id) + self.signature

    @classmethod
    def max_bytes(cls, config: SecAggConfig) -> int:
        return _HEAD.size + _SIGNATURE_ENTRY.size

    @classmethod
    def _read(cls, r: _Reader, round_id: int, config: SecAggConfig) -> SurvivorSignature:
        u = r.client(config, "client id")
        return cls(round_id, u, r.take(SIGNATURE_BYTES))


@dataclass(frozen=True)
class SurvivorSignatures(Message):
    """The consistency check's result, server → devices: every survivor signature the server collected, which
    each device checks before it reveals a share (forwarded unverified: the devices verify)."""

    KIND: ClassVar[int] = 11
    round_id: int
    signatures: dict[int, bytes]  # signer id -> signature

    def body(self) -> bytes:
        parts = [_U32.pack(len(self.signatures))]
        for u, sig in _items_sorted(self.signatures):
            if len(sig) != SIGNATURE_BYTES:
                raise DecodeError(
                    f"client {u}'s survivor signature is {len(sig)} bytes, not {SIGNATURE_BYTES}"
                )
            parts += [_U32.pack(u), sig]
        return b"".join(parts)

    @classmethod
    def max_bytes(cls, config: SecAggConfig) -> int:
        return _HEAD.size + 4 + config.num_clients * _SIGNATURE_ENTRY.size

    @classmethod
    def _read(cls, r: _Reader, round_id: int, config: SecAggConfig) -> SurvivorSignatures:
        n = r.count(config.num_clients, _SIGNATURE_ENTRY.size, "signatures")
        return cls(round_id, dict(r.entries(config, n, _SIGNATURE_ENTRY, "signer id")))


_KINDS: dict[int, type[Message]] = {
    cls.KIND: cls
    for cls in (
        AdvertiseKeys,
        KeyRoster,
        ShareKeys,
        ShareInbox,
        MaskedInput,
        UnmaskRequest,
        UnmaskResponse,
        SignedAdvertiseKeys,
        SignedKeyRoster,
        SurvivorSignature,
        SurvivorSignatures,
    )
}


def decode_message(data: bytes, config: SecAggConfig) -> Message:
    """Decode any SecAgg message of the round of ``config``, strictly (see the module docstring)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"a SecAgg message is bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _HEAD.size:
        raise DecodeError(f"SecAgg message of {len(data)} bytes is shorter than its {_HEAD.size}-byte header")
    magic, version, kind, round_id = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError(f"not a SecAgg message (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        upgrade = (
            f"the sender runs an older deltaplane: upgrade it to a release that speaks version {VERSION}"
            if version < VERSION
            else f"the sender runs a newer deltaplane: upgrade this side to a release that speaks version {version}"
        )
        raise DecodeError(
            f"SecAgg message version {version} is not supported (this reader speaks version {VERSION}): {upgrade}; "
            "peers of different versions cannot run a round together"
        )
    cls = _KINDS.get(kind)
    if cls is None:
        raise DecodeError(f"unknown SecAgg message kind {kind}")
    if len(data) > cls.max_bytes(config):
        raise DecodeError(
            f"{cls.__name__} of {len(data)} bytes exceeds the {cls.max_bytes(config)}-byte maximum"
        )
    if round_id != config.round_id:
        raise SecAggOrderError(
            f"{cls.__name__} is for round {round_id}, this is round {config.round_id}", stage="decode"
        )
    r = _Reader(data, _HEAD.size, cls.__name__)
    msg = cls._read(r, round_id, config)
    r.end()
    return msg
