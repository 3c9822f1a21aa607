"""Aggregators: combine many client deltas into one global delta, streaming and composable by wrapping.

``Validate(FedAdam(DPFedAvg(Clip(FedAvg(), clip="adaptive"), ...)))`` reads inside-out like the math. Secure
aggregation lives in :mod:`deltaplane.aggregation.secagg` (it needs ``cryptography``); privacy accounting in
:mod:`deltaplane.aggregation.accounting` (it needs ``dp-accounting``, imported only when ε is computed).

Its public names load on first use (:mod:`deltaplane.lazy`): importing a submodule that needs no torch (the
enrollment's keys and certificates, which ``fleet enroll`` and ``keys`` use) must not import every aggregator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltaplane.lazy import lazy_attributes

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load lazily (below)
    from deltaplane.aggregation.accounting import (
        PrivacyAccountant,
        PrivacyAccountantState,
        epsilon_for,
        noise_for_epsilon,
    )
    from deltaplane.aggregation.base import Aggregator, AggregatorWrapper
    from deltaplane.aggregation.clipping import Clip, ClipEstimator, ConstantClip, NormBound, QuantileClip
    from deltaplane.aggregation.dp import DPFedAvg, DPState, local_epsilon, privatize
    from deltaplane.aggregation.factory import build_aggregator, check_defense_codec, parse_defense
    from deltaplane.aggregation.fedavg import FedAvg
    from deltaplane.aggregation.fedopt import (
        FedAdagrad,
        FedAdam,
        FedAvgM,
        FedOpt,
        FedYogi,
        ServerOptimizerState,
        ServerSGD,
    )
    from deltaplane.aggregation.robust import (
        FLAME,
        CenteredClip,
        CenteredClipState,
        CoordinateMedian,
        FLTrust,
        FoolsGold,
        FoolsGoldState,
        GeometricMedian,
        Krum,
        SignVote,
        TrimmedMean,
    )
    from deltaplane.aggregation.sampling import clients_per_round, sample_round, sampling_rate
    from deltaplane.aggregation.validation import Rejection, Validate, validate_update

_LAZY = {
    "Aggregator": "deltaplane.aggregation.base",
    "AggregatorWrapper": "deltaplane.aggregation.base",
    "build_aggregator": "deltaplane.aggregation.factory",
    "check_defense_codec": "deltaplane.aggregation.factory",
    "clients_per_round": "deltaplane.aggregation.sampling",
    "Clip": "deltaplane.aggregation.clipping",
    "ClipEstimator": "deltaplane.aggregation.clipping",
    "ConstantClip": "deltaplane.aggregation.clipping",
    "CenteredClip": "deltaplane.aggregation.robust",
    "CenteredClipState": "deltaplane.aggregation.robust",
    "CoordinateMedian": "deltaplane.aggregation.robust",
    "DPFedAvg": "deltaplane.aggregation.dp",
    "DPState": "deltaplane.aggregation.dp",
    "epsilon_for": "deltaplane.aggregation.accounting",
    "FedAdagrad": "deltaplane.aggregation.fedopt",
    "FedAdam": "deltaplane.aggregation.fedopt",
    "FedAvg": "deltaplane.aggregation.fedavg",
    "FedAvgM": "deltaplane.aggregation.fedopt",
    "FedOpt": "deltaplane.aggregation.fedopt",
    "FedYogi": "deltaplane.aggregation.fedopt",
    "FLAME": "deltaplane.aggregation.robust",
    "FLTrust": "deltaplane.aggregation.robust",
    "FoolsGold": "deltaplane.aggregation.robust",
    "FoolsGoldState": "deltaplane.aggregation.robust",
    "GeometricMedian": "deltaplane.aggregation.robust",
    "Krum": "deltaplane.aggregation.robust",
    "local_epsilon": "deltaplane.aggregation.dp",
    "noise_for_epsilon": "deltaplane.aggregation.accounting",
    "NormBound": "deltaplane.aggregation.clipping",
    "parse_defense": "deltaplane.aggregation.factory",
    "PrivacyAccountant": "deltaplane.aggregation.accounting",
    "PrivacyAccountantState": "deltaplane.aggregation.accounting",
    "privatize": "deltaplane.aggregation.dp",
    "QuantileClip": "deltaplane.aggregation.clipping",
    "Rejection": "deltaplane.aggregation.validation",
    "sample_round": "deltaplane.aggregation.sampling",
    "sampling_rate": "deltaplane.aggregation.sampling",
    "ServerOptimizerState": "deltaplane.aggregation.fedopt",
    "ServerSGD": "deltaplane.aggregation.fedopt",
    "SignVote": "deltaplane.aggregation.robust",
    "TrimmedMean": "deltaplane.aggregation.robust",
    "Validate": "deltaplane.aggregation.validation",
    "validate_update": "deltaplane.aggregation.validation",
}

__all__ = [
    "FLAME",
    "Aggregator",
    "AggregatorWrapper",
    "CenteredClip",
    "CenteredClipState",
    "Clip",
    "ClipEstimator",
    "ConstantClip",
    "CoordinateMedian",
    "DPFedAvg",
    "DPState",
    "FLTrust",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedOpt",
    "FedYogi",
    "FoolsGold",
    "FoolsGoldState",
    "GeometricMedian",
    "Krum",
    "NormBound",
    "PrivacyAccountant",
    "PrivacyAccountantState",
    "QuantileClip",
    "Rejection",
    "ServerOptimizerState",
    "ServerSGD",
    "SignVote",
    "TrimmedMean",
    "Validate",
    "build_aggregator",
    "check_defense_codec",
    "clients_per_round",
    "epsilon_for",
    "local_epsilon",
    "noise_for_epsilon",
    "parse_defense",
    "privatize",
    "sample_round",
    "sampling_rate",
    "validate_update",
]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
