"""Encryption at rest for registry blobs: AES-256-GCM envelope encryption with rotatable key-encryption keys.

Each blob gets its own random 256-bit data key (DEK); the blob is encrypted with it, and the DEK is stored in
the blob's header wrapped (AES-GCM) by a key-encryption key (KEK). Both encryptions authenticate the blob's
SHA-256 name as associated data, so a valid encrypted blob cannot be moved under another name, and any
flipped bit fails the GCM tag (:class:`~deltaplane.errors.IntegrityError`). Rotating the KEK rewrites only
the small headers — the ciphertext stays. (NIST SP 800-38D for GCM; the envelope pattern is the one cloud
KMSs use.)

Blob layout (version 1)::

    b"DPEB" | u8 version | u8 kid_len | kid | u8 wrap_nonce(12) | wrapped_dek(48) | nonce(12) | ciphertext+tag

KEKs come from, in order: ``$DELTAPLANE_KEK`` (base64 of 32 bytes), ``$DELTAPLANE_KEK_FILE`` (a file holding
that), and every ``<home>/keys/kek/*.key``; the first one present encrypts new blobs, all of them decrypt.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import struct
from collections.abc import Mapping
from pathlib import Path

from deltaplane.errors import ConfigError, IntegrityError, NotFound

__all__ = ["KEK_ENV", "KEK_FILE_ENV", "MAGIC", "KeyRing", "is_sealed", "kek_id", "parse_key"]

MAGIC = b"DPEB"
VERSION = 1
KEK_ENV = "DELTAPLANE_KEK"
KEK_FILE_ENV = "DELTAPLANE_KEK_FILE"
_WRAP_AAD = b"deltaplane/kek-wrap/v1\x00"
_DATA_AAD = b"deltaplane/blob/v1\x00"
_NONCE = 12
_WRAPPED = 32 + 16


def kek_id(key: bytes) -> str:
    """A key's public identifier: the first 16 hex digits of SHA-256 over a domain tag and the key."""
    return hashlib.sha256(b"deltaplane/kek-id\x00" + key).hexdigest()[:16]


def is_sealed(raw: bytes) -> bool:
    return raw[:4] == MAGIC


def parse_key(text: bytes, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(f"{where} must hold a base64-encoded 32-byte key (AES-256)")
    return key


class KeyRing:
    """Key-encryption keys by id; ``current`` wraps new data keys, every key unwraps."""

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if current not in keys:
            raise ConfigError(f"current KEK {current} is not among the loaded keys {sorted(keys)}")
        self.keys = dict(keys)
        self.current = current

    @staticmethod
    def key_dir(home: str | os.PathLike[str]) -> Path:
        return Path(home) / "keys" / "kek"

    @classmethod
    def load(cls, home: str | os.PathLike[str]) -> KeyRing:
        """The KEKs available to the registry at ``home`` (environment first, then key files)."""
        ordered: list[bytes] = []
        if os.environ.get(KEK_ENV):
            ordered.append(parse_key(os.environ[KEK_ENV].encode(), f"${KEK_ENV}"))
        if os.environ.get(KEK_FILE_ENV):
            p = Path(os.environ[KEK_FILE_ENV])
            if not p.is_file():
                raise NotFound(f"${KEK_FILE_ENV} names {p}, which does not exist")
            ordered.append(parse_key(p.read_bytes(), str(p)))
        files = sorted(cls.key_dir(home).glob("*.key"), key=lambda p: p.stat().st_mtime, reverse=True)
        ordered += [parse_key(f.read_bytes(), str(f)) for f in files]
        if not ordered:
            raise NotFound(
                f"the registry at {home} is encrypted but no key-encryption key was found: set ${KEK_ENV} or "
                f"${KEK_FILE_ENV}, or restore {cls.key_dir(home)}"
            )
        keys = {kek_id(k): k for k in ordered}
        return cls(keys, kek_id(ordered[0]))

    @classmethod
    def create_key_file(cls, home: str | os.PathLike[str], key: bytes | None = None) -> str:
        """Write a (new random) KEK to ``<home>/keys/kek/<id>.key`` (mode 0600 from creation); returns its id."""
        from deltaplane.registry.signing import write_secret_file

        key = key if key is not None else secrets.token_bytes(32)
        kid = kek_id(key)
        write_secret_file(cls.key_dir(home) / f"{kid}.key", base64.b64encode(key) + b"\n")
        return kid

    # -- envelope --------------------------------------------------------------------------------------
    def seal(self, data: bytes, name: str) -> bytes:
        """Encrypt ``data`` (whose SHA-256 is ``name``) under a fresh data key wrapped by the current KEK."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        dek = secrets.token_bytes(32)
        nonce = secrets.token_bytes(_NONCE)
        body = AESGCM(dek).encrypt(nonce, data, _DATA_AAD + name.encode())
        return self._header(self.current, dek, name) + nonce + body

    def _header(self, kid: str, dek: bytes, name: str) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        wrap_nonce = secrets.token_bytes(_NONCE)
        wrapped = AESGCM(self.keys[kid]).encrypt(wrap_nonce, dek, _WRAP_AAD + name.encode())
        k = kid.encode()
        return MAGIC + struct.pack("<BB", VERSION, len(k)) + k + wrap_nonce + wrapped

    def _split(self, raw: bytes, name: str) -> tuple[str, bytes, int]:
        """(kid, data key, offset of the data nonce) of a sealed blob; IntegrityError if it does not open."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(raw) < 6 or raw[:4] != MAGIC:
            raise IntegrityError(f"blob {name} is not an encrypted registry blob")
        version, klen = struct.unpack_from("<BB", raw, 4)
        if version != VERSION:
            raise IntegrityError(
                f"blob {name} uses encryption format {version}; this deltaplane reads {VERSION}"
            )
        off = 6 + klen
        if len(raw) < off + _NONCE + _WRAPPED + _NONCE + 16:
            raise IntegrityError(f"blob {name} is truncated")
        kid = raw[6:off].decode("ascii", errors="replace")
        kek = self.keys.get(kid)
        if kek is None:
            raise IntegrityError(
                f"blob {name} is wrapped by key {kid}, which is not loaded ({sorted(self.keys)})"
            )
        wrap_nonce, wrapped = raw[off : off + _NONCE], raw[off + _NONCE : off + _NONCE + _WRAPPED]
        try:
            dek = AESGCM(kek).decrypt(wrap_nonce, wrapped, _WRAP_AAD + name.encode())
        except InvalidTag:
            raise IntegrityError(
                f"blob {name}: its data key fails the AES-GCM tag (tampered or moved)"
            ) from None
        return kid, dek, off + _NONCE + _WRAPPED

    def open(self, raw: bytes, name: str) -> bytes:
        """Decrypt a sealed blob; :class:`IntegrityError` when any byte was altered or it was renamed."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        _, dek, off = self._split(raw, name)
        try:
            return AESGCM(dek).decrypt(
                raw[off : off + _NONCE], raw[off + _NONCE :], _DATA_AAD + name.encode()
            )
        except InvalidTag:
            raise IntegrityError(
                f"blob {name} fails its AES-GCM tag: the encrypted bytes were tampered with"
            ) from None

    def rewrap(self, raw: bytes, name: str) -> bytes | None:
        """The blob with its data key re-wrapped by the current KEK (None when it already is)."""
        kid, dek, off = self._split(raw, name)
        if kid == self.current:
            return None
        return self._header(self.current, dek, name) + raw[off:]
