"""Which clients take part in a round: one rule for every driver, matching what the privacy accountant composes.

:class:`~deltaplane.aggregation.accounting.PrivacyAccountant` composes the *Poisson-subsampled* Gaussian
mechanism: each client joins each round independently with probability ``q``. That ε is only valid if the round's
participants really are drawn that way — a fixed-size subset (sampling without replacement) is a different
mechanism, for which the Poisson figure is not a bound under add/remove-one adjacency. So with central DP,
:func:`sample_round` samples Poisson at exactly the accountant's rate ``q = m / N``; the number of participants
then varies from round to round (and may be zero: the DP aggregator still releases that round's noise), and
DP-FedAvg divides by the fixed ``m``. Without central DP (no DP, or local DP, whose ε counts each device's actual
releases and holds for any sampling) a round has exactly ``m`` clients, drawn without replacement.
"""

from __future__ import annotations

import numpy as np

from deltaplane.errors import ConfigError

__all__ = ["clients_per_round", "sample_round", "sampling_rate"]


def clients_per_round(n_clients: int, fraction: float) -> int:
    """``m = max(1, round(fraction · n_clients))``: the size of a round (its expected size under Poisson)."""
    if not (isinstance(n_clients, int) and n_clients >= 1):
        raise ConfigError(f"n_clients must be a positive integer. Found {n_clients!r}")
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1]. Found {fraction!r}")
    return max(1, min(n_clients, round(fraction * n_clients)))


def sampling_rate(n_clients: int, fraction: float) -> float:
    """``q = m / N``: the probability that a given client is in a round, the rate the accountant composes."""
    return clients_per_round(n_clients, fraction) / n_clients


def sample_round(n_clients: int, fraction: float, rng: np.random.Generator, *, central_dp: bool) -> list[int]:
    """The sorted ids of the clients in one round.

    Args:
        n_clients: the population ``N``.
        fraction: the requested share of clients per round (rounded to ``m / N``, see :func:`sampling_rate`).
        rng: this round's generator (drivers derive one per round, so runs repeat).
        central_dp: True when the server adds DP noise: sample Poisson at ``q = m / N``, as the accountant
            assumes; False: exactly ``m`` clients without replacement.

    Example:
        >>> import numpy as np
        >>> sample_round(10, 0.3, np.random.default_rng(0), central_dp=False)
        [5, 6, 9]
        >>> [len(sample_round(10, 0.3, np.random.default_rng(s), central_dp=True)) for s in range(6)]
        [3, 2, 6, 5, 2, 4]
    """
    m = clients_per_round(n_clients, fraction)
    if central_dp:
        if m == n_clients:
            return list(range(n_clients))
        return [int(i) for i in np.flatnonzero(rng.random(n_clients) < m / n_clients)]
    if m == n_clients:
        return list(range(n_clients))
    return sorted(int(i) for i in rng.choice(n_clients, size=m, replace=False))
