"""The sizes of distributed DP, arithmetic only: the noise each device adds under SecAgg and the ring range that
never clips it.

Apart from :mod:`deltaplane.aggregation.dp` (which needs torch) because a federation file's check
(:class:`~deltaplane.engine.RunConfig`: ``secagg_range`` against its least value) needs these numbers, and
reading a federation file must not load torch (``fleet coordinate``, ``fleet enroll``).
"""

from __future__ import annotations

import math

__all__ = ["RING_RANGE_SIGMAS", "distributed_noise_std", "distributed_ring_range"]


def distributed_noise_std(noise_multiplier: float, clip: float, min_contributors: int) -> float:
    """σ_d = z·C/√m_min: the Gaussian noise std each device adds under SecAgg, so that the sum of at least
    ``min_contributors`` devices' noise has std ≥ z·C, what central DP-FedAvg adds to the clipped sum."""
    return noise_multiplier * clip / math.sqrt(min_contributors)


#: how many of a device's noise stds the SecAgg ring range leaves beyond the clip (see distributed_ring_range)
RING_RANGE_SIGMAS = 6.0


def distributed_ring_range(clip: float, device_noise_std: float) -> float:
    """The least SecAgg ring range (``secagg_range``) under distributed DP: C + 6·σ_d, rounded up to two
    decimals (the number quoted to users, and checked, is one that passes when given back).

    A device's values are clipped to L2 norm C (so each is within ±C) and then noised with N(0, σ_d²) before
    SecAgg encodes them into the ring, whose range clip acts per device, *before* the sum: it is not
    post-processing of the noised sum, and the Gaussian accounting holds only while it does not bind. Beyond
    C + 6σ_d a value lands with probability about 2·10⁻⁹ (the Gaussian tail at 6σ), so the clip essentially
    never binds."""
    return math.ceil((clip + RING_RANGE_SIGMAS * device_noise_std) * 100 - 1e-9) / 100
