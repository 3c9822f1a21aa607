"""Key agreement, key derivation and mask expansion — every primitive from ``cryptography``.

* X25519 Diffie–Hellman gives each pair of clients a shared secret the server cannot compute.
* HKDF-SHA256 turns it into independent keys, bound to the round and the pair by its ``info`` string, so no key
  is reused across rounds or purposes: 16-byte mask keys (:data:`MASK_KEY_BYTES`), 32-byte share-encryption keys.
* AES-128 in CTR mode expands a mask key into a mask of any length (a standard PRG: the keystream of a fresh key
  with a zero counter); each key encrypts exactly one stream, so the fixed nonce is safe. Since message version 4
  a mask is one 64-bit keystream word per lane word of packed ring values
  (:func:`~deltaplane.aggregation.secagg.ring.to_words`), reduced modulo the word's group. :func:`add_masks` adds
  or subtracts many such masks in place, a cache-sized block of every keystream at a time.
* AES-256-GCM encrypts the Shamir shares that travel through the server.

Why AES-128 for the masks (message version 3; version 2 used AES-256-CTR): the scheme's security level is
already set at about 128 bits by X25519 (RFC 7748 puts curve25519 at the ~128-bit level), which produces every
pairwise mask key, so a 128-bit mask key does not lower it; AES-128-CTR as a PRG is standard (NIST SP 800-90A's
CTR_DRBG is specified with AES-128), and one key drives at most 2^29 blocks (2^30 words of 8 bytes, each
holding at least 2 values), far from CTR's birthday bound of 2^64. The masks are most of a round's work and AES-128 runs 10 rounds to AES-256's 14:
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

__all__ = ["MASK_KEY_BYTES", "add_masks", "agree", "contributory", "derive", "expand_mask"]

#: bytes of a mask key: AES-128 (since message version 3)
MASK_KEY_BYTES = 16

#: keystream bytes per step of :func:`add_masks`: that block of keystream and of the sum stay in a core's L2
#: cache while every mask is added to it
MASK_BLOCK_BYTES = 1 << 17


#: CTR mode from a zero counter block: every mask key drives exactly one stream (one object for all of them)
_CTR_ZERO = modes.CTR(bytes(16))


def derive(secret: bytes, purpose: str, context: bytes, length: int = 32) -> bytes:
    """A ``length``-byte key for ``purpose`` bound to ``context`` (round id, client ids), via HKDF-SHA256."""
    info = b"deltaplane/secagg/" + purpose.encode() + b"/" + context
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 shared secret with the peer's raw 32-byte public key.

    Raises :class:`SecAggError` when ``peer_public`` is a low-order point (:func:`contributory`): a key that
    makes every agreement fail would otherwise surface as ``cryptography``'s bare ``ValueError``.
    """
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise SecAggError(
            "a peer's X25519 public key is a low-order point (no shared secret can be agreed with it); "
            "the key roster is refused"
        ) from None


#: any private key tells low-order points apart (see :func:`contributory`); made once, never a secret
_PROBE = X25519PrivateKey.generate()


def contributory(public: bytes) -> bool:
    """Whether X25519 agreements with the raw public key ``public`` can succeed (it is not a low-order point).

    X25519 clamps every private scalar to a multiple of the cofactor 8, so a point of order 1, 2, 4 or 8 (on
    the curve or its twist, in any encoding, e.g. all zeros) gives the all-zero shared secret with *every*
    private key, which ``cryptography`` refuses with ``ValueError`` (RFC 7748 §6.1). One agreement with any key
    therefore decides it for all of them. A device advertising such a key would make each of its neighbours'
    agreements, and the server's unmasking, fail.
    """
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return False
    return True


def _keystream(key: bytes) -> CipherContext:
    if len(key) != MASK_KEY_BYTES:  # AES would silently pick AES-192/256 and expand other masks
        raise SecAggError(f"a mask key has {MASK_KEY_BYTES} bytes (AES-128), not {len(key)}")
    return Cipher(algorithms.AES128(key), _CTR_ZERO).encryptor()


def expand_mask(key: bytes, count: int) -> np.ndarray:
    """The ``count`` little-endian 64-bit words (uint64) of the AES-128-CTR keystream of mask key ``key``.

    Since message version 4 the mask of lane word ``i`` (:func:`~deltaplane.aggregation.secagg.ring.to_words`)
    is keystream word ``i`` reduced modulo the word's group (``2^W``, a divisor of 2^64), so it is exactly
    uniform there; versions 2 and 3 masked each value with a 16- or 32-bit word of its own.
    """
    enc = _keystream(key)
    buf = bytearray(8 * count + 15)  # update_into wants room for one block more than the input
    enc.update_into(_zeros(8 * count), buf)
    return np.frombuffer(buf, dtype="<u8", count=count).astype(np.uint64)


def add_masks(acc: np.ndarray, masks: Iterable[tuple[bytes, int]]) -> None:
    """``acc += Σ sign · PRG(key)`` modulo 2^64, in place, for mask keys ``key``, sign ±1.

    ``acc`` holds lane words (contiguous 1-D uint64) and ``PRG(key)`` is :func:`expand_mask`'s keystream
    words: every word's group ``2^W`` divides 2^64, so reduced once at the end the sum is exactly that of the
    reduced masks. Every keystream is read a block at a time (CTR mode continues the stream across calls) and
    added while that block of ``acc`` is in cache: no mask-sized array is ever allocated.
    """
    if acc.dtype != np.uint64 or not acc.flags.c_contiguous or acc.ndim != 1:
        raise SecAggError(
            f"masks are added to a contiguous 1-D uint64 array of words, not {acc.dtype} {acc.shape}"
        )
    masks = list(masks)
    if any(sign not in (1, -1) for _, sign in masks):
        raise SecAggError("a mask's sign must be +1 or -1")
    # (write the next keystream block, add or subtract it): looked up once, called ~20 times per block
    streams = [(_keystream(key).update_into, np.add if sign > 0 else np.subtract) for key, sign in masks]
    n = len(acc)
    step = max(1, min(n, MASK_BLOCK_BYTES // 8))
    zeros = memoryview(_zeros(8 * step))
    buf = bytearray(8 * step + 15)  # update_into wants room for one block more than the input
    words = np.frombuffer(buf, dtype="<u8", count=step)
    for lo in range(0, n, step):
        m = min(step, n - lo)
        part, x, zero = acc[lo : lo + m], words[:m], zeros[: 8 * m]
        for update_into, op in streams:
            update_into(zero, buf)
            op(part, x, part)


@lru_cache(maxsize=4)
def _zeros(nbytes: int) -> bytes:
    # the plaintext of the keystream; cached because every mask of a round has the same length
    return bytes(nbytes)
