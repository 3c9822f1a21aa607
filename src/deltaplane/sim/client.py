"""Simulated devices are built by the engine (:mod:`deltaplane.engine.federation`); re-exported here."""

from deltaplane.engine.federation import Client, make_clients
from deltaplane.engine.metrics import evaluate_clients, round_scores

__all__ = ["Client", "evaluate_clients", "make_clients", "round_scores"]
