"""Shamir t-of-n secret sharing over the prime field GF(2⁵²¹ − 1), for 32-byte seeds and keys.

Hand-written on purpose: ``cryptography`` (our source for every primitive) has no secret sharing, and the
maintained Python packages that do either work over GF(256) byte-wise with unaudited code or pull large
dependency trees. Shamir's scheme is ~30 lines of modular arithmetic with no side channel that matters in this
setting (shares are generated and combined by honest parties; the server sees at most ``t − 1`` shares of any
secret it may not learn), so writing it here is the smaller risk. The field is the Mersenne prime
``2⁵²¹ − 1``, large enough to hold any 64-byte secret, so a 32-byte X25519 key or PRG seed is one field element.

Shamir 1979, "How to Share a Secret" (https://dl.acm.org/doi/10.1145/359168.359176).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence

from deltaplane.errors import DecodeError, DeltaplaneError

__all__ = [
    "PRIME",
    "SHARE_BYTES",
    "ShareMismatch",
    "combine",
    "lagrange_at",
    "lagrange_at_zero",
    "share_from_bytes",
    "share_to_bytes",
    "split",
]

PRIME = (1 << 521) - 1


class ShareMismatch(DeltaplaneError):
    """More shares than the threshold arrived and they do not agree: at least one is corrupted."""


SHARE_BYTES = 66  # ceil(521 / 8)


def split(
    secret: bytes,
    *,
    threshold: int,
    xs: Sequence[int],
    randbytes: Callable[[int], bytes] = secrets.token_bytes,
) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` for the nonzero points ``xs``; any ``threshold`` of them recover it."""
    if len(secret) > 64:
        raise DeltaplaneError(f"secret of {len(secret)} bytes does not fit the field (at most 64)")
    if not 1 <= threshold <= len(xs):
        raise DeltaplaneError(f"threshold must be in [1, {len(xs)}]. Found {threshold}")
    if any(x % PRIME == 0 for x in xs) or len(set(xs)) != len(xs):
        raise DeltaplaneError("share points must be distinct and nonzero")
    pool = randbytes(SHARE_BYTES * (threshold - 1))  # one draw for every random coefficient
    coeffs = [int.from_bytes(secret, "big")] + [
        int.from_bytes(pool[i : i + SHARE_BYTES], "big") % PRIME for i in range(0, len(pool), SHARE_BYTES)
    ]
    rev = coeffs[::-1]
    # Horner without a reduction per step when the points are small (client id + 1): ``y`` then grows by a few
    # bits a step and one ``% PRIME`` at the end gives the same value; large points reduce every step
    lazy = (threshold - 1) * max(x.bit_length() for x in xs) <= _LAZY_BITS
    out = {}
    for x in xs:
        y = 0
        if lazy:
            for c in rev:
                y = y * x + c
        else:
            for c in rev:
                y = (y * x + c) % PRIME
        out[x] = y % PRIME
    return out


#: growth in bits (over the field's 521) that :func:`split`'s Horner accumulator may reach unreduced
_LAZY_BITS = 2048


def lagrange_at_zero(xs: Sequence[int]) -> dict[int, int]:
    """Lagrange coefficients ``λⱼ`` with ``f(0) = Σ λⱼ f(xⱼ)``; reused for every secret shared at the same points."""
    return lagrange_at(xs, 0)


def lagrange_at(xs: Sequence[int], at: int) -> dict[int, int]:
    """Lagrange coefficients ``λⱼ`` with ``f(at) = Σ λⱼ f(xⱼ)`` for any polynomial of degree < ``len(xs)``.

    ``λⱼ = Πₘ≠ⱼ (xₘ − at) / Πₘ≠ⱼ (xₘ − xⱼ)``. Share points are small integers (client id + 1), so numerators and
    denominators are computed exactly as integers, brought to the common denominator ``L`` (their least common
    multiple) and reduced with a single modular inversion of ``L`` instead of one per point: the same field
    elements, a few times faster (one ``pow(·, −1, p)`` on a 521-bit modulus costs as much as the rest).
    """
    xs = list(xs)
    if len(set(xs)) != len(xs):
        raise DeltaplaneError("share points must be distinct")
    if at in xs:  # f(at) is that share itself
        return {j: int(j == at) for j in xs}
    total = math.prod(m - at for m in xs)
    dens = [math.prod(m - j for m in xs if m != j) for j in xs]
    common = math.lcm(*dens)
    if common % PRIME == 0:  # points equal modulo the prime: no polynomial through them
        raise DeltaplaneError("share points must be distinct modulo the field's prime")
    inv = pow(common, -1, PRIME)
    # total // (j - at): the product without xⱼ's factor (exact); common // den: exact, sign kept
    return {j: total // (j - at) * (common // den) * inv % PRIME for j, den in zip(xs, dens, strict=True)}


def combine(
    shares: dict[int, int],
    *,
    threshold: int,
    size: int = 32,
    lam: dict[int, int] | None = None,
    check: dict[int, int] | None = None,
) -> bytes:
    """Recover the ``size``-byte secret from at least ``threshold`` shares ``{x: y}``.

    The secret comes from the ``threshold`` lowest points. With one share more, that share must lie on the
    polynomial those points define, else :class:`ShareMismatch`: a single corrupted share among the points
    used would otherwise give a wrong secret silently (if the corrupted share is the extra one, it disagrees
    itself). ``lam`` and ``check`` are cached :func:`lagrange_at_zero` and :func:`lagrange_at` coefficients.
    """
    if len(shares) < threshold:
        raise DeltaplaneError(f"{len(shares)} shares cannot recover a secret with threshold {threshold}")
    points = sorted(shares)
    xs = points[:threshold]
    if len(points) > threshold:
        extra = points[threshold]
        mu = check if check is not None and set(check) == set(xs) else lagrange_at(xs, extra)
        if sum(mu[x] * shares[x] for x in xs) % PRIME != shares[extra]:
            raise ShareMismatch(
                f"the shares at points {points[: threshold + 1]} do not lie on one polynomial of degree "
                f"{threshold - 1}: some share is corrupted"
            )
    lam = lam if lam is not None and set(lam) == set(xs) else lagrange_at_zero(xs)
    secret = sum(lam[x] * shares[x] for x in xs) % PRIME
    if secret >= 1 << (8 * size):
        raise DeltaplaneError("shares are inconsistent: the recovered value does not fit the secret size")
    return secret.to_bytes(size, "big")


def share_to_bytes(y: int) -> bytes:
    """Fixed-width big-endian encoding of one share value."""
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """Inverse of :func:`share_to_bytes`, strict on length and range."""
    if len(data) != SHARE_BYTES:
        raise DecodeError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise DecodeError("share value out of the field")
    return y
