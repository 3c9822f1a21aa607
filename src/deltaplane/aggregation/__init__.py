"""Aggregators: combine many client deltas into one global delta, streaming."""

from deltaplane.aggregation.base import Aggregator
from deltaplane.aggregation.fedavg import FedAvg

__all__ = ["Aggregator", "FedAvg"]
