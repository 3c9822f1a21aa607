"""The in-process federated simulator: non-IID digits, a small CNN, clients with compressors, FedAvg rounds."""

from deltaplane.sim.client import Client, make_clients
from deltaplane.sim.config import RunConfig
from deltaplane.sim.model import DigitsCNN, accuracy, build_model
from deltaplane.sim.simulation import RoundMetrics, RunResult, run_simulation, sample_clients

__all__ = [
    "Client",
    "DigitsCNN",
    "RoundMetrics",
    "RunConfig",
    "RunResult",
    "accuracy",
    "build_model",
    "make_clients",
    "run_simulation",
    "sample_clients",
]
