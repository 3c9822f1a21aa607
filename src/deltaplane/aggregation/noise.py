"""Gaussian noise for differential privacy drawn from the operating system's CSPRNG.

Why not a seeded ``torch.Generator``: DP noise protects only while nobody can reproduce it. A generator seeded
from the run's config seed (public: every device and the server read the config) lets anyone who knows the
config subtract the noise exactly. Seeding a Mersenne Twister from a secret would not be enough either: its
outputs are published (the noisy aggregate), and MT19937's state can be recovered from its outputs.

What Opacus does in ``secure_mode``: it draws its noise from ``torchcsprng``'s random-device generator
(AES-CTR keyed from ``/dev/urandom``). ``torchcsprng`` is not installed here (and is unmaintained), so this module
follows the same principle with the standard library: uniform doubles come from :func:`os.urandom` (the
kernel's CSPRNG, via :func:`secrets`' source) and the Box–Muller transform turns them into standard normals.
Every draw reads fresh kernel entropy, so there is no generator state to recover, checkpoint or reuse across a
restart. (Opacus also sums several draws to blunt floating-point attacks on the noise's low bits
(Mironov 2012); deltaplane adds float64 noise and releases float32 tensors, which rounds those bits away.)
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

__all__ = ["secure_normal", "secure_randn"]

_TWO53 = float(1 << 53)


def _uniform_open(n: int) -> np.ndarray:
    """``n`` uniform doubles in (0, 1] from 53 random bits each of the kernel CSPRNG."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (bits.astype(np.float64) + 1.0) / _TWO53


def secure_randn(shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A float64 tensor of ``shape`` with i.i.d. N(0, 1) entries from the OS CSPRNG (Box–Muller)."""
    n = math.prod(shape)
    pairs = (n + 1) // 2
    u1, u2 = _uniform_open(pairs), _uniform_open(pairs)
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * math.pi * u2), r * np.sin(2 * math.pi * u2)])[:n]
    return torch.from_numpy(z.copy()).reshape(shape)


def secure_normal(std: float) -> float:
    """One draw of N(0, std²) from the OS CSPRNG."""
    return float(secure_randn((1,))[0]) * std
