"""The public parameters a round is opened and reported with, from the run config alone (no torch).

A fleet coordinator (``deltaplane fleet coordinate``) states them for every round it opens without building the
task: the neighbouring relation its ε is stated under (:func:`dp_adjacency`), the SecAgg+ degree
(:func:`secure_neighbours`) and SecAgg's public weight scale
(:func:`secure_weight_scale`, from the devices' example counts, which ``fleet init`` records in the registry).
Every other driver reads the same functions (:mod:`deltaplane.engine.scoring` and
:mod:`deltaplane.engine.secure` re-export them), so they mean the same on each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from deltaplane.aggregation.accounting import ADD_REMOVE, REPLACE_ONE, ZERO_OUT

if TYPE_CHECKING:
    from deltaplane.engine.config import RunConfig

__all__ = ["dp_adjacency", "secure_neighbours", "secure_weight_scale"]


def dp_adjacency(config: RunConfig) -> str | None:
    """The neighbouring relation the run's ε is stated under, shown and stored beside it (None without DP).

    Local DP (``local_dp_noise``): replace-one (each device's own ε against any change of its data). Central
    DP (``dp_noise``): add/remove one client. Distributed DP (``dp_noise`` with ``secagg``): zero-out, the
    device's data replaced by none while it still takes part, since removing a device would also remove its
    noise share from the sum (:data:`~deltaplane.aggregation.accounting.ZERO_OUT`). The chain's own label
    (:attr:`~deltaplane.aggregation.dp.DPFedAvg.adjacency`) agrees: ``tests/aggregation/test_dp_adjacency.py``."""
    if config.local_dp_noise > 0:
        return REPLACE_ONE
    if config.dp_noise > 0:
        return ZERO_OUT if config.secagg else ADD_REMOVE
    return None


def secure_weight_scale(config: RunConfig, num_samples: Sequence[int]) -> float:
    """The public weight scale of a SecAgg round whose sampled devices hold ``num_samples`` examples: their
    mean (an example-weighted mean, as plain FedAvg), or 0 (an unweighted mean) under distributed DP, where,
    as in DP-FedAvg, every device weighs 1 so that one device moves the sum by at most ``clip``."""
    if config.dp_noise > 0:
        return 0.0
    return float(np.mean([int(n) for n in num_samples]))


def secure_neighbours(config: RunConfig, num_inputs: int) -> int | None:
    """The SecAgg+ degree of a round with ``num_inputs`` secure inputs (None: the complete graph): the run's
    ``secagg_neighbours`` for that round's size (:func:`~deltaplane.aggregation.secagg.round_neighbours`).
    Every driver opens its rounds with it: in process, the HTTP simulation, the fleet coordinator, Flower."""
    from deltaplane.aggregation.secagg import round_neighbours

    return round_neighbours(config.secagg_neighbours, num_inputs)
