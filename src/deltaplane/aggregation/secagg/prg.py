"""Key agreement, key derivation and mask expansion — every primitive from ``cryptography``.

* X25519 Diffie–Hellman gives each pair of clients a shared secret the server cannot compute.
* HKDF-SHA256 turns it into independent 32-byte keys, bound to the round and the pair by its ``info`` string, so
  no key is reused across rounds or purposes.
* AES-256 in CTR mode expands a key into a mask of any length (a standard PRG: the keystream of a fresh key with a
  zero counter); each key encrypts exactly one stream, so the fixed nonce is safe.
* AES-256-GCM encrypts the Shamir shares that travel through the server.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["agree", "derive", "expand_mask"]


def derive(secret: bytes, purpose: str, context: bytes) -> bytes:
    """A 32-byte key for ``purpose`` bound to ``context`` (round id, client ids), via HKDF-SHA256."""
    info = b"deltaplane/secagg/" + purpose.encode() + b"/" + context
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 shared secret with the peer's raw 32-byte public key."""
    return private.exchange(X25519PublicKey.from_public_bytes(peer_public))


def expand_mask(key: bytes, n: int, bits: int) -> np.ndarray:
    """``n`` uniform values in ``[0, 2^bits)`` (uint32) from the AES-256-CTR keystream of ``key``."""
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    buf = bytearray(4 * n + 15)  # update_into wants room for one block more than the input
    enc.update_into(_zeros(4 * n), buf)
    out = np.frombuffer(buf, dtype="<u4", count=n)
    if bits < 32:  # 2^bits divides 2^32, so keeping the low bits keeps the values exactly uniform
        out &= np.uint32((1 << bits) - 1)
    return out


@lru_cache(maxsize=4)
def _zeros(nbytes: int) -> bytes:
    # the plaintext of the keystream; cached because every mask of a round has the same length
    return bytes(nbytes)
