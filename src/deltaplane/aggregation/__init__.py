"""Aggregators: combine many client deltas into one global delta, streaming and composable by wrapping.

``Validate(FedAdam(DPFedAvg(Clip(FedAvg(), clip="adaptive"), ...)))`` reads inside-out like the math. Secure
aggregation lives in :mod:`deltaplane.aggregation.secagg` (it needs ``cryptography``); privacy accounting in
:mod:`deltaplane.aggregation.accounting` (it needs ``dp-accounting``, imported only when ε is computed).
"""

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
    CoordinateMedian,
    FLTrust,
    FoolsGold,
    FoolsGoldState,
    Krum,
    SignVote,
    TrimmedMean,
)
from deltaplane.aggregation.sampling import clients_per_round, sample_round, sampling_rate
from deltaplane.aggregation.validation import Rejection, Validate, validate_update

__all__ = [
    "FLAME",
    "Aggregator",
    "AggregatorWrapper",
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
