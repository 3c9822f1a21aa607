"""Non-IID partitioning of a labelled dataset across clients (label skew drawn from a Dirichlet prior).

Real fleets are not IID: one phone sees mostly 3s, another mostly 7s. The standard way to simulate this
(Hsu, Qi & Brown 2019, https://arxiv.org/abs/1909.06335) draws, for every class, the share of that class each
client receives from ``Dirichlet(alpha)``: small ``alpha`` gives clients that hold one or two classes, large
``alpha`` tends to an IID split.
"""

from __future__ import annotations

import numpy as np

from deltaplane.errors import ConfigError

__all__ = ["dirichlet_partition", "split_holdout"]

_MAX_DRAWS = 1000


def dirichlet_partition(
    labels: np.ndarray,
    n_clients: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Split the indices ``0..len(labels)-1`` among ``n_clients`` with Dirichlet(``alpha``) label skew.

    Every index lands in exactly one client, and every client holds at least ``min_size`` samples: the whole
    draw is repeated until that holds (a client with two samples cannot both train and hold data out).
    As in the reference implementation, a client that already holds its fair share ``N / n_clients`` gets
    no more of the next class, which keeps shard sizes from drifting far apart while keeping the skew.

    Args:
        labels: integer class labels, shape ``(N,)``.
        n_clients: number of shards to make.
        alpha: Dirichlet concentration, > 0; smaller means more skew.
        rng: the only source of randomness, so the split is reproducible.
        min_size: the least number of samples any client may hold.

    Returns:
        ``n_clients`` sorted index arrays.

    Raises:
        ConfigError: if the arguments are out of range or no draw meets ``min_size``.

    Example:
        >>> import numpy as np
        >>> labels = np.repeat(np.arange(10), 30)  # 300 samples, 10 classes
        >>> shards = dirichlet_partition(labels, 5, 0.5, np.random.default_rng(0), min_size=20)
        >>> sorted(np.concatenate(shards).tolist()) == list(range(300))  # each sample exactly once
        True
        >>> min(len(s) for s in shards) >= 20
        True
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n_clients < 1:
        raise ConfigError(f"n_clients must be at least 1. Found {n_clients}")
    if not alpha > 0:
        raise ConfigError(f"alpha must be positive. Found {alpha}")
    if min_size < 0 or min_size * n_clients > n:
        raise ConfigError(
            f"cannot give each of {n_clients} clients at least {min_size} of {n} samples; "
            "use fewer clients or a smaller min_size"
        )
    classes = np.unique(labels)
    fair_share = n / n_clients
    for _ in range(_MAX_DRAWS):
        shards: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(n_clients, alpha))
            full = np.array([len(s) >= fair_share for s in shards])
            p = np.where(full, 0.0, p)
            p = p / p.sum() if p.sum() > 0 else np.full(n_clients, 1.0 / n_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for shard, part in zip(shards, np.split(idx, cuts), strict=True):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) draw in {_MAX_DRAWS} gave all {n_clients} clients {min_size} samples; "
        "raise alpha or lower min_size"
    )


def split_holdout(
    indices: np.ndarray, holdout_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's ``indices`` into (local train, held-out), at least one sample in each part.

    The held-out part measures how well a model serves *this* client's data, which a global test set with
    every class in equal measure hides under label skew.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ConfigError(f"holdout_fraction must be in (0, 1). Found {holdout_fraction}")
    indices = np.asarray(indices)
    if len(indices) < 2:
        raise ConfigError(f"a client needs at least 2 samples to hold one out. Found {len(indices)}")
    perm = rng.permutation(indices)
    n_hold = min(max(1, round(len(indices) * holdout_fraction)), len(indices) - 1)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])
