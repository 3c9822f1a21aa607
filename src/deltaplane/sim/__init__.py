"""The in-process drivers over the engine: sequential, batched (stacked clients) and population (10k)."""

from deltaplane.data.models import DigitsCNN, build_model
from deltaplane.engine import (
    Client,
    RoundMetrics,
    RunConfig,
    RunResult,
    accuracy,
    make_clients,
    sample_clients,
)
from deltaplane.sim.simulation import run_simulation

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
