"""Key agreement, key derivation and mask expansion — every primitive from ``cryptography``.

* X25519 Diffie–Hellman gives each pair of clients a shared secret the server cannot compute.
* HKDF-SHA256 turns it into independent keys, bound to the round and the pair by its ``info`` string, so no key
  is reused across rounds or purposes: 16-byte mask keys (:data:`MASK_KEY_BYTES`), 32-byte share-encryption keys.
* AES-128 in CTR mode expands a mask key into a mask of any length (a standard PRG: the keystream of a fresh key
  with a zero counter); each key encrypts exactly one stream, so the fixed nonce is safe. :func:`add_masks` adds
  or subtracts many such masks in place, a cache-sized block of every keystream at a time.
* AES-256-GCM encrypts the Shamir shares that travel through the server.

Why AES-128 for the masks (message version 3; version 2 used AES-256-CTR): the scheme's security level is
already set at about 128 bits by X25519 (RFC 7748 puts curve25519 at the ~128-bit level), which produces every
pairwise mask key, so a 128-bit mask key does not lower it; AES-128-CTR as a PRG is standard (NIST SP 800-90A's
CTR_DRBG is specified with AES-128), and one key drives at most 2^29 blocks (2^31 values of 4 bytes), far from
CTR's birthday bound of 2^64. The masks are most of a round's work and AES-128 runs 10 rounds to AES-256's 14:
on the benchmark machine it expands keystream about 1.35× as fast (11.8 vs 8.7 GB/s in the 128 KB steps of
:func:`add_masks`).
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

__all__ = ["MASK_KEY_BYTES", "add_masks", "agree", "derive", "expand_mask", "mask_word_bits"]

#: bytes of a mask key: AES-128 (message version 3)
MASK_KEY_BYTES = 16

#: keystream bytes per step of :func:`add_masks`: that block of keystream and of the sum stay in a core's L2
#: cache while every mask is added to it
MASK_BLOCK_BYTES = 1 << 17


def derive(secret: bytes, purpose: str, context: bytes, length: int = 32) -> bytes:
    """A ``length``-byte key for ``purpose`` bound to ``context`` (round id, client ids), via HKDF-SHA256."""
    info = b"deltaplane/secagg/" + purpose.encode() + b"/" + context
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 shared secret with the peer's raw 32-byte public key."""
    return private.exchange(X25519PublicKey.from_public_bytes(peer_public))


def _keystream(key: bytes) -> CipherContext:
    if len(key) != MASK_KEY_BYTES:  # AES would silently pick AES-192/256 and expand other masks
        raise SecAggError(f"a mask key has {MASK_KEY_BYTES} bytes (AES-128), not {len(key)}")
    return Cipher(algorithms.AES128(key), modes.CTR(b"\0" * 16)).encryptor()


def mask_word_bits(bits: int) -> int:
    """Keystream bits behind each mask value in a ``bits``-bit ring: 16 up to 16 bits, else 32.

    Since version 2 of the messages (:mod:`~deltaplane.aggregation.secagg.messages`); version 1 used 32-bit words
    for every ring, so a ring of at most 16 bits (8-bit codes, up to 256 clients) now costs half the AES.
    """
    return 16 if bits <= 16 else 32


def expand_mask(key: bytes, n: int, bits: int) -> np.ndarray:
    """``n`` uniform values in ``[0, 2^bits)`` (uint32) from the AES-128-CTR keystream of mask key ``key``.

    Value ``i`` is the ``i``-th little-endian word of :func:`mask_word_bits` bits of the keystream (bytes
    ``wi … wi + w − 1`` for ``w``-byte words), reduced to its low ``bits`` bits: 2^bits divides the word
    range, so the values are exactly uniform.
    """
    w = mask_word_bits(bits) // 8
    enc = _keystream(key)
    buf = bytearray(w * n + 15)  # update_into wants room for one block more than the input
    enc.update_into(_zeros(w * n), buf)
    out = np.frombuffer(buf, dtype=f"<u{w}", count=n).astype(np.uint32)
    return out & np.uint32((1 << bits) - 1) if bits < 32 else out


def add_masks(acc: np.ndarray, masks: Iterable[tuple[bytes, int]], bits: int) -> None:
    """``acc += Σ sign · PRG(key)`` modulo ``2^(8 · acc.itemsize)``, in place, for mask keys ``key``, sign ±1.

    ``PRG(key)`` is :func:`expand_mask`'s keystream words for a ``bits``-bit ring, before their reduction to
    ``bits`` bits: ``2^bits`` divides the word and the accumulator ranges, so reduced modulo ``2^bits``
    afterwards the sum is exactly that of the reduced masks, and the reduction is done once on the sum
    instead of once per mask. ``acc`` is uint32, or uint16 for a ring of at most 16 bits. Every keystream is
    read a block at a time (CTR mode continues the stream across calls) and added while that block of
    ``acc`` is in cache: no mask-sized array is ever allocated.
    """
    w = mask_word_bits(bits) // 8
    if (
        acc.dtype not in (np.uint16, np.uint32)
        or acc.itemsize < w
        or not acc.flags.c_contiguous
        or acc.ndim != 1
    ):
        raise SecAggError(
            f"masks of a {bits}-bit ring are added to a contiguous 1-D uint{8 * max(w, 2)} or wider array, "
            f"not {acc.dtype} {acc.shape}"
        )
    streams = [(_keystream(key), sign) for key, sign in masks]
    if any(sign not in (1, -1) for _, sign in streams):
        raise SecAggError("a mask's sign must be +1 or -1")
    n = len(acc)
    step = max(1, min(n, MASK_BLOCK_BYTES // w))
    zeros = memoryview(_zeros(w * step))
    buf = bytearray(w * step + 15)  # update_into wants room for one block more than the input
    words = np.frombuffer(buf, dtype=f"<u{w}", count=step)
    for lo in range(0, n, step):
        m = min(step, n - lo)
        part, x = acc[lo : lo + m], words[:m]
        for enc, sign in streams:
            enc.update_into(zeros[: w * m], buf)
            (np.add if sign > 0 else np.subtract)(part, x, out=part)


@lru_cache(maxsize=4)
def _zeros(nbytes: int) -> bytes:
    # the plaintext of the keystream; cached because every mask of a round has the same length
    return bytes(nbytes)
