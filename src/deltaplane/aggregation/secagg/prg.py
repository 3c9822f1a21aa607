"""Key agreement, key derivation and mask expansion — every primitive from ``cryptography``.

* X25519 Diffie–Hellman gives each pair of clients a shared secret the server cannot compute.
* HKDF-SHA256 turns it into independent 32-byte keys, bound to the round and the pair by its ``info`` string, so
  no key is reused across rounds or purposes.
* AES-256 in CTR mode expands a key into a mask of any length (a standard PRG: the keystream of a fresh key with a
  zero counter); each key encrypts exactly one stream, so the fixed nonce is safe. :func:`add_masks` adds or
  subtracts many such masks in place, a cache-sized block of every keystream at a time.
* AES-256-GCM encrypts the Shamir shares that travel through the server.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from deltaplane.aggregation.secagg.errors import SecAggError

__all__ = ["add_masks", "agree", "derive", "expand_mask"]

#: keystream words per step of :func:`add_masks`: a block of the sum (128 kB) and of the keystream stay in a
#: core's L2 cache while every mask is added to it
MASK_BLOCK_WORDS = 1 << 15


def derive(secret: bytes, purpose: str, context: bytes) -> bytes:
    """A 32-byte key for ``purpose`` bound to ``context`` (round id, client ids), via HKDF-SHA256."""
    info = b"deltaplane/secagg/" + purpose.encode() + b"/" + context
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 shared secret with the peer's raw 32-byte public key."""
    return private.exchange(X25519PublicKey.from_public_bytes(peer_public))


def _keystream(key: bytes) -> CipherContext:
    return Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()


def expand_mask(key: bytes, n: int, bits: int) -> np.ndarray:
    """``n`` uniform values in ``[0, 2^bits)`` (uint32) from the AES-256-CTR keystream of ``key``.

    Word ``i`` is little-endian bytes ``4i … 4i + 3`` of the keystream, reduced to its low ``bits`` bits.
    """
    enc = _keystream(key)
    buf = bytearray(4 * n + 15)  # update_into wants room for one block more than the input
    enc.update_into(_zeros(4 * n), buf)
    out = np.frombuffer(buf, dtype="<u4", count=n)
    if bits < 32:  # 2^bits divides 2^32, so keeping the low bits keeps the values exactly uniform
        out &= np.uint32((1 << bits) - 1)
    return out


def add_masks(acc: np.ndarray, masks: Iterable[tuple[bytes, int]]) -> None:
    """``acc += Σ sign · PRG(key)`` modulo 2³², in place, for ``(key, sign)`` pairs with ``sign`` ±1.

    ``PRG(key)`` is :func:`expand_mask`'s keystream words before their reduction to ``bits`` bits; reduced
    modulo ``2^bits`` afterwards (2^bits divides 2³²), the sum is exactly that of the reduced masks, so the
    reduction is done once on the sum instead of once per mask. Every keystream is read a block at a time
    (CTR mode continues the stream across calls) and added while that block of ``acc`` is in cache: no
    mask-sized array is ever allocated.
    """
    if acc.dtype != np.uint32 or not acc.flags.c_contiguous or acc.ndim != 1:
        raise SecAggError(f"masks are added to a contiguous 1-D uint32 array, not {acc.dtype} {acc.shape}")
    streams = [(_keystream(key), sign) for key, sign in masks]
    if any(sign not in (1, -1) for _, sign in streams):
        raise SecAggError("a mask's sign must be +1 or -1")
    n = len(acc)
    step = max(1, min(n, MASK_BLOCK_WORDS))
    zeros = memoryview(_zeros(4 * step))
    buf = bytearray(4 * step + 15)  # update_into wants room for one block more than the input
    words = np.frombuffer(buf, dtype="<u4", count=step)
    for lo in range(0, n, step):
        m = min(step, n - lo)
        part, w = acc[lo : lo + m], words[:m]
        for enc, sign in streams:
            enc.update_into(zeros[: 4 * m], buf)
            (np.add if sign > 0 else np.subtract)(part, w, out=part)


@lru_cache(maxsize=4)
def _zeros(nbytes: int) -> bytes:
    # the plaintext of the keystream; cached because every mask of a round has the same length
    return bytes(nbytes)
